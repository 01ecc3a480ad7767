"""Training batches for the E2E model: generated on the fly, deterministic in (seed, step), in a few fixed shapes.

The original fills a batch up to a budget of points (sequences x largest point count <= 10 000; spec §5). Here each
step draws a point-count cap from `point_buckets` (with `bucket_weights`); its examples are generated with N drawn
as the generator does but capped there (N ~ U{min(5d, cap)..cap}), and the batch holds points_per_batch // cap
examples. Targets are padded to the smallest of `target_buckets` that fits the longest one. So a run compiles at
most len(point_buckets) x len(target_buckets) training programs, and the batch for step s is the same whatever
happened before it: the step stored in a checkpoint is the data-stream position.

`BatchStream(cfg)` serves `batch(step)` and generates the next steps' batches in worker processes while the
current step runs; `wait_s` is the time the training loop spent waiting for data.

Batch (numpy): points int32[B, N, P] (sr_jax.vocab.encode_points), point_mask bool[B, N], target int32[B, T]
(EOS as BOS, the expression's decoder ids, EOS, then PAD), n_vars int32[B].
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import time

import numpy as np

from sr_jax.generator import GeneratorConfig, _generator
from sr_jax.vocab import EOS, PAD, DecoderVocab, encode_points


@dataclasses.dataclass(frozen=True)
class DataConfig:
    generator: GeneratorConfig = GeneratorConfig()
    seed: int = 0
    points_per_batch: int = 10_000          # budget: examples per batch = points_per_batch // point cap
    point_buckets: tuple[int, ...] = (50, 100, 200)
    bucket_weights: tuple[float, ...] = (0.2, 0.3, 0.5)   # how often each cap is drawn for a step
    target_buckets: tuple[int, ...] = (64, 96, 128, 200)  # padded target lengths (BOS and EOS included)
    batch_multiple: int = 1                 # round examples per batch down to a multiple (devices of the mesh)
    workers: int = 1                        # generator processes (0: generate in the training process)
    prefetch: int = 4                       # batches generated ahead of the step being trained

    def __post_init__(self):
        if not self.point_buckets or any(b < 1 for b in self.point_buckets):
            raise ValueError("data.point_buckets must be a non-empty list of positive point counts")
        if len(self.bucket_weights) != len(self.point_buckets) or any(w < 0 for w in self.bucket_weights) \
                or sum(self.bucket_weights) <= 0:
            raise ValueError("data.bucket_weights needs one non-negative weight per point bucket (not all zero)")
        if max(self.point_buckets) > self.generator.max_len:
            raise ValueError(f"data.point_buckets {self.point_buckets} exceed generator.max_len "
                             f"{self.generator.max_len}")
        if self.points_per_batch < max(self.point_buckets):
            raise ValueError(f"data.points_per_batch {self.points_per_batch} must hold at least one example of the "
                             f"largest bucket ({max(self.point_buckets)} points)")
        if not self.target_buckets or min(self.target_buckets) < 4:
            raise ValueError("data.target_buckets must be target lengths >= 4")
        if self.batch_multiple < 1 or self.workers < 0 or self.prefetch < 0:
            raise ValueError("data.batch_multiple must be >= 1, data.workers and data.prefetch >= 0")


def make_batch(cfg: DataConfig, vocab: DecoderVocab, max_dim: int, step: int) -> dict:
    """The batch of training step `step` (pure function of cfg, vocab and step)."""
    rng = np.random.default_rng([cfg.seed, 1, step])
    weights = np.asarray(cfg.bucket_weights, np.float64)
    cap = int(cfg.point_buckets[rng.choice(len(weights), p=weights / weights.sum())])
    rows = max(cfg.points_per_batch // cap // cfg.batch_multiple, 1) * cfg.batch_multiple
    gen = _generator(dataclasses.replace(cfg.generator, max_len=cap, n_points=None))
    max_target = max(cfg.target_buckets)
    points = np.full((rows, cap, 3 * (max_dim + 1)), 0, np.int32)
    mask = np.zeros((rows, cap), bool)
    targets, n_vars = [], np.zeros(rows, np.int32)
    index = 0
    for r in range(rows):
        while True:  # examples too long for the largest target bucket are replaced by the next index
            s = gen.sample(np.random.default_rng([cfg.seed, 0, step, index]))
            index += 1
            ids = vocab.encode_expression(s.expression)
            if len(ids) + 2 <= max_target and s.x_NxD.shape[1] <= max_dim:
                break
        n = len(s.y_N)
        points[r, :n] = encode_points(s.x_NxD, s.y_N, max_dim)
        mask[r, :n] = True
        targets.append(ids)
        n_vars[r] = s.x_NxD.shape[1]
    longest = max(len(t) for t in targets) + 2
    width = min(b for b in cfg.target_buckets if b >= longest)
    target = np.full((rows, width), PAD, np.int32)
    for r, ids in enumerate(targets):
        target[r, 0] = EOS
        target[r, 1:1 + len(ids)] = ids
        target[r, 1 + len(ids)] = EOS
    return {"points": points, "point_mask": mask, "target": target, "n_vars": n_vars}


def _job(args):
    return make_batch(*args)


class BatchStream:
    """`stream(step)` -> the batch of `step`; later steps are generated ahead in worker processes."""

    def __init__(self, cfg: DataConfig, vocab: DecoderVocab, max_dim: int):
        self.cfg, self.vocab, self.max_dim = cfg, vocab, max_dim
        self.wait_s = 0.0
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._pool = None
        if cfg.workers > 0 and cfg.prefetch > 0:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                cfg.workers, mp_context=multiprocessing.get_context("spawn"))

    def __call__(self, step: int) -> dict:
        t0 = time.perf_counter()
        future = self._pending.pop(step, None)
        batch = future.result() if future is not None else make_batch(self.cfg, self.vocab, self.max_dim, step)
        self.wait_s += time.perf_counter() - t0
        if self._pool is not None:
            for s in list(self._pending):
                if s < step:
                    self._pending.pop(s).cancel()
            for s in range(step + 1, step + 1 + self.cfg.prefetch):
                if s not in self._pending:
                    self._pending[s] = self._pool.submit(_job, (self.cfg, self.vocab, self.max_dim, s))
        return batch

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
