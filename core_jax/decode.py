"""Batched autoregressive decoding: greedy, sampling and beam search over a one-token step function.

Every loop is written against

    tokens_to_logits(tokens_Bx1, cache) -> (logits_BxV, cache)

which feeds one token per row (the previous output, BOS on the first call) and returns the next-token logits
and the updated cache. The cache is an opaque pytree: greedy and sample never look inside it. Beam search
needs one convention: every cache leaf with ndim >= 1 has a leading batch axis (B rows, then B*K during the
search, rows b*K .. b*K+K-1 holding the K beams of input b in an order the search keeps track of); leaves with
ndim 0 (a shared write index) are left as they are. `tile_beams` repeats a cache (or any per-row pytree) to B*K
rows.

Everything traces inside a caller's `jax.jit`: lengths and the beam size are static ints, loops are
`lax.while_loop`s that stop as soon as every row has finished (or at `max_len` generated tokens).

Outputs hold the generated tokens only (BOS excluded, EOS included, `pad_id` after EOS); a row that never
produced EOS has `max_len` tokens and no EOS. Log-probabilities are those of the model's distribution at
temperature 1 restricted to the allowed tokens and renormalised: log_softmax(logits with disallowed tokens set to
-inf). Without a constraint this is the model's plain log-softmax. Sampling temperature changes which token is
drawn, never the reported log-probability.

A `Constraint` (an optional grammar) sees an opaque per-row state pytree (leading axis B, tiled and gathered like
the cache in beam search): `allowed(state) -> bool[B, V]` masks the logits before argmax/sampling/top-k, and
`advance(state, token_B) -> state` moves every row past its chosen token. `allowed` must leave at least one
token for every row that has not finished. In greedy and sample, a finished row emits `pad_id` and its constraint
state stops changing (advance's result is discarded for it).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

TokensToLogits = Callable[[jnp.ndarray, Any], "tuple[jnp.ndarray, Any]"]


class Constraint(NamedTuple):
    """A per-row grammar over the vocabulary, advanced token by token."""

    allowed: Callable[[Any], jnp.ndarray]               # state -> bool[B, V]
    advance: Callable[[Any, jnp.ndarray], Any]          # (state, token_B int32) -> state


class DecodeOutput(NamedTuple):
    """Greedy or sampled sequences.

    tokens_BxT: int32, generated tokens (BOS excluded, EOS included, pad_id after it), T = max_len.
    log_prob_B: float32, sum of the log-probs of the generated tokens including EOS (see the module docstring).
    length_B: int32, number of generated tokens including EOS.
    """

    tokens_BxT: jnp.ndarray
    log_prob_B: jnp.ndarray
    length_B: jnp.ndarray


class BeamOutput(NamedTuple):
    """The beam_size hypotheses of every row, best first.

    tokens_BxKxT: int32, generated tokens as in DecodeOutput.
    scores_BxK: float32, log_prob / (length + 1) ** length_penalty (the + 1 counts BOS); -inf for empty slots.
    log_prob_BxK: float32, sum of the log-probs of the generated tokens including EOS.
    length_BxK: int32, number of generated tokens including EOS.
    finished_BxK: bool, the hypothesis ended with EOS. Rows with fewer than K finished hypotheses are filled,
        after the finished ones, with the best hypotheses still alive when the search stopped (finished False;
        their score uses their current length; slots that never held a valid hypothesis score -inf).
    """

    tokens_BxKxT: jnp.ndarray
    scores_BxK: jnp.ndarray
    log_prob_BxK: jnp.ndarray
    length_BxK: jnp.ndarray
    finished_BxK: jnp.ndarray


# ---------------------------------------------------------------------------------------------------- helpers
def tile_beams(tree, beam_size: int):
    """Repeat every leaf with ndim >= 1 beam_size times along axis 0 (row b -> rows b*K .. b*K+K-1)."""
    return jax.tree_util.tree_map(lambda x: jnp.repeat(x, beam_size, axis=0) if jnp.ndim(x) else x, tree)


def _gather_rows(tree, rows_N):
    """Rows `rows_N` of every leaf with ndim >= 1; leaves with ndim 0 unchanged."""
    return jax.tree_util.tree_map(lambda x: jnp.take(x, rows_N, axis=0) if jnp.ndim(x) else x, tree)


def _keep_rows(keep_B, old, new):
    """Per leaf: old where keep_B, else new (leaves with ndim 0 take new)."""
    def pick(o, n):
        if not jnp.ndim(n):
            return n
        return jnp.where(keep_B.reshape((-1,) + (1,) * (jnp.ndim(n) - 1)), o, n)
    return jax.tree_util.tree_map(pick, old, new)


def _check_args(max_len, eos_id, pad_id, constraint, constraint_state):
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a static int >= 1, got {max_len!r}")
    if constraint is None and constraint_state is not None:
        raise ValueError("constraint_state was given without a constraint")
    if constraint is not None and constraint_state is None:
        raise ValueError("a constraint needs its initial constraint_state (one row per input row)")
    for name, v in (("eos_id", eos_id), ("pad_id", pad_id)):
        if not isinstance(v, int):
            raise ValueError(f"{name} must be a static int, got {v!r}")


def _step_logits(tokens_to_logits, tokens_N, cache, constraint, state):
    """(masked float32 logits [N, V], new cache): one model call plus the constraint's mask."""
    logits, cache = tokens_to_logits(tokens_N[:, None], cache)
    if jnp.ndim(logits) != 2 or logits.shape[0] != tokens_N.shape[0]:
        raise ValueError(f"tokens_to_logits must return logits of shape [{tokens_N.shape[0]}, vocab], "
                         f"got {jnp.shape(logits)}")
    logits = logits.astype(jnp.float32)
    if constraint is not None:
        logits = jnp.where(constraint.allowed(state), logits, -jnp.inf)
    return logits, cache


# ------------------------------------------------------------------------------------------ greedy and sample
class _RowsState(NamedTuple):
    t: jnp.ndarray            # int32 scalar: index of the token generated next
    tokens_BxT: jnp.ndarray
    last_B: jnp.ndarray       # token fed to the model next
    done_B: jnp.ndarray
    log_prob_B: jnp.ndarray
    length_B: jnp.ndarray
    cache: Any
    constraint_state: Any


def _decode_rows(tokens_to_logits, cache, bos_B, pick, max_len, eos_id, pad_id, constraint, constraint_state):
    """Shared loop of greedy and sample; `pick(t, masked_logits_BxV) -> token_B`."""
    _check_args(max_len, eos_id, pad_id, constraint, constraint_state)
    bos_B = jnp.asarray(bos_B, jnp.int32)
    B = bos_B.shape[0]

    def cond(s: _RowsState):
        return (s.t < max_len) & ~jnp.all(s.done_B)

    def body(s: _RowsState):
        logits, cache = _step_logits(tokens_to_logits, s.last_B, s.cache, constraint, s.constraint_state)
        nxt = jnp.where(s.done_B, pad_id, pick(s.t, logits).astype(jnp.int32))
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), nxt[:, None], axis=1)[:, 0]
        cstate = s.constraint_state
        if constraint is not None:
            cstate = _keep_rows(s.done_B, cstate, constraint.advance(cstate, nxt))
        return _RowsState(
            t=s.t + 1,
            tokens_BxT=jax.lax.dynamic_update_slice(s.tokens_BxT, nxt[:, None], (0, s.t)),
            last_B=nxt,
            done_B=s.done_B | (nxt == eos_id),
            log_prob_B=s.log_prob_B + jnp.where(s.done_B, 0.0, logp),
            length_B=s.length_B + (~s.done_B).astype(jnp.int32),
            cache=cache,
            constraint_state=cstate)

    init = _RowsState(t=jnp.int32(0), tokens_BxT=jnp.full((B, max_len), pad_id, jnp.int32), last_B=bos_B,
                      done_B=jnp.zeros((B,), bool), log_prob_B=jnp.zeros((B,), jnp.float32),
                      length_B=jnp.zeros((B,), jnp.int32), cache=cache, constraint_state=constraint_state)
    s = jax.lax.while_loop(cond, body, init)
    return DecodeOutput(s.tokens_BxT, s.log_prob_B, s.length_B)


def greedy(tokens_to_logits: TokensToLogits, cache, bos_B, *, max_len: int, eos_id: int, pad_id: int,
           constraint: Constraint | None = None, constraint_state=None) -> DecodeOutput:
    """Argmax decoding of every row from its first input token bos_B (int32[B]) for at most max_len tokens."""
    return _decode_rows(tokens_to_logits, cache, bos_B, lambda t, logits: jnp.argmax(logits, axis=-1),
                        max_len, eos_id, pad_id, constraint, constraint_state)


def sample(tokens_to_logits: TokensToLogits, cache, bos_B, rng, *, temperature: float = 1.0, max_len: int,
           eos_id: int, pad_id: int, constraint: Constraint | None = None, constraint_state=None) -> DecodeOutput:
    """One independent sample per row from softmax(masked logits / temperature).

    For several samples per input, tile the input rows (and cache) first. Step t draws with
    `jax.random.fold_in(rng, t)`, so a row's sample depends on its position in the batch and on rng.
    """
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use greedy() for argmax decoding")

    def pick(t, logits_BxV):
        return jax.random.categorical(jax.random.fold_in(rng, t), logits_BxV / temperature, axis=-1)

    return _decode_rows(tokens_to_logits, cache, bos_B, pick, max_len, eos_id, pad_id, constraint,
                        constraint_state)


# ----------------------------------------------------------------------------------------------- beam search
def _assign_rows(parent_row_BxK):
    """Physical rows for the new beams, moving as little history as possible.

    parent_row_BxK: the row (0..K-1 within its input row) holding each new beam's parent. The first new beam of
    each parent (in k order) keeps the parent's row; the others take, in k order, the rows that no first child
    kept (ascending). Returns (row_BxK, copied_BxK): each new beam's row, and which beams need their parent's
    history copied into it (sources are kept rows, destinations are rows no beam kept, so copies never clash).
    """
    K = parent_row_BxK.shape[1]
    same = parent_row_BxK[:, :, None] == parent_row_BxK[:, None, :]               # [B, K(k), K(j)]
    earlier = jnp.arange(K)[None, :] < jnp.arange(K)[:, None]                     # j < k
    copied = jnp.any(same & earlier[None], axis=2)
    kept = jnp.any((parent_row_BxK[:, :, None] == jnp.arange(K)) & ~copied[:, :, None], axis=1)   # [B, K rows]
    free_rank = jnp.cumsum(~kept, axis=1) - 1                                     # rank among free rows
    copy_rank = jnp.cumsum(copied, axis=1) - 1
    match = (~kept[:, None, :]) & (free_rank[:, None, :] == copy_rank[:, :, None])   # [B, K(k), K(rows)]
    row = jnp.where(copied, jnp.argmax(match, axis=2), parent_row_BxK).astype(jnp.int32)
    return row, copied


def _copy_histories(cache, src_N, dst_N, n_copies, t, prefix_axis, chunk):
    """Copy rows src_N[i] -> dst_N[i] for i < n_copies of every cache leaf with ndim >= 1, in place.

    Leaves with more than prefix_axis axes get only positions [0, t] along prefix_axis copied, in chunks of
    `chunk` positions (dynamic_slice and dynamic_update_slice move a window that would pass the end back by the
    same amount, so it re-copies positions from the same source row); the other leaves get whole rows.
    """
    leaves, treedef = jax.tree_util.tree_flatten(cache)
    chunks = 1 if prefix_axis is None else (t + chunk) // chunk          # ceil((t + 1) / chunk)

    def body(i, leaves):
        copy, c = i // chunks, i % chunks
        src, dst = src_N[copy], dst_N[copy]
        out = []
        for x in leaves:
            if not jnp.ndim(x):
                out.append(x)
                continue
            start = [src] + [0] * (x.ndim - 1)
            size = [1] + list(x.shape[1:])
            if prefix_axis is not None and x.ndim > prefix_axis:
                size[prefix_axis] = min(chunk, x.shape[prefix_axis])
                start[prefix_axis] = c * chunk
            piece = jax.lax.dynamic_slice(x, start, size)
            start[0] = dst
            out.append(jax.lax.dynamic_update_slice(x, piece, start))
        return out

    leaves = jax.lax.fori_loop(0, n_copies * chunks, body, leaves)
    return jax.tree_util.tree_unflatten(treedef, leaves)


class _BeamState(NamedTuple):
    t: jnp.ndarray                 # int32 scalar: index of the token generated next
    alive_tokens_BxKxT: jnp.ndarray
    alive_log_prob_BxK: jnp.ndarray  # -inf for empty beams; sorted descending along K
    alive_tok_BxK: jnp.ndarray     # last token of each alive beam (fed next)
    row_BxK: jnp.ndarray           # physical cache row (within the input row) of each alive beam
    cache: Any                     # B*K physical rows: row b*K + row_BxK[b, k] holds beam k's history
    constraint_state: Any          # B*K rows in beam order (row b*K + k is beam k)
    fin_tokens_BxKxT: jnp.ndarray
    fin_score_BxK: jnp.ndarray     # -inf for empty slots; sorted descending along K
    fin_log_prob_BxK: jnp.ndarray
    fin_length_BxK: jnp.ndarray
    row_done_B: jnp.ndarray        # this row's finished set can no longer change (or must not: early stopping)


def beam_search(tokens_to_logits: TokensToLogits, cache, bos_B, *, beam_size: int, max_len: int, eos_id: int,
                pad_id: int, length_penalty: float = 1.0, early_stopping: bool = True,
                constraint: Constraint | None = None, constraint_state=None, prefix_axis: int | None = None,
                copy_chunk: int = 32) -> BeamOutput:
    """Beam search with beam_size hypotheses per row; `cache` and `constraint_state` have B rows (tiled inside).

    Each step expands every alive beam by every token and ranks the 2K best extensions by summed log-prob (so at
    least K of them do not end with EOS). The K best extensions without EOS stay alive; the extensions ending with
    EOS that rank above the K-th of those become finished hypotheses (as in the original, whose loop over the
    ranked extensions stops once K alive ones are collected, so beam_size 1 is greedy decoding), with score
    log_prob / (length + 1) ** length_penalty, length counting EOS, + 1 for BOS (the E2E original's
    convention). The row keeps its K best finished hypotheses.

    early_stopping (a static bool). True (the original's): a row stops once it holds K finished hypotheses.
    early_stopping=False: a row stops only once no alive beam can still reach a better score than its K-th
    finished one (bound: its current log-prob, which can only fall, over the most favourable final length), so
    the result is what the beam would give if run to max_len. A row also stops when no alive beam is left.
    The loop ends when every row has stopped or max_len tokens were generated.

    Cache rows are not reordered by beam: a beam's history stays in its cache row, the first extension of a beam
    keeps that row, and only further extensions of the same beam get the history copied into a row whose beam
    was dropped (the logits are read in beam order, so the search is the same as with a cache gathered by beam).
    `prefix_axis` (static int or None): the axis of the cache leaves that indexes decoding positions when the
    step that generates token t writes entry t there and reads no entry past it before writing it (a KV cache:
    axis 1 of [rows, length, heads, head_dim]); a copy then moves only entries 0..t, `copy_chunk` entries at a
    time. Leaves with fewer axes, and every leaf when prefix_axis is None, are copied whole.
    """
    _check_args(max_len, eos_id, pad_id, constraint, constraint_state)
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be a static int >= 1, got {beam_size!r}")
    if prefix_axis is not None and (not isinstance(prefix_axis, int) or prefix_axis < 1):
        raise ValueError(f"prefix_axis must be None or a static int >= 1 (axis 0 is the row), got {prefix_axis!r}")
    if not isinstance(copy_chunk, int) or copy_chunk < 1:
        raise ValueError(f"copy_chunk must be a static int >= 1, got {copy_chunk!r}")
    K = beam_size
    bos_B = jnp.asarray(bos_B, jnp.int32)
    B = bos_B.shape[0]
    length_penalty = jnp.float32(length_penalty)
    neg_inf = jnp.float32(-jnp.inf)
    base_B = jnp.arange(B, dtype=jnp.int32)[:, None] * K

    def norm(log_prob, length):
        return log_prob / (length.astype(jnp.float32) + 1.0) ** length_penalty

    def cond(s: _BeamState):
        return (s.t < max_len) & ~jnp.all(s.row_done_B)

    def body(s: _BeamState):
        # feed each cache row the last token of the beam that lives there; read the logits back in beam order
        beam_of_row = jnp.argsort(s.row_BxK, axis=1)
        feed = jnp.take_along_axis(s.alive_tok_BxK, beam_of_row, axis=1).reshape(B * K)
        logits, cache = tokens_to_logits(feed[:, None], s.cache)
        if jnp.ndim(logits) != 2 or logits.shape[0] != B * K:
            raise ValueError(f"tokens_to_logits must return logits of shape [{B * K}, vocab], "
                             f"got {jnp.shape(logits)}")
        logits = jnp.take(logits.astype(jnp.float32), (base_B + s.row_BxK).reshape(B * K), axis=0)
        if constraint is not None:
            logits = jnp.where(constraint.allowed(s.constraint_state), logits, -jnp.inf)
        V = logits.shape[-1]
        logp_BxKxV = jax.nn.log_softmax(logits, axis=-1).reshape(B, K, V)
        cand_BxKV = (s.alive_log_prob_BxK[:, :, None] + logp_BxKxV).reshape(B, K * V)
        top_lp, top_idx = jax.lax.top_k(cand_BxKV, min(2 * K, K * V))   # [B, C]
        top_beam, top_tok = top_idx // V, (top_idx % V).astype(jnp.int32)
        valid = top_lp > neg_inf
        is_eos = top_tok == eos_id
        top_tokens = jnp.take_along_axis(s.alive_tokens_BxKxT, top_beam[:, :, None], axis=1)
        at_t = jnp.arange(max_len)[None, None, :] == s.t
        top_tokens = jnp.where(at_t, top_tok[:, :, None], top_tokens)

        # finished: the EOS extensions ranked above the K-th extension without EOS (not for stopped rows),
        # merged into the K best
        alive_cand = ~is_eos & valid
        alive_before = jnp.cumsum(alive_cand, axis=1) - alive_cand
        admit = is_eos & valid & (alive_before < K) & ~s.row_done_B[:, None]
        new_score = jnp.where(admit, norm(top_lp, s.t + 1), neg_inf)
        all_score = jnp.concatenate([s.fin_score_BxK, new_score], axis=1)
        fin_score, order = jax.lax.top_k(all_score, K)
        take = lambda old, new: jnp.take_along_axis(jnp.concatenate([old, new], axis=1),
                                                    order.reshape(order.shape + (1,) * (old.ndim - 2)), axis=1)
        fin_tokens = take(s.fin_tokens_BxKxT, top_tokens)
        fin_log_prob = take(s.fin_log_prob_BxK, top_lp)
        fin_length = take(s.fin_length_BxK, jnp.full(top_lp.shape, s.t + 1, jnp.int32))

        # alive: the K best extensions without EOS
        alive_key = jnp.where(is_eos | ~valid, neg_inf, top_lp)
        alive_lp, keep = jax.lax.top_k(alive_key, K)
        alive_tokens = jnp.take_along_axis(top_tokens, keep[:, :, None], axis=1)
        alive_tok = jnp.take_along_axis(top_tok, keep, axis=1)
        parent_BxK = jnp.take_along_axis(top_beam, keep, axis=1)
        row, copied = _assign_rows(jnp.take_along_axis(s.row_BxK, parent_BxK, axis=1))
        if K > 1:
            # the copies, compacted to the front: parent's row -> the new beam's row
            first = jnp.argsort(~copied.reshape(B * K), stable=True)
            src = jnp.take((base_B + jnp.take_along_axis(s.row_BxK, parent_BxK, axis=1)).reshape(B * K), first)
            dst = jnp.take((base_B + row).reshape(B * K), first)
            cache = _copy_histories(cache, src, dst, copied.sum(), s.t, prefix_axis, copy_chunk)
        cstate = s.constraint_state
        if constraint is not None:
            cstate = constraint.advance(_gather_rows(cstate, (base_B + parent_BxK).reshape(B * K)),
                                        alive_tok.reshape(B * K))

        # which rows stop
        full = jnp.all(fin_score > neg_inf, axis=1)
        if early_stopping:
            stop = full
        else:
            # best final length: as long as possible when the penalty rewards length, else the shortest
            best_len = jnp.where(length_penalty > 0, max_len, s.t + 2)
            bound = jnp.where(s.t + 1 < max_len, norm(alive_lp[:, 0], best_len), neg_inf)
            stop = full & (fin_score[:, K - 1] >= bound)
        row_done = s.row_done_B | stop | ~(alive_lp[:, 0] > neg_inf)
        return _BeamState(t=s.t + 1, alive_tokens_BxKxT=alive_tokens, alive_log_prob_BxK=alive_lp,
                          alive_tok_BxK=alive_tok, row_BxK=row, cache=cache, constraint_state=cstate,
                          fin_tokens_BxKxT=fin_tokens, fin_score_BxK=fin_score, fin_log_prob_BxK=fin_log_prob,
                          fin_length_BxK=fin_length, row_done_B=row_done)

    empty_tokens = jnp.full((B, K, max_len), pad_id, jnp.int32)
    empty_scores = jnp.full((B, K), neg_inf)
    init = _BeamState(
        t=jnp.int32(0), alive_tokens_BxKxT=empty_tokens,
        alive_log_prob_BxK=empty_scores.at[:, 0].set(0.0),   # one live beam per row at the start
        alive_tok_BxK=jnp.repeat(bos_B[:, None], K, axis=1),
        row_BxK=jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (B, K)), cache=tile_beams(cache, K),
        constraint_state=None if constraint is None else tile_beams(constraint_state, K),
        fin_tokens_BxKxT=empty_tokens, fin_score_BxK=empty_scores, fin_log_prob_BxK=empty_scores,
        fin_length_BxK=jnp.zeros((B, K), jnp.int32), row_done_B=jnp.zeros((B,), bool))
    s = jax.lax.while_loop(cond, body, init)

    # finished hypotheses first (already sorted), then the best alive ones (sorted, all of length t)
    finished = s.fin_score_BxK > neg_inf
    n_fin = finished.sum(axis=1, keepdims=True)
    slot = jnp.arange(K)[None, :]
    from_alive = jnp.clip(slot - n_fin, 0, K - 1)
    use_fin = slot < n_fin
    alive_len = jnp.full((B, K), s.t, jnp.int32)
    alive_score = norm(s.alive_log_prob_BxK, alive_len)
    fill = lambda fin, alive: jnp.where(
        use_fin.reshape(use_fin.shape + (1,) * (fin.ndim - 2)), fin,
        jnp.take_along_axis(alive, from_alive.reshape(from_alive.shape + (1,) * (alive.ndim - 2)), axis=1))
    return BeamOutput(tokens_BxKxT=fill(s.fin_tokens_BxKxT, s.alive_tokens_BxKxT),
                      scores_BxK=fill(s.fin_score_BxK, alive_score),
                      log_prob_BxK=fill(s.fin_log_prob_BxK, s.alive_log_prob_BxK),
                      length_BxK=fill(s.fin_length_BxK, alive_len),
                      finished_BxK=use_fin)
