"""The E2E symbolic-regression experiment's config, loaded from configs/sr_*.yaml with `--set` overrides."""

from __future__ import annotations

import dataclasses

from core_jax.train import TrainConfig
from sr_jax.data import DataConfig
from sr_jax.model import ModelConfig
from sr_jax.vocab import DecoderVocab


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """In-domain validation during training: fixed generated problems (seed, n_points), greedy candidate."""

    n_problems: int = 32           # problems in the fixed validation set
    n_points: int = 200            # fit points per problem (the original's validation uses 200)
    seed: int = 1                  # the original's test_env_seed
    refine_maxiter: int = 100      # BFGS evaluations when refining the greedy candidate

    def __post_init__(self):
        if self.n_problems < 0 or self.n_points < 1 or self.refine_maxiter < 0:
            raise ValueError("eval.n_problems >= 0, eval.n_points >= 1 and eval.refine_maxiter >= 0 are required")


@dataclasses.dataclass(frozen=True)
class SRConfig:
    name: str = "sr"
    model: ModelConfig = ModelConfig()
    vocab: DecoderVocab = DecoderVocab()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    def __post_init__(self):
        if max(self.data.target_buckets) > self.model.max_len:
            raise ValueError(f"data.target_buckets {self.data.target_buckets} exceed model.max_len "
                             f"{self.model.max_len} (the decoder's position table)")
        if self.data.generator.max_input_dimension > self.model.max_dim:
            raise ValueError(f"data.generator.max_input_dimension {self.data.generator.max_input_dimension} "
                             f"exceeds model.max_dim {self.model.max_dim}")
