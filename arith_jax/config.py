"""The arithmetic experiment's config: model, data, training and evaluation, loaded from configs/arith_*.yaml.

`ArithConfig.config_rules` lists every key's allowed range; `core_jax.config` checks them when a config is loaded,
so a value that cannot work (heads=0, float16, operands longer than the position table) is a one-line error.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from arith_jax.data import SAMPLERS, SAMPLING, DataConfig
from arith_jax.model import ATTENTION_KERNELS, FIRE_INITS, LOSS_REDUCTIONS, PROGRESSIVE_GRADS, ModelConfig
from arith_jax.tokenizer import TASKS
from core_jax.config import Rule, at_least, between, each, one_of
from core_jax.train import TrainConfig

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    max_len: int = 20              # accuracy grid over operand lengths 1..max_len on both axes
    n_per_cell: int = 100          # problems per grid cell (the original's 100)
    batch_size: int = 256          # decoding batch
    recurrences: int | None = None  # passes at test time (default: as trained); looped models may go higher
    sweep: tuple[int, ...] = ()    # equal-length operand sizes evaluated beyond the grid
    seed: int = 1234
    abacus_offsets: tuple[int, ...] = (0,)  # decode once per offset added to every digit's Abacus id and keep the
                                   # majority answer (`arith_jax.evaluate.solve_prompts`); (0,): once, as trained


def valid_abacus_offsets(offsets) -> bool:
    """One or more distinct integers >= 0 (what `eval.abacus_offsets` and `solve_prompts` accept)."""
    return (len(offsets) > 0 and len(set(offsets)) == len(offsets)
            and all(isinstance(o, (int, np.integer)) and not isinstance(o, bool) and o >= 0 for o in offsets))


def longest_number(task: str, max_len: int) -> int:
    """Most digits in one number of a problem (operands and answer) whose operands have <= max_len digits."""
    return {"add": max_len + 1, "mul": 2 * max_len, "sort": max_len}[task]


def sequence_length(task: str, max_len: int, max_count: int) -> int:
    """Prompt + answer + EOS tokens of the longest problem (what learned absolute positions must cover)."""
    return {"add": 3 * max_len + 4, "mul": 4 * max_len + 3, "sort": max_count * (max_len + 5)}[task]


def fits_positions(model: dict, task: str, max_len: int, max_count: int, train: bool, eval_offset: int = 0) -> bool:
    """Whether problems with operands of <= max_len digits stay inside the model's position tables (in training,
    the Abacus 'shift' offsets up to abacus_max_k come on top; in evaluation, the largest Abacus offset
    `eval_offset`)."""
    table = model["table_size"]
    if "abacus" in model["positions"]:
        offset = eval_offset
        if train:
            shifted = model["abacus_train_ids"] == "shift"
            offset = model["abacus_max_k"] if shifted else model.get("abacus_subset_shift", 0)
        if longest_number(task, max_len) + offset > table - 1:
            return False
    if "learned" in model["positions"]:
        return sequence_length(task, max_len, max_count) <= table
    return True


@dataclasses.dataclass(frozen=True)
class ArithConfig:
    name: str = "arith"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @staticmethod
    def config_rules(c: dict) -> list[tuple[str, Rule]]:
        """Allowed ranges (checked by core_jax.config when the config is loaded)."""
        m, d, task = c["model"], c["data"], c["data"]["task"]
        eval_offset = max(max(c["eval"]["abacus_offsets"], default=0), 0)

        def fits(train: bool, same_count: bool) -> Rule:
            def ok(n: int) -> bool:
                return fits_positions(m, task, n, n if same_count else d["max_count"], train,
                                      0 if train else eval_offset)
            limit = max((n for n in range(1, m["table_size"] + 1) if ok(n)), default=0)
            why = f"model.table_size {m['table_size']}, positions {list(m['positions'])}"
            if train and "abacus" in m["positions"] and m["abacus_train_ids"] == "shift":
                why += f", abacus_max_k {m['abacus_max_k']}"
            if train and "abacus" in m["positions"] and m["abacus_train_ids"] == "subset" and m["abacus_subset_shift"]:
                why += f", abacus_subset_shift {m['abacus_subset_shift']}"
            if not train and "abacus" in m["positions"] and eval_offset:
                why += f", eval.abacus_offsets up to {eval_offset}"
            return Rule(ok, f"<= {limit} (the longest operand the position table holds: {why})")

        if task not in TASKS:  # the position-table rules below need a known task: this one error comes first
            return [("data.task", one_of(TASKS))]
        return [
            ("model.width", at_least(1)), ("model.heads", at_least(1)),
            ("model.ffn", Rule(lambda v: v >= 2 and v % 2 == 0, "even and >= 2 (GLU: value and gate halves)")),
            ("model.layers", at_least(1)), ("model.recurrences", at_least(1)),
            ("model.abacus_max_k", at_least(0)), ("model.abacus_train_ids", one_of(("shift", "subset"))),
            ("model.abacus_subset_shift", at_least(0)), ("model.abacus_contiguous_frac", between(0, 1)),
            ("model.table_size", at_least(2)),
            ("model.max_backprop", Rule(lambda v: 1 <= v <= m["recurrences"],
                                       f"in [1, model.recurrences = {m['recurrences']}] or null")),
            ("model.init_noise", at_least(0)), ("model.scan_unroll", at_least(1)), ("model.dtype", one_of(DTYPES)),
            ("model.loss_reduction", one_of(LOSS_REDUCTIONS)), ("model.fire_init", one_of(FIRE_INITS)),
            ("model.progressive_grad", one_of(PROGRESSIVE_GRADS)), ("model.attention", one_of(ATTENTION_KERNELS)),
            ("model.width", Rule(lambda w: w % m["heads"] == 0, f"divisible by model.heads ({m['heads']})")),
            ("model.width", Rule(lambda w: "rope" not in m["positions"] or (w // m["heads"]) % 2 == 0,
                                 "such that model.width / model.heads is even (RoPE rotates pairs)")),
            ("data.task", one_of(TASKS)), ("data.max_len", at_least(1)), ("data.min_len", at_least(1)),
            ("data.max_count", at_least(1)), ("data.batch_size", at_least(1)), ("data.seed", at_least(0)),
            ("data.sampling", one_of(SAMPLING)), ("data.sampler", one_of(SAMPLERS)),
            ("data.max_len", fits(train=True, same_count=False)),
            ("eval.max_len", at_least(0)), ("eval.n_per_cell", at_least(1)), ("eval.batch_size", at_least(1)),
            ("eval.recurrences", at_least(1)), ("eval.seed", at_least(0)), ("eval.sweep", each(at_least(1))),
            ("eval.abacus_offsets", Rule(valid_abacus_offsets, "one or more distinct integers >= 0")),
            ("eval.abacus_offsets", Rule(lambda v: "abacus" in m["positions"] or tuple(v) == (0,),
                                         "(0,) for a model without Abacus positions (offsets would change nothing)")),
            ("eval.max_len", fits(train=False, same_count=True)),
            ("eval.sweep", each(fits(train=False, same_count=True))),
        ]
