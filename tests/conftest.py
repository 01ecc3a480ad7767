"""Test-session settings: one JAX persistent compilation cache per test session, and `--cpu-durations=N`.

The README runs the suite on two worker processes (`-n 2`, pytest-xdist, whole files per worker with
`--dist loadfile`); the workers share the session's compilation cache.

Several tests compile the very same XLA program in separate `jax.jit` objects (every `run_training` call builds its
own train step; the CLI tests train and load again in-process). A compilation cache in a fresh temporary folder,
created here for this session only and removed at its end, lets the second and later compilations of an identical
program in this process load the first one's executable instead of compiling it again. It starts empty, so a clean
clone (CI) gets the same saving, and nothing outside the session is read or written. Subprocesses are left alone:
`run.py` children use the cache `run.py` picks for itself, as they would without these tests.

What the tests check is unchanged: the library's own compile counters (`sr_jax.interpreter.COMPILE_COUNTER`,
`arith_jax.decode.compiled_programs`) count traces, which happen with or without the cache, and no test reads JAX's
cache settings except to see that the library leaves them as they were. `MATHFORMERS_TEST_NO_CACHE=1` turns the
cache off (e.g. to time cold compilations).

`--cpu-durations=N` lists the N tests that used the most CPU seconds (this process and its finished subprocesses),
a cost that a busy machine inflates much less than wall-clock `--durations`. It reports from the process that runs
the tests, so use it without `-n` (or with `-n 0`).
"""
import os
import resource
import shutil
import tempfile
import time

import pytest

# Compilation, not running, is most of this suite's time on CPU, and the tests check what programs compute (equal
# outputs, gradients, shapes, messages), not how fast. So the whole session -- this process, its xdist workers and
# the `run.py` subprocesses that inherit the environment -- compiles with JAX's `jax_disable_most_optimizations`
# (XLA backend optimisation level 0, no expensive LLVM passes; BENCHMARKS.md, "Test suite: two workers" has the
# time it saves). It is one setting for the whole session because comparisons between programs compiled at different
# levels are not bit-exact (a few Adam steps amplify the rounding). `MATHFORMERS_TEST_XLA_OPTIMIZED=1` runs the suite
# with JAX's default optimisations instead.
if not os.environ.get("MATHFORMERS_TEST_XLA_OPTIMIZED"):
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    import jax as _jax

    _jax.config.update("jax_disable_most_optimizations", True)  # in case JAX was imported before this file

_SHARED_CACHE_VAR = "MATHFORMERS_TEST_JAX_CACHE"  # set by the process that created the folder, read by xdist workers

if not os.environ.get("MATHFORMERS_TEST_NO_CACHE"):
    _CACHE = os.environ.get(_SHARED_CACHE_VAR)
    _OWNER = _CACHE is None  # the pytest process that made the folder removes it; its xdist workers only use it
    if _OWNER:
        _CACHE = tempfile.mkdtemp(prefix="mathformers-test-jax-cache-")
        os.environ[_SHARED_CACHE_VAR] = _CACHE  # inherited by the xdist workers started after this import

    import jax

    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # the programs worth a disk round trip
    # A size limit switches on JAX's file lock around every cache read and write, so that several xdist workers can
    # share the folder without one reading an entry another is still writing.
    jax.config.update("jax_compilation_cache_max_size", 8 << 30)

    def pytest_unconfigure(config):
        if _OWNER:
            shutil.rmtree(_CACHE, ignore_errors=True)


# ----- `--cpu-durations=N`: the N tests that used the most CPU seconds ------------------------------------------------
# CPU time of this process (all its threads) plus its finished subprocesses, per test (setup + call + teardown). On
# a machine shared with other jobs, wall-clock durations (--durations) grow with the load; CPU seconds much less.
_CPU_ROWS = []


def pytest_addoption(parser):
    parser.addoption("--cpu-durations", type=int, default=None, metavar="N",
                     help="report the N tests that used the most CPU seconds (0: all)")


def _cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = _cpu_seconds()
    yield
    _CPU_ROWS.append((_cpu_seconds() - start, item.nodeid))


def pytest_terminal_summary(terminalreporter, config):
    n = config.getoption("--cpu-durations")
    if n is None or not _CPU_ROWS:
        return
    rows = sorted(_CPU_ROWS, reverse=True)
    terminalreporter.write_sep("=", f"CPU seconds per test: {sum(r[0] for r in rows):.1f} in all")
    for seconds, nodeid in rows[:n or None]:
        terminalreporter.write_line(f"{seconds:8.1f}s  {nodeid}")
