"""Training batches for the E2E model: generated on the fly, deterministic in (seed, step), in a few fixed shapes.

The original fills a batch up to a budget of points (sequences x largest point count <= 10 000; spec §5). Here each
step draws a point-count cap from `point_buckets` (with `bucket_weights`); its examples are generated with N drawn
as the generator does but capped there (N ~ U{min(5d, cap)..cap}), and the batch holds points_per_batch // cap
examples. The batch for step s is the same whatever happened before it: the step stored in a checkpoint is the
data-stream position.

Two layouts of the same examples (`pack`):

- padded (`pack=False`): one example per row; points padded to the cap, targets to the smallest of
  `target_buckets` that fits the longest one. At most len(point_buckets) x len(target_buckets) training programs.
- packed (`pack=True`): several examples per row. Rows hold up to `cap` points and max(target_buckets) target tokens;
  the step's examples are placed by first-fit decreasing (largest share of a row first) and the row count is
  rounded up to a multiple of `pack_row_multiple` (and of `batch_multiple`). Segment ids (1, 2, ... within a row,
  0 = padding) say which example each point and target token belongs to; the model attends within a segment and
  restarts the decoder positions per segment, so the loss is that of the padded layout up to rounding. At most
  sum over caps of ceil(examples / pack_row_multiple) training programs (one target width), a few in practice.

`BatchStream(cfg)` serves `batch(step)` and generates the next steps' batches in worker processes while the
current step runs; `wait_s` is the time the training loop spent waiting for data.

Batch (numpy), padded: points int32[B, N, P] (sr_jax.vocab.encode_points), point_mask bool[B, N], target int32[B, T]
(EOS as BOS, the expression's decoder ids, EOS, then PAD), n_vars int32[B]. Packed: points, point_mask and target
as above with R rows of several examples each (target: the examples' [EOS, ids, EOS] back to back, then PAD), plus
point_segment int32[R, N], target_segment int32[R, T] and target_position int32[R, T] (0 at each example's BOS).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import multiprocessing
import time
from typing import NamedTuple

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
    pack: bool = False                      # several examples per row with segment ids (module doc)
    pack_row_multiple: int = 4              # packed batches' row counts are rounded up to a multiple of this

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
        if self.pack_row_multiple < 1:
            raise ValueError(f"data.pack_row_multiple must be >= 1, got {self.pack_row_multiple}")


class Example(NamedTuple):
    """One generated training example: encoded points [n, P], its expression's decoder ids, its variable count."""

    points_nxP: np.ndarray
    ids: list
    n_vars: int


def step_examples(cfg: DataConfig, vocab: DecoderVocab, max_dim: int, step: int) -> tuple[int, list[Example]]:
    """(point cap, examples) of training step `step`: the same for both layouts (pure function of cfg and step)."""
    rng = np.random.default_rng([cfg.seed, 1, step])
    weights = np.asarray(cfg.bucket_weights, np.float64)
    cap = int(cfg.point_buckets[rng.choice(len(weights), p=weights / weights.sum())])
    rows = max(cfg.points_per_batch // cap // cfg.batch_multiple, 1) * cfg.batch_multiple
    gen = _generator(dataclasses.replace(cfg.generator, max_len=cap, n_points=None))
    max_target = max(cfg.target_buckets)
    examples = []
    index = 0
    for _ in range(rows):
        while True:  # examples too long for the largest target bucket are replaced by the next index
            s = gen.sample(np.random.default_rng([cfg.seed, 0, step, index]))
            index += 1
            ids = vocab.encode_expression(s.expression)
            if len(ids) + 2 <= max_target and s.x_NxD.shape[1] <= max_dim:
                break
        examples.append(Example(encode_points(s.x_NxD, s.y_N, max_dim), ids, s.x_NxD.shape[1]))
    return cap, examples


def make_batch(cfg: DataConfig, vocab: DecoderVocab, max_dim: int, step: int) -> dict:
    """The batch of training step `step` (pure function of cfg, vocab and step), padded or packed (`cfg.pack`)."""
    cap, examples = step_examples(cfg, vocab, max_dim, step)
    if cfg.pack:
        return packed_batch(examples, cap, max(cfg.target_buckets), math.lcm(cfg.pack_row_multiple,
                                                                             cfg.batch_multiple))
    return padded_batch(examples, cap, cfg.target_buckets)


def _target_row(ids) -> list:
    return [EOS, *ids, EOS]


def padded_batch(examples: list[Example], cap: int, target_buckets) -> dict:
    """One example per row: points padded to `cap`, targets to the smallest target bucket that fits them all."""
    rows, n_tokens = len(examples), examples[0].points_nxP.shape[1]
    points = np.zeros((rows, cap, n_tokens), np.int32)
    mask = np.zeros((rows, cap), bool)
    longest = max(len(e.ids) for e in examples) + 2
    width = min(b for b in target_buckets if b >= longest)
    target = np.full((rows, width), PAD, np.int32)
    for r, e in enumerate(examples):
        n = len(e.points_nxP)
        points[r, :n] = e.points_nxP
        mask[r, :n] = True
        target[r, :len(e.ids) + 2] = _target_row(e.ids)
    n_vars = np.array([e.n_vars for e in examples], np.int32)
    return {"points": points, "point_mask": mask, "target": target, "n_vars": n_vars}


def pack_rows(sizes_Ex2: np.ndarray, capacity: tuple[int, int]) -> np.ndarray:
    """Row of each item under first-fit decreasing in two dimensions (points, target tokens): items by their
    largest share of a row, descending (ties in item order), each into the first row with room in both."""
    sizes_Ex2 = np.asarray(sizes_Ex2, np.int64)
    cap = np.asarray(capacity, np.int64)
    if (sizes_Ex2 > cap).any():
        raise ValueError(f"an item of size {sizes_Ex2.max(0).tolist()} exceeds the row capacity {capacity}")
    order = np.argsort(-(sizes_Ex2 / cap).max(1), kind="stable")
    free, row_E = [], np.zeros(len(sizes_Ex2), np.int64)
    for e in order:
        for r, f in enumerate(free):
            if (sizes_Ex2[e] <= f).all():
                break
        else:
            r = len(free)
            free.append(cap.copy())
        free[r] = free[r] - sizes_Ex2[e]
        row_E[e] = r
    return row_E


def packed_batch(examples: list[Example], cap: int, target_len: int, row_multiple: int) -> dict:
    """Several examples per row (rows of `cap` points and `target_len` target tokens), rows rounded up to a multiple
    of `row_multiple`; segment ids 1, 2, ... in each row's order of placement, 0 on padding."""
    sizes = np.array([(len(e.points_nxP), len(e.ids) + 2) for e in examples])
    row_E = pack_rows(sizes, (cap, target_len))
    rows = -(-(int(row_E.max()) + 1) // row_multiple) * row_multiple
    n_tokens = examples[0].points_nxP.shape[1]
    points = np.zeros((rows, cap, n_tokens), np.int32)
    point_segment = np.zeros((rows, cap), np.int32)
    target = np.full((rows, target_len), PAD, np.int32)
    target_segment = np.zeros((rows, target_len), np.int32)
    target_position = np.zeros((rows, target_len), np.int32)
    used_points, used_target, segments = np.zeros(rows, int), np.zeros(rows, int), np.zeros(rows, int)
    for e, r in zip(examples, row_E):
        segments[r] += 1
        n, t, p0, t0 = len(e.points_nxP), len(e.ids) + 2, used_points[r], used_target[r]
        points[r, p0:p0 + n] = e.points_nxP
        point_segment[r, p0:p0 + n] = segments[r]
        target[r, t0:t0 + t] = _target_row(e.ids)
        target_segment[r, t0:t0 + t] = segments[r]
        target_position[r, t0:t0 + t] = np.arange(t)
        used_points[r] += n
        used_target[r] += t
    return {"points": points, "point_mask": point_segment > 0, "target": target, "point_segment": point_segment,
            "target_segment": target_segment, "target_position": target_position}


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
