"""Decoding speed of the shipped E2E model: hypotheses/s of greedy, beam search and sampling, compile time apart
from steady state; and KV-cached against uncached decoding of a fixed number of tokens.

    python benchmarks/sr_decode.py                                  # the whole table (minutes of compiling)
    python benchmarks/sr_decode.py --modes greedy beam4 --datasets 1 --repeat 3
    python benchmarks/sr_decode.py --compile-only --modes greedy --datasets 1   # one fresh compile, then exit
    python benchmarks/sr_decode.py --modes beam4 --datasets 64 --group 4            # 4 datasets side by side per step

Each (mode, datasets) program is what `sr_jax.candidates.model_candidates` runs for that request: encode the
points once, greedy decoding always, plus the beam or the samples, all under the prefix-expression grammar, over
`--datasets` generated problems of `--points` points (the shipped model's generator, seed 0). The table counts
hypotheses (greedy: 1 per dataset, beamK/sampleS: 1 + K or 1 + S per dataset) per second of the jitted call; the
Python parsing of the returned ids into expressions is not timed. "compile" is lowering plus XLA compilation of
that program in this process (a second program of the same process reuses some of JAX's caches; run
`--compile-only` in a fresh process for a clean figure).

Cached vs uncached: `--cache-tokens` argmax steps without the grammar and without stopping at EOS, over
`--cache-batch` datasets; cached feeds one token per step through the decoder's KV cache, uncached runs the decoder
over the whole token buffer (causal mask) at every step and reads the logits of the current position.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_line  # noqa: E402
from sr_jax import candidates  # noqa: E402
from sr_jax.generator import sample  # noqa: E402
from sr_jax.model import bos  # noqa: E402
from sr_jax.vocab import PAD  # noqa: E402
from sr_jax.train import load_trained  # noqa: E402


def parse_mode(mode: str) -> tuple[str, int]:
    for name in ("greedy", "beam", "sample"):
        if mode.startswith(name):
            width = mode[len(name):]
            if name == "greedy" and not width:
                return name, 1
            if name != "greedy" and width.isdigit() and int(width) >= 1:
                return name, int(width)
    raise SystemExit(f"error: unknown mode {mode!r}; use greedy, beam<K> or sample<S> (e.g. beam10, sample16)")


def make_datasets(cfg, n: int, points: int):
    gen = dataclasses.replace(cfg.data.generator, n_points=points, max_len=max(cfg.data.generator.max_len, points))
    return [(s.x_NxD, s.y_N) for s in (sample([0, i], gen) for i in range(n))]


def block(tree):
    return jax.tree_util.tree_map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def time_program(tm, datasets, mode: str, max_len: int, repeat: int, budget_s: float, group: int):
    """(compile seconds, median seconds per call, calls, hypotheses per call, mean generated tokens per hypothesis);
    `repeat` calls of the compiled program, fewer once they took budget_s seconds (at least one)."""
    decoding, width = parse_mode(mode)
    program = candidates.decoding_program(tm.model, decoding, width, max_len, 1.0, 1.0, group)
    points, mask, n_vars = candidates.encode_datasets(datasets, tm.config.model.max_dim)
    args = (tm.params, points, mask, n_vars, jax.random.PRNGKey(0))
    t = time.perf_counter()
    compiled = program.lower(*args).compile()
    compile_s = time.perf_counter() - t
    times = []
    while len(times) < repeat and (not times or sum(times) < budget_s):
        t = time.perf_counter()
        out = block(compiled(*args))
        times.append(time.perf_counter() - t)
    g_tok, _, x_tok, _ = jax.device_get(out)
    n = len(datasets)
    toks = [g_tok[:n]] + ([] if x_tok is None else [x_tok[:n].reshape(-1, x_tok.shape[-1])])
    toks = np.concatenate(toks)
    hyps = toks.shape[0]
    mean_len = float(np.mean(np.sum(toks != PAD, axis=1)))
    return compile_s, float(np.median(times)), len(times), hyps, mean_len


def cached_vs_uncached(tm, datasets, n_tokens: int, repeat: int):
    """(cached s, uncached s, fraction of equal argmax tokens) for n_tokens argmax steps over the datasets."""
    model, params = tm.model, tm.params
    points, mask, _ = candidates.encode_datasets(datasets, tm.config.model.max_dim)
    B = points.shape[0]

    @jax.jit
    def cached(params, points, mask):
        step = model.decoder_fn(params, model.context(params, points, mask))

        def body(t, carry):
            tokens, cache, last = carry
            logits, cache = step(last[:, None], cache)
            nxt = jnp.argmax(logits, -1).astype(jnp.int32)
            return tokens.at[:, t].set(nxt), cache, nxt
        init = (jnp.zeros((B, n_tokens), jnp.int32), model.init_cache(B, n_tokens), bos(B))
        return jax.lax.fori_loop(0, n_tokens, body, init)[0]

    @jax.jit
    def uncached(params, points, mask):
        ctx = model.context(params, points, mask)

        def body(t, fed):   # fed[:, 0] = BOS, fed[:, t + 1] = token generated at step t
            logits, _ = model.decoder.apply({"params": params["decoder"]}, fed[:, :n_tokens],
                                            memory_kvs=ctx.memory_kvs, memory_mask_BxN=ctx.memory_mask_BxN)
            nxt = jnp.argmax(jnp.take(logits, t, axis=1), -1).astype(jnp.int32)
            return fed.at[:, t + 1].set(nxt)
        fed = jnp.zeros((B, n_tokens + 1), jnp.int32).at[:, 0].set(bos(B))
        return jax.lax.fori_loop(0, n_tokens, body, fed)[:, 1:]

    out = {}
    for name, fn in (("cached", cached), ("uncached", uncached)):
        res = fn(params, points, mask).block_until_ready()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            res = fn(params, points, mask).block_until_ready()
            times.append(time.perf_counter() - t)
        out[name] = (float(np.median(times)), np.asarray(res)[:len(datasets)])
    agree = float(np.mean(out["cached"][1] == out["uncached"][1]))
    return out["cached"][0], out["uncached"][0], agree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="trained model (default: the shipped sr_jax model)")
    ap.add_argument("--modes", nargs="+", default=["greedy", "beam4", "beam10", "sample16"])
    ap.add_argument("--datasets", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--points", type=int, default=200)
    ap.add_argument("--max-len", type=int, default=None, help="generated tokens at most (default: as the estimator)")
    ap.add_argument("--repeat", type=int, default=3, help="calls per program (median reported)")
    ap.add_argument("--budget-s", type=float, default=60.0, help="no further calls of a program after this long")
    ap.add_argument("--cache-tokens", type=int, default=100, help="0 skips the cached/uncached comparison")
    ap.add_argument("--cache-batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--compile-only", action="store_true", help="compile the first (mode, datasets), print, exit")
    ap.add_argument("--group", type=int, default=None,
                    help="datasets decoded side by side inside the call (default: sr_jax.candidates.DECODE_GROUP)")
    args = ap.parse_args()
    if args.group is not None and args.group < 1:
        raise SystemExit(f"--group must be a positive number of datasets, got {args.group}")
    group = candidates.DECODE_GROUP if args.group is None else args.group

    tm = load_trained(args.checkpoint)
    cfg = tm.config
    max_len = min(args.max_len or max(cfg.data.target_buckets) - 1, cfg.model.max_len - 1)
    all_data = make_datasets(cfg, max(args.datasets + args.cache_batch), args.points)
    if args.compile_only:
        decoding, width = parse_mode(args.modes[0])
        program = candidates.decoding_program(tm.model, decoding, width, max_len, 1.0, 1.0, group)
        points, mask, n_vars = candidates.encode_datasets(all_data[:args.datasets[0]], cfg.model.max_dim)
        t = time.perf_counter()
        program.lower(tm.params, points, mask, n_vars, jax.random.PRNGKey(0)).compile()
        print(f"compile {args.modes[0]} x {args.datasets[0]} datasets: {time.perf_counter() - t:.2f} s", flush=True)
        return

    print(f"machine: {machine_line()}; load average {os.getloadavg()[0]:.1f} at start")
    print(f"datasets decoded side by side in a call: {group}")
    print(f"model: {args.checkpoint or 'shipped sr_jax/pretrained/e2e_small'}, {args.points} points per dataset, "
          f"at most {max_len} generated tokens, median of up to {args.repeat} calls ({args.budget_s:g} s budget)")
    print("| decoding | datasets | hypotheses/call | mean tokens | compile s | calls | s/call | hypotheses/s |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.datasets:
        for mode in args.modes:
            comp, sec, calls, hyps, mean_len = time_program(tm, all_data[:n], mode, max_len, args.repeat,
                                                            args.budget_s, group)
            print(f"| {mode} | {n} | {hyps} | {mean_len:.1f} | {comp:.1f} | {calls} | {sec:.3f} | "
                  f"{hyps / sec:,.1f} |", flush=True)
    if args.cache_tokens:
        print(f"\n{args.cache_tokens} argmax tokens, KV cache vs the whole prefix recomputed every step")
        print("| datasets | cached s | uncached s | speed-up | equal tokens |")
        print("|---|---|---|---|---|")
        for n in args.cache_batch:
            c, u, agree = cached_vs_uncached(tm, all_data[:n], args.cache_tokens, args.repeat)
            print(f"| {n} | {c:.3f} | {u:.3f} | {u / c:.1f}x | {agree:.1%} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
