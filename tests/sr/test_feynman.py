"""The Feynman benchmark: table loading (fixed rows), sampling, metrics, symbolic recovery and the runner."""

import threading
import time

import numpy as np
import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from sr_jax import feynman
from sr_jax.feynman import (MISCOUNTED_ROWS, load_feynman, normalise_constants, parse_formula, problem_seed,
                            run_benchmark, sample_problem, score_predictions, select_problems, summarize,
                            symbolic_recovery)

TABLE = load_feynman()
BY_NAME = {p.name: p for p in TABLE.problems}
HEADER = ("Filename,Number,Output,Formula,# variables,v1_name,v1_low,v1_high,v2_name,v2_low,v2_high,"
          "v3_name,v3_low,v3_high\n")


class PowerLawRegressor:
    """Test double: least squares on logs, y = ±exp(b) * prod x_i**w_i — exact for monomial formulas."""

    def fit(self, X, y):
        A_NxK = np.c_[np.log(X), np.ones(len(X))]
        self.coef_ = np.linalg.lstsq(A_NxK, np.log(np.abs(y)), rcond=None)[0]
        self.sign_ = float(np.sign(np.median(y)))
        xs = sympy.symbols(f"x_0:{X.shape[1]}")
        self.expression_ = self.sign_ * sympy.exp(self.coef_[-1]) * sympy.Mul(
            *[x**w for x, w in zip(xs, self.coef_[:-1])])
        return self

    def predict(self, X):
        return self.sign_ * np.exp(np.log(X) @ self.coef_[:-1] + self.coef_[-1])


class CrashingRegressor:
    def fit(self, X, y):
        raise RuntimeError("boom")

    def predict(self, X):
        raise AssertionError("predict after a failed fit")


# ---------------------------------------------------------------------------------------------------- loading


def test_every_row_loads_and_only_the_miscounted_rows_are_fixed():
    assert len(TABLE.problems) == 100
    assert {n.name for n in TABLE.notes} == set(MISCOUNTED_ROWS)
    assert all(n.action == "fixed" and "trusting the listed names" in n.reason for n in TABLE.notes)
    for p in TABLE.problems:
        assert {str(s) for s in p.formula.free_symbols} == set(p.variables), p.name
        assert len(p.ranges) == p.n_vars and all(lo < hi for lo, hi in p.ranges)
    assert BY_NAME["II.37.1"].variables == ("mom", "B", "chi")  # stated 6, listed 3
    assert BY_NAME["III.19.51"].n_vars == 5  # stated 4, listed 5


def test_table_names_are_variables_not_sympy_builtins():
    # gamma, I, beta, E_n would otherwise be sympy's gamma function, imaginary unit, beta function ...
    p = BY_NAME["I.39.11"]  # 1/(gamma-1)*pr*V
    assert p.evaluate(np.array([[3.0, 2.0, 5.0]]))[0] == pytest.approx(5.0)
    assert BY_NAME["III.17.37"].evaluate(np.array([[2.0, 0.5, 0.0]]))[0] == pytest.approx(3.0)  # beta*(1+a cos)
    assert BY_NAME["I.37.4"].evaluate(np.array([[1.0, 4.0, 0.0]]))[0] == pytest.approx(9.0)  # I1+I2+2sqrt(I1 I2)


@pytest.mark.parametrize("name", [p.name for p in TABLE.problems])
def test_every_formula_is_finite_on_samples_of_its_ranges(name):
    data = sample_problem(BY_NAME[name], n_train=500, n_test=500, seed=3)
    assert np.isfinite(data.y_train_N).all() and np.isfinite(data.y_test_M).all()


def test_tilde_is_unary_minus_with_its_precedence():
    theta = sympy.Symbol("theta", positive=True)
    assert parse_formula("exp(~theta**2/2)", ["theta"]) == sympy.exp(-theta**2 / 2)
    assert BY_NAME["I.6.2a"].evaluate(np.array([[2.0]]))[0] == pytest.approx(np.exp(-2.0) / np.sqrt(2 * np.pi))


def test_bad_rows_are_skipped_with_their_reason(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text(HEADER +
                    "A,1,f,x*y,3,x,1,2,y,1,2,,,\n"          # stated 3, listed 2: fixed
                    "B,2,f,x*(y,2,x,1,2,y,1,2,,,\n"         # does not parse
                    "C,3,f,x*z,2,x,1,2,y,1,2,,,\n"          # z is not listed
                    "D,4,f,x,1,x,2,1,,,,,,\n"               # empty range
                    "E,5,f,foo(x),1,x,1,2,,,,,,\n"          # unknown function
                    "F,6,f,x,2,x,1,2,y,1,2,,,\n"            # y listed but unused
                    "G,7,f,gamma*x,2,gamma,2,5,x,1,2,,,\n")  # gamma is a variable
    table = load_feynman(path)
    assert [p.name for p in table.problems] == ["A", "G"]
    notes = {n.name: n for n in table.notes}
    assert notes["A"].action == "fixed"
    reasons = {"B": "does not parse", "C": "['z'] that are not among", "D": "empty or infinite range",
               "E": "unknown functions", "F": "do not appear in the formula"}
    for name, text in reasons.items():
        assert notes[name].action == "skipped" and text in notes[name].reason, notes[name]


def test_missing_table_and_columns(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_feynman(tmp_path / "nope.csv")
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        load_feynman(tmp_path / "t.csv")


def test_select_problems():
    assert [p.name for p in select_problems(TABLE.problems, limit=2)] == ["I.6.2a", "I.6.2"]
    assert all(p.n_vars <= 2 for p in select_problems(TABLE.problems, max_vars=2))
    assert [p.name for p in select_problems(TABLE.problems, names=["II.38.14", "I.6.2a"])] == ["I.6.2a", "II.38.14"]
    with pytest.raises(ValueError, match="unknown Feynman equations"):
        select_problems(TABLE.problems, names=["I.99"])


# ---------------------------------------------------------------------------------------------------- sampling


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(TABLE.problems), st.integers(0, 2**40), st.floats(0.001, 1.0))
def test_sampling_is_deterministic_in_range_and_noise_touches_train_targets_only(problem, seed, noise):
    a = sample_problem(problem, 50, 30, seed)
    b = sample_problem(problem, 50, 30, seed)
    noisy = sample_problem(problem, 50, 30, seed, noise=noise)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.X_train_NxD, noisy.X_train_NxD)
    np.testing.assert_array_equal(a.y_test_M, noisy.y_test_M)
    assert not np.array_equal(a.y_train_N, noisy.y_train_N)
    lo, hi = np.array(problem.ranges).T
    assert ((a.X_train_NxD >= lo) & (a.X_train_NxD <= hi)).all()
    np.testing.assert_allclose(a.y_test_M, problem.evaluate(a.X_test_MxD))
    assert a.X_train_NxD.shape == (50, problem.n_vars) and a.y_test_M.shape == (30,)


def test_problem_seed_depends_on_seed_and_name():
    assert problem_seed(0, "I.6.2a") == problem_seed(0, "I.6.2a")
    assert len({problem_seed(s, n) for s in range(5) for n in ("I.6.2a", "I.6.2")}) == 10
    a = sample_problem(BY_NAME["I.6.2"], 20, 20, seed=0)
    b = sample_problem(BY_NAME["I.6.2"], 20, 20, seed=1)
    assert not np.array_equal(a.X_train_NxD, b.X_train_NxD)


def test_noise_level_is_relative_to_rms():
    p = BY_NAME["I.12.1"]
    clean = sample_problem(p, 20000, 10, seed=0)
    noisy = sample_problem(p, 20000, 10, seed=0, noise=0.1)
    ratio = np.std(noisy.y_train_N - clean.y_train_N) / np.sqrt(np.mean(clean.y_train_N**2))
    assert ratio == pytest.approx(0.1, rel=0.03)
    with pytest.raises(ValueError, match="noise"):
        sample_problem(p, noise=-0.1)


# ---------------------------------------------------------------------------------------------------- metrics


def test_scores_of_known_predictions():
    y = np.linspace(1.0, 2.0, 200)
    assert score_predictions(y, y) == (1.0, True, True, True)
    const = score_predictions(y, np.full_like(y, y.mean()))
    assert const.r2 == pytest.approx(0.0, abs=1e-12) and const[1:] == (False, False, False)
    one_inf = y.copy()
    one_inf[0] = np.inf
    s = score_predictions(y, one_inf)
    assert np.isnan(s.r2) and not s.r2_above_099 and s.acc_01  # 1 of 200 points missed: still >= 95%
    eleven_off = y.copy()
    eleven_off[:11] *= 1.2  # 11/200 = 5.5% of points beyond 10%
    assert not score_predictions(y, eleven_off).acc_01
    ten_off = y.copy()
    ten_off[:10] *= 1.2
    assert score_predictions(y, ten_off).acc_01
    missing = score_predictions(y, None)
    assert np.isnan(missing.r2) and missing[1:] == (False, False, False)
    with pytest.raises(ValueError, match="test points"):
        score_predictions(y, y[:5])


def test_recovery_of_the_truth_up_to_constants():
    p = BY_NAME["I.6.2"]  # exp(-(theta/sigma)**2/2)/(sqrt(2*pi)*sigma)
    X = sample_problem(p).X_test_MxD
    sigma, theta = p.symbols
    x0, x1 = sympy.symbols("x_0 x_1")
    assert symbolic_recovery(p, p.formula, X).recovered
    assert symbolic_recovery(p, 2.5 * p.formula, X) == (True, "ratio")
    assert symbolic_recovery(p, p.formula + 0.3, X) == (True, "difference")
    # floats as a regressor writes them, in x_i names: 0.39894228 = 1/sqrt(2 pi), exponent -0.5000002
    fitted = 0.39894228 * sympy.exp(-0.5000002 * x1**2 / x0**2) / x0
    assert symbolic_recovery(p, fitted, X).recovered
    assert symbolic_recovery(p, str(fitted), X).recovered
    assert symbolic_recovery(p, 1.3 * p.formula + 0.3, X) == (False, "numeric-mismatch")
    assert symbolic_recovery(p, sympy.exp(-theta / sigma) / sigma, X) == (False, "numeric-mismatch")
    assert symbolic_recovery(p, p.formula + 0.01 * theta, X) == (False, "numeric-mismatch")
    assert symbolic_recovery(p, p.formula + 1e-5 * theta, X).recovered  # rounded away at 3 decimals
    assert symbolic_recovery(p, None, X) == (False, "no-expression")
    assert symbolic_recovery(p, sympy.Symbol("q") * theta, X).check.startswith("bad-expression")


def test_normalising_constants_keeps_every_formula_variable():
    for p in TABLE.problems:
        assert normalise_constants(p.formula).free_symbols == p.formula.free_symbols, p.name


def _slow_simplify(expr, *args, **kwargs):
    time.sleep(0.5)
    return expr


def test_recovery_times_out_instead_of_hanging(monkeypatch):
    p = BY_NAME["I.12.1"]
    X = sample_problem(p).X_test_MxD
    monkeypatch.setattr(feynman.sympy, "simplify", _slow_simplify)
    assert symbolic_recovery(p, p.formula, X, timeout_s=0.05) == (False, "timeout")
    box = {}
    worker = threading.Thread(target=lambda: box.update(r=symbolic_recovery(p, p.formula, X, timeout_s=0.05)))
    worker.start()
    worker.join()
    assert box["r"] == (False, "timeout")  # off the main thread: the daemon-thread fallback


# ---------------------------------------------------------------------------------------------------- runner

MONOMIALS = ["I.12.1", "I.14.3", "II.38.3"]  # mu*Nn, m*g*z, Y*A*x/d: exact for the power-law double


def test_runner_with_a_least_squares_regressor():
    problems = [BY_NAME[n] for n in MONOMIALS] + [BY_NAME["I.6.2a"]]
    records = run_benchmark(lambda seed: PowerLawRegressor(), problems, method="powerlaw", progress=False)
    assert [r["problem"] for r in records] == MONOMIALS + ["I.6.2a"]
    for r in records[:3]:
        assert r["r2"] > 1 - 1e-9 and r["r2_above_0.999"] and r["acc_0.1"] and r["recovered"], r
        assert r["error"] is None and r["seconds"] >= 0
    gauss = records[3]
    assert not gauss["recovered"] and gauss["r2"] < 0.999
    again = run_benchmark(lambda seed: PowerLawRegressor(), problems, method="powerlaw", progress=False)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in again]


def test_failed_fits_count_as_misses():
    problems = [BY_NAME[n] for n in MONOMIALS]
    records = run_benchmark(lambda seed: PowerLawRegressor(), problems, method="ok", progress=False)
    records += run_benchmark(lambda seed: CrashingRegressor(), problems, method="crash", progress=False)
    assert all(r["error"] == "RuntimeError: boom" for r in records[3:])
    s = summarize(records)
    assert s["ok"].r2_above_099 == 1.0 and s["ok"].recovery == 1.0 and s["ok"].n_failed == 0
    assert s["crash"].n_problems == 3 and s["crash"].n_failed == 3
    assert (s["crash"].r2_above_099, s["crash"].acc_01, s["crash"].recovery) == (0.0, 0.0, 0.0)
    table = feynman.format_summary(s)
    assert "ok" in table and "crash" in table and "R2 > 0.99" in table and "100.0%" in table
