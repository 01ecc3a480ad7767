"""Solving a file of mixed-length problems vs one of equal-length problems, each in a fresh process.

    python benchmarks/arith_solve_mixed.py [--n 300] [--rounds 2] [--checkpoint DIR]

Writes two problem files: `mixed` (both operands of 1..10 digits, lengths uniform) and `equal` (both operands of
10 digits), and times `run.py arith solve --file` on each in a new Python process (import, model load,
compilation and decoding: what a user waits for), alternating mixed / equal for `--rounds` rounds. Prints the
median wall time of each, their ratio, and the number of decoding programs each compiled (from
`arith_jax.decode.compiled_programs`, reported by a child process that runs the same solve in-process).
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

_COUNT_PROGRAMS = """
import sys
from pathlib import Path
from arith_jax import Solver
from arith_jax.decode import compiled_programs
problems = [l for l in Path(sys.argv[1]).read_text().splitlines() if l.strip()]
ckpt = sys.argv[2] if len(sys.argv) > 2 else None
Solver.load(ckpt).solve(problems)
print(compiled_programs())
"""


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)


def write_problems(path: Path, n: int, min_digits: int, max_digits: int, seed: int) -> None:
    rng = random.Random(seed)
    lines = [f"{_number(rng, rng.randint(min_digits, max_digits))}+{_number(rng, rng.randint(min_digits, max_digits))}"
             for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")


def time_solve(path: Path, checkpoint: str | None) -> float:
    cmd = [sys.executable, str(ROOT / "run.py"), "arith", "solve", "--file", str(path)]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def count_programs(path: Path, checkpoint: str | None) -> int:
    cmd = [sys.executable, "-c", _COUNT_PROGRAMS, str(path)] + ([checkpoint] if checkpoint else [])
    out = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300, help="problems per file")
    ap.add_argument("--rounds", type=int, default=2, help="alternating (mixed, equal) rounds")
    ap.add_argument("--checkpoint", default=None, help="default: the shipped model")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from common import machine_line

    with tempfile.TemporaryDirectory() as tmp:
        files = {"mixed": Path(tmp) / "mixed.txt", "equal": Path(tmp) / "equal.txt"}
        write_problems(files["mixed"], args.n, 1, 10, args.seed)
        write_problems(files["equal"], args.n, 10, 10, args.seed)
        times: dict[str, list[float]] = {"mixed": [], "equal": []}
        for r in range(args.rounds):
            for name in ("mixed", "equal"):
                times[name].append(time_solve(files[name], args.checkpoint))
                print(f"round {r}: {name} {times[name][-1]:.1f} s", flush=True)
        programs = {name: count_programs(path, args.checkpoint) for name, path in files.items()}
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"machine: {machine_line()}")
    print(f"| problems | median wall s (fresh process) | decoding programs compiled |")
    print("|---|---|---|")
    print(f"| {args.n} mixed (operands of 1-10 digits) | {med['mixed']:.1f} | {programs['mixed']} |")
    print(f"| {args.n} equal (operands of 10 digits) | {med['equal']:.1f} | {programs['equal']} |")
    print(f"ratio mixed / equal: {med['mixed'] / med['equal']:.2f}x")


if __name__ == "__main__":
    main()
