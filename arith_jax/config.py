"""The arithmetic experiment's config: model, data, training and evaluation, loaded from configs/arith_*.yaml."""

from __future__ import annotations

import dataclasses

from arith_jax.data import DataConfig
from arith_jax.model import ModelConfig
from core_jax.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    max_len: int = 20              # accuracy grid over operand lengths 1..max_len on both axes
    n_per_cell: int = 100          # problems per grid cell (the original's 100)
    batch_size: int = 256          # decoding batch
    recurrences: int | None = None  # passes at test time (default: as trained); looped models may go higher
    sweep: tuple[int, ...] = ()    # equal-length operand sizes evaluated beyond the grid
    seed: int = 1234


@dataclasses.dataclass(frozen=True)
class ArithConfig:
    name: str = "arith"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
