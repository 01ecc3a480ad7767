"""Candidate expressions for a dataset, tagged with where they came from."""
from __future__ import annotations

from dataclasses import dataclass

from .expressions import Expression


@dataclass(frozen=True)
class Candidate:
    """One candidate expression: ``source`` names its origin ("greedy", "beam", "sample" from the transformer;
    "prior", "basis" from the non-neural pool); ``log_prob`` is the model's log-probability where there is one."""

    expression: Expression
    source: str
    log_prob: float | None = None
