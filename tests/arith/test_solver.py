"""The shipped model: loads without a path, answers in ordinary digit order, batches mixed lengths."""

import random

import pytest

from arith_jax import Solver
from arith_jax.decode import compiled_programs
from arith_jax.solver import DEFAULT_MODEL


@pytest.fixture(scope="module")
def solver():
    assert DEFAULT_MODEL.is_dir(), "the pretrained model must ship in arith_jax/pretrained"
    return Solver.load()


def test_examples(solver):
    assert solver.solve(["123+456"]) == ["579"]
    assert solver.solve(["9999999999+1", "0+0", "5+5"]) == ["10000000000", "0", "10"]


def test_in_distribution_batch(solver):
    rng = random.Random(0)
    problems = []
    for _ in range(60):
        a = rng.randint(1, 10 ** rng.randint(1, 10) - 1)
        b = rng.randint(1, 10 ** rng.randint(1, 10) - 1)
        problems.append((a, b))
    answers = solver.solve([f"{a} + {b}" for a, b in problems])
    right = sum(ans == str(a + b) for (a, b), ans in zip(problems, answers))
    assert right >= 58, (right, list(zip(problems, answers)))


def test_batched_equals_one_by_one(solver):
    problems = ["12+345", "98765+4321", "1+1", "5555555+4444444"]
    assert solver.solve(problems) == [solver.solve([p])[0] for p in problems]


def test_task_mismatch(solver):
    with pytest.raises(ValueError, match="multiplication"):
        solver.solve(["12*3"])


def test_warns_beyond_evaluated_lengths(solver, caplog):
    with caplog.at_level("WARNING"):
        solver.solve(["1" * 40 + "+1"])
    assert "beyond the 30 digits" in caplog.text


def test_second_load_compiles_nothing_new(solver):
    """Decoding programs are cached per model configuration and shapes, not per loaded instance."""
    problems = ["123+456", "9999999999+1"]
    want = solver.solve(problems)
    before = compiled_programs()
    again = Solver.load()
    assert again.model is not solver.model and again.params is not solver.params
    assert again.solve(problems) == want == ["579", "10000000000"]
    assert compiled_programs() == before
