"""`run.py sr bench`: error paths give one line and exit 2; a run with a test regressor and with Operon works."""

import json

import numpy as np
import pytest

from sr_jax import bench_cli, feynman
from sr_jax.bench_cli import main


class LinearRegressor:
    """Test double: ordinary least squares y = X w + b (numpy), with its sympy expression in x_i names."""

    def fit(self, X, y):
        self.coef_ = np.linalg.lstsq(np.c_[X, np.ones(len(X))], y, rcond=None)[0]
        import sympy

        xs = sympy.symbols(f"x_0:{X.shape[1]}")
        self.expression_ = sum(w * x for w, x in zip(self.coef_[:-1], xs)) + self.coef_[-1]
        return self

    def predict(self, X):
        return X @ self.coef_[:-1] + self.coef_[-1]


def _linear(seed):
    return LinearRegressor()


@pytest.mark.parametrize("argv,message", [
    (["strogatz"], "invalid choice: 'strogatz'"),
    (["feynman", "--limit", "0"], "expected an integer >= 1, got 0"),
    (["feynman", "--noise", "-0.1"], "expected a finite number >= 0"),
    (["feynman", "--noise", "nan"], "expected a finite number >= 0"),
    (["feynman", "--time-per-problem", "0"], "expected a finite number > 0, got 0"),
    (["feynman", "--compare", "eureqa"], "invalid choice: 'eureqa'"),
    (["feynman", "--problems", "I.99.9"], "unknown Feynman equations ['I.99.9']"),
    (["feynman", "--problems", "I.9.18", "--max-vars", "2"], "no equation has at most 2 variables"),
    (["feynman", "--table", "/nonexistent/table.csv"], "not found"),
    (["feynman", "--json", "/nonexistent/dir/out.json"], "folder '/nonexistent/dir' does not exist"),
    (["feynman", "--bogus"], "unrecognized arguments: --bogus"),
    (["feynman", "--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    (["feynman", "--json", "/proc/out.json"], "cannot write --json '/proc/out.json'"),
])
def test_errors_are_one_line_exit_2(capsys, argv, message):
    assert main(argv, make_regressor=_linear) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_compare_operon_without_pyoperon_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(feynman, "operon_version", lambda: None)
    assert main(["feynman", "--limit", "1", "--compare", "operon"], make_regressor=_linear) == 2
    err = capsys.readouterr().err.strip()
    assert "pyoperon" in err and 'pip install -e ".[operon]"' in err and "\n" not in err


def test_run_with_a_test_regressor_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["feynman", "--problems", "I.12.5,II.11.28,I.14.3", "--json", str(out), "--no-progress", "--seed", "4",
            "--noise", "0.01"]
    assert main(argv, make_regressor=_linear, method="linear") == 0
    captured = capsys.readouterr()
    assert "note: I.18.12 fixed" in captured.err and "R2 > 0.99" in captured.out and "linear" in captured.out
    report = json.loads(out.read_text())
    assert report["settings"]["problems"] == ["I.12.5", "I.14.3", "II.11.28"]  # table order
    assert report["settings"]["noise"] == 0.01 and report["settings"]["seed"] == 4
    assert {n["name"] for n in report["table_notes"]} == set(feynman.MISCOUNTED_ROWS)
    results = {r["problem"]: r for r in report["results"]}
    assert results["I.12.5"]["r2"] < 0.999  # q2*Ef is not linear
    assert results["I.14.3"]["r2"] < 0.999
    assert report["summary"]["linear"]["n_problems"] == 3 and report["complete"] is True


def test_json_says_which_source_each_chosen_equation_came_from(tmp_path, capsys):
    class Best:
        source = "basis"

    class Sourced(LinearRegressor):
        best_ = Best()

    out = tmp_path / "bench.json"
    argv = ["feynman", "--problems", "I.12.1,I.14.3", "--json", str(out), "--no-progress"]
    assert main(argv, make_regressor=lambda seed: Sourced(), method="linear") == 0
    report = json.loads(out.read_text())
    assert [r["source"] for r in report["results"]] == ["basis", "basis"]
    solved = sum(r["r2_above_0.99"] for r in report["results"])
    assert report["settings"]["solved_by_source"] == ({"basis": solved} if solved else {})


def test_an_interrupted_run_keeps_the_finished_problems_in_the_json(tmp_path, capsys):
    class StopsOnSecond(LinearRegressor):
        fits = 0

        def fit(self, X, y):
            StopsOnSecond.fits += 1
            if StopsOnSecond.fits == 2:
                raise KeyboardInterrupt  # as Ctrl-C (or a crash) in the middle of the second problem
            return super().fit(X, y)

    out = tmp_path / "bench.json"
    argv = ["feynman", "--problems", "I.12.1,I.14.3", "--json", str(out), "--no-progress"]
    assert main(argv, make_regressor=lambda seed: StopsOnSecond(), method="linear") == 130
    report = json.loads(out.read_text())
    assert report["complete"] is False
    assert [r["problem"] for r in report["results"]] == ["I.12.1"]
    assert report["summary"]["linear"]["n_problems"] == 1
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(feynman.operon_version() is None, reason="pyoperon not installed")
def test_compare_operon_side_by_side(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["feynman", "--problems", "I.12.1,II.38.14", "--time-per-problem", "1", "--compare", "operon",
            "--json", str(out), "--no-progress", "--operon-threads", "1"]
    assert main(argv, make_regressor=_linear, method="linear") == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0].split()
    assert header == ["metric", "linear", "operon"]
    report = json.loads(out.read_text())
    assert report["settings"]["operon_time_limit_s"] == 1
    operon = [r for r in report["results"] if r["method"] == "operon"]
    assert [r["problem"] for r in operon] == ["I.12.1", "II.38.14"]
    assert all(r["error"] is None and r["expression"] for r in operon)
    assert operon[0]["r2"] > 0.99  # mu*Nn: one product, which Operon finds in a second
    assert all(r["seconds"] < 10 for r in operon)


def test_operon_regressor_expression_matches_its_predictions():
    pytest.importorskip("pyoperon")
    rng = np.random.default_rng(0)
    X = rng.uniform(1, 2, size=(100, 2))
    reg = feynman.OperonRegressor(0.5, random_state=1, n_threads=1).fit(X, X[:, 0] * X[:, 1] + 1)
    import sympy

    fn = sympy.lambdify(sympy.symbols("x_0 x_1"), reg.expression_, "numpy")
    np.testing.assert_allclose(np.broadcast_to(fn(X[:, 0], X[:, 1]), (100,)), reg.predict(X), rtol=1e-6,
                               atol=1e-9)


def test_parser_help_lists_the_benchmark_options():
    text = bench_cli._parser().format_help()
    for flag in ("--limit", "--seed", "--json", "--noise", "--compare", "--max-vars", "--time-per-problem"):
        assert flag in text
