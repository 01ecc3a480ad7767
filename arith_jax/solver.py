"""`Solver`: a trained model behind a plain-strings API, in ordinary digit order."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from arith_jax.data import answer_length, format_answer, parse_problem
from arith_jax.evaluate import solve_prompts
from arith_jax.train import load_trained

INVALID = "?"  # the answer reported when the model generated no number
DEFAULT_MODEL = Path(__file__).parent / "pretrained" / "add_small"
log = logging.getLogger(__name__)
_TASK_NAMES = {"add": "addition", "mul": "multiplication", "sort": "sorting"}


class Solver:
    """Solver.load().solve(["123+456"]) -> ["579"].

    Problems of any mix of lengths are padded into a few length buckets (`arith_jax.evaluate.solve_prompts`), so a
    call compiles one decoding program per bucket; every answer is the one its problem gets alone (for a model
    whose config sets `model.eval_init_noise`, evaluation starts from noise as the original's, and answers depend on
    that noise too: `solve_prompts` keys it by seed 0 and the problem's place in the call).
    """

    def __init__(self, cfg, model, params, recurrences: int | None = None, batch_size: int = 256):
        self.cfg, self.model, self.params = cfg, model, params
        self.recurrences, self.batch_size = recurrences, batch_size

    @classmethod
    def load(cls, path: str | Path | None = None, recurrences: int | None = None) -> "Solver":
        """Loads a checkpoint (training workdir, its checkpoints/ or an export); None = the shipped model."""
        cfg, model, params = load_trained(DEFAULT_MODEL if path is None else path)
        return cls(cfg, model, params, recurrences)

    @property
    def task(self) -> str:
        return self.cfg.data.task

    @property
    def max_operand_len(self) -> int:
        """Longest operand the position tables can represent (no limit but a practical one without tables)."""
        m = self.cfg.model
        if "abacus" in m.positions:
            return m.table_size - 2 if self.task == "add" else (m.table_size - 1) // 2
        if "learned" in m.positions:
            return (m.table_size - 4) // (3 if self.task == "add" else 4)
        return 1000

    def solve(self, problems: list[str]) -> list[str]:
        if self.task == "sort":
            raise ValueError("this model sorts; Solver.solve takes addition/multiplication problems")
        parsed = []
        for text in problems:
            task, prompt = parse_problem(text, self.max_operand_len)
            if task != self.task:
                raise ValueError(f"{text.strip()!r} is {_TASK_NAMES[task]}, but this model was trained for "
                                 f"{_TASK_NAMES[self.task]}")
            parsed.append(prompt)
        tok = self.cfg.data.tokenizer
        prompts = [tok.encode(p) for p in parsed]
        lengths = [_operand_lengths(p) for p in parsed]
        longest = max((max(ab) for ab in lengths), default=0)
        if longest > self.cfg.eval.max_len:
            log.warning("operands of %d digits are beyond the %d digits this model's accuracy grid covers "
                        "(trained on <= %d); answers may be wrong", longest, self.cfg.eval.max_len,
                        self.cfg.data.max_len)
        max_new = [answer_length(self.task, *ab) for ab in lengths]
        gens = solve_prompts(self.model, self.params, [np.asarray(p, np.int32) for p in prompts], max_new,
                             batch_size=self.batch_size, recurrences=self.recurrences)
        out = []
        for text, g in zip(problems, gens):
            raw = tok.decode(g.tolist())
            try:
                out.append(format_answer(self.task, raw))
            except ValueError:  # the model wrote something that is not a number: say so, keep the others
                log.warning("the model produced no number for %r (raw output %r)", text.strip(), raw)
                out.append(INVALID)
        return out


def _operand_lengths(prompt: str) -> tuple[int, int]:
    body = prompt.rstrip("=")
    op = "+" if "+" in body else "x"
    a, b = body.split(op)
    return len(a), len(b)
