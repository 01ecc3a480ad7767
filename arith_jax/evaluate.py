"""Exact-match accuracy: over a len_a × len_b grid (saved as JSON and a heatmap) and equal-length sweeps.

A problem counts as solved only if the generated answer matches every token *and* ends with EOS at the right
place (spec §6.2; for sorting this is stricter than the original, which ignored EOS). Sorting also reports the
original's top-1 accuracy (spec §6.3): whether the first answer token, the label of the smallest number, is right.
Problems are padded into prompt-length buckets (powers of two) and decoded in fixed-size batches, so a whole grid
compiles one program per bucket, and every answer is the one its prompt gets decoded alone at its exact length.

`run_evaluation(..., errors=N)` adds an error breakdown of the grid's and the sweep's wrong answers
(`error_breakdown`): how many answer tokens each got wrong, at which answer positions, in which cells, and N examples
with prompt, expected and generated text.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from arith_jax.config import valid_abacus_offsets
from arith_jax.data import answer_length, make_eval_cell
from arith_jax.decode import greedy_decode, length_bucket
from arith_jax.model import ArithModel
from arith_jax.plots import plot_accuracy_grid, plot_length_sweep
from arith_jax.tokenizer import EOS, PAD, Tokenizer


def exact_match(generated_BxN: np.ndarray, targets: list[list[int]]) -> np.ndarray:
    """Row b is right iff generated[b, :len(t)] == t, where t ends with EOS."""
    out = np.zeros(len(targets), bool)
    for b, t in enumerate(targets):
        out[b] = len(t) <= generated_BxN.shape[1] and np.array_equal(generated_BxN[b, :len(t)], t)
    return out


def top1_match(generated_BxN: np.ndarray, targets: list[list[int]]) -> np.ndarray:
    """Row b's first generated token is t[0] (for sorting, the label of the minimum: the original's top-1)."""
    return np.array([generated_BxN.shape[1] > 0 and generated_BxN[b, 0] == t[0] for b, t in enumerate(targets)],
                    bool)


class CellScore(NamedTuple):
    """One cell's accuracies: exact match (answer and EOS) and top-1 (first answer token)."""

    exact: float
    top1: float


def solve_prompts(model: ArithModel, params, prompts: list[np.ndarray], max_new: list[int], *,
                  batch_size: int = 256, recurrences: int | None = None, use_cache: bool = True,
                  progress: bool = False, desc: str = "decode", bucket: bool = True,
                  noise_seed: int = 0, abacus_offsets: tuple[int, ...] = (0,)) -> list[np.ndarray]:
    """Greedy generations for prompts of any lengths: row i has exactly max_new[i] tokens (EOS, then PAD).

    With `bucket` (default), prompts are right-padded to their `length_bucket` and answers to the bucket of the
    group's longest budget, so any mix of lengths compiles one program per bucket (powers of two from
    `SMALLEST_BUCKET`); every chunk of a call has the same number of rows (batch_size, or the smallest power of
    two that holds the largest group). Each answer is what decoding its prompt alone at its exact length gives
    (`greedy_decode`). `bucket=False` groups prompts by exact length instead (the reference).

    `abacus_offsets`: decode with every digit's Abacus id raised by each offset in turn and return, per problem,
    the generation most offsets agree on (ties: the one that came first). A trained model's weak ids then fall on
    different digits in each decode. A problem stops being decoded as soon as the remaining offsets cannot change
    its majority (with three offsets, the third decodes only the problems where the first two disagree), so the
    answers are those of decoding every offset, at about two decodes' cost. The default (0,) decodes once, as
    trained.

    A model with `eval_init_noise` draws the initial state of the c-th decoded chunk from
    `fold_in(PRNGKey(noise_seed), c)` (then each answer depends on the seed and on where its prompt lands; with
    several offsets, the j-th offset's chunks fold in j as well, for j > 0).
    """
    if len(prompts) != len(max_new):
        raise ValueError(f"got {len(prompts)} prompts but {len(max_new)} answer lengths")
    offsets = check_abacus_offsets(abacus_offsets)
    votes: list[dict[bytes, list]] = [{} for _ in prompts]   # generation bytes -> [count, first offset index, ids]
    todo = list(range(len(prompts)))
    for j, offset in enumerate(offsets):
        key = jax.random.PRNGKey(noise_seed) if j == 0 else jax.random.fold_in(jax.random.PRNGKey(noise_seed), j)
        label = desc if len(offsets) == 1 else f"{desc} (Abacus offset {offset})"
        gens = _decode(model, params, [prompts[i] for i in todo], [max_new[i] for i in todo], batch_size,
                       recurrences, use_cache, progress, label, bucket, key, offset)
        for i, g in zip(todo, gens):
            entry = votes[i].setdefault(g.tobytes(), [0, j, g])
            entry[0] += 1
        left = len(offsets) - j - 1
        todo = [i for i in todo if not _settled(votes[i], left)]
        if not todo:
            break
    return [min(v.values(), key=lambda e: (-e[0], e[1]))[2] for v in votes]


def check_abacus_offsets(offsets) -> tuple[int, ...]:
    """The offsets as a tuple, after checking they are distinct integers >= 0, at least one."""
    out = tuple(offsets)
    if not valid_abacus_offsets(out):
        raise ValueError(f"abacus_offsets must be one or more distinct integers >= 0, got {offsets!r}")
    return tuple(int(o) for o in out)


def _settled(votes: dict, left: int) -> bool:
    """Whether `left` more votes cannot change the leader (a tie would go to the earlier answer, but a later
    runner-up that only ties may have come first, so a tie still counts as open)."""
    counts = sorted((e[0] for e in votes.values()), reverse=True) + [0]
    return counts[0] > counts[1] + left


def _decode(model, params, prompts, max_new, batch_size, recurrences, use_cache, progress, desc, bucket, noise_key,
            offset) -> list[np.ndarray]:
    """`solve_prompts` for one Abacus offset."""
    key = (lambda n: length_bucket(n)) if bucket else (lambda n: n)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[key(len(p))].append(i)
    rows = min(batch_size, _pow2_at_least(max((len(ix) for ix in groups.values()), default=1)))
    results: list[np.ndarray | None] = [None] * len(prompts)
    total = sum(-(-len(ix) // rows) for ix in groups.values())
    chunk_number = 0
    with tqdm(total=total, disable=not progress, desc=desc, dynamic_ncols=True,
              mininterval=0.5 if sys.stderr.isatty() else 30.0) as bar:
        for width in sorted(groups):
            idx = groups[width]
            new = max(max_new[i] for i in idx)
            new = length_bucket(new) if bucket else new
            for s in range(0, len(idx), rows):
                chunk = idx[s:s + rows] + idx[:1] * max(0, rows - len(idx[s:s + rows]))  # fill with a repeat
                batch = np.full((rows, width), PAD, np.int32)
                for j, i in enumerate(chunk):
                    batch[j, :len(prompts[i])] = prompts[i]
                gen = greedy_decode(model, params, batch, new, lengths_B=[len(prompts[i]) for i in chunk],
                                    max_new_B=[max_new[i] for i in chunk], recurrences=recurrences,
                                    use_cache=use_cache, rng=jax.random.fold_in(noise_key, chunk_number),
                                    abacus_offset_B=np.full(rows, offset, np.int32))
                chunk_number += 1
                for j, i in enumerate(chunk[:min(rows, len(idx) - s)]):
                    results[i] = gen[j, :max_new[i]]
                bar.update(1)
    return results  # type: ignore[return-value]


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def cell_problems(task: str, la: int, lb: int, n: int, seed: int):
    """(prompts without padding, target ids with EOS) for one cell."""
    tok = Tokenizer.for_task(task)
    prompts_NxP, answers = make_eval_cell(task, la, lb, n, seed)
    prompts = [row[row != PAD] for row in prompts_NxP]
    targets = [tok.encode(a) + [EOS] for a in answers]
    return prompts, targets


class Decoded(NamedTuple):
    """Per problem, in the same order: its cell, prompt ids (no padding), target ids (EOS last) and generation."""

    cells: list[tuple[int, int]]
    prompts: list[np.ndarray]
    targets: list[list[int]]
    generated: list[np.ndarray]


def decode_cells(model: ArithModel, params, task: str, cells: list[tuple[int, int]], n: int, *, seed: int = 1234,
                 batch_size: int = 256, recurrences: int | None = None, progress: bool = True,
                 abacus_offsets: tuple[int, ...] = (0,)) -> Decoded:
    """Draw `n` problems per cell (`seed`) and decode them all together (padded into prompt-length buckets); `seed`
    also keys the initial-state noise of a model with `eval_init_noise`; `abacus_offsets` as in `solve_prompts`."""
    prompts, targets, max_new, owner = [], [], [], []
    for cell in cells:
        p, t = cell_problems(task, *cell, n, seed)
        prompts += p
        targets += t
        max_new += [answer_length(task, *cell)] * len(p)
        owner += [cell] * len(p)
    gens = solve_prompts(model, params, prompts, max_new, batch_size=batch_size, recurrences=recurrences,
                         progress=progress, desc="eval", noise_seed=seed, abacus_offsets=abacus_offsets)
    return Decoded(owner, prompts, targets, gens)


def cell_scores(decoded: Decoded) -> dict:
    """{(la, lb): CellScore} of decoded problems."""
    exact: dict = defaultdict(list)
    top1: dict = defaultdict(list)
    for cell, g, t in zip(decoded.cells, decoded.generated, decoded.targets):
        exact[cell].append(bool(exact_match(g[None], [t])[0]))
        top1[cell].append(bool(top1_match(g[None], [t])[0]))
    return {cell: CellScore(float(np.mean(exact[cell])), float(np.mean(top1[cell]))) for cell in exact}


def score_cells(model: ArithModel, params, task: str, cells: list[tuple[int, int]], n: int, **kw) -> dict:
    """{(la, lb): CellScore} for each cell (`decode_cells`' options)."""
    return cell_scores(decode_cells(model, params, task, cells, n, **kw))


def error_breakdown(decoded: Decoded, task: str, examples: int = 10) -> dict:
    """What the wrong answers got wrong.

    Positions are 1-based answer tokens in the order the model writes them; for addition and multiplication the
    answer is written least significant digit first, so position p is the digit of 10^(p-1). A token past the
    target's EOS is not compared; a missing or early EOS counts at the EOS's position.

    Returns {"problems", "wrong", "by_wrong_tokens": {count: problems}, "by_position": {position: problems},
    "by_cell": {"la,lb": wrong}, "examples": [{"cell", "prompt", "expected", "generated", "positions"}]}; the
    examples are the first `examples` wrong answers in cell order.
    """
    tok = Tokenizer.for_task(task)
    by_count: dict = defaultdict(int)
    by_position: dict = defaultdict(int)
    by_cell: dict = defaultdict(int)
    shown = []
    wrong = 0
    for cell, prompt, t, g in zip(decoded.cells, decoded.prompts, decoded.targets, decoded.generated):
        if exact_match(g[None], [t])[0]:
            continue
        wrong += 1
        got = np.full(len(t), -1, np.int64)
        got[:min(len(t), len(g))] = g[:len(t)]
        positions = [int(p) + 1 for p in np.flatnonzero(got != np.asarray(t))]
        by_count[len(positions)] += 1
        for p in positions:
            by_position[p] += 1
        by_cell[f"{cell[0]},{cell[1]}"] += 1
        if len(shown) < examples:
            shown.append({"cell": list(cell), "prompt": tok.decode(prompt), "expected": tok.decode(t),
                          "generated": tok.decode(g), "positions": positions})
    return {"problems": len(decoded.targets), "wrong": wrong,
            "by_wrong_tokens": {str(k): by_count[k] for k in sorted(by_count)},
            "by_position": {str(k): by_position[k] for k in sorted(by_position)},
            "by_cell": dict(by_cell), "examples": shown}


def accuracy_cells(model: ArithModel, params, task: str, cells: list[tuple[int, int]], n: int, **kw) -> dict:
    """{(la, lb): exact-match accuracy} for each cell (`score_cells`' options)."""
    return {cell: score.exact for cell, score in score_cells(model, params, task, cells, n, **kw).items()}


def accuracy_grid(model: ArithModel, params, task: str, max_len: int, n: int, **kw) -> np.ndarray:
    """acc[i-1, j-1] for operand lengths (or, for sort, max digits × array length) i, j in 1..max_len."""
    return score_grids(model, params, task, max_len, n, **kw).exact


def grid_cells(max_len: int) -> list[tuple[int, int]]:
    """Every (la, lb) with 1 <= la, lb <= max_len, row by row."""
    return [(i, j) for i in range(1, max_len + 1) for j in range(1, max_len + 1)]


def _grid_arrays(scores: dict, max_len: int) -> CellScore:
    exact, top1 = np.zeros((max_len, max_len)), np.zeros((max_len, max_len))
    for (i, j), score in scores.items():
        exact[i - 1, j - 1], top1[i - 1, j - 1] = score
    return CellScore(exact, top1)


def score_grids(model: ArithModel, params, task: str, max_len: int, n: int, **kw) -> CellScore:
    """CellScore of two [max_len, max_len] arrays: exact-match and top-1 accuracy of every cell of the grid."""
    return _grid_arrays(score_cells(model, params, task, grid_cells(max_len), n, **kw), max_len)


def run_evaluation(model: ArithModel, params, task: str, train_len: int, max_len: int, n: int,
                   sweep: tuple[int, ...] = (), json_path: str | Path | None = None,
                   plot_path: str | Path | None = None, *, errors: int | None = None, **kw) -> dict:
    """Grid + sweep, summarised as in-distribution / out-of-distribution accuracy, written to JSON/PNG. Sorting
    adds the original's top-1 accuracy: `top1_grid`, `in_distribution_top1`, `out_of_distribution_top1` and
    `sweep_top1`. With `errors` (a number of examples, 0 for none), `errors` and `sweep_errors` are the grid's and
    the sweep's `error_breakdown`."""
    decoded = decode_cells(model, params, task, grid_cells(max_len), n, **kw)
    grid, top1_grid = _grid_arrays(cell_scores(decoded), max_len)
    ii, jj = np.meshgrid(np.arange(1, max_len + 1), np.arange(1, max_len + 1), indexing="ij")
    in_dist = (ii <= train_len) & (jj <= train_len)
    report = {
        "task": task, "train_len": train_len, "max_len": max_len, "n_per_cell": n,
        "in_distribution_acc": float(grid[in_dist].mean()),
        "out_of_distribution_acc": float(grid[~in_dist].mean()) if (~in_dist).any() else None,
        "grid": grid.tolist(),
    }
    if tuple(kw.get("abacus_offsets", (0,))) != (0,):
        report["abacus_offsets"] = list(kw["abacus_offsets"])
    if task == "sort":
        report.update({
            "in_distribution_top1": float(top1_grid[in_dist].mean()),
            "out_of_distribution_top1": float(top1_grid[~in_dist].mean()) if (~in_dist).any() else None,
            "top1_grid": top1_grid.tolist(),
        })
    if errors is not None:
        report["errors"] = error_breakdown(decoded, task, errors)
    if sweep:
        decoded_sweep = decode_cells(model, params, task, [(s, s) for s in sweep], n, **kw)
        scores = cell_scores(decoded_sweep)
        if errors is not None:
            report["sweep_errors"] = error_breakdown(decoded_sweep, task, errors)
        report["sweep"] = {str(s): scores[(s, s)].exact for s in sweep}
        if task == "sort":
            report["sweep_top1"] = {str(s): scores[(s, s)].top1 for s in sweep}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1))
    if plot_path:
        labels = ("max digits", "array length") if task == "sort" else ("length of operand 1",
                                                                        "length of operand 2")
        plot_accuracy_grid(grid, plot_path, train_len, title=f"{task}: exact match (%)", row_label=labels[0],
                           col_label=labels[1])
        if sweep:
            plot_length_sweep(list(sweep), [report["sweep"][str(s)] for s in sweep],
                              Path(plot_path).with_name(Path(plot_path).stem + "_sweep.png"), train_len)
    return report
