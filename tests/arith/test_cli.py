"""The `run.py arith` command line: every error path gives one line and exit 2; the happy paths work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from arith_jax.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "arith_tiny.yaml")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    work = tmp_path_factory.mktemp("tiny")
    argv = ["train", "--config", TINY, "--workdir", str(work), "--set", "train.steps=2", "--eval-max-len", "0"]
    assert main(argv) == 0
    return work


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("problem,message", [
    ("12a+3", "invalid character 'a'"),
    ("", "empty problem"),
    ("12-3", "unsupported operator '-'"),
    ("123", "missing operator"),
    ("1+2+3", "exactly one operator"),
    ("9" * 70 + "+1", "limit is 62 digits"),
    ("12*3", "is multiplication, but this model was trained for addition"),
])
def test_solve_errors_are_one_line(tiny_ckpt, capsys, problem, message):
    assert main(["solve", "--checkpoint", str(tiny_ckpt), problem]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_error_paths_without_traceback(tmp_path, capsys):
    cases = [
        (["solve", "--checkpoint", str(tmp_path / "missing"), "1+2"], "not found"),
        (["solve", "--checkpoint", str(tmp_path), "1+2"], "holds no checkpoint"),
        (["eval", "--checkpoint", str(tmp_path / "missing")], "not found"),
        (["train", "--config", str(tmp_path / "nope.yaml")], "not found"),
        (["train", "--config", TINY, "--set", "model.widht=3"], "unknown config key 'model.widht'"),
        (["train", "--config", TINY, "--set", "model.width=big"], "expects an integer"),
        (["train", "--config", TINY, "--set", "model.positions=[alibi]"], "unknown position kind"),
        (["solve", "--checkpoint", str(tmp_path), "--file", str(tmp_path / "none.txt")], "not found"),
        (["solve", "--checkpoint", str(tmp_path)], "no problems given"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err, (argv, err)


def test_corrupt_checkpoint_is_reported(tiny_ckpt, tmp_path, capsys):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    step_dirs = [p for p in (bad / "checkpoints").iterdir() if p.name.isdigit()]
    for d in step_dirs:  # wipe every array file of every step, keep the metadata
        for f in (d / "state").rglob("*"):
            if f.is_file():
                f.write_bytes(b"garbage")
    assert main(["solve", "--checkpoint", str(bad), "1+2"]) == 2
    err = capsys.readouterr().err
    assert "unreadable" in err and "Traceback" not in err


def test_solve_file_and_export_roundtrip(tiny_ckpt, tmp_path, capsys):
    """`solve --file` plus a problem on the command line: one answer per problem (blank lines skipped), the same
    from the checkpoint and from its parameters-only export."""
    problems = tmp_path / "p.txt"
    problems.write_text("12+34\n\n5+6\n999+1\n")
    assert main(["solve", "--checkpoint", str(tiny_ckpt), "--file", str(problems), "7+8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.isdigit() or line == "?" for line in lines)
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / "exp")]) == 0
    capsys.readouterr()
    assert main(["solve", "--checkpoint", str(tmp_path / "exp"), "--file", str(problems), "7+8"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == lines


def test_eval_writes_json_and_plot(tiny_ckpt, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tiny_ckpt), "--max-len", "3", "--n", "2",
                 "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["grid"]) == 3 and 0 <= report["in_distribution_acc"] <= 1
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_unknown_package():
    """Through run.py in a fresh process (the package dispatch; it fails before importing JAX)."""
    out = run_cli("nope")
    assert out.returncode == 2 and "usage" in out.stderr
