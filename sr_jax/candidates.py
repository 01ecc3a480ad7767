"""Candidate expressions for datasets, tagged with where they came from; the transformer's candidates.

`model_candidates(trained, datasets)` encodes every dataset's points once, then decodes all datasets in one jitted
call — greedy always, plus beam search or sampling — under the prefix-expression grammar
(`sr_jax.constraints`), so every hypothesis parses and uses only the dataset's variables. Programs are cached by
shape; the number of datasets and points are padded to a few buckets so mixed calls compile a bounded number of
programs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from core_jax import decode
from .expressions import Expression
from .vocab import EOS, PAD, encode_points


@dataclass(frozen=True)
class Candidate:
    """One candidate expression: ``source`` names its origin ("greedy", "beam", "sample" from the transformer;
    "prior", "basis" from the non-neural pool); ``log_prob`` is the model's log-probability where there is one."""

    expression: Expression
    source: str
    log_prob: float | None = None


DECODINGS = ("greedy", "beam", "sample")
# the default number of datasets decoded side by side inside one program; the others follow in a `lax.map`. Each
# decoding loop runs until its slowest row stops, and on CPU each step reads its datasets' cross-attention
# keys/values: one dataset at a time is fastest there (BENCHMARKS.md, "Decoding many datasets")
DECODE_GROUP = 1


def _bucket(n: int, minimum: int) -> int:
    b = minimum
    while b < n:
        b *= 2
    return b


@functools.lru_cache(maxsize=32)
def decoding_program(model, decoding: str, width: int, max_len: int, length_penalty: float, temperature: float,
                     group: int = DECODE_GROUP):
    """The jitted program of one request, cached: (params, points, mask, n_vars, rng) -> (greedy tokens [B, T],
    greedy log-probs [B], then for beam/sample the extra hypotheses' tokens [B, width, T] and log-probs
    [B, width], None for greedy), inputs as `encode_datasets` returns them. `group` datasets are decoded side by
    side, the groups one after another in a `lax.map` (the same outputs for any group; the samples of
    `decoding="sample"` depend on the batch either way)."""
    if int(group) < 1:
        raise ValueError(f"group must be a positive number of datasets, got {group}")
    from .constraints import initial_state, prefix_grammar

    grammar = prefix_grammar(model.vocab, max_len)

    def run(params, points_BxNxP, mask_BxN, n_vars_B, rng):
        """Datasets decoded `group` at a time in a `lax.map` (B is a power of two, see `encode_datasets`)."""
        B = points_BxNxP.shape[0]
        G = min(B, int(group))
        if G == B:
            return run_group(params, points_BxNxP, mask_BxN, n_vars_B, rng)
        split = lambda a: a.reshape((B // G, G) + a.shape[1:])
        out = jax.lax.map(lambda args: run_group(params, *args),
                          (split(points_BxNxP), split(mask_BxN), split(n_vars_B), jax.random.split(rng, B // G)))
        return jax.tree_util.tree_map(lambda a: a.reshape((B,) + a.shape[2:]), out)

    def run_group(params, points_BxNxP, mask_BxN, n_vars_B, rng):
        B = points_BxNxP.shape[0]
        context = model.context(params, points_BxNxP, mask_BxN)
        fn = model.decoder_fn(params, context)
        greedy = decode.greedy(fn, model.init_cache(B, max_len + 1), jnp.full((B,), EOS, jnp.int32),
                               max_len=max_len, eos_id=EOS, pad_id=PAD, constraint=grammar,
                               constraint_state=initial_state(n_vars_B))
        if decoding == "beam":
            extra = decode.beam_search(fn, model.init_cache(B, max_len + 1), jnp.full((B,), EOS, jnp.int32),
                                       beam_size=width, max_len=max_len, eos_id=EOS, pad_id=PAD,
                                       length_penalty=length_penalty, constraint=grammar,
                                       constraint_state=initial_state(n_vars_B),
                                       prefix_axis=1)   # DecodeCache leaves: [rows, position, heads, head_dim]
            return greedy.tokens_BxT, greedy.log_prob_B, extra.tokens_BxKxT, extra.log_prob_BxK
        if decoding == "sample":
            rows = B * width
            out = decode.sample(fn, model.init_cache(rows, max_len + 1), jnp.full((rows,), EOS, jnp.int32), rng,
                                temperature=temperature, max_len=max_len, eos_id=EOS, pad_id=PAD,
                                constraint=grammar, constraint_state=initial_state(jnp.repeat(n_vars_B, width)))
            return (greedy.tokens_BxT, greedy.log_prob_B, out.tokens_BxT.reshape(B, width, -1),
                    out.log_prob_B.reshape(B, width))
        return greedy.tokens_BxT, greedy.log_prob_B, None, None

    return jax.jit(run)


def encode_datasets(datasets: Sequence[tuple[np.ndarray, np.ndarray]], max_dim: int, max_points: int = 200):
    """(points int32[B', N', P], mask bool[B', N'], n_vars int32[B']) with B' and N' padded to power-of-two buckets
    (extra datasets repeat the first; extra points are masked). Datasets must have <= max_points rows."""
    n_max = max(len(y) for _, y in datasets)
    if n_max > max_points:
        raise ValueError(f"a dataset has {n_max} points; the model reads at most {max_points} (subsample or bag)")
    n_pad = _bucket(n_max, 16)
    b_pad = _bucket(len(datasets), 1)
    P = 3 * (max_dim + 1)
    points = np.zeros((b_pad, n_pad, P), np.int32)
    mask = np.zeros((b_pad, n_pad), bool)
    n_vars = np.ones(b_pad, np.int32)
    for b in range(b_pad):
        x, y = datasets[b if b < len(datasets) else 0]
        x = np.asarray(x, np.float64)
        x = x.reshape(-1, 1) if x.ndim == 1 else x
        points[b, :len(y)] = encode_points(x, y, max_dim)
        mask[b, :len(y)] = True
        n_vars[b] = x.shape[1]
    return points, mask, n_vars


def model_candidates(trained, datasets: Sequence[tuple[np.ndarray, np.ndarray]], *, decoding: str = "beam",
                     beam_size: int = 10, n_samples: int = 32, temperature: float = 1.0, length_penalty: float = 1.0,
                     max_len: int | None = None, seed: int = 0, group: int = DECODE_GROUP) -> list[list[Candidate]]:
    """The transformer's candidates for each (X standardised, y) dataset: greedy first, then the beam's or the
    samples' distinct expressions, each with its log-probability. Every candidate parses (grammar-constrained).

    `max_len`: generated tokens at most (EOS included); default: the longest training target."""
    return start_model_candidates(trained, datasets, decoding=decoding, beam_size=beam_size, n_samples=n_samples,
                                  temperature=temperature, length_penalty=length_penalty, max_len=max_len, seed=seed,
                                  group=group)()


def start_model_candidates(trained, datasets: Sequence[tuple[np.ndarray, np.ndarray]], *, decoding: str = "beam",
                           beam_size: int = 10, n_samples: int = 32, temperature: float = 1.0,
                           length_penalty: float = 1.0, max_len: int | None = None, seed: int = 0,
                           group: int = DECODE_GROUP) -> Callable[[], list[list[Candidate]]]:
    """``model_candidates`` in two steps: this call checks the arguments and dispatches the decoding (JAX runs it
    asynchronously) and returns a function that waits for it and returns the candidates, so that host work done in
    between (``SymbolicTransformerRegressor`` builds its other candidates) overlaps the decoding."""
    if decoding not in DECODINGS:
        raise ValueError(f"unknown decoding {decoding!r}; choose from {', '.join(DECODINGS)}")
    if not datasets:
        return lambda: []
    cfg, model, params = trained
    # default: the longest target the model was trained on (targets are padded to data.target_buckets, BOS included)
    max_len = min(max_len or max(cfg.data.target_buckets) - 1, cfg.model.max_len - 1)
    width = {"greedy": 1, "beam": int(beam_size), "sample": int(n_samples)}[decoding]
    if width < 1:
        raise ValueError(f"beam_size / n_samples must be >= 1, got {width}")
    points, mask, n_vars = encode_datasets(datasets, cfg.model.max_dim)
    program = decoding_program(model, decoding, width, int(max_len), float(length_penalty), float(temperature),
                               int(group))
    decoded = program(params, points, mask, n_vars, jax.random.PRNGKey(seed))

    def finish() -> list[list[Candidate]]:
        g_tok, g_lp, x_tok, x_lp = jax.device_get(decoded)
        out = []
        for b in range(len(datasets)):
            seen: dict[Expression, Candidate] = {}
            rows = [(g_tok[b], g_lp[b], "greedy")]
            if x_tok is not None:
                rows += [(x_tok[b, k], x_lp[b, k], decoding) for k in range(x_tok.shape[1])]
            for ids, lp, source in rows:
                try:
                    expr = model.vocab.decode_expression(ids)
                except ValueError:
                    continue  # an unfinished hypothesis (decoding ran out of length)
                if expr not in seen:
                    seen[expr] = Candidate(expr, source, float(lp))
            out.append(list(seen.values()))
        return out

    return finish
