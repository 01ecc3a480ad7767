"""`run.py arith` under user mistakes: flags out of range, unwritable outputs (refused before any work), problem
files with bad lines, a BOM or another encoding, negative numbers, corrupt checkpoints."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from arith_jax.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "arith_tiny.yaml")
SHIPPED = ROOT / "arith_jax" / "pretrained" / "add_small"


def one_line_error(capsys, argv, status=2):
    assert main(argv) == status, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv,message", [
    (["eval", "--max-len", "0"], "argument --max-len: expected an integer >= 1, got 0"),
    (["eval", "--n", "0"], "argument --n: expected an integer >= 1, got 0"),
    (["eval", "--n", "-3"], "argument --n: expected an integer >= 1, got -3"),
    (["eval", "--sweep", "0"], "argument --sweep: expected comma-separated integers >= 1, got '0'"),
    (["eval", "--sweep", "30,,40"], "argument --sweep: expected comma-separated integers >= 1"),
    (["eval", "--recurrences", "0"], "argument --recurrences: expected an integer >= 1, got 0"),
    (["eval", "--recurrences", "-1"], "argument --recurrences: expected an integer >= 1, got -1"),
    (["solve", "--recurrences", "0", "1+2"], "argument --recurrences: expected an integer >= 1, got 0"),
    (["train", "--config", TINY, "--eval-max-len", "-1"], "argument --eval-max-len: expected an integer >= 0"),
    (["eval", "--bogus"], "unrecognized arguments: --bogus"),
    (["solve", "-5+3"], "problem '-5+3': negative numbers are not supported"),
    (["solve", "-12 + 7"], "problem '-12 + 7': negative numbers are not supported"),
    (["solve", "--", "5*-3"], "problem '5*-3': negative numbers are not supported"),
    ([], "the following arguments are required: command"),
])
def test_bad_flags_are_one_line_errors(capsys, argv, message):
    assert message in one_line_error(capsys, argv)


@pytest.mark.parametrize("argv,message", [
    (["--config", TINY, "--set", "data.task=div"], "config key 'data.task' must be one of ['add', 'mul', 'sort'], "
                                                   "got 'div'"),
    (["--config", str(ROOT / "configs")], "is a folder; give a YAML file"),
])
def test_bad_config_is_one_line_before_the_workdir(capsys, tmp_path, argv, message):
    assert message in one_line_error(capsys, ["train", *argv, "--workdir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def _no_evaluation(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the evaluation ran although its output cannot be written")
    monkeypatch.setattr("arith_jax.evaluate.run_evaluation", fail)


def test_outputs_checked_before_the_work(capsys, monkeypatch, tmp_path):
    _no_evaluation(monkeypatch)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    (tmp_path / "blank.txt").write_text("\n  \n")
    cases = [
        (["eval", "--json", str(tmp_path / "missing" / "r.json")], "folder"),
        (["eval", "--json", str(a_file / "r.json")], "is a file, not a folder"),
        (["eval", "--plot", str(tmp_path)], "it is a folder"),
        (["eval", "--plot", str(tmp_path / "grid.xyz")], "'.xyz' is not an image format matplotlib writes"),
        (["solve", "--file", str(tmp_path)], f"problem file '{tmp_path}' is a folder, not a file"),
        (["solve", "--file", str(tmp_path / "none.txt")], f"problem file '{tmp_path / 'none.txt'}' not found"),
        (["solve", "--file", str(a_file.with_name("blank.txt"))], "holds no problems (only blank lines, or empty)"),
        (["eval", "--max-len", "300"], "--max-len 300 is beyond this model's position table"),
        (["eval", "--sweep", "30,500"], "--sweep 500 is beyond this model's position table"),
        (["export", "--checkpoint", str(SHIPPED), "--out", str(a_file)], "is a file, not a folder"),
        (["train", "--config", TINY, "--workdir", str(a_file)], "cannot write --workdir"),
        (["train", "--config", TINY, "--workdir", str(a_file / "run")], "is a file, not a folder"),
        (["train", "--config", TINY, "--eval-max-len", "63"], "--eval-max-len 63 is beyond"),
    ]
    for argv, message in cases:
        err = one_line_error(capsys, argv)
        assert message in err, (argv, err)
    assert not (tmp_path / "missing").exists()


def test_read_only_folder(capsys, monkeypatch, tmp_path):
    """A folder where no file can be created (read-only mount, no permission) fails in one line before any work.
    Simulated at the probe's file creation, so it also holds when the tests run as root (whom chmod does not
    bind)."""
    import tempfile

    import core_jax.cli

    _no_evaluation(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kw):
        if dir is not None and Path(dir).resolve() == ro.resolve():
            raise PermissionError(13, "Permission denied", str(ro))
        return real_mkstemp(*args, dir=dir, **kw)

    monkeypatch.setattr(core_jax.cli.tempfile, "mkstemp", mkstemp)
    assert "Permission denied" in one_line_error(capsys, ["eval", "--json", str(ro / "r.json")])
    assert "Permission denied" in one_line_error(capsys, ["train", "--config", TINY, "--workdir", str(ro)])
    assert not any(ro.iterdir())  # nothing was started there


def test_solve_file_reports_each_bad_line_and_answers_the_rest(capsys, tmp_path):
    problems = tmp_path / "p.txt"
    problems.write_bytes("\ufeff12+34\n12a+3\n\n5+6\n12*3\n1+2+3\n99+1\n".encode("utf-8"))
    assert main(["solve", "--file", str(problems), "7+8", "9-1"]) == 2
    out, err = capsys.readouterr()
    assert out.split() == ["15", "46", "11", "36", "100"]  # the shipped models get these right (12*3: mul_small)
    assert err.splitlines() == [
        "error: unsupported operator '-' in problem '9-1'; use '+', '*' or 'x'",
        f"{problems}:2: error: invalid character 'a' in problem '12a+3'",
        f"{problems}:6: error: expected exactly one operator in problem '1+2+3', found 2",
    ]


def test_solve_file_all_good_exits_0_and_bom_is_ignored(capsys, tmp_path):
    problems = tmp_path / "p.txt"
    problems.write_bytes(b"\xef\xbb\xbf1+1\r\n2+2\r\n")
    assert main(["solve", "--file", str(problems)]) == 0
    assert capsys.readouterr().out.split() == ["2", "4"]


def test_solve_file_not_utf8_names_the_file(capsys, tmp_path):
    problems = tmp_path / "latin1.txt"
    problems.write_bytes("1+2\n3+4 \xe9\n".encode("latin-1"))
    err = one_line_error(capsys, ["solve", "--file", str(problems)])
    assert f"problem file '{problems}' is not UTF-8 text (byte 0xe9 at offset 8)" in err
    wide = tmp_path / "utf16.txt"
    wide.write_bytes("1+2\n".encode("utf-16"))
    err = one_line_error(capsys, ["solve", "--file", str(wide)])
    assert f"problem file '{wide}' is not UTF-8 text (it is UTF-16); save it as UTF-8" in err


def test_corrupt_checkpoint_is_one_line_without_asyncio_noise(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(SHIPPED, bad)
    for f in bad.rglob("*"):
        if f.is_file() and f.name == "manifest.ocdbt":
            f.write_bytes(b"garbage")
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "arith", "solve", "--checkpoint", str(bad), "1+2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Event loop is closed" not in out.stderr, out.stderr[-3000:]
    assert f"{bad / '0'}:" in out.stderr and "delete the broken step directories" in out.stderr
    assert len(out.stderr) < 400


def test_ctrl_c_outside_training_is_one_line_130(capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("arith_jax.solver.Solver.load", interrupted)
    assert main(["solve", "1+2"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
