#!/usr/bin/env python
"""Command-line entry point: `python run.py arith ...` (Abacus arithmetic) and `python run.py sr ...`."""

import sys


def main() -> int:
    packages = {"arith": "arith_jax.cli"}
    if len(sys.argv) < 2 or sys.argv[1] not in packages:
        print(f"usage: python run.py {{{','.join(packages)}}} COMMAND [options]  (try: python run.py arith -h)",
              file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(packages[sys.argv[1]]).main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
