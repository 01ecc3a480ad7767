"""Greedy decoding throughput (problems/s) with and without the KV cache, at given operand lengths.

    python benchmarks/arith_decode.py --config configs/arith_add_small.yaml --lengths 20 100 --batch 64

The model is randomly initialised (throughput does not depend on the weights) and always generates the full
answer length (no early stop at EOS), so both modes do the same number of steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from arith_jax.config import ArithConfig  # noqa: E402
from arith_jax.data import answer_length, make_eval_cell  # noqa: E402
from arith_jax.decode import greedy_decode  # noqa: E402
from arith_jax.train import build_model  # noqa: E402
from common import machine_line, timeit  # noqa: E402
from core_jax.config import load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/arith_add_small.yaml")
    ap.add_argument("--lengths", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(ArithConfig, args.config, ["model.table_size=512", *args.set])
    model = build_model(cfg)
    params = model.init(jax.random.PRNGKey(0))
    print(f"machine: {machine_line()}")
    print(f"config: {args.config} {' '.join(args.set)} (table_size 512), batch {args.batch}")
    print("| digits | cached problems/s | uncached problems/s | speed-up |")
    print("|---|---|---|---|")
    for n in args.lengths:
        prompts, _ = make_eval_cell(cfg.data.task, n, n, args.batch, seed=0)
        new = answer_length(cfg.data.task, n, n)
        rates = {}
        for cached in (True, False):
            sec = timeit(lambda: greedy_decode(model, params, prompts, new, use_cache=cached, stop_at_eos=False),
                         warmup=1, repeat=3)
            rates[cached] = args.batch / sec
        print(f"| {n} | {rates[True]:,.1f} | {rates[False]:,.1f} | {rates[True] / rates[False]:.1f}× |",
              flush=True)


if __name__ == "__main__":
    main()
