"""`run.py sr fit|bench|eval` under a new user's mistakes (issue 10): a folder, an empty or header-only or binary
CSV, an image name matplotlib cannot write, a missing --model, too few points; each is one `error:` line and exit
status 2 before any work, and SIGTERM ends a command with one line and exit 143."""

import os
import signal
import time

import pytest

from sr_jax import bench_cli, fit_cli


def one_line_error(capsys, main, argv) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def no_fit(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the fit ran although the command line was bad")
    monkeypatch.setattr("sr_jax.estimator.SymbolicTransformerRegressor.fit", fail)


@pytest.fixture
def csv_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,y\n" + "".join(f"{i},{2 * i}\n" for i in range(20)))
    return str(path)


@pytest.mark.parametrize("content,message", [
    (None, "is a folder, not a CSV file"),
    (b"", "needs a header row and at least one data row"),
    (b"a,y\n", "needs a header row and at least one data row"),
    (b"a,y\n1,one\n", "column 'y' is not numeric: 'one' on line 2"),
    (b"\xff\xfe\x00a,y\n", "is not UTF-8 text (it is UTF-16); save it as UTF-8"),
    (b"a,y\n1,\xe9\n", "is not UTF-8 text (byte 0xe9 at offset 6); save it as UTF-8"),
])
def test_fit_bad_csv_files(capsys, tmp_path, no_fit, content, message):
    path = tmp_path / "data.csv"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    assert message in one_line_error(capsys, fit_cli.main, [str(path), "--target", "y"])


def test_fit_plot_name_is_checked_before_the_fit(capsys, csv_file, tmp_path, no_fit):
    err = one_line_error(capsys, fit_cli.main, [csv_file, "--target", "y", "--plot", str(tmp_path / "front.xyz")])
    assert "'.xyz' is not an image format matplotlib writes; use one of" in err and ".png" in err


def test_sigterm_during_a_fit_is_one_line_143(capsys, csv_file, monkeypatch):
    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr("sr_jax.estimator.SymbolicTransformerRegressor.fit", terminated)
    handler = signal.getsignal(signal.SIGTERM)
    t0 = time.time()
    assert fit_cli.main([csv_file, "--target", "y", "--sources", "bases"]) == 143
    assert time.time() - t0 < 20 and capsys.readouterr().err == "interrupted by SIGTERM\n"
    assert signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.parametrize("argv,message", [
    (["--model", "/nonexistent/model"], "checkpoint '/nonexistent/model' not found"),
    (["--sources", "prior,magic"], "candidate_sources must be a non-empty collection of"),
    (["--sources", "bases", "--n-train", "2"], "--n-train 2: SymbolicTransformerRegressor needs at least 5"),
])
def test_bench_options_of_our_regressor_fail_before_the_problems(capsys, monkeypatch, argv, message):
    """Before: every problem's fit failed and the run reported 0% with exit status 0."""
    monkeypatch.setattr("sr_jax.feynman.run_benchmark", lambda *a, **k: pytest.fail("the benchmark ran"))
    assert message in one_line_error(capsys, bench_cli.main, ["feynman", "--limit", "1", *argv])


def test_eval_needs_two_points(capsys):
    from sr_jax.cli import main

    err = one_line_error(capsys, main, ["eval", "--points", "1"])
    assert "argument --points: expected an integer >= 2, got 1" in err


def test_checkpoint_that_is_a_file(capsys, csv_file):
    from sr_jax.cli import main

    err = one_line_error(capsys, main, ["eval", "--checkpoint", csv_file, "--n", "1"])
    assert f"checkpoint '{csv_file}' is a file; pass the folder a training run or an export wrote" in err


def test_a_failed_export_leaves_no_folder(capsys, tmp_path):
    """The writability check creates --out's missing folders only for its probe: the export of a checkpoint of
    the other package fails in one line and leaves nothing behind."""
    from pathlib import Path

    from sr_jax.cli import main

    arith_model = Path(__file__).resolve().parents[2] / "arith_jax" / "pretrained" / "add_small"
    out = tmp_path / "new" / "model"
    err = one_line_error(capsys, main, ["export", "--checkpoint", str(arith_model), "--out", str(out)])
    assert f"checkpoint '{arith_model}'" in err and not (tmp_path / "new").exists()


def test_help_lists_every_command():
    """`run.py -h` names both packages (exit 0; no arguments: usage on stderr, exit 2), and `run.py sr -h` lists the
    commands it hands to other modules (fit, bench) beside its own."""
    import subprocess
    import sys
    from pathlib import Path

    from sr_jax.cli import _parser

    root = Path(__file__).resolve().parents[2]
    asked = subprocess.run([sys.executable, "run.py", "--help"], cwd=root, capture_output=True, text=True)
    assert asked.returncode == 0 and "arith" in asked.stdout and "sr" in asked.stdout
    bare = subprocess.run([sys.executable, "run.py"], cwd=root, capture_output=True, text=True)
    assert bare.returncode == 2 and bare.stderr.startswith("usage: python run.py")
    listed = _parser().format_help()
    assert all(c in listed for c in ("fit", "bench", "train", "describe", "eval", "export"))
