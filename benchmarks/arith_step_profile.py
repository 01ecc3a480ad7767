"""Per-op times of this project's compiled addition training step (the model and batches of
`benchmarks/arith_vs_original.py`), from a `jax.profiler` trace with XLA:CPU's per-thunk trace events.

    python benchmarks/arith_step_profile.py [--model standard|looped] [--threads 1] [--steps 10] [--out DIR]

Prints the step time (median of `--steps` single steps, without the profiler), then the profiled ops sorted by
time per step, each with its output shape and the JAX op it comes from (the HLO metadata), and the sums by kind:
YNNPACK fusions (the matmuls, and reductions XLA hands to YNNPACK) against XLA's own loop fusions and copies. With
`--threads 2` the op times overlap (ops run concurrently) and a matmul's time is its wall time on both threads.
The trace (xplane.pb) and the compiled HLO stay in `--out`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="standard", choices=["standard", "looped"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", default="/tmp/arith_step_profile")
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_cpu_multi_thread_eigen={'true' if args.threads > 1 else 'false'}"
                               f" intra_op_parallelism_threads={args.threads} --xla_cpu_enable_xprof_traceme=true")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jax
    import numpy as np

    import arith_vs_original as ref
    from arith_jax.config import ArithConfig
    from arith_jax.data import loss_positions
    from arith_jax.train import build_model
    from core_jax.config import load_config
    from core_jax.optim import make_optimizer
    from core_jax.train import init_state, make_train_step

    ref._pin(args.threads)
    m = ref.MODELS[args.model]
    overrides = [f"model.width={ref.WIDTH}", f"model.ffn={ref.FFN}", f"model.heads={ref.HEADS}",
                 f"model.layers={m['layers']}", f"model.recurrences={m['recurrences']}",
                 f"model.input_injection={str(m['injection']).lower()}", "model.positions=[abacus]",
                 f"model.abacus_max_k={ref.MAX_K}", f"model.table_size={ref.TABLE}", "model.abacus_train_ids=shift",
                 "model.abacus_k_per_row=false", "model.scan_unroll=1", f"data.max_len={ref.MAX_DIGITS}",
                 f"data.batch_size={ref.BATCH}", "train.optim.clip_norm=0.5", "train.optim.lr=0.0001"]
    cfg = load_config(ArithConfig, ROOT / "configs" / "arith_add_small.yaml", overrides)
    model = build_model(cfg)
    tx = make_optimizer(cfg.train.optim, cfg.train.steps)
    state = jax.jit(lambda: init_state(cfg.train, model.init, tx))()
    step = jax.jit(make_train_step(model.loss, tx), donate_argnums=0)
    batches = []
    for rows in ref.addition_batches(4):
        mask = np.zeros(rows.shape, np.float32)
        for r, row in enumerate(rows):
            eq = int(np.nonzero(row == 17)[0][0])
            mask[r, eq + 1:int(np.nonzero(row == 3)[0][0]) + 1] = 1.0
        batch = {"tokens": rows, "mask": mask, "loss_pos": loss_positions(mask, cfg.data.answer_len)}
        batches.append({k: jax.device_put(v) for k, v in batch.items()})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hlo = step.lower(state, batches[0]).compile().as_text()
    (out / "hlo.txt").write_text(hlo)
    for i in range(3):
        state, metrics = step(state, batches[i % 4])
    jax.block_until_ready(metrics["loss"])
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        state, metrics = step(state, batches[i % 4])
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    dt = float(np.median(times))
    print(f"{args.model}, {args.threads} thread(s): step {dt * 1e3:.1f} ms (median of {args.steps}), "
          f"{ref.BATCH * ref.SEQ / dt:,.0f} tokens/s")

    jax.profiler.start_trace(str(out))
    for i in range(args.steps):
        state, metrics = step(state, batches[i % 4])
    jax.block_until_ready(metrics["loss"])
    jax.profiler.stop_trace()
    path = sorted(glob.glob(str(out / "**" / "*.xplane.pb"), recursive=True), key=os.path.getmtime)[-1]
    total = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for ev in line.events:
                total[ev.name] += ev.duration_ns
    meta = {}
    for mt in re.finditer(r"\n\s*(?:ROOT )?%([\w.\-]+) = (\S+) \w+\(.*?op_name=\"jit\(train_step\)/([^\"]+)\"", hlo):
        meta[mt.group(1)] = (mt.group(2).split("{")[0], mt.group(3))
    ops = {k: v / 1e6 / args.steps for k, v in total.items() if k in meta or re.match(r"[\w\-]+(\.\d+)?$", k)}
    ops = {k: v for k, v in ops.items() if not k.startswith(("ThunkExecutor", "PjitFunction", "SlinkyThreadPool"))}
    kinds = collections.Counter()
    for k, v in ops.items():
        kinds["YNNPACK fusions" if k.startswith("ynn_fusion") else "transposes and copies"
              if re.match(r"(transpose|copy|wrapped_copy)", k) or "transpose" in k.split("_fusion")[0] else
              "other XLA ops"] += v
    print(f"op time per step: {sum(ops.values()):.1f} ms; " +
          ", ".join(f"{name} {v:.1f} ms" for name, v in kinds.most_common()))
    print(f"{'ms/step':>8}  {'op':28s} {'shape':22s} from")
    for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]:
        shape, origin = meta.get(k, ("", ""))
        print(f"{v:8.2f}  {k:28s} {shape:22s} {origin}")


if __name__ == "__main__":
    main()
