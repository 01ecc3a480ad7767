"""Multiplication and sorting in `Solver` and `run.py arith solve`: sort syntax, routing a mix of operations to the
shipped models, and the error paths."""

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arith_jax import Solver
from arith_jax.cli import main
from arith_jax.data import (format_answer, format_sort_problem, parse_problem, parse_sort_problem,
                            sort_prompt_numbers)
from arith_jax.solver import SHIPPED_MODELS, ShippedSolver
from arith_jax.tokenizer import SORT_VOCAB_LABELS


# --- sort syntax (no model) -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(numbers=st.lists(st.integers(0, 10**12), min_size=1, max_size=len(SORT_VOCAB_LABELS)),
       spaces=st.booleans())
def test_sort_problem_round_trips_through_the_prompt(numbers, spaces):
    text = "sort " + (", " if spaces else ",").join(map(str, numbers))
    task, prompt = parse_problem(text)
    assert task == "sort" and prompt == parse_sort_problem(text)
    assert list(sort_prompt_numbers(prompt).values()) == [str(x) for x in numbers]
    # the training data's encoder gives the same prompt, and its answer reads back as the sorted numbers
    labels = SORT_VOCAB_LABELS[:len(numbers)]
    expected_prompt, labels_answer = format_sort_problem(labels, numbers)
    assert prompt == expected_prompt
    assert format_answer("sort", labels_answer, prompt) == ",".join(map(str, sorted(numbers)))


def test_sort_prompt_example():
    assert parse_problem("Sort 31, 4,159") == ("sort", "A:13,B:4,C:951=")
    assert parse_problem("sort 007") == ("sort", "A:7=")
    assert format_answer("sort", "B,A,C", "A:13,B:4,C:951=") == "4,31,159"


@pytest.mark.parametrize("text, kwargs, message", [
    ("sort", {}, "no numbers to sort"),
    ("sort   ", {}, "no numbers to sort"),
    ("sort 1,,2", {}, "missing number between commas"),
    ("sort 1,2,", {}, "missing number between commas"),
    ("sort 1,a", {}, "'a' in 'sort 1,a': only whole numbers"),
    ("sort 1 2", {}, "'1 2' in 'sort 1 2': only whole numbers"),
    ("sort 1.5,2", {}, "'1.5'"),
    ("sort 3,-4", {}, "negative numbers are not supported"),
    ("sort " + ",".join(["1"] * 100), {}, "100 numbers"),
    ("sort 1,123456", {"max_operand_len": 5}, "number '123456' has 6 digits; the limit is 5"),
])
def test_sort_parse_errors(text, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        parse_problem(text, **kwargs)
    assert "\n" not in str(err.value)


def test_sort_answer_must_be_an_ordering_of_the_labels():
    for bad in ("A", "A,A,B", "A,B,D", "", "A,B,C,"):
        with pytest.raises(ValueError, match="not an ordering"):
            format_answer("sort", bad, "A:1,B:2,C:3=")
    with pytest.raises(ValueError, match="needs the prompt"):
        format_answer("sort", "A")


# --- the shipped models -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    for task, path in SHIPPED_MODELS.items():
        assert path.is_dir(), f"the shipped {task} model must be in arith_jax/pretrained"
    return Solver.shipped()


def test_shipped_models_answer(shipped):
    """Problems in the grid cells the shipped models have at 100% (1-digit times 1-2 digits; 1-2 numbers): a broken
    model, decoder or answer reader gets them wrong."""
    assert shipped.solver("mul").task == "mul" and shipped.solver("sort").task == "sort"
    assert shipped.solve(["7*8", "9x99", "12x3", "3 x 45"]) == ["56", "891", "36", "135"]
    assert shipped.solve(["sort 5", "sort 42,24", "sort 7,1234", "sort 0010, 9"]) == ["5", "24,42", "7,1234", "9,10"]


def test_random_problems_in_the_models_exact_cells(shipped):
    """30 random problems of each operation from the cells the accuracy grids (docs/*_small_grid.json) have at >= 98%:
    one operand of 1 digit and the other of <= 2 (multiplication), 1 or 2 numbers of <= 4 digits (sorting)."""
    rng = random.Random(0)
    pairs = [(rng.randint(1, 9), rng.randint(1, 10 ** rng.randint(1, 2) - 1)) for _ in range(30)]
    pairs = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in pairs]
    arrays = [[rng.randint(1, 10 ** rng.randint(1, 4) - 1) for _ in range(rng.randint(1, 2))] for _ in range(30)]
    problems = [f"{a}x{b}" for a, b in pairs] + ["sort " + ",".join(map(str, xs)) for xs in arrays]
    expected = [str(a * b) for a, b in pairs] + [",".join(map(str, sorted(xs))) for xs in arrays]
    answers = shipped.solve(problems)
    right = sum(a == e for a, e in zip(answers, expected))
    assert right >= 58, [(p, a, e) for p, a, e in zip(problems, answers, expected) if a != e]


def test_mixed_problems_go_to_their_models(shipped):
    problems = ["12+34", "sort 9,81", "7x8", "99+1", "sort 42,24"]
    assert shipped.solve(problems) == ["46", "9,81", "56", "100", "24,42"]
    assert set(shipped._solvers) == {"add", "mul", "sort"}


def test_models_load_lazily(monkeypatch):
    loaded = []
    real = Solver.load

    def load(path=None, recurrences=None):
        loaded.append(path)
        return real(path, recurrences)

    monkeypatch.setattr(Solver, "load", staticmethod(load))
    solver = ShippedSolver()
    assert solver.solve(["2x3"]) == ["6"]
    assert loaded == [SHIPPED_MODELS["mul"]]
    with pytest.raises(ValueError, match="unsupported operator"):  # a bad problem: nothing more is loaded
        solver.solve(["sort 1,2", "1-2"])
    assert loaded == [SHIPPED_MODELS["mul"]]


def test_one_model_rejects_other_operations(shipped):
    with pytest.raises(ValueError, match="'sort 1,2' is sorting, but this model was trained for multiplication"):
        shipped.solver("mul").solve(["sort 1,2"])
    with pytest.raises(ValueError, match="'3x4' is multiplication, but this model was trained for sorting"):
        shipped.solver("sort").solve(["3x4"])


def test_too_long_for_the_model(shipped):
    sort = shipped.solver("sort")
    with pytest.raises(ValueError, match=f"the limit is {sort.max_operand_len} digits"):
        shipped.solve(["1+1", "sort 1," + "9" * (sort.max_operand_len + 1)])


# --- the command line ---------------------------------------------------------------------------------


def test_cli_mixed_file(tmp_path, capsys):
    problems = tmp_path / "mixed.txt"
    problems.write_text("3x45\nsort 42,24\n\n123+456\nsort 1,,2\n7*8\n")
    assert main(["solve", "--file", str(problems)]) == 2
    out = capsys.readouterr()
    assert out.out.split() == ["135", "24,42", "579", "56"]
    assert out.err == f"{problems}:5: error: missing number between commas in 'sort 1,,2'; expected e.g. " \
                      f"'sort 31,4,159'\n"


def test_cli_checkpoint_serves_its_operation_only(capsys):
    assert main(["solve", "--checkpoint", str(SHIPPED_MODELS["sort"]), "sort 42,24", "12x34"]) == 2
    out = capsys.readouterr()
    assert out.out == "24,42\n"
    assert out.err == "error: '12x34' is multiplication, but this model was trained for sorting\n"


def test_warns_beyond_the_evaluated_grid(shipped, caplog):
    mul, sort = shipped.solver("mul"), shipped.solver("sort")
    too_many = ",".join(["7"] * (sort.cfg.eval.max_len + 1))
    with caplog.at_level("WARNING"):
        shipped.solve(["1" * (mul.cfg.eval.max_len + 1) + "x3", f"sort {too_many}"])
    assert f"sorting {sort.cfg.eval.max_len + 1} numbers of up to 1 digits is beyond" in caplog.text
    # the multiplication model was trained without Abacus id offsets: past its training length it says so at once
    trained = mul.cfg.data.max_len
    assert mul.cfg.model.abacus_max_k == 0 and trained < mul.cfg.eval.max_len
    caplog.clear()
    with caplog.at_level("WARNING"):
        shipped.solve(["1" * trained + "x3"])
    assert "beyond" not in caplog.text
    with caplog.at_level("WARNING"):
        shipped.solve(["1" * (trained + 1) + "x3"])
    assert f"operands of {trained + 1} digits are beyond the {trained} digits this model was trained on" in caplog.text


def test_solve_takes_a_list_of_strings(shipped):
    for bad, message in [("12+34", "solve takes a list of problems, e.g. solve(['12+34']), not one string"),
                         (["1+2", 5], "problem 1 is int 5, not a string like '123+456'"),
                         ([b"1+2"], "problem 0 is bytes b'1+2', not a string")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            shipped.solve(bad)
        with pytest.raises(ValueError, match=re.escape(message)):
            shipped.solver("add").solve(bad)
    assert shipped.solve(("12+34", "7x8")) == ["46", "56"]
