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
        (["train", "--config", TINY.replace("arith_tiny", "sr_tiny")],
         "if it is another command's config: this one trains from configs/arith_*.yaml"),
        (["train", "--config", TINY, "--set", "model.width=big"], "expects an integer"),
        (["train", "--config", TINY, "--set", "model.positions=[alibi]"], "unknown position kind"),
        (["train", "--config", TINY, "--set", "model.positions=[fire]", "--set", "eval.abacus_offsets=[0,3]"],
         "without Abacus positions"),
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
    # exporting again into the same folder replaces the earlier export (nothing else is left beside it)
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / "exp")]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "p.txt"]
    assert main(["solve", "--checkpoint", str(tmp_path / "exp"), "--file", str(problems), "7+8"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == lines


def test_abacus_offsets_flags(tiny_ckpt, tmp_path, capsys):
    """--abacus-offsets K,...: `export` keeps them in the exported config, `solve --checkpoint` and `eval` use them
    (the same answers as the export that carries them; the report names them), offsets that push the model's
    lengths past its position table, repeated offsets and `solve` without --checkpoint are one-line errors."""
    from arith_jax.train import load_trained

    out = str(tmp_path / "exp")
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--out", out, "--abacus-offsets", "0,3,5"]) == 0
    assert load_trained(out)[0].eval.abacus_offsets == (0, 3, 5)
    assert load_trained(tiny_ckpt)[0].eval.abacus_offsets == (0,)
    capsys.readouterr()
    problems = ["12+34", "5+6", "999+1", "7+8"]
    assert main(["solve", "--checkpoint", out, *problems]) == 0
    exported = capsys.readouterr().out
    assert main(["solve", "--checkpoint", str(tiny_ckpt), "--abacus-offsets", "0,3,5", *problems]) == 0
    assert capsys.readouterr().out == exported
    assert main(["eval", "--checkpoint", str(tiny_ckpt), "--abacus-offsets", "3,5,0", "--max-len", "2", "--n", "2",
                 "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["grid"]) == 2 and report["abacus_offsets"] == [3, 5, 0]
    capsys.readouterr()
    for argv, message in [(["solve", "--abacus-offsets", "3", "1+2"], "needs --checkpoint"),
                          (["eval", "--checkpoint", str(tiny_ckpt), "--abacus-offsets", "0,1000"],
                           "eval.abacus_offsets up to 1000"),
                          (["eval", "--checkpoint", str(tiny_ckpt), "--abacus-offsets", "0,3,3"], "distinct"),
                          (["solve", "--checkpoint", str(tiny_ckpt), "--abacus-offsets", "-1", "1+2"], ">= 0"),
                          (["solve", "--checkpoint", str(tiny_ckpt), "--abacus-offsets", "0,3", "9" * 60 + "+1"],
                           "limit is 59 digits")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (argv, err)


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


def test_average_last_checkpoints_export_and_eval(tmp_path, capsys):
    """`export --average-last N` writes the element-wise mean of the newest N checkpoints' parameters (and says which
    steps, also when that export is exported again), `eval` takes the same flag and a held-out `--seed`; N = 1 is the
    newest checkpoint unchanged, and more than the workdir keeps is one line naming train.keep_checkpoints."""
    import jax
    import numpy as np

    from arith_jax.train import load_trained
    from core_jax.checkpoint import read_meta

    work = tmp_path / "run"
    assert main(["train", "--config", TINY, "--workdir", str(work), "--set", "train.steps=3", "--set",
                 "train.ckpt_every=1", "--set", "train.keep_checkpoints=3", "--eval-max-len", "0"]) == 0
    leaves = lambda p: [np.asarray(x) for x in jax.tree_util.tree_leaves(p)]
    at = {s: leaves(load_trained(work, step=s)[2]) for s in (1, 2, 3)}
    assert any(not np.array_equal(a, b) for a, b in zip(at[2], at[3]))  # training moved the parameters
    assert all(np.array_equal(a, b) for a, b in zip(leaves(load_trained(work, average_last=1)[2]), at[3]))
    mean = leaves(load_trained(work, average_last=2)[2])
    for m, a, b in zip(mean, at[2], at[3]):
        np.testing.assert_allclose(m, (a + b) / 2, rtol=1e-6, atol=1e-7)
    assert main(["export", "--checkpoint", str(work), "--out", str(tmp_path / "exp"), "--average-last", "3"]) == 0
    assert read_meta(tmp_path / "exp")[0]["averaged_steps"] == [1, 2, 3]
    # re-exporting the average (e.g. to give it Abacus offsets) keeps saying which steps it averages
    assert main(["export", "--checkpoint", str(tmp_path / "exp"), "--out", str(tmp_path / "again"),
                 "--abacus-offsets", "0,2"]) == 0
    assert read_meta(tmp_path / "again")[0]["averaged_steps"] == [1, 2, 3]
    for m, a, b, c in zip(leaves(load_trained(tmp_path / "exp")[2]), at[1], at[2], at[3]):
        np.testing.assert_allclose(m, (a + b + c) / 3, rtol=1e-6, atol=1e-7)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(work), "--average-last", "2", "--seed", "7", "--max-len", "1",
                 "--n", "1"]) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(work), "--out", str(tmp_path / "exp4"), "--average-last", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "holds 3" in err and "train.keep_checkpoints >= 4" in err and "\n" not in err
