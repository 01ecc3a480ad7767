"""Host-side batch building (`arith_jax.data.make_batch`): milliseconds per batch with each sampler.

    python benchmarks/arith_data.py [--batch 512] [--repeat 50]

The training loop builds the next batch on the host while the device runs the current step, so where building takes
longer than the step (a small model on a GPU) it sets the pace: `data_wait_s` in a run's metrics.jsonl.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from arith_jax.data import DataConfig, make_batch  # noqa: E402
from common import machine_line  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    print(f"machine: {machine_line()}")
    print("| task | operand digits | batch | sampler rows (ms) | sampler batch (ms) | speed-up |")
    print("|---|---|---|---|---|---|")
    for task, max_len in (("add", 10), ("add", 20), ("mul", 15)):
        ms = {}
        for sampler in ("rows", "batch"):
            cfg = DataConfig(task, max_len=max_len, batch_size=args.batch, sampler=sampler)
            make_batch(cfg, 0)
            t = time.perf_counter()
            for step in range(args.repeat):
                make_batch(cfg, step)
            ms[sampler] = (time.perf_counter() - t) / args.repeat * 1e3
        print(f"| {task} | 1–{max_len} | {args.batch} | {ms['rows']:.2f} | {ms['batch']:.2f} | "
              f"{ms['rows'] / ms['batch']:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
