"""Training throughput (tokens/s) of arith configs, and model-FLOPs utilisation where the peak is known.

    python benchmarks/arith_train.py configs/arith_add_small.yaml configs/arith_add_looped_1x16.yaml [--steps 20]

    python benchmarks/arith_train.py "configs/arith_add_looped_1x16.yaml|model.attention=cudnn"

Tokens = batch × padded length per step. Model FLOPs count what the step actually computes: the progressive
loss's expected n + k forward passes and 2k backward passes (exact expectation over the (n, k) distribution), plus
attention, with the output head (and the final pass's last layer but its keys and values) at the positions the loss
scores only; MFU divides by the chip's dense peak (H100/H200 SXM bf16: 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from arith_jax.config import ArithConfig  # noqa: E402
from arith_jax.data import make_batch  # noqa: E402
from arith_jax.train import build_model  # noqa: E402
from common import machine_line, timeit  # noqa: E402
from core_jax import sharding as shd  # noqa: E402
from core_jax.config import load_config  # noqa: E402
from core_jax.optim import make_optimizer  # noqa: E402
from core_jax.train import init_state, make_train_step  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def expected_passes(cfg) -> tuple[float, float]:
    """(E[forward passes], E[differentiated passes]) per step under the progressive loss."""
    T, B = cfg.recurrences, cfg.backprop
    if not (cfg.looped and cfg.progressive):
        return float(T), float(T)
    fwd = grad = 0.0
    for n in range(T):
        ks = range(1, min(T - n, B) + 1)
        for k in ks:
            fwd += (n + k) / (T * len(ks))
            grad += k / (T * len(ks))
    return fwd, grad


def step_flops(cfg: ArithConfig, answer_len: int | None = None) -> float:
    """Model FLOPs of one training step (forward + backward). With `answer_len` A (the batch's `loss_pos`), the
    output head runs at A positions per row, and so does the final pass's last layer except its keys and values
    (what `ArithModel.loss` computes); without it, at every position."""
    m, S, Bt = cfg.model, cfg.data.seq_len - 1, cfg.data.batch_size
    H, F = m.width, m.ffn
    ffn = 2 * (H * F + (F // 2) * H)
    per_token_layer = 2 * 4 * H * H + ffn + 2 * 2 * S * H / 2  # causal: half the scores
    fwd, grad = expected_passes(m)
    head = 2 * (H * F + (F // 2) * H + H * H + H * 19)
    passes = m.layers * (fwd + 2 * grad)            # layer applications, backward counted twice
    reduced_last = answer_len is not None and (m.recurrences == 1 or (
        m.looped and m.progressive and m.progressive_grad == "branches"))
    if not reduced_last:
        A = S if answer_len is None else answer_len
        return Bt * (S * per_token_layer * passes + A * head * 3)
    A = answer_len
    last = S * 2 * 2 * H * H + A * (2 * 2 * H * H + ffn + 2 * 2 * S * H)   # keys/values everywhere, the rest at A
    return Bt * (S * per_token_layer * (passes - 3) + 3 * last + 3 * A * head)


def bench(path: str, steps: int, overrides: list[str]) -> dict:
    path, *own = path.split("|")     # "config.yaml|key=value|key=value": overrides for this config only
    overrides = list(overrides) + own
    cfg = load_config(ArithConfig, path, overrides)
    model = build_model(cfg)
    mesh = shd.data_mesh()
    tx = make_optimizer(cfg.train.optim, cfg.train.steps)
    repl = shd.replicated(mesh)
    state = jax.jit(lambda: init_state(cfg.train, model.init, tx), out_shardings=repl)()
    step = jax.jit(make_train_step(model.loss, tx), in_shardings=(repl, shd.batch_sharding(mesh)),
                   out_shardings=(repl, repl), donate_argnums=0)
    batches = [shd.shard_batch(make_batch(cfg.data, i), mesh) for i in range(4)]
    box = {"state": state, "i": 0}

    def run():
        for _ in range(steps):
            box["state"], metrics = step(box["state"], batches[box["i"] % 4])
            box["i"] += 1
        jax.block_until_ready(metrics["loss"])

    sec = timeit(run, warmup=1, repeat=3) / steps
    tokens = cfg.data.batch_size * cfg.data.seq_len
    flops = step_flops(cfg, batches[0]["loss_pos"].shape[1] if "loss_pos" in batches[0] else None)
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
    return {"config": Path(path).name + (" " + " ".join(overrides) if overrides else ""),
            "params_M": model.num_params(box["state"].params) / 1e6, "batch": cfg.data.batch_size,
            "seq_len": cfg.data.seq_len, "steps_per_s": 1 / sec, "tokens_per_s": tokens / sec,
            "tflops": flops / sec / 1e12,
            "mfu": (flops / sec / peak) if (peak and cfg.model.dtype == "bfloat16") else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+", help='config files; "PATH|key=value|..." adds overrides for that one')
    ap.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    ap.add_argument("--set", action="append", default=[], help="override for every config")
    args = ap.parse_args()
    print(f"machine: {machine_line()}")
    print("| config | params (M) | batch × len | steps/s | tokens/s | model TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    for path in args.configs:
        try:
            r = bench(path, args.steps, args.set)
        except Exception as e:  # one config that cannot run (e.g. a kernel this chip refuses) ends only its row
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"| {path.replace('|', ' ')} {' '.join(args.set)} | failed: {reason} | | | | | |", flush=True)
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {r['config']} | {r['params_M']:.2f} | {r['batch']}×{r['seq_len']} | {r['steps_per_s']:.2f} | "
              f"{r['tokens_per_s']:,.0f} | {r['tflops']:.2f} | {mfu} |", flush=True)


if __name__ == "__main__":
    main()
