"""On-the-fly arithmetic data in the original's formats (spec sections 1, 6 and 8).

Every batch is a pure function of (config, step): the training loop can resume from a step number
alone, and two runs with the same seed see the same data. All numbers are Python ints, digit
strings or digit arrays (`DataConfig.sampler`), so operands of hundreds of digits never overflow.

Formats (digits least-significant first, one character per token, EOS appended by `make_batch`):
    add   rev(a)+rev(b)=rev(a+b)          e.g. 123+4567 -> "321+7654=0964"
    mul   rev(a)xrev(b)=rev(a*b)
    sort  A:rev(n1),B:rev(n2),...=labels sorted by value (stable), e.g. "A:21,B:5=B,A"
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from arith_jax.tokenizer import EOS, PAD, SORT_VOCAB_LABELS, TASKS, Tokenizer

_OPERATOR = {"add": "+", "mul": "x"}
SAMPLING = ("iid", "cycle")
SAMPLERS = ("rows", "batch")
_EVAL_STREAM = 0xE7A1  # extra seed word: evaluation problems never share a random stream with training


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to train on.

    add/mul: each operand has min_len..max_len digits. sort: arrays of 1..max_count numbers whose
    maximum digit count D runs over min_len..max_len (each number then has 1..D digits, as the original).

    sampling: how rows are spread over the length cells (`length_cells`). "iid" (default): each row's cell is
    drawn uniformly and independently, as the original's shuffled rows of an exactly balanced dataset (every batch
    mixes all lengths). "cycle": global row g = step * batch_size + r takes cell g mod n_cells, so the counts are
    exactly balanced over each cycle but a batch with fewer rows than cells holds a contiguous run of cells (only
    some lengths); the shipped addition model was trained this way.

    sampler: how a batch's numbers are drawn. "rows" (default): one problem after another, Python integers and
    strings (the stream every shipped model was trained on). "batch" (add and mul): all rows' digits in a few
    array operations and the answers by digit arithmetic with carries, much faster to build (BENCHMARKS.md), which
    matters where the device's step is shorter than the host's batch, e.g. a small model on a GPU. The same
    distribution (each row's cell as `sampling` says, operands uniform over their digit counts) from another
    random stream, so the same seed gives other problems than "rows".
    """

    task: str = "add"
    max_len: int = 10
    max_count: int = 10
    min_len: int = 1
    batch_size: int = 64
    seed: int = 0
    sampling: str = "iid"
    sampler: str = "rows"

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASKS}")
        if self.sampling not in SAMPLING:
            raise ValueError(f"unknown data.sampling {self.sampling!r}; expected one of {SAMPLING}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown data.sampler {self.sampler!r}; expected one of {SAMPLERS}")
        if self.sampler == "batch" and self.task == "sort":
            raise ValueError("data.sampler 'batch' draws add and mul problems; sort takes sampler 'rows'")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if self.task == "sort" and not 1 <= self.max_count <= len(SORT_VOCAB_LABELS):
            raise ValueError(f"sort max_count must be in 1..{len(SORT_VOCAB_LABELS)}, got {self.max_count}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")

    @property
    def seq_len(self) -> int:
        """Fixed padded length = the longest possible sample + EOS (64 for add n=20, 63 for mul n=15,
        150 for sort 10x10), like the original's per-dataset padding."""
        n, m = self.max_len, self.max_count
        return {"add": 3 * n + 4, "mul": 4 * n + 3, "sort": m * (n + 5)}[self.task]

    @property
    def answer_len(self) -> int:
        """Most loss targets in a row: the longest possible answer plus its EOS."""
        return answer_length(self.task, self.max_len, self.max_count if self.task == "sort" else self.max_len)

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.for_task(self.task)


def length_cells(cfg: DataConfig) -> list[tuple[int, int]]:
    """The bucket cycle, in the original's loop order (first length outer).

    add/mul: (len_a, len_b) operand lengths; sort: (max digits D, array length L), the eval grid's axes.
    """
    first = range(cfg.min_len, cfg.max_len + 1)
    second = range(1, cfg.max_count + 1) if cfg.task == "sort" else first
    return [(i, j) for i in first for j in second]


def batch_cells(cfg: DataConfig, step: int, rng: np.random.Generator | None = None) -> list[tuple[int, int]]:
    """The length cell of each row of batch `step` (see `DataConfig.sampling`).

    "iid": `batch_size` cells drawn uniformly with replacement from `rng` (default: the batch's own stream,
    `np.random.default_rng([seed, step])`, which `sample_problems` then goes on drawing the problems from).
    "cycle": global sample g = step * batch_size + row takes cell g mod n_cells, so every cell gets exactly the
    same count over each full cycle, as the original's bucket method before its shuffle (no randomness).
    """
    cells = length_cells(cfg)
    if cfg.sampling == "cycle":
        g0 = step * cfg.batch_size
        return [cells[(g0 + r) % len(cells)] for r in range(cfg.batch_size)]
    rng = np.random.default_rng([cfg.seed, step]) if rng is None else rng
    return [cells[i] for i in rng.integers(0, len(cells), size=cfg.batch_size)]


def sample_problems(cfg: DataConfig, step: int) -> list[tuple[str, str]]:
    """(prompt ending in '=', answer without EOS) for each row of batch `step`, a pure function of
    (config, step): the rows' cells come from `batch_cells`, then each row's problem is drawn in its cell."""
    rng = np.random.default_rng([cfg.seed, step])
    return [_problem(cfg.task, rng, *cell) for cell in batch_cells(cfg, step, rng)]


def make_batch(cfg: DataConfig, step: int) -> dict[str, np.ndarray]:
    """tokens int32[B, seq_len] = prompt + answer + EOS, right-padded with PAD;
    mask float32[B, seq_len] = 1 exactly on the answer tokens and the EOS (the loss targets);
    loss_pos int32[B, answer_len] = `loss_positions(mask, cfg.answer_len)` (where the model's loss needs logits)."""
    if cfg.sampler == "batch":
        tokens, mask = _batch_rows(cfg, step)
    else:
        rows = [encode_sample(cfg.task, p, a, cfg.seq_len) for p, a in sample_problems(cfg, step)]
        tokens, mask = np.stack([t for t, _ in rows]), np.stack([m for _, m in rows])
    return {"tokens": tokens, "mask": mask, "loss_pos": loss_positions(mask, cfg.answer_len)}


_BATCH_STREAM = 0xBA7C  # extra seed word of sampler "batch": its stream never coincides with "rows"


def _batch_rows(cfg: DataConfig, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) of batch `step` for sampler "batch" (add, mul): every row's operands drawn at once as
    little-endian digit arrays (the prompt's order), the answer computed digit-wise with carries."""
    rng = np.random.default_rng([cfg.seed, step, _BATCH_STREAM])
    cells = np.asarray(batch_cells(cfg, step, rng), np.int64)
    len_a, len_b = cells[:, 0], cells[:, 1]
    a_BxN, b_BxN = _random_digits(rng, len_a, cfg.max_len), _random_digits(rng, len_b, cfg.max_len)
    if cfg.task == "add":
        out_BxR = np.zeros((len(cells), cfg.max_len + 1), np.int64)
        out_BxR[:, : cfg.max_len] = a_BxN + b_BxN
    else:   # schoolbook product: column sums of at most max_len digit products (<= 81 each)
        out_BxR = np.zeros((len(cells), 2 * cfg.max_len), np.int64)
        for i in range(cfg.max_len):
            out_BxR[:, i : i + cfg.max_len] += a_BxN[:, i : i + 1] * b_BxN
    for i in range(out_BxR.shape[1] - 1):   # carries, least significant digit first
        out_BxR[:, i + 1] += out_BxR[:, i] // 10
        out_BxR[:, i] %= 10
    nonzero = out_BxR > 0   # the answer is never 0 (operands >= 1): its length is one past its top nonzero digit
    len_r = out_BxR.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)

    ids = Tokenizer.for_task(cfg.task).char_to_id
    col = np.arange(cfg.seq_len)[None, :]
    la, lb, lr = len_a[:, None], len_b[:, None], len_r[:, None]
    start_b, eq, start_r = la + 1, la + lb + 1, la + lb + 2

    def digits_at(d, start, length):   # token ids of digit array d written from column `start` on
        inside = (col >= start) & (col < start + length)
        idx = np.clip(col - start, 0, d.shape[1] - 1)
        return inside, ids["0"] + np.take_along_axis(d, np.broadcast_to(idx, (len(d), cfg.seq_len)), axis=1)

    tokens = np.full((len(cells), cfg.seq_len), PAD, np.int64)
    for inside, value in (digits_at(a_BxN, 0, la), digits_at(b_BxN, start_b, lb), digits_at(out_BxR, start_r, lr)):
        tokens = np.where(inside, value, tokens)
    tokens = np.where(col == la, ids[_OPERATOR[cfg.task]], tokens)
    tokens = np.where(col == eq, ids["="], tokens)
    tokens = np.where(col == start_r + lr, EOS, tokens)
    mask = ((col >= start_r) & (col <= start_r + lr)).astype(np.float32)
    return tokens.astype(np.int32), mask


def _random_digits(rng: np.random.Generator, n_digits: np.ndarray, width: int) -> np.ndarray:
    """int64[B, width]: row b a number of exactly n_digits[b] digits, uniform, least significant first, zeros
    beyond its length (the top digit from 1..9, the others from 0..9)."""
    digits = rng.integers(0, 10, (len(n_digits), width))
    top = rng.integers(1, 10, len(n_digits))
    digits[np.arange(len(n_digits)), n_digits - 1] = top
    return np.where(np.arange(width)[None, :] < n_digits[:, None], digits, 0)


def loss_positions(mask_BxL: np.ndarray, width: int) -> np.ndarray:
    """int32[B, width]: per row, in order, the input positions p (of tokens[:, :-1]) whose next token is a loss
    target (mask[:, p + 1] > 0), padded with -1. The loss computes logits only there."""
    target_BxP = np.asarray(mask_BxL)[:, 1:] > 0
    counts = target_BxP.sum(axis=1)
    if counts.max(initial=0) > width:
        raise ValueError(f"a row has {int(counts.max())} loss targets, more than the {width} positions asked for")
    out = np.full((target_BxP.shape[0], width), -1, np.int32)
    rows, cols = np.nonzero(target_BxP)
    out[rows, np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)] = cols
    return out


def encode_sample(task: str, prompt: str, answer: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """One training row: (tokens int32[seq_len], loss mask float32[seq_len]), see `make_batch`."""
    ids = Tokenizer.for_task(task).encode(prompt + answer) + [EOS]
    if len(ids) > seq_len:
        raise ValueError(f"sample of {len(ids)} tokens does not fit seq_len {seq_len}: {prompt + answer!r}")
    tokens = np.full(seq_len, PAD, np.int32)
    tokens[: len(ids)] = ids
    mask = np.zeros(seq_len, np.float32)
    mask[len(prompt) : len(ids)] = 1.0
    return tokens, mask


def format_problem(task: str, a: int | str, b: int | str) -> tuple[str, str]:
    """Hand-made add/mul problem in model order: (prompt, answer), e.g. 123+4567 -> ("321+7654=", "0964")."""
    if task not in _OPERATOR:
        raise ValueError(f"format_problem supports 'add' and 'mul', not {task!r}")
    a, b = str(a), str(b)
    result = int(a) + int(b) if task == "add" else int(a) * int(b)
    return _prompt(task, a, b), str(result)[::-1]


def _prompt(task: str, a: str, b: str) -> str:
    return f"{a[::-1]}{_OPERATOR[task]}{b[::-1]}="


def format_sort_problem(labels: Sequence[str], numbers: Sequence[int | str]) -> tuple[str, str]:
    """Hand-made sort problem: ("A:21,B:5=", "B,A") for labels AB and numbers 12, 5.
    Ties keep their input order (Python's stable sort, as the original)."""
    numbers = [str(x) for x in numbers]
    prompt = ",".join(f"{lab}:{num[::-1]}" for lab, num in zip(labels, numbers, strict=True)) + "="
    order = sorted(range(len(numbers)), key=lambda k: int(numbers[k]))
    return prompt, ",".join(labels[k] for k in order)


# --- sampling -------------------------------------------------------------------------------------


def _problem(task: str, rng: np.random.Generator, len_a: int, len_b: int) -> tuple[str, str]:
    if task == "sort":
        return _sort_problem(rng, max_digits=len_a, count=len_b)
    return format_problem(task, _random_number(rng, len_a), _random_number(rng, len_b))


def _random_number(rng: np.random.Generator, n_digits: int) -> str:
    """Uniform on [10^(n-1), 10^n - 1]: exactly n digits, leading digit nonzero, never 0."""
    low = np.zeros(n_digits, np.int64)
    low[0] = 1
    return _digits_to_str(rng.integers(low, 10))


def _digits_to_str(digits: np.ndarray) -> str:
    return (np.asarray(digits, np.uint8) + ord("0")).tobytes().decode("ascii")


def _sort_problem(rng: np.random.Generator, max_digits: int, count: int) -> tuple[str, str]:
    """`count` numbers, each with a digit count uniform in 1..max_digits, labelled by a cyclic window
    of the 99 collision-free labels (the original's `uniform_distribution_sort_basic`)."""
    n_labels = len(SORT_VOCAB_LABELS)
    if not 1 <= count <= n_labels:
        raise ValueError(f"sort array length must be in 1..{n_labels}, got {count}")
    start = int(rng.integers(0, n_labels))
    labels = [SORT_VOCAB_LABELS[(start + k) % n_labels] for k in range(count)]
    n_digits = rng.integers(1, max_digits + 1, size=count)
    low = np.zeros((count, max_digits), np.int64)
    low[:, 0] = 1
    digits = rng.integers(low, 10)
    return format_sort_problem(labels, [_digits_to_str(digits[k, : n_digits[k]]) for k in range(count)])


# --- evaluation -----------------------------------------------------------------------------------


def make_eval_cell(task: str, len_a: int, len_b: int, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """n problems of one grid cell: prompts int32[n, P] (each ending in '=') and expected answers in
    model order, without EOS.

    add/mul: len_a, len_b are exact operand lengths, so all prompts have the same length.
    sort: len_a = max digits, len_b = array length; prompt lengths differ, so shorter ones are
    LEFT-padded with PAD (strip them with `row[row != PAD]`, PAD never occurs inside a prompt).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    rng = np.random.default_rng([seed, _EVAL_STREAM, TASKS.index(task), len_a, len_b])
    problems = [_problem(task, rng, len_a, len_b) for _ in range(n)]
    tok = Tokenizer.for_task(task)
    width = max((len(p) for p, _ in problems), default=0)
    prompts = np.full((n, width), PAD, np.int32)
    for row, (prompt, _) in enumerate(problems):
        prompts[row, width - len(prompt) :] = tok.encode(prompt)
    return prompts, [answer for _, answer in problems]


def answer_length(task: str, len_a: int, len_b: int) -> int:
    """Most tokens to generate for a cell: the longest possible answer plus its EOS."""
    if task == "add":
        return max(len_a, len_b) + 2
    if task == "mul":
        return len_a + len_b + 1
    if task == "sort":
        return 2 * len_b  # len_b labels, len_b - 1 commas, EOS
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


# --- user-facing problems -------------------------------------------------------------------------

_USER_OPERATORS = {"+": "add", "*": "mul", "x": "mul", "X": "mul", "×": "mul"}
_UNSUPPORTED_OPERATORS = set("-−/÷:^%")


def parse_problem(text: str, max_operand_len: int | None = None) -> tuple[str, str]:
    """Ordinary notation ("123+456", "12*34", "12x34", spaces around the operator allowed; "sort 31,4,159",
    see `parse_sort_problem`) to (task, model prompt), e.g. ("add", "321+654="). Leading zeros are dropped
    ("007" is 7). `max_operand_len` limits the digits of each operand (of each number, for sorting).

    Raises ValueError with a one-line message naming what is wrong, so a CLI can print it as is.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty problem")
    if _SORT_KEYWORD.match(s):
        return "sort", parse_sort_problem(s, max_operand_len)
    for c in s:
        if not (c in "0123456789" or c.isspace() or c in _USER_OPERATORS or c in _UNSUPPORTED_OPERATORS):
            raise ValueError(f"invalid character {c!r} in problem {s!r}")
    operators = [c for c in s if c in _USER_OPERATORS or c in _UNSUPPORTED_OPERATORS]
    if not operators:
        raise ValueError(f"missing operator in problem {s!r}; expected e.g. '123+456' or '12*34'")
    for c in operators:
        if c in _UNSUPPORTED_OPERATORS:
            raise ValueError(f"unsupported operator {c!r} in problem {s!r}; use '+', '*' or 'x'")
    if len(operators) > 1:
        raise ValueError(f"expected exactly one operator in problem {s!r}, found {len(operators)}")
    op = operators[0]
    operands = [part.strip() for part in s.split(op)]
    for part in operands:
        if not part:
            raise ValueError(f"missing operand in problem {s!r}")
        if re.search(r"\s", part):
            raise ValueError(f"space inside operand {part!r} in problem {s!r}")
    a, b = (part.lstrip("0") or "0" for part in operands)
    if max_operand_len is not None:
        for x in (a, b):
            if len(x) > max_operand_len:
                raise ValueError(
                    f"operand {x!r} has {len(x)} digits; the limit is {max_operand_len} digits (in {s!r})"
                )
    task = _USER_OPERATORS[op]
    return task, _prompt(task, a, b)


def format_answer(task: str, model_answer: str, prompt: str | None = None) -> str:
    """A model's answer in ordinary notation: add/mul, the number in ordinary digit order (the model writes the
    least-significant digit first); sort, the prompt's numbers in the order of the labels the model wrote, e.g.
    "4,31,159" for prompt "A:13,B:4,C:951=" and answer "B,A,C" (the prompt is needed to read a sorting answer).

    Raises ValueError when the model's output is not a number (not a permutation of the prompt's labels, for
    sorting), rather than printing garbage.
    """
    if task == "sort":
        if prompt is None:
            raise ValueError("format_answer needs the prompt to read a sorting answer (its labels name numbers)")
        return _format_sort_answer(prompt, model_answer)
    if task not in _OPERATOR:
        raise ValueError(f"format_answer supports 'add', 'mul' and 'sort', not {task!r}")
    if not re.fullmatch(r"[0-9]+", model_answer):
        raise ValueError(f"model answer {model_answer!r} is not a number")
    return model_answer[::-1]


_SORT_KEYWORD = re.compile(r"sort(\s|$)", re.IGNORECASE)


def parse_sort_problem(text: str, max_digits: int | None = None) -> str:
    """User sorting notation to the model's prompt: "sort 31,4,159" -> "A:13,B:4,C:951=".

    The keyword `sort` (any case), then whole numbers >= 0 separated by commas (spaces around them allowed).
    Leading zeros are dropped ("007" is 7). The numbers get the labels A, B, C, ... in input order
    (`SORT_VOCAB_LABELS`, as `format_sort_problem`, so at most 99 numbers); `max_digits` limits each number's
    digits. Raises ValueError naming the problem.
    """
    s = text.strip()
    if not _SORT_KEYWORD.match(s):
        raise ValueError(f"a sorting problem starts with 'sort', e.g. 'sort 31,4,159'; got {s!r}")
    body = s[4:].strip()
    if not body:
        raise ValueError(f"no numbers to sort in {s!r}; expected e.g. 'sort 31,4,159'")
    numbers = []
    for part in (p.strip() for p in body.split(",")):
        if not part:
            raise ValueError(f"missing number between commas in {s!r}; expected e.g. 'sort 31,4,159'")
        if not re.fullmatch(r"[0-9]+", part):
            what = "negative numbers are not supported" if re.fullmatch(r"-\s*[0-9]+", part) else \
                "only whole numbers >= 0 separated by commas can be sorted"
            raise ValueError(f"{part!r} in {s!r}: {what}")
        numbers.append(part.lstrip("0") or "0")
    if len(numbers) > len(SORT_VOCAB_LABELS):
        raise ValueError(f"{len(numbers)} numbers in {s!r}; at most {len(SORT_VOCAB_LABELS)} can be sorted at once "
                         f"(one label each)")
    if max_digits is not None:
        for x in numbers:
            if len(x) > max_digits:
                raise ValueError(f"number {x!r} has {len(x)} digits; the limit is {max_digits} digits (in {s!r})")
    return format_sort_problem(SORT_VOCAB_LABELS[: len(numbers)], numbers)[0]


def sort_prompt_numbers(prompt: str) -> dict[str, str]:
    """{label: number in ordinary digit order} of a sorting prompt, in prompt order: "A:13,B:4=" -> {A: 31, B: 4}
    (the inverse of `format_sort_problem`'s prompt; labels never contain ',', ':' or '=')."""
    body = prompt[:-1] if prompt.endswith("=") else prompt
    out = {}
    for item in body.split(","):
        label, sep, digits = item.partition(":")
        if not sep or len(label) != 1 or not re.fullmatch(r"[0-9]+", digits):
            raise ValueError(f"{prompt!r} is not a sorting prompt ('A:13,B:4=')")
        out[label] = digits[::-1]
    return out


def _format_sort_answer(prompt: str, model_answer: str) -> str:
    numbers = sort_prompt_numbers(prompt)
    labels = model_answer.split(",")
    if sorted(labels) != sorted(numbers):
        raise ValueError(f"model answer {model_answer!r} is not an ordering of the labels {','.join(numbers)}")
    return ",".join(numbers[label] for label in labels)
