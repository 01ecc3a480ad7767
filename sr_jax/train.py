"""Training the E2E model on the shared loop, in-domain validation, and loading/exporting trained models.

`run_training(cfg, workdir)` trains (or resumes) with `core_jax.train.train`: batches from `sr_jax.data.BatchStream`
(worker processes, deterministic in the step) and, every `train.eval_every` steps, `validate` on a fixed set of
generated problems. `load_trained(path)` rebuilds model and parameters from a checkpoint; `path=None` is the model
shipped in sr_jax/pretrained/.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from core_jax import config as cfglib
from core_jax import trained
from core_jax.train import TrainResult, train
from sr_jax.config import SRConfig
from sr_jax.data import BatchStream
from sr_jax.generator import GeneratorConfig, sample
from sr_jax.model import E2EModel

PRETRAINED = Path(__file__).parent / "pretrained" / "e2e_small"


class TrainedModel(NamedTuple):
    config: SRConfig
    model: E2EModel
    params: Any


def build_model(cfg: SRConfig) -> E2EModel:
    return E2EModel(cfg.model, cfg.vocab)


def validation_problems(cfg: SRConfig) -> list:
    """The fixed in-domain validation set: `eval.n_problems` generator samples with `eval.n_points` points."""
    gen_cfg: GeneratorConfig = dataclasses.replace(cfg.data.generator, n_points=cfg.eval.n_points,
                                                   max_len=max(cfg.data.generator.max_len, cfg.eval.n_points))
    return [sample([cfg.eval.seed, i], gen_cfg) for i in range(cfg.eval.n_problems)]


def validate(tm: TrainedModel, problems: list, refine_maxiter: int = 100, *, decoding: str = "greedy",
             beam_size: int = 10) -> dict:
    """In-domain scores of the model's candidates on generated problems (fit points = the problem's points).

    Per problem, the best candidate by R² (greedy only, or greedy + beam/samples) before and after refining all
    candidates' constants: `r2>0.99`, `acc0.1` (the original's accuracy at tolerance 0.1), with a `_refined`
    suffix after BFGS; `valid` is the fraction of problems with at least one parseable candidate (always 1 under
    the grammar).
    """
    from sr_jax.candidates import model_candidates
    from sr_jax.metrics import accuracy, r2
    from sr_jax.refinement import refine

    if not problems:
        return {}
    datasets = [(p.x_NxD, p.y_N) for p in problems]
    cands = model_candidates(tm, datasets, decoding=decoding, beam_size=beam_size, n_samples=beam_size)
    exprs = [[c.expression for c in cs] for cs in cands]
    out = {"valid": float(np.mean([len(c) > 0 for c in cands]))}
    width = max(p.x_NxD.shape[1] for p in problems)  # one refinement call needs one width: pad unused columns
    xs = [np.pad(p.x_NxD, ((0, 0), (0, width - p.x_NxD.shape[1]))) for p in problems]
    refined = refine(exprs, xs, [p.y_N for p in problems], maxiter=refine_maxiter)
    for tag, chosen in (("", exprs), ("_refined", refined.expressions)):
        best_r2, best_acc = [], []
        for p, es in zip(problems, chosen):
            r2s, accs = [-np.inf], [0.0]
            for e in es:
                with np.errstate(all="ignore"):
                    pred = e.evaluate_numpy(p.x_NxD)
                score = r2(p.y_N, pred)
                r2s.append(score if np.isfinite(score) else -np.inf)
                accs.append(float(np.nan_to_num(accuracy(p.y_N, pred, 0.1))))
            best = int(np.argmax(r2s))
            best_r2.append(r2s[best])
            best_acc.append(accs[best])
        out[f"r2>0.99{tag}"] = float(np.mean(np.asarray(best_r2) > 0.99))
        out[f"acc0.1{tag}"] = float(np.mean(best_acc))
    return out


def run_training(cfg: SRConfig, workdir: str | Path | None, *, stop_at: int | None = None,
                 progress: bool = True, mesh=None) -> TrainResult:
    cfglib.validate(cfg)  # configs built in Python meet the same rules as loaded ones
    model = build_model(cfg)
    problems = validation_problems(cfg) if cfg.train.eval_every > 0 else []

    def eval_fn(params, step):
        return validate(TrainedModel(cfg, model, params), problems, cfg.eval.refine_maxiter)

    with BatchStream(cfg.data, cfg.vocab, cfg.model.max_dim) as stream:
        result = train(cfg.train, workdir, model.init, model.loss, stream,
                       meta={"kind": "train_state", "task": "sr", "config": cfglib.to_dict(cfg)},
                       stop_at=stop_at, progress=progress, mesh=mesh, eval_fn=eval_fn if problems else None)
    return result


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, step: int | None) -> TrainedModel:
    return TrainedModel(*trained.load_trained(path, SRConfig, build_model, kind="sr", step=step))


def load_trained(path: str | Path | None = None, step: int | None = None) -> TrainedModel:
    """(config, model, params) from a training workdir, its checkpoints/ folder, or an export; None: the shipped
    model. Loaded models are cached per (path, step)."""
    if path is None:
        if not PRETRAINED.is_dir():
            raise FileNotFoundError(f"the shipped model {PRETRAINED} is missing; reinstall the package or pass "
                                    f"model_path= / --checkpoint to a trained model")
        path = PRETRAINED
    return _load_cached(str(Path(path).absolute()), step)


def export_params(tm: TrainedModel, directory: str | Path, extra_meta: dict | None = None) -> Path:
    """A parameters-only checkpoint (what ships in sr_jax/pretrained)."""
    return trained.export_params(tm.config, tm.params, directory, dict(extra_meta or {}, task="sr"))
