"""Seconds per evaluation chunk (`arith_jax.evaluate.solve_prompts`, as `run.py arith eval` decodes a grid cell) and
the compile time of its decoding program, with a trained model.

    python benchmarks/arith_eval_chunk.py [--checkpoint arith_jax/pretrained/add_long_avg] [--cell 60 60]
                                          [--rows 256] [--rounds 3]

Draws `--rows` problems of one cell (seed 1234, as `eval`), decodes them as one chunk of `--rows` rows (cached,
stopping at EOS), first in a fresh process (compilation included), then `--rounds` more times. Prints the compile
time JAX reports (tracing, lowering and XLA compilation of every program compiled by the first call), the first
call's wall time, the median of the others, and the exact-match accuracy. Run it on the code before and after a
change (e.g. from a `git archive` of the old commit, with PYTHONPATH set to it) to compare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from arith_jax import evaluate  # noqa: E402
from arith_jax.solver import Solver  # noqa: E402
from common import machine_line  # noqa: E402

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="arith_jax/pretrained/add_long_avg")
    ap.add_argument("--task", default="add")
    ap.add_argument("--cell", type=int, nargs=2, default=[60, 60])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    solver = Solver.load(args.checkpoint)
    prompts, targets = evaluate.cell_problems(args.task, *args.cell, args.rows, 1234)
    budgets = [len(t) for t in targets]
    compile_s = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, sec, **kw: compile_s.append(sec) if event in _COMPILE_EVENTS else None)

    def run():
        start = time.perf_counter()
        gens = evaluate.solve_prompts(solver.model, solver.params, prompts, budgets, batch_size=args.rows)
        return time.perf_counter() - start, gens

    first, gens = run()
    compiled = sum(compile_s)
    times = [run()[0] for _ in range(args.rounds)]
    exact = np.mean([evaluate.exact_match(g[None], [t])[0] for g, t in zip(gens, targets)])
    print(f"machine: {machine_line()}")
    print(f"{args.checkpoint}, cell {args.cell[0]} x {args.cell[1]}, one chunk of {args.rows} rows: compile "
          f"{compiled:.2f} s, first call {first:.2f} s, then median {statistics.median(times):.2f} s "
          f"({', '.join(f'{t:.2f}' for t in times)}); exact match {exact:.4f}")


if __name__ == "__main__":
    main()
