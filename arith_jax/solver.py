"""`Solver`: a trained model behind a plain-strings API, in ordinary digit order; `ShippedSolver`: the shipped
models together, each problem answered by the one of its operation."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from arith_jax.config import fits_positions
from arith_jax.data import answer_length, format_answer, parse_problem, sort_prompt_numbers
from arith_jax.evaluate import solve_prompts
from arith_jax.train import load_trained
from core_jax.config import to_dict

INVALID = "?"  # the answer reported when the model generated no number (no ordering of the labels, for sorting)
PRETRAINED = Path(__file__).parent / "pretrained"
SHIPPED_MODELS = {"add": PRETRAINED / "add_long_avg", "mul": PRETRAINED / "mul_small",
                  "sort": PRETRAINED / "sort_small"}
DEFAULT_MODEL = SHIPPED_MODELS["add"]
log = logging.getLogger(__name__)
_TASK_NAMES = {"add": "addition", "mul": "multiplication", "sort": "sorting"}


class Solver:
    """One model: Solver.load().solve(["123+456"]) -> ["579"]; a sorting model's
    Solver.load(SHIPPED_MODELS["sort"]).solve(["sort 42,24"]) -> ["24,42"].

    Every problem must be of the model's operation (`Solver.shipped()` takes any mix). Problems of any mix of
    lengths are padded into a few length buckets (`arith_jax.evaluate.solve_prompts`), so a call compiles one
    decoding program per bucket; answers are voted over the checkpoint's `eval.abacus_offsets` (the shipped addition
    model: 0, 5, 11; `solve_prompts`); every answer is the one its problem gets alone (for a model whose config sets
    `model.eval_init_noise`, evaluation starts from noise as the original's, and answers depend on that noise too:
    `solve_prompts` keys it by seed 0 and the problem's place in the call).
    """

    def __init__(self, cfg, model, params, recurrences: int | None = None, batch_size: int = 256):
        self.cfg, self.model, self.params = cfg, model, params
        self.recurrences, self.batch_size = recurrences, batch_size

    @classmethod
    def load(cls, path: str | Path | None = None, recurrences: int | None = None,
             abacus_offsets: tuple[int, ...] | None = None) -> "Solver":
        """Loads a checkpoint (training workdir, its checkpoints/ or an export); None = the shipped addition model.
        `abacus_offsets` overrides the checkpoint's `eval.abacus_offsets` (the Abacus offsets answers are voted
        over: `arith_jax.evaluate.solve_prompts`)."""
        cfg, model, params = load_trained(DEFAULT_MODEL if path is None else path, abacus_offsets=abacus_offsets)
        return cls(cfg, model, params, recurrences)

    @staticmethod
    def shipped(recurrences: int | None = None) -> "ShippedSolver":
        """The shipped addition, multiplication and sorting models behind one `solve` (see `ShippedSolver`)."""
        return ShippedSolver(recurrences)

    @property
    def task(self) -> str:
        return self.cfg.data.task

    @property
    def max_operand_len(self) -> int:
        """Longest operand (number, for sorting) the position tables can represent (no limit but a practical one
        without tables)."""
        m = self.cfg.model
        if "abacus" in m.positions:  # the longest number's ids, raised by the largest offset, fit the table
            top = m.table_size - 1 - max(self.cfg.eval.abacus_offsets)
            return {"add": top - 1, "mul": top // 2, "sort": top}[self.task]
        if "learned" in m.positions:
            if self.task == "sort":  # one number of D digits: D + 5 positions with label, ':', '=', answer, EOS
                return m.table_size - 5
            return (m.table_size - 4) // (3 if self.task == "add" else 4)
        return 1000

    def solve(self, problems: list[str]) -> list[str]:
        """Answers in ordinary notation ("579"; "4,31,159" for sorting), or `INVALID` where the model wrote none.
        Raises ValueError naming the first problem that is malformed, too long or of another operation."""
        problems = _problem_list(problems)
        parsed = []
        for text in problems:
            task, prompt = parse_problem(text, self.max_operand_len)
            if task != self.task:
                raise ValueError(f"{text.strip()!r} is {_TASK_NAMES[task]}, but this model was trained for "
                                 f"{_TASK_NAMES[self.task]}")
            parsed.append(prompt)
        lengths = [self._check_lengths(text, p) for text, p in zip(problems, parsed)]
        longest = max((max(ab) for ab in lengths), default=0)
        grid, trained = self.cfg.eval.max_len, self.cfg.data.max_len
        if longest > grid and self.task == "sort":
            digits, count = max(d for d, _ in lengths), max(c for _, c in lengths)
            log.warning("sorting %d numbers of up to %d digits is beyond the %d numbers of %d digits this model's "
                        "accuracy grid covers (trained on <= %d of <= %d); answers may be wrong", count, digits, grid,
                        grid, self.cfg.data.max_count, trained)
        elif longest > trained and "abacus" in self.cfg.model.positions and self.cfg.model.abacus_max_k == 0:
            # trained without id offsets: meant for its training lengths only (the shipped multiplication model)
            log.warning("operands of %d digits are beyond the %d digits this model was trained on (without Abacus "
                        "id offsets, so it does not generalise past them); answers may be wrong", longest, trained)
        elif longest > grid:
            log.warning("operands of %d digits are beyond the %d digits this model's accuracy grid covers (trained "
                        "on <= %d); answers may be wrong", longest, grid, trained)
        tok = self.cfg.data.tokenizer
        max_new = [answer_length(self.task, *ab) for ab in lengths]
        gens = solve_prompts(self.model, self.params, [np.asarray(tok.encode(p), np.int32) for p in parsed], max_new,
                             batch_size=self.batch_size, recurrences=self.recurrences,
                             abacus_offsets=self.cfg.eval.abacus_offsets)
        out = []
        for text, prompt, g in zip(problems, parsed, gens):
            raw = tok.decode(g.tolist())
            try:
                out.append(format_answer(self.task, raw, prompt))
            except ValueError:  # the model wrote something that is not an answer: say so, keep the others
                log.warning("the model produced no answer for %r (raw output %r)", text.strip(), raw)
                out.append(INVALID)
        return out

    def _check_lengths(self, text: str, prompt: str) -> tuple[int, int]:
        """The problem's grid cell (operand lengths; for sorting, most digits and count of numbers), after checking
        that a sorting problem fits the model's position tables."""
        if self.task != "sort":
            return _operand_lengths(prompt)
        numbers = sort_prompt_numbers(prompt).values()
        digits, count = max(len(x) for x in numbers), len(numbers)
        if not fits_positions(to_dict(self.cfg.model), "sort", digits, count, train=False):
            raise ValueError(f"{text.strip()!r}: {count} numbers of up to {digits} digits do not fit this model's "
                             f"position table (model.table_size {self.cfg.model.table_size}); sort fewer numbers")
        return digits, count


def _problem_list(problems) -> list[str]:
    """``solve``'s argument as a list of strings; a ValueError for one bare string or an item that is not a string."""
    if isinstance(problems, (str, bytes)):
        raise ValueError(f"solve takes a list of problems, e.g. solve([{problems!r}]), not one string")
    problems = list(problems)
    bad = next((i for i, text in enumerate(problems) if not isinstance(text, str)), None)
    if bad is not None:
        raise ValueError(f"problem {bad} is {type(problems[bad]).__name__} {problems[bad]!r}, not a string like "
                         f"'123+456'")
    return problems


class ShippedSolver:
    """Any mix of problems, each answered by the shipped model of its operation (`SHIPPED_MODELS`):
    Solver.shipped().solve(["12+34", "7x8", "sort 42,24"]) -> ["46", "56", "24,42"].

    A model is loaded the first time a problem needs it (and kept); `recurrences` (passes at test time) applies to
    every model used. Answers are those of `Solver.solve` on each operation's problems together.
    """

    def __init__(self, recurrences: int | None = None):
        self.recurrences = recurrences
        self._solvers: dict[str, Solver] = {}

    def solver(self, task: str) -> Solver:
        """The shipped model for `task` ('add', 'mul' or 'sort'), loaded on first use."""
        if task not in SHIPPED_MODELS:
            raise ValueError(f"unknown task {task!r}; expected one of {tuple(SHIPPED_MODELS)}")
        if task not in self._solvers:
            solver = Solver.load(SHIPPED_MODELS[task], recurrences=self.recurrences)
            if self.recurrences is not None and not solver.cfg.model.shared \
                    and self.recurrences != solver.cfg.model.recurrences:
                raise ValueError(f"recurrences {self.recurrences}: the shipped {_TASK_NAMES[task]} model has separate "
                                 f"weights per pass and runs exactly {solver.cfg.model.recurrences}")
            self._solvers[task] = solver
        return self._solvers[task]

    def solve(self, problems: list[str]) -> list[str]:
        """Answers in input order; raises ValueError naming the first malformed problem (before any model runs)
        or the first too long for its model."""
        problems = _problem_list(problems)
        by_task: dict[str, list[int]] = {}
        for i, text in enumerate(problems):
            task, _ = parse_problem(text)
            by_task.setdefault(task, []).append(i)
        out: list[str] = [""] * len(problems)
        for task, idx in by_task.items():
            for i, answer in zip(idx, self.solver(task).solve([problems[i] for i in idx])):
                out[i] = answer
        return out


def _operand_lengths(prompt: str) -> tuple[int, int]:
    body = prompt.rstrip("=")
    op = "+" if "+" in body else "x"
    a, b = body.split(op)
    return len(a), len(b)
