"""Generator throughput: samples/s on one core, and the multi-process stream's scaling.

Run: python benchmarks/sr_generator.py [--n 400]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sr_jax.generator import GeneratorConfig, sample_stream  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400)
    args = ap.parse_args(argv)
    cfg = GeneratorConfig()
    rows = []
    for workers in sorted({1, 2, os.cpu_count() or 1}):
        stream = sample_stream(cfg, seed=0, n_workers=workers, stop=args.n + 8 * workers)
        for _ in range(8 * workers):  # warm-up: worker start-up and imports are not counted
            next(stream)
        t0 = time.perf_counter()
        n = sum(1 for _ in stream)
        dt = time.perf_counter() - t0
        rows.append((workers, n / dt))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"date {datetime.date.today().isoformat()}")
    print(f"command: python benchmarks/sr_generator.py --n {args.n}")
    print("| workers | samples/s | samples/s per worker | scaling vs 1 |")
    print("|---|---|---|---|")
    for w, r in rows:
        print(f"| {w} | {r:.0f} | {r / w:.0f} | {r / rows[0][1]:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
