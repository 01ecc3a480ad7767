"""The E2E symbolic-regression experiment's config, loaded from configs/sr_*.yaml with `--set` overrides.

`SRConfig.config_rules` lists the allowed ranges that `core_jax.config` checks when a config is loaded (the
sections' own dataclasses check the rest when built), so a value that cannot work is a one-line error naming the key.
"""

from __future__ import annotations

import dataclasses

from core_jax.config import Rule, at_least, each, positive
from core_jax.train import TrainConfig
from sr_jax.data import DataConfig
from sr_jax.model import ModelConfig
from sr_jax.vocab import DecoderVocab


def two_points() -> Rule:
    """A point count the generator can sample: it standardises each input column, which one point cannot fill."""
    return Rule(at_least(2).ok, ">= 2 (the generator standardises each input column)")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """In-domain validation during training: fixed generated problems (seed, n_points), greedy candidate."""

    n_problems: int = 32           # problems in the fixed validation set
    n_points: int = 200            # fit points per problem (the original's validation uses 200)
    seed: int = 1                  # the original's test_env_seed
    refine_maxiter: int = 100      # BFGS evaluations when refining the greedy candidate

    @staticmethod
    def config_rules(section: dict) -> list[tuple[str, Rule]]:
        return [("n_problems", at_least(0)), ("n_points", two_points()), ("seed", at_least(0)),
                ("refine_maxiter", at_least(0))]


@dataclasses.dataclass(frozen=True)
class SRConfig:
    name: str = "sr"
    model: ModelConfig = ModelConfig()
    vocab: DecoderVocab = DecoderVocab()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @staticmethod
    def config_rules(c: dict) -> list[tuple[str, Rule]]:
        """Allowed ranges (checked by core_jax.config when the config is loaded)."""
        m, g = c["model"], c["data"]["generator"]
        return [
            *[(f"model.{k}", at_least(1)) for k in ("emb_dim", "emb_expansion", "width", "heads", "enc_layers",
                                                     "dec_layers", "ffn_mult", "max_dim")],
            ("model.max_len", at_least(4)),
            ("model.width", Rule(lambda w: w % m["heads"] == 0, f"divisible by model.heads ({m['heads']})")),
            ("model.max_dim", Rule(lambda v: v <= 10, "<= 10 (variables x_0..x_9)")),
            ("data.seed", at_least(0)), ("data.points_per_batch", at_least(1)), ("data.batch_multiple", at_least(1)),
            ("data.workers", at_least(0)), ("data.prefetch", at_least(0)),
            ("data.point_buckets", each(two_points())), ("data.bucket_weights", each(at_least(0))),
            ("data.target_buckets", each(Rule(lambda v: 4 <= v <= m["max_len"],
                                              f"in [4, model.max_len = {m['max_len']}] (the decoder's "
                                              f"position table)"))),
            ("data.generator.max_input_dimension", Rule(lambda v: 1 <= v <= m["max_dim"],
                                                        f"in [1, model.max_dim = {m['max_dim']}]")),
            *[(f"data.generator.{k}", at_least(0)) for k in (
                "min_unary_ops", "max_unary_ops", "min_binary_ops_per_dim", "max_binary_ops_per_dim",
                "max_binary_ops_offset", "max_unary_depth", "float_precision", "max_exponent_prefactor",
                "max_exponent", "train_noise_gamma")],
            *[(f"data.generator.{k}", at_least(1)) for k in ("max_centroids", "min_len_per_dim", "max_attempts")],
            *[(f"data.generator.{k}", two_points()) for k in ("max_len", "n_points", "n_prediction_points")],
            ("data.generator.prediction_sigmas", each(positive())),
            ("data.generator.max_binary_ops_per_dim", Rule(lambda v: v >= g["min_binary_ops_per_dim"],
                                                           ">= data.generator.min_binary_ops_per_dim")),
        ]
