"""`run.py sr fit` (sr_jax.fit_cli.main): errors are one line on stderr with exit status 2; a fit prints the formula."""
import json

import numpy as np
import pytest

from sr_jax.fit_cli import main, read_csv

RNG = np.random.default_rng(0)
XS = RNG.uniform(-3, 3, 120)
YS = 2.5 * np.sin(XS) + XS**2


def write(path, header, rows):
    path.write_text(",".join(header) + "\n" + "\n".join(",".join(str(v) for v in r) for r in rows) + "\n")
    return str(path)


@pytest.fixture
def good(tmp_path):
    return write(tmp_path / "d.csv", ["speed", "y"], zip(XS, YS))


def run_err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_missing_file(capsys, tmp_path):
    assert "no such file" in run_err(capsys, [str(tmp_path / "nope.csv"), "--target", "y"])


def test_missing_target_column(capsys, good):
    err = run_err(capsys, [good, "--target", "z"])
    assert "'z'" in err and "speed, y" in err


def test_non_numeric_column(capsys, tmp_path):
    path = write(tmp_path / "c.csv", ["speed", "colour", "y"], [(1, "red", 2), (2, "blue", 3)])
    err = run_err(capsys, [path, "--target", "y"])
    assert "column 'colour' is not numeric: 'red' on line 2" in err


def test_nan_and_empty_cells(capsys, tmp_path):
    path = write(tmp_path / "n.csv", ["a", "y"], [(1, 2), ("nan", 3)])
    assert "column 'a' has a missing, NaN or infinite value on line 3" in run_err(capsys, [path, "--target", "y"])
    path = write(tmp_path / "e.csv", ["a", "y"], [(1, 2), ("", 3)])
    assert "column 'a' is not numeric: '' on line 3" in run_err(capsys, [path, "--target", "y"])


def test_bad_options_and_estimator_errors(capsys, good, tmp_path):
    assert "--target" in run_err(capsys, [good])
    assert "unknown source 'magic'" in run_err(capsys, [good, "--target", "y", "--sources", "prior,magic"])
    assert "feature column 'w'" in run_err(capsys, [good, "--target", "y", "--features", "w"])
    path = write(tmp_path / "k.csv", ["a", "y"], [(i, 1.0) for i in range(10)])
    assert "constant" in run_err(capsys, [path, "--target", "y", "--sources", "bases"])


def test_read_csv_selects_columns(tmp_path):
    path = write(tmp_path / "r.csv", ["a", "y", "b"], [(1, 2, 3), (4, 5, 6)])
    x, y, names = read_csv(path, "y")
    assert names == ["a", "b"] and x.tolist() == [[1, 3], [4, 6]] and y.tolist() == [2, 5]
    x, _, names = read_csv(path, "y", ["b"])
    assert names == ["b"] and x.tolist() == [[3], [6]]


def test_read_csv_drops_a_utf8_byte_order_mark_and_names_utf16(capsys, tmp_path):
    """Excel writes CSV with a UTF-8 byte-order mark: not part of the first column's name."""
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfa,y\n1,2\n3,4\n")
    x, y, names = read_csv(str(path), "y", ["a"])
    assert names == ["a"] and x.tolist() == [[1], [3]]
    wide = tmp_path / "utf16.csv"
    wide.write_bytes("a,y\n1,2\n".encode("utf-16"))
    assert f"{wide} is not UTF-8 text (it is UTF-16); save it as UTF-8" in run_err(capsys, [str(wide), "--target", "y"])


def test_front_formulas_print_every_number_to_six_digits():
    """Also the numbers inside a function's argument, which sympy's evalf(6) leaves at full precision."""
    import sympy

    from sr_jax.fit_cli import _short

    angle = sympy.Symbol("angle")
    raw = sympy.Float("2.4713912") * sympy.sin(sympy.Float("1.0037984683002331") * angle
                                               + sympy.Float("0.0067847985394963049")) + sympy.Float("0.751717")
    assert _short(raw) == "2.47139*sin(1.0038*angle + 0.0067848) + 0.751717"


def test_fit_prints_formula_front_json_and_plot(capsys, good, tmp_path):
    out_json, out_png = tmp_path / "o.json", tmp_path / "p.png"
    argv = [good, "--target", "y", "--sources", "prior,bases", "--n-prior", "4", "--json", str(out_json),
            "--plot", str(out_png)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("y = speed**2 + 2.5*sin(speed)\n") and "Pareto front" in text
    rep = json.loads(out_json.read_text())
    assert rep["expression"] == "speed**2 + 2.5*sin(speed)" and rep["r2"] == pytest.approx(1.0)
    assert rep["complexity"] == 7 and rep["pareto_front"][-1]["loss"] < 1e-12
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(argv[:7] + ["--json"]) == 0  # --json alone: JSON on stdout
    assert json.loads(capsys.readouterr().out)["expression"] == rep["expression"]


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_unwritable_outputs_fail_before_the_fit(capsys, good, tmp_path, monkeypatch, flag):
    import sr_jax.estimator

    def no_fit(*a, **k):
        raise AssertionError("fitted although the output cannot be written")
    monkeypatch.setattr(sr_jax.estimator.SymbolicTransformerRegressor, "fit", no_fit)
    err = run_err(capsys, [good, "--target", "y", flag, str(tmp_path / "no" / "out")])
    assert f"cannot write {flag}" in err and "does not exist" in err
    err = run_err(capsys, [good, "--target", "y", flag, str(tmp_path)])
    assert "it is a folder" in err


@pytest.mark.parametrize("argv,message", [
    (["--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    (["--n-prior", "-3"], "argument --n-prior: expected an integer >= 0, got -3"),
    (["--max-time", "0"], "argument --max-time: expected a finite number > 0, got 0"),
    (["--max-time", "-1"], "argument --max-time: expected a finite number > 0, got -1"),
    (["--max-time", "nan"], "argument --max-time: expected a finite number > 0, got nan"),
    (["--max-time", "soon"], "argument --max-time: expected a number > 0, got 'soon'"),
])
def test_bad_numbers_are_one_line_errors(capsys, good, argv, message):
    assert message in run_err(capsys, [good, "--target", "y", *argv])


def test_max_time_reaches_the_estimator(capsys, good, monkeypatch):
    import sr_jax.estimator

    seen = []

    def fit(self, *a, **k):
        seen.append(self.max_time)
        raise KeyboardInterrupt
    monkeypatch.setattr(sr_jax.estimator.SymbolicTransformerRegressor, "fit", fit)
    assert main([good, "--target", "y", "--max-time", "1.5"]) == 130
    assert main([good, "--target", "y"]) == 130
    assert seen == [1.5, None]


def test_ctrl_c_is_one_line_130(capsys, good, monkeypatch):
    import sr_jax.fit_cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(sr_jax.fit_cli, "read_csv", interrupted)
    assert main([good, "--target", "y"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
