"""Training throughput of this project against the original PyTorch code (McLeish et al.), side by side.

    python benchmarks/arith_vs_original.py --original /path/to/mcleish7-arithmetic \\
        [--torch-python /tmp/torchenv/bin/python] [--models standard looped] [--threads 1 2] [--rounds 2]

The original is not part of this repository: pass a checkout of `mcleish7/arithmetic` (its `cramming/architectures`
is imported from there) and a Python that has torch, transformers, omegaconf and einops (a separate environment:
this project's does not need torch). Both sides train the same addition model on the same 64 × 64 batches
(operands of 1..20 digits, the original's padded length 64), fp32, AdamW, clipping, the progressive loss for the
looped model, Abacus positions:

- standard: 2 layers, width 256, GLU FFN 1024, 4 heads;
- looped: 1 layer × 4 passes with input injection, same width (progressive loss: n ~ U{0..3} passes without
  gradient, then k with, as the original's forward_progressive with alpha = 1).

Each measurement is a fresh worker process pinned to the first N CPUs (`os.sched_setaffinity`), torch with
`torch.set_num_threads(N)`, XLA with its thread pool limited to N threads; workers alternate JAX / torch for
`--rounds` rounds. A worker times `--steps` training steps after `--warmup` steps (compilation excluded: the
original's `torch.compile` of the recurrent block when `--torch-compile`, XLA's jit always) and prints tokens/s
(batch × 64 per step). The report is the median of each side and their ratio.

This project's batches carry `loss_pos` as `arith_jax.data.make_batch` gives them to the training loop, so its
loss runs the output head, and the last layer's queries and position-wise part, only at the positions the loss
scores (same loss and gradients as the original's logits everywhere); `--full-head` leaves it out, for the
comparison op for op. The looped model's progressive loss takes its gradient inside a switch over k (the default
`model.progressive_grad=branches`); `--jax-set model.progressive_grad=scan` measures the scan under `lax.cond`.

The original calls `.to(input_ids.get_device())`, which fails on a CPU tensor; the worker therefore samples
(n, k) itself and calls the original's `model_call(input_ids, n, k)`, which is what `forward_progressive` does at
alpha = 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ, MAX_DIGITS = 64, 64, 20
MODELS = {
    "standard": dict(layers=2, recurrences=1, injection=False),
    "looped": dict(layers=1, recurrences=4, injection=True),
}
WIDTH, FFN, HEADS, MAX_K, TABLE = 256, 1024, 4, 100, 512


def addition_batches(count: int, seed: int = 0):
    """`count` int32 [BATCH, SEQ] batches of rev(a)+rev(b)=rev(a+b) EOS, PAD after (the original's token ids)."""
    import random

    import numpy as np

    rng = random.Random(seed)
    ids = {str(d): 4 + d for d in range(10)} | {"+": 14, "=": 17}
    out = []
    for _ in range(count):
        rows = np.zeros((BATCH, SEQ), np.int32)
        for r in range(BATCH):
            a, b = (rng.randrange(10 ** (n - 1), 10 ** n)
                    for n in (rng.randint(1, MAX_DIGITS), rng.randint(1, MAX_DIGITS)))
            text = f"{str(a)[::-1]}+{str(b)[::-1]}={str(a + b)[::-1]}"
            rows[r, :len(text) + 1] = [ids[c] for c in text] + [3]
        out.append(rows)
    return out


def _pin(threads: int) -> None:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:threads]))


def worker_jax(model_name: str, threads: int, steps: int, warmup: int, extra: list[str], full_head: bool) -> float:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
                               f" intra_op_parallelism_threads={threads}")
    _pin(threads)
    sys.path.insert(0, str(ROOT))
    import jax
    import numpy as np

    from arith_jax.config import ArithConfig
    from arith_jax.data import loss_positions
    from arith_jax.train import build_model
    from core_jax.config import load_config
    from core_jax.optim import make_optimizer
    from core_jax.train import init_state, make_train_step

    m = MODELS[model_name]
    overrides = [f"model.width={WIDTH}", f"model.ffn={FFN}", f"model.heads={HEADS}", f"model.layers={m['layers']}",
                 f"model.recurrences={m['recurrences']}", f"model.input_injection={str(m['injection']).lower()}",
                 "model.positions=[abacus]", f"model.abacus_max_k={MAX_K}", f"model.table_size={TABLE}",
                 "model.abacus_train_ids=shift", "model.abacus_k_per_row=false", "model.scan_unroll=1",
                 f"data.max_len={MAX_DIGITS}", f"data.batch_size={BATCH}", "train.optim.clip_norm=0.5",
                 "train.optim.lr=0.0001", *extra]
    cfg = load_config(ArithConfig, ROOT / "configs" / "arith_add_small.yaml", overrides)
    assert cfg.data.seq_len == SEQ, cfg.data.seq_len
    model = build_model(cfg)
    tx = make_optimizer(cfg.train.optim, cfg.train.steps)
    state = jax.jit(lambda: init_state(cfg.train, model.init, tx))()
    step = jax.jit(make_train_step(model.loss, tx), donate_argnums=0)
    batches = []
    for rows in addition_batches(4):
        mask = np.zeros(rows.shape, np.float32)
        for r, row in enumerate(rows):
            eq = int(np.nonzero(row == 17)[0][0])
            mask[r, eq + 1:int(np.nonzero(row == 3)[0][0]) + 1] = 1.0
        batch = {"tokens": rows, "mask": mask}
        if not full_head:   # what arith_jax.data.make_batch gives the training loop
            batch["loss_pos"] = loss_positions(mask, cfg.data.answer_len)
        batches.append({k: jax.device_put(v) for k, v in batch.items()})
    for i in range(warmup):
        state, metrics = step(state, batches[i % 4])
    jax.block_until_ready(metrics["loss"])
    t = time.perf_counter()
    for i in range(steps):
        state, metrics = step(state, batches[i % 4])
    jax.block_until_ready(metrics["loss"])
    return BATCH * SEQ * steps / (time.perf_counter() - t)


def worker_torch(model_name: str, threads: int, steps: int, warmup: int, original: str, compile_: bool) -> float:
    _pin(threads)
    import importlib
    import types

    import torch
    from omegaconf import OmegaConf

    torch.set_num_threads(threads)
    arch_dir = Path(original) / "cramming" / "architectures"
    package = types.ModuleType("original_architectures")   # the package without its __init__ (which needs more)
    package.__path__ = [str(arch_dir)]
    sys.modules["original_architectures"] = package
    recurrent = importlib.import_module("original_architectures.crammed_depthrecurrent")

    m = MODELS[model_name]
    yaml = OmegaConf.load(Path(original) / "cramming" / "config" / "arch" / "crammed-depthrecurrent.yaml")
    arch = OmegaConf.merge(yaml, {
        "layers_in_recurrent_block": m["layers"], "maximal_recurrence": m["recurrences"], "hidden_size": WIDTH,
        "intermed_size": FFN, "input_injection_type": "add" if m["injection"] else "none",
        "local_compilation": compile_, "mask_before_equals": True,
        "embedding": {"pos_embedding": "abacus", "max_abacus_len": MAX_K},
        "attention": {"num_attention_heads": HEADS}})
    arch = OmegaConf.create({"arch": arch, "data": {"seq_length": TABLE}}).arch
    model = recurrent.construct_crammed_recurrent(arch, 19, 17)
    model.train()
    model.set_max_recurrences_for_training(m["recurrences"])
    decay = [p for n, p in model.named_parameters() if "bias" not in n and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "bias" in n or "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.98), eps=1e-12)
    batches = [torch.from_numpy(b).long() for b in addition_batches(4)]
    T, Bp = model.max_recurrences_for_training, model.max_backprop

    def train_step(input_ids):
        n = torch.randint(low=0, high=T, size=(1,))
        k = torch.randint(low=1, high=1 + min(T - n, Bp), size=(1,))
        loss, _ = model.model_call(input_ids, n=n, k=k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        return loss

    for i in range(warmup):
        train_step(batches[i % 4])
    t = time.perf_counter()
    for i in range(steps):
        train_step(batches[i % 4])
    return BATCH * SEQ * steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--original", help="checkout of mcleish7/arithmetic")
    ap.add_argument("--torch-python", default="/tmp/torchenv/bin/python")
    ap.add_argument("--models", nargs="+", default=["standard", "looped"], choices=sorted(MODELS))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--torch-compile", action="store_true", help="the original's torch.compile of the block")
    ap.add_argument("--jax-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for this project's side, e.g. model.scan_unroll=4")
    ap.add_argument("--full-head", action="store_true",
                    help="this project's loss computes logits (and the last layer) at every position, as the original, "
                         "instead of only where the loss needs them (the batch's loss_pos, as "
                         "arith_jax.data.make_batch gives it)")
    ap.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker == "jax":
        print(json.dumps({"tokens_per_s": worker_jax(args.model, args.threads[0], args.steps, args.warmup,
                                                     args.jax_set, args.full_head)}))
        return
    if args.worker == "torch":
        print(json.dumps({"tokens_per_s": worker_torch(args.model, args.threads[0], args.steps, args.warmup,
                                                       args.original, args.torch_compile)}))
        return
    if not args.original or not (Path(args.original) / "cramming" / "architectures").is_dir():
        ap.error("--original must point at a checkout of mcleish7/arithmetic (with cramming/architectures)")

    def run(side: str, model: str, threads: int) -> float:
        python = sys.executable if side == "jax" else args.torch_python
        cmd = [python, __file__, "--worker", side, "--model", model, "--threads", str(threads),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--original", args.original]
        if args.torch_compile:
            cmd.append("--torch-compile")
        if args.full_head:
            cmd.append("--full-head")
        for kv in args.jax_set:
            cmd += ["--jax-set", kv]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]

    print("| model | threads | original tokens/s | this project tokens/s | ratio (ours / original) |")
    print("|---|---|---|---|---|")
    for model in args.models:
        for threads in args.threads:
            rates: dict[str, list[float]] = {"jax": [], "torch": []}
            for _ in range(args.rounds):
                for side in ("jax", "torch"):
                    rates[side].append(run(side, model, threads))
            med = {s: statistics.median(r) for s, r in rates.items()}
            print(f"| {model} | {threads} | {med['torch']:,.0f} | {med['jax']:,.0f} | "
                  f"{med['jax'] / med['torch']:.2f}× |", flush=True)
            print(f"  runs: jax {[round(r) for r in rates['jax']]}, torch {[round(r) for r in rates['torch']]}",
                  file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
