"""Character-level tokenizers of the original code (spec section 2).

Each character is one token. The ids match `cramming/data/arithmetic_tokenizers.py` exactly, because
the Abacus embedding hard-codes the digit ids 4..13 and the loss mask reads the id of '=' (17).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIAL_IDS = (PAD, UNK, BOS, EOS)
DIGITS = "0123456789"
DIGIT_IDS = tuple(range(4, 14))  # '0'..'9' -> 4..13, in every vocabulary
TASKS = ("add", "mul", "sort")

# The original's fixed 102-character label list (`pick_char_set` in create_data_split.py), in its order:
# A-Z (26), a-w then y, z (25; there is no 'x', the multiplication sign), 25 symbols, 26 Greek letters.
# The spec's "β…ω" is made concrete as the original's 26 Greek letters, upper and lower case mixed.
SORT_LABELS = tuple(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "abcdefghijklmnopqrstuvwyz"
    "!@£#$%^&*()~?.,<>{}[]:;/|"
    "βΓΔδεζηθκΛλμΞξΠπΣςτΦφχΨψΩω"
)
assert len(SORT_LABELS) == 102 and len(set(SORT_LABELS)) == 102

_PAD_CHARS = "0123456789+-x= "  # ids 4..18 ('+' 14, '-' 15, 'x' 16, '=' 17, ' ' 18)
_SORT_CHARS = "0123456789D,:= "  # ids 4..18 ('D' 14, ',' 15, ':' 16, '=' 17, ' ' 18)

# 'D', ',' and ':' are in the label list but are also sort-vocabulary characters, so a label could
# collide with a separator (spec 1.4 quirk). The vocabulary holds the other 99 labels at ids 19..117,
# and generation draws labels only from these 99, so a sort string always parses unambiguously.
SORT_VOCAB_LABELS = tuple(c for c in SORT_LABELS if c not in _SORT_CHARS)
assert len(SORT_VOCAB_LABELS) == 99


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """One vocabulary: character i of `chars` has id 4 + i; a space encodes to PAD as in the original."""

    task: str
    chars: str

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def for_task(task: str) -> "Tokenizer":
        """The original's `pad` vocabulary for add/mul, its `sort` vocabulary for sort."""
        if task in ("add", "mul"):
            return Tokenizer(task, _PAD_CHARS)
        if task == "sort":
            return Tokenizer(task, _SORT_CHARS + "".join(SORT_VOCAB_LABELS))
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")

    @functools.cached_property
    def char_to_id(self) -> dict[str, int]:
        table = {c: 4 + i for i, c in enumerate(self.chars)}
        table[" "] = PAD  # `_tokenize` rewrites a space to [PAD]; id 18 is never emitted
        return table

    @functools.cached_property
    def id_to_char(self) -> dict[int, str]:
        """Every non-special id (4..vocab_size-1) to its character; id 18 decodes to a space."""
        return {4 + i: c for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return 4 + len(self.chars)

    @property
    def eq_id(self) -> int:
        return self.char_to_id["="]

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, one per character. Unknown characters raise instead of becoming UNK,
        so a typo in generated data or user input can never pass silently."""
        table = self.char_to_id
        try:
            return [table[c] for c in text]
        except KeyError as err:
            raise ValueError(
                f"character {err.args[0]!r} is not in the {self.task!r} vocabulary (in {text!r})"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text up to the first EOS; PAD and BOS are dropped, UNK shows as U+FFFD."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            if i == UNK:
                out.append("\ufffd")
            elif 4 <= i < self.vocab_size:
                out.append(self.chars[i - 4])
            else:
                raise ValueError(f"id {i} is outside the {self.task!r} vocabulary (size {self.vocab_size})")
        return "".join(out)
