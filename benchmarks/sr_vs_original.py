"""Training throughput of sr_jax's E2E transformer against the original PyTorch code (Kamienny et al. 2022),
side by side: equations/s and target tokens/s of the training step.

    python benchmarks/sr_vs_original.py --original /path/to/facebookresearch-symbolicregression \\
        [--torch-python /tmp/torchenv/bin/python] [--settings small cpu] [--threads 1 2] [--rounds 2]

The original is not part of this repository: pass a checkout of `facebookresearch/symbolicregression` (its
`symbolicregression/model/transformer.py`, `model/embedders.py` and `optim.py` are imported from there, without
the package's `model/__init__.py`, which needs sklearn, sympytorch, ...) and a Python that has torch and numpy (a
separate environment: this project's does not need torch).

Settings (fp32, the same sizes on both sides; attention heads of 32 dimensions as in the paper's 512 / 16):

- `small`: the original's small setting: width 256, 8 heads, 2 encoder / 4 decoder layers, point-token embedding
  64 (the original's default), 32 equations per batch of up to 200 points each; Adam with the original's schedule
  (lr 1e-4, linear warmup from 1e-7 over 10,000 steps, then inverse square root), clipping 0.5;
- `cpu`: this project's `configs/sr_e2e_small.yaml` (width 128, 4 heads, 2 / 4 layers, embedding 16; 3,200 points
  per batch: 32 equations of <= 100 points or 16 of <= 200; lr 1e-3, warmup 1,000 steps, clipping 0.5).

Both settings take that config's training-speed options on this project's side: batches packed several equations
per row (`data.pack`) and attention normalised after the value product (`model.deferred_norm`); the layout and
attention of before them: `--set data.pack=false --set model.deferred_norm=false`.

Both sides train on the same examples: those of `--batches` steps of this project's data stream
(`sr_jax.data.step_examples`: the generator, float tokens, the step's point cap) are generated once in the parent
process. This project trains on them as its training loop would (`sr_jax.data.make_batch`: padded to the point cap
and a target-length bucket, or packed several per row when the config sets `data.pack`). The original
gets them as its collate function would build them: the same point tokens (both use the original's float
vocabulary ids) in its (points, batch, 33) layout padded only to the batch's longest point set and with its
`<PAD>` id on padding points; the same expressions mapped to its decoder ids (its 10,292-row vocabulary; this
project's decoder vocabulary is pruned to 937 tokens), padded only to the longest target; its `pred_mask` and `y`
as in `trainer.enc_dec_step`. The timed step is, on each side, training only: embedder, encoder, decoder, loss,
backward, clipping and the optimiser update, from token ids already in memory. Data generation is excluded on both
sides (this project generates it in worker processes ahead of the step); the original's embedder also tokenises
the floats in Python inside its step (`LinearPointEmbedder.encode`), which is excluded here (the original is timed
from `embed` + `compress`, i.e. favourably to it).

The original's step is `trainer.enc_dec_step` + `trainer.optimize` without AMP: encoder("fwd"), decoder("fwd"),
decoder("predict") (logits of the predicted positions only, cross-entropy), zero_grad, backward, clip_grad_norm_
at 0.5, its `AdamInverseSqrtWithWarmup.step`. This project's step is `core_jax.train.make_train_step(model.loss,
make_optimizer(...))` under `jax.jit` with the state donated, as `core_jax.train.train` runs it.

Each measurement is a fresh worker process pinned to the first N CPUs (`os.sched_setaffinity`), torch with
`torch.set_num_threads(N)`, XLA with its thread pool limited to N threads; workers alternate this project /
original for `--rounds` rounds. A worker runs one pass over the batches as warm-up (XLA compiles one program per
batch shape; torch allocates), then times `--passes` passes; equations/s = equations trained / seconds, tokens/s
= predicted target tokens (expression tokens + EOS, PAD excluded) / seconds. The report is the median of each
side and their ratio, with the load average around the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "small": ["model.width=256", "model.heads=8", "model.enc_layers=2", "model.dec_layers=4", "model.emb_dim=64",
              "model.emb_expansion=1", "data.points_per_batch=6400", "data.point_buckets=[200]",
              "data.bucket_weights=[1.0]", "train.optim.lr=0.0001", "train.optim.warmup_steps=10000"],
    "cpu": [],
}


def load_cfg(setting: str, extra: list[str]):
    from core_jax.config import load_config
    from sr_jax.config import SRConfig

    return load_config(SRConfig, ROOT / "configs" / "sr_e2e_small.yaml", [*SETTINGS[setting], *extra])


def make_batches(setting: str, count: int, extra: list[str], path: Path) -> None:
    """`count` batches of this project's stream, stored with the original's form of each (see module doc)."""
    import numpy as np

    from sr_jax.data import make_batch, padded_batch, step_examples
    from sr_jax.float_tokens import FloatEncoder
    from sr_jax.vocab import EOS, PAD, POINT_PAD

    cfg = load_cfg(setting, extra)
    dec = FloatEncoder().decoder_vocab
    to_original = np.array([dec.word2id[w] for w in cfg.vocab.id2word], np.int64)
    arrays = {}
    for i in range(count):
        ours = make_batch(cfg.data, cfg.vocab, cfg.model.max_dim, i)
        for k, v in ours.items():
            arrays[f"ours{i}_{k}"] = v
        cap, examples = step_examples(cfg.data, cfg.vocab, cfg.model.max_dim, i)
        b = padded_batch(examples, cap, cfg.data.target_buckets)   # one example per row: the original's rows
        len1 = b["point_mask"].sum(1).astype(np.int64)
        pts = np.where(b["point_mask"][..., None], b["points"], POINT_PAD)[:, :len1.max()]
        len2 = (b["target"] != PAD).sum(1).astype(np.int64)                      # BOS + tokens + EOS
        assert (b["target"][:, 0] == EOS).all()
        x2 = np.where(b["target"] != PAD, to_original[b["target"]], dec.word2id["<PAD>"])[:, :len2.max()]
        arrays[f"orig{i}_x1"] = np.ascontiguousarray(pts.transpose(1, 0, 2)).astype(np.int64)  # (slen, bs, 33)
        arrays[f"orig{i}_len1"] = len1
        arrays[f"orig{i}_x2"] = np.ascontiguousarray(x2.T)                                     # (tlen, bs)
        arrays[f"orig{i}_len2"] = len2
    m, o = cfg.model, cfg.train.optim
    spec = {"model": {k: getattr(m, k) for k in ("emb_dim", "emb_expansion", "width", "heads", "enc_layers",
                                                   "dec_layers", "ffn_mult", "max_dim", "norm", "dtype")},
            "optim": {k: getattr(o, k) for k in ("lr", "b1", "b2", "eps", "weight_decay", "warmup_steps",
                                                   "warmup_init", "clip_norm", "schedule")}}
    np.savez(path, count=count, spec=json.dumps(spec), keys=np.array(sorted(ours)),
             enc_words=np.array(FloatEncoder().encoder_vocab.id2word),
             dec_words=np.array(dec.id2word), **arrays)


def _pin(threads: int) -> None:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:threads]))


def _measure(step, batches: list, passes: int, sync) -> dict:
    """One warm-up pass, then `passes` timed passes; per-batch seconds (median over passes)."""
    for b in batches:
        sync(step(b))
    per_batch = [[] for _ in batches]
    t_total = 0.0
    for _ in range(passes):
        for i, b in enumerate(batches):
            t = time.perf_counter()
            sync(step(b))
            dt = time.perf_counter() - t
            per_batch[i].append(dt)
            t_total += dt
    return {"seconds": t_total, "batch_s": [statistics.median(p) for p in per_batch]}


def _option(kv: str):
    key, value = kv.split("=", 1)
    return key, {"true": True, "false": False}.get(value, value)


def worker_jax(setting: str, threads: int, data: str, passes: int, extra: list[str], options: list[str]) -> dict:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
                               f" intra_op_parallelism_threads={threads}")
    _pin(threads)
    sys.path.insert(0, str(ROOT))
    import jax
    import numpy as np

    from core_jax.optim import make_optimizer
    from core_jax.train import init_state, make_train_step
    from sr_jax.train import build_model

    cfg = load_cfg(setting, extra)
    model = build_model(cfg)
    tx = make_optimizer(cfg.train.optim, cfg.train.steps)
    holder = {"state": jax.jit(lambda: init_state(cfg.train, model.init, tx))()}
    train_step = jax.jit(make_train_step(model.loss, tx), donate_argnums=0,
                         compiler_options=dict(_option(kv) for kv in options) or None)
    z = np.load(data)
    keys = [str(k) for k in z["keys"]]
    batches = [{k: jax.device_put(z[f"ours{i}_{k}"]) for k in keys} for i in range(int(z["count"]))]
    losses = []

    def step(batch):
        holder["state"], metrics = train_step(holder["state"], batch)
        return metrics["loss"]

    def sync(loss):
        losses.append(float(loss))

    out = _measure(step, batches, passes, sync)
    out["first_loss"] = losses[0]
    out["params"] = model.num_params(holder["state"].params)
    return out


def worker_torch(threads: int, data: str, passes: int, original: str) -> dict:
    _pin(threads)
    import importlib
    import types

    import numpy as np
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    sys.path.insert(0, original)             # `symbolicregression.utils` (embedders.py imports it)
    model_dir = Path(original) / "symbolicregression" / "model"
    package = types.ModuleType("original_model")   # the package without its __init__ (which needs more)
    package.__path__ = [str(model_dir)]
    sys.modules["original_model"] = package
    transformer = importlib.import_module("original_model.transformer")
    embedders = importlib.import_module("original_model.embedders")
    optim = importlib.import_module("symbolicregression.optim")

    z = np.load(data)
    spec = json.loads(str(z["spec"]))   # this worker's Python has no JAX: the parent wrote what it needs
    m, o = types.SimpleNamespace(**spec["model"]), types.SimpleNamespace(**spec["optim"])
    if m.norm != "post" or m.ffn_mult != 4 or m.dtype != "float32" or o.schedule != "inverse_sqrt":
        raise SystemExit("the original is post-LN, FFN 4 x width, fp32, inverse_sqrt: compare those settings only")
    params = types.SimpleNamespace(
        emb_emb_dim=m.emb_dim, enc_emb_dim=m.width, dec_emb_dim=m.width, n_emb_layers=1,
        emb_expansion_factor=m.emb_expansion, n_enc_layers=m.enc_layers, n_dec_layers=m.dec_layers,
        n_enc_heads=m.heads, n_dec_heads=m.heads, n_enc_hidden_layers=1, n_dec_hidden_layers=1,
        norm_attention=False, dropout=0.0, attention_dropout=0.0, share_inout_emb=True, fp16=False,
        nvidia_apex=False, mantissa_len=1, max_input_dimension=m.max_dim, max_output_dimension=1, max_len=200)
    enc_words, dec_words = [str(w) for w in z["enc_words"]], [str(w) for w in z["dec_words"]]
    env = types.SimpleNamespace(float_id2word=dict(enumerate(enc_words)),
                                float_word2id={w: i for i, w in enumerate(enc_words)})
    embedder = embedders.LinearPointEmbedder(params, env)
    encoder = transformer.TransformerModel(params, env.float_id2word, is_encoder=True, with_output=False,
                                           use_prior_embeddings=True, positional_embeddings=None)
    decoder = transformer.TransformerModel(params, dict(enumerate(dec_words)), is_encoder=False,
                                           with_output=True, use_prior_embeddings=False,
                                           positional_embeddings="learnable")
    modules = [embedder, encoder, decoder]
    for mod in modules:
        mod.train()
    parameters = [p for mod in modules for p in mod.parameters() if p.requires_grad]
    opt = optim.AdamInverseSqrtWithWarmup(parameters, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                          weight_decay=o.weight_decay, warmup_updates=o.warmup_steps,
                                          warmup_init_lr=o.warmup_init)

    batches = []
    for i in range(int(z["count"])):
        x2, len2 = torch.from_numpy(z[f"orig{i}_x2"]), torch.from_numpy(z[f"orig{i}_len2"])
        alen = torch.arange(len2.max(), dtype=torch.long)
        pred_mask = alen[:, None] < len2[None] - 1
        y = x2[1:].masked_select(pred_mask[:-1])
        batches.append((torch.from_numpy(z[f"orig{i}_x1"]), torch.from_numpy(z[f"orig{i}_len1"]), x2, len2,
                        pred_mask, y))
    losses = []

    def step(batch):
        x1_tokens, len1, x2, len2, pred_mask, y = batch
        x1 = embedder.compress(embedder.embed(x1_tokens))
        encoded = encoder("fwd", x=x1, lengths=len1, causal=False)
        decoded = decoder("fwd", x=x2, lengths=len2, causal=True, src_enc=encoded.transpose(0, 1), src_len=len1)
        _, loss = decoder("predict", tensor=decoded, pred_mask=pred_mask, y=y, get_scores=False)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, o.clip_norm)
        opt.step()
        return loss

    def sync(loss):
        losses.append(loss.item())

    out = _measure(step, batches, passes, sync)
    out["first_loss"] = losses[0]
    out["params"] = sum(p.numel() for p in parameters)
    return out


def batch_counts(data: str) -> tuple[int, int]:
    """(equations, predicted target tokens) of one pass over the stored batches."""
    import numpy as np

    z = np.load(data)
    eqs = toks = 0
    for i in range(int(z["count"])):
        len2 = z[f"orig{i}_len2"]           # BOS + expression + EOS per equation
        eqs += len(len2)
        toks += int((len2 - 1).sum())
    return eqs, toks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--original", help="checkout of facebookresearch/symbolicregression")
    ap.add_argument("--torch-python", default="/tmp/torchenv/bin/python")
    ap.add_argument("--settings", nargs="+", default=["small", "cpu"], choices=sorted(SETTINGS))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batches", type=int, default=4, help="distinct batches (steps 0.. of the data stream)")
    ap.add_argument("--passes", type=int, default=2, help="timed passes over the batches (after one warm-up)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for both sides (sizes, data), e.g. data.point_buckets=[100]")
    ap.add_argument("--jax-option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                    help="XLA compile option of this project's training step only (jax.jit compiler_options), e.g. "
                         "xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
    ap.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--setting", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker == "jax":
        print(json.dumps(worker_jax(args.setting, args.threads[0], args.data, args.passes, args.extra,
                                    args.options)))
        return
    if args.worker == "torch":
        print(json.dumps(worker_torch(args.threads[0], args.data, args.passes, args.original)))
        return
    if not args.original or not (Path(args.original) / "symbolicregression" / "model" / "transformer.py").is_file():
        ap.error("--original must point at a checkout of facebookresearch/symbolicregression "
                 "(with symbolicregression/model/transformer.py)")
    sys.path.insert(0, str(ROOT))

    def run(side: str, setting: str, threads: int, data: str) -> dict:
        python = sys.executable if side == "jax" else args.torch_python
        cmd = [python, __file__, "--worker", side, "--setting", setting, "--threads", str(threads), "--data", data,
               "--passes", str(args.passes), "--original", str(Path(args.original).absolute())]
        for kv in args.extra:
            cmd += ["--set", kv]
        for kv in args.options:
            cmd += ["--jax-option", kv]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{side} worker failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    print("| setting | threads | original eq/s | this project eq/s | original tokens/s | this project tokens/s | "
          "ratio (ours / original) | load average |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            data = str(Path(tmp) / f"{setting}.npz")
            make_batches(setting, args.batches, args.extra, Path(data))
            eqs, toks = batch_counts(data)
            for threads in args.threads:
                secs: dict[str, list[float]] = {"jax": [], "torch": []}
                detail: dict[str, list[dict]] = {"jax": [], "torch": []}
                load = [os.getloadavg()[0]]
                for _ in range(args.rounds):
                    for side in ("jax", "torch"):
                        r = run(side, setting, threads, data)
                        secs[side].append(r["seconds"] / args.passes)
                        detail[side].append(r)
                        load.append(os.getloadavg()[0])
                med = {s: statistics.median(v) for s, v in secs.items()}
                print(f"| {setting} | {threads} | {eqs / med['torch']:,.2f} | {eqs / med['jax']:,.2f} | "
                      f"{toks / med['torch']:,.0f} | {toks / med['jax']:,.0f} | {med['torch'] / med['jax']:.2f}× | "
                      f"{min(load):.1f}–{max(load):.1f} |", flush=True)
                for side in ("jax", "torch"):
                    d = detail[side][0]
                    print(f"  {side}: s/pass {[round(s, 2) for s in secs[side]]}, per-batch s "
                          f"{[round(s, 3) for s in d['batch_s']]}, first loss {d['first_loss']:.4f}, "
                          f"{d['params']:,} parameters", file=sys.stderr, flush=True)
            print(f"  {setting}: {args.batches} batches, {eqs} equations, {toks} predicted tokens per pass",
                  file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
