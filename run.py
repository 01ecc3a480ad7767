#!/usr/bin/env python
"""Command-line entry point: `python run.py arith ...` (Abacus arithmetic) and `python run.py sr ...`."""

import os
import sys


def main() -> int:
    packages = {"arith": "arith_jax.cli", "sr": "sr_jax.cli"}
    if len(sys.argv) < 2 or sys.argv[1] not in packages:
        asked = sys.argv[1:2] in (["-h"], ["--help"])
        print(f"usage: python run.py {{{','.join(packages)}}} COMMAND [options]\n"
              "  arith  addition, multiplication and sorting with Abacus embeddings (train, eval, solve, export)\n"
              "  sr     symbolic regression (fit, bench, train, eval, describe, export)\n"
              "each package's commands: python run.py arith -h, python run.py sr -h",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    import importlib

    if "JAX_COMPILATION_CACHE_DIR" not in os.environ and not os.environ.get("MATHFORMERS_NO_COMPILE_CACHE"):
        # command-line runs reuse compiled programs across processes (a resumed training run, repeated fits);
        # this process is ours, so setting JAX's cache here changes no library user's settings
        cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mathformers-jax",
                             "xla")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    return importlib.import_module(packages[sys.argv[1]]).main(sys.argv[2:])


if __name__ == "__main__":
    status = main() or 0
    if status != 0:
        # an error (its one line is printed) or a signal (the checkpoint is saved): end here without the
        # interpreter's teardown, which can crash (SIGSEGV instead of 128+signal) while XLA threads still compile,
        # and in which reads a failed checkpoint restore left outstanding can still report to stderr
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
