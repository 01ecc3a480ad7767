"""Decoder-only transformers of McLeish et al.: standard, with input injection, and looped (one block, r passes).

One parameterisation covers all three (spec §4): a block of `layers` post-LN layers is applied `recurrences`
times. `shared=True` reuses the block's weights on every pass (the looped transformer, run with `lax.scan`);
`shared=False` gives every pass its own weights (stacked and scanned). The embedded input e is added to the state
before the first pass and, with `input_injection`, before every pass. Standard = layers L, recurrences 1;
standard with input injection = layers 1, recurrences L, shared False; looped b×r = layers b, recurrences r.

The model is a pure `init(rng) -> params` / `apply(params, tokens, ...)` pair built from Linen modules; the
recurrence lives outside Linen so the progressive loss can cut gradients and skip passes with plain JAX.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from core_jax.attention import Attention, HeadsKVCache, KVCache, dense_dot_general, xavier
from arith_jax.tokenizer import DIGIT_IDS

POSITION_KINDS = ("abacus", "learned", "fire", "rope")
LOSS_REDUCTIONS = ("mean", "padded")
PROGRESSIVE_GRADS = ("branches", "scan")
ATTENTION_KERNELS = ("einsum", "xla", "cudnn")   # core_jax.attention.Attention.kernel
FIRE_INITS = ("xavier", "lecun")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    width: int = 1024
    ffn: int = 2048               # GLU: dense_in to `ffn`, halves are value and gate
    heads: int = 16
    layers: int = 16              # layers in the (recurrent) block
    recurrences: int = 1          # passes through the block in training
    shared: bool = True           # one block reused on every pass (looped) vs. weights per pass
    input_injection: bool = False  # add e before every pass, not only the first
    positions: tuple[str, ...] = ("abacus",)  # any of abacus, learned, fire, rope; () = NoPE
    abacus_max_k: int = 100       # training offset k ~ U{0..max_k}
    abacus_k_per_row: bool = False  # original: one k per batch; per row trains every position in every batch
    abacus_train_ids: str = "shift"  # "shift": ids k+1..k+L (original); "subset": the i-th digit of every number
                                     # gets the i-th id of a sorted random subset of 1..max_k+L (per row)
    abacus_subset_shift: int = 0  # "subset" only: add k = max(0, U{-S..S}) per row (half the rows unshifted, the
                                  # rest by 1..S), so high ids are also trained as densely as low ones; 0 = off
    abacus_contiguous_frac: float = 0.0  # "subset" only: this fraction of rows get contiguous ids k+1..k+Q instead of
                                  # the subset draw (k ~ U{0..pool-Q}, the original's shift inside the same pool), so
                                  # an answer's extra digit sits at the id right after the last operand digit's, as
                                  # at test time; the subset shift still applies on top; 0 = off
    table_size: int = 512         # rows of the Abacus / learned position tables
    max_backprop: int | None = None  # progressive loss: at most this many passes with gradient (default T//2)
    progressive: bool = True      # progressive loss for looped models (n no-grad passes, then k with grad)
    init_noise: float = 0.02      # std of the initial state h0 ~ init_noise * N(0, I) in training
    eval_init_noise: bool = False  # draw h0 the same way in evaluation too (the original); False: h0 = 0 there
    fire_init: str = "xavier"     # FIRE MLP kernels: "xavier" normal with the deepnorm gain (the original), or
                                  # "lecun" normal (Flax's Dense default; the shipped model's recipe)
    scan_unroll: int = 1          # lax.scan unroll over passes (CPU: unrolling pays, see BENCHMARKS.md)
    progressive_grad: str = "branches"  # how the progressive loss differentiates its k passes (same function):
                                  # "branches": lax.switch over k, each branch runs its k passes unrolled and takes
                                  # its own gradient; "scan": one scan of max_backprop passes under lax.cond
    attention: str = "einsum"     # self-attention kernel (core_jax.attention.Attention.kernel): "einsum", or
                                  # jax.nn.dot_product_attention's "xla" or "cudnn" (fused; GPU, bfloat16 only)
    dtype: str = "float32"        # compute dtype: float32 or bfloat16 (params stay float32)
    loss_reduction: str = "mean"  # "mean": over the batch's answer tokens (the original's default, its addition and
                                  # sorting); "padded": each row's answer-token sum / (S - 1), averaged over rows
                                  # (the original's loss_reduction=none of its multiplication runs)

    def __post_init__(self):
        bad = [p for p in self.positions if p not in POSITION_KINDS]
        if bad:
            raise ValueError(f"unknown position kind {bad[0]!r}; choose from {POSITION_KINDS} (empty = NoPE)")
        if "abacus" in self.positions and "learned" in self.positions:
            raise ValueError("abacus and learned absolute positions share the embedding slot; pick one")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.fire_init not in FIRE_INITS:
            raise ValueError(f"fire_init must be one of {FIRE_INITS}, got {self.fire_init!r}")
        if self.progressive_grad not in PROGRESSIVE_GRADS:
            raise ValueError(f"progressive_grad must be one of {PROGRESSIVE_GRADS}, got {self.progressive_grad!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        if self.attention == "cudnn" and self.dtype != "bfloat16":
            raise ValueError("attention 'cudnn' (cuDNN's fused kernel) takes bfloat16 only: set dtype: bfloat16, "
                             "or use attention 'einsum' or 'xla'")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}")
        if self.abacus_train_ids not in ("shift", "subset"):
            raise ValueError(f"abacus_train_ids must be 'shift' or 'subset', got {self.abacus_train_ids!r}")
        if self.abacus_subset_shift < 0:
            raise ValueError(f"abacus_subset_shift must be >= 0, got {self.abacus_subset_shift}")
        if not 0 <= self.abacus_contiguous_frac <= 1:
            raise ValueError(f"abacus_contiguous_frac must be in [0, 1], got {self.abacus_contiguous_frac}")
        for name in ("abacus_subset_shift", "abacus_contiguous_frac"):
            if getattr(self, name) and self.abacus_train_ids != "subset":
                raise ValueError(f"{name} applies to abacus_train_ids 'subset' only (got "
                                 f"{self.abacus_train_ids!r}, where it would do nothing): set "
                                 "abacus_train_ids: subset or leave it at 0")
        if self.recurrences < 1 or self.layers < 1:
            raise ValueError("layers and recurrences must be >= 1")

    @property
    def backprop(self) -> int:
        return self.max_backprop or max(self.recurrences // 2, 1)

    @property
    def looped(self) -> bool:
        return self.shared and self.recurrences > 1


def abacus_ids(tokens_BxL: jnp.ndarray) -> jnp.ndarray:
    """Index of each digit within its own number, from 1; 0 for every non-digit (spec §3.1)."""
    is_digit = (tokens_BxL >= DIGIT_IDS[0]) & (tokens_BxL <= DIGIT_IDS[-1])
    idx = jnp.arange(tokens_BxL.shape[1])[None, :]
    last_non_digit = jax.lax.cummax(jnp.where(is_digit, -1, idx), axis=1)
    return jnp.where(is_digit, idx - last_non_digit, 0).astype(jnp.int32)


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _gain(cfg: ModelConfig) -> float:
    """The original's deepnorm-straight gain (8 N)^(-1/4), N = layers x recurrences (spec §4.3)."""
    return (8 * cfg.layers * cfg.recurrences) ** -0.25


def xavier_fire_mlp(block_params: dict, rng, gain: float) -> dict:
    """`block_params` with every FIRE MLP kernel (`.../fire/mlp_in/kernel`, `.../fire/mlp_out/kernel`) redrawn
    from xavier-normal with `gain` (std gain * sqrt(2 / (fan_in + fan_out)), plain normal), as the original
    initialises every nn.Linear (spec §4.3); leading axes of stacked per-pass weights are batch axes. Biases and
    every other leaf are returned unchanged (FireBias's biases start at zero, as the original's)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(block_params)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-3:] in (["fire", "mlp_in", "kernel"], ["fire", "mlp_out", "kernel"]):
            init = nn.initializers.variance_scaling(gain * gain, "fan_avg", "normal",
                                                    batch_axis=tuple(range(leaf.ndim - 2)))
            leaf = init(jax.random.fold_in(rng, i), leaf.shape, leaf.dtype)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def gelu_exact(x):
    """The exact (erf) GELU, x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)): the function of
    `nn.gelu(x, approximate=False)` (which writes it with erfc, a slower expansion on CPU), equal up to rounding."""
    return x * (0.5 + 0.5 * jax.lax.erf(x * 0.7071067811865476))


class GluFFN(nn.Module):
    hidden: int
    gain: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden, use_bias=False, kernel_init=xavier(self.gain), dtype=self.dtype,
                     dot_general=dense_dot_general, name="dense_in")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        h = value * gelu_exact(gate)
        return nn.Dense(x.shape[-1], use_bias=False, kernel_init=xavier(self.gain), dtype=self.dtype,
                        dot_general=dense_dot_general, name="dense_out")(h)


def _norm(name):
    return nn.LayerNorm(epsilon=1e-12, dtype=jnp.float32, name=name)


class Layer(nn.Module):
    """Post-LN: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, pos_Q, cache=None, cache_index=None, out_index_BxA=None):
        """With `out_index_BxA` (int [B, A]), only those positions of each row leave the layer ([B, A, width]):
        their queries attend to keys and values at all positions; the rest (query and output projections,
        residual, LayerNorms, FFN) acts on each position alone and runs at those only."""
        cfg, dtype = self.cfg, _dtype(self.cfg.dtype)
        attn = Attention(cfg.heads, rope="rope" in cfg.positions, fire="fire" in cfg.positions,
                         v_gain=_gain(cfg), out_gain=_gain(cfg), dtype=dtype, kernel=cfg.attention, name="attn")
        if out_index_BxA is None:
            a, cache = attn(x, q_pos_Q=pos_Q, causal=True, cache=cache, cache_index=cache_index)
        else:   # queries at the kept positions only, keys and values at all of them (same parameters)
            x_q = jnp.take_along_axis(x, out_index_BxA[..., None], axis=1)
            a, cache = attn(x_q, x, q_pos_Q=pos_Q[out_index_BxA], k_pos_K=pos_Q, causal=True)
            x = x_q
        x = _norm("norm1")(x + a)
        x = _norm("norm2")(x + GluFFN(cfg.ffn, _gain(cfg), dtype, name="ffn")(x))
        return x.astype(dtype), cache


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, pos_Q, caches=None, cache_index=None, out_index_BxA=None):
        """`caches`: None, a KVCache stacked over the layers ([layers, B, S, H, D] leaves), or a tuple of one
        cache per layer (any layout); the new caches come back in the same form."""
        new = []
        last = self.cfg.layers - 1
        stacked = isinstance(caches, KVCache)
        for i in range(self.cfg.layers):
            c = (None if caches is None else KVCache(caches.k_BxSxHxD[i], caches.v_BxSxHxD[i]) if stacked
                 else caches[i])
            x, c = Layer(self.cfg, name=f"layer{i}")(x, pos_Q, c, cache_index,
                                                     out_index_BxA if i == last else None)
            new.append(c)
        if caches is None:
            return x, None
        if not stacked:
            return x, tuple(new)
        return x, KVCache(jnp.stack([c.k_BxSxHxD for c in new]), jnp.stack([c.v_BxSxHxD for c in new]))


class Embed(nn.Module):
    """e = LayerNorm(word[id] + pos[abacus id or absolute index]); row 0 of the Abacus table serves non-digits."""

    cfg: ModelConfig
    vocab_size: int

    @nn.compact
    def __call__(self, tokens_BxQ, abacus_BxQ, pos_Q):
        cfg = self.cfg
        init = nn.initializers.normal(cfg.width ** -0.5)
        x = nn.Embed(self.vocab_size, cfg.width, embedding_init=init, name="word")(tokens_BxQ)
        if "abacus" in cfg.positions:
            x = x + nn.Embed(cfg.table_size, cfg.width, embedding_init=init, name="abacus")(abacus_BxQ)
        if "learned" in cfg.positions:   # positions [Q] shared by the rows, or [B, Q] per row
            learned = nn.Embed(cfg.table_size, cfg.width, embedding_init=init, name="learned")(pos_Q)
            x = x + (learned if pos_Q.ndim == 2 else learned[None])
        return _norm("norm")(x)


class Head(nn.Module):
    """GLU FFN -> LayerNorm -> untied adapter -> untied decoder (spec §4.1 output path)."""

    cfg: ModelConfig
    vocab_size: int

    @nn.compact
    def __call__(self, h):
        cfg, dtype = self.cfg, _dtype(self.cfg.dtype)
        h = GluFFN(cfg.ffn, _gain(cfg), dtype, name="ffn")(h)
        h = _norm("norm")(h)
        h = nn.Dense(cfg.width, use_bias=False, kernel_init=xavier(_gain(cfg)), dtype=dtype,
                     dot_general=dense_dot_general, name="adapter")(h)
        return nn.Dense(self.vocab_size, use_bias=False, kernel_init=xavier(_gain(cfg)), dtype=dtype,
                        dot_general=dense_dot_general, name="decoder")(h).astype(jnp.float32)


class ArithModel:
    """Pure init/apply around the Linen pieces; holds no parameters itself."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        if cfg.attention == "cudnn" and jax.default_backend() != "gpu":
            # a kernel choice, not part of the model: a checkpoint trained with it runs anywhere (same function)
            warnings.warn(f"model.attention 'cudnn' runs on a GPU only; using 'xla' (the same function) on "
                          f"{jax.default_backend()}", stacklevel=2)
            cfg = dataclasses.replace(cfg, attention="xla")
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = Embed(cfg, vocab_size)
        self.block = Block(cfg)
        self.head = Head(cfg, vocab_size)

    # ---------------------------------------------------------------- parameters
    def init(self, rng) -> dict:
        cfg = self.cfg
        r_embed, r_block, r_head = jax.random.split(rng, 3)
        tok = jnp.zeros((1, 4), jnp.int32)
        pos = jnp.arange(4)
        x = jnp.zeros((1, 4, cfg.width), jnp.float32)
        params = {"embed": self.embed.init(r_embed, tok, tok, pos)["params"],
                  "head": self.head.init(r_head, x)["params"]}
        if cfg.shared:
            params["block"] = self.block.init(r_block, x, pos)["params"]
        else:
            rngs = jax.random.split(r_block, cfg.recurrences)
            params["block"] = jax.vmap(lambda r: self.block.init(r, x, pos)["params"])(rngs)
        if "fire" in cfg.positions and cfg.fire_init == "xavier":  # a key of its own: the other leaves stay as drawn
            params["block"] = xavier_fire_mlp(params["block"], jax.random.fold_in(rng, 0xF12E), _gain(cfg))
        return params

    def num_params(self, params) -> int:
        return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))

    # ---------------------------------------------------------------- forward
    def init_cache(self, batch: int, length: int, recurrences: int | None = None) -> KVCache:
        cfg = self.cfg
        passes = recurrences or cfg.recurrences
        shape = (passes, cfg.layers, batch, length, cfg.heads, cfg.width // cfg.heads)
        dtype = _dtype(cfg.dtype)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @staticmethod
    def unstack_cache(cache: KVCache) -> tuple[tuple[HeadsKVCache, ...], ...]:
        """A cache from `init_cache` (leaves [passes, layers, B, S, H, D]) as one `HeadsKVCache` per pass and
        layer (`[pass][layer]`, leaves [B, H, S, D]): the same keys and values. `apply` with such a cache runs the
        passes unrolled and updates every buffer where it is (decoding: see `apply`)."""
        k, v = HeadsKVCache.from_cache(cache)
        return tuple(tuple(HeadsKVCache(k[i, l], v[i, l]) for l in range(k.shape[1])) for i in range(k.shape[0]))

    @staticmethod
    def stack_cache(caches) -> KVCache:
        """The inverse of `unstack_cache`."""
        k = jnp.stack([jnp.stack([c.k_BxHxSxD for c in layers]) for layers in caches])
        v = jnp.stack([jnp.stack([c.v_BxHxSxD for c in layers]) for layers in caches])
        return KVCache(jnp.swapaxes(k, -3, -2), jnp.swapaxes(v, -3, -2))

    def apply(self, params, tokens_BxQ, *, abacus_BxQ=None, start: int | jnp.ndarray = 0, rng=None,
              train: bool = False, recurrences: int | None = None, cache: KVCache | None = None):
        """Logits [B, Q, vocab] for tokens at absolute positions start..start+Q-1.

        With `cache` (from `init_cache`), the tokens' keys/values are written at `start` and (logits, cache) is
        returned. In training, `rng` drives the Abacus offset, the initial-state noise and the progressive loss; in
        evaluation it drives only the initial-state noise of a model with `cfg.eval_init_noise` (and must be given
        there), and is ignored otherwise.

        Rows at positions of their own (decoding right-padded prompts; evaluation with a cache only): `start` [B]
        puts row b's tokens at positions (and cache slots) start[b]..start[b]+Q-1, and `rng`, where the model
        draws noise, is one key per row ([B] keys), row b's initial state drawn from rng[b] exactly as a one-row
        call with that key draws it; row b's logits and cache row are then those of that one-row call. The cache
        may also be `unstack_cache`'s (one buffer per pass and layer, heads before slots): the passes then run
        unrolled and each buffer is updated in place (one scatter per buffer and call) instead of every pass's
        cache being sliced out of and written back into a stacked one (whole-cache copies at every call).
        """
        h, new_cache = self.hidden(params, tokens_BxQ, abacus_BxQ=abacus_BxQ, start=start, rng=rng, train=train,
                                   recurrences=recurrences, cache=cache)
        logits = self.head.apply({"params": params["head"]}, h)
        return logits if cache is None else (logits, new_cache)

    def hidden(self, params, tokens_BxQ, *, abacus_BxQ=None, start: int | jnp.ndarray = 0, rng=None,
               train: bool = False, recurrences: int | None = None, cache: KVCache | None = None):
        """(h [B, Q, width], new cache or None): the state after the last pass, before the output head; the
        arguments are those of `apply`. The head acts on each position alone, so `head(hidden(...)[0])` restricted
        to some positions equals `apply(...)` at those positions."""
        cfg = self.cfg
        if jnp.ndim(start) == 1 and (cache is None or train):
            raise ValueError("per-row start positions [B] are for evaluation with a KV cache")
        e, h, rng, pos_Q = self._embed_and_h0(params["embed"], tokens_BxQ, abacus_BxQ, start, rng, train)
        if train and cfg.looped and cfg.progressive:
            h = self.progressive_passes(params["block"], h, e, pos_Q, *self.sample_progressive(rng))
            new_cache = None
        else:
            passes = recurrences or cfg.recurrences
            if not cfg.shared and passes != cfg.recurrences:
                raise ValueError(f"a model with separate weights per pass runs exactly {cfg.recurrences} passes; "
                                 f"only looped (shared) models can change recurrences at test time")
            h, new_cache = self._passes(params["block"], h, e, pos_Q, passes, cache, start)
        return h, new_cache

    def _embed_and_h0(self, embed_params, tokens_BxQ, abacus_BxQ, start, rng, train):
        """(e, h0, rng left over, pos_Q): the embedded input, the initial state and the absolute positions ([Q],
        or [B, Q] for a per-row `start` [B], whose `rng` is then one key per row: see `apply`)."""
        cfg = self.cfg
        B, Q = tokens_BxQ.shape
        per_row = jnp.ndim(start) == 1
        pos_Q = (start[:, None] if per_row else start) + jnp.arange(Q)
        if abacus_BxQ is None:
            abacus_BxQ = abacus_ids(tokens_BxQ)
        if train and "abacus" in cfg.positions and cfg.abacus_max_k > 0:
            rng, r_k = jax.random.split(rng)
            abacus_BxQ = self._train_abacus_ids(abacus_BxQ, r_k)
        # callers validate lengths against the tables; clamping keeps padding past them finite (it is never
        # attended to, but a NaN there would still poison the attention's weighted sum: 0 * NaN = NaN)
        abacus_BxQ = jnp.minimum(abacus_BxQ, cfg.table_size - 1)
        table_pos_Q = jnp.minimum(pos_Q, cfg.table_size - 1)

        e = self.embed.apply({"params": embed_params}, tokens_BxQ, abacus_BxQ, table_pos_Q)
        e = e.astype(_dtype(cfg.dtype))
        if cfg.init_noise > 0 and (train or cfg.eval_init_noise):
            if rng is None:
                raise ValueError("this model draws its initial state from noise in evaluation too "
                                 "(model.eval_init_noise): pass rng")
            if per_row:   # row b as a one-row call keyed rng[b] draws it (evaluation only: no rng left over)
                draw = lambda r: jax.random.normal(jax.random.split(r)[1], (1, Q, e.shape[-1]), jnp.float32)[0]
                h = cfg.init_noise * jax.vmap(draw)(rng).astype(e.dtype)
                rng = None
            else:
                rng, r_h = jax.random.split(rng)
                h = cfg.init_noise * jax.random.normal(r_h, e.shape, jnp.float32).astype(e.dtype)
        else:
            h = jnp.zeros_like(e)

        return e, h, rng, pos_Q

    def _train_abacus_ids(self, ids_BxQ, rng):
        """Training-time Abacus ids (spec §3.1 step 3, plus a randomised variant).

        shift: one offset k ~ U{0..max_k} (per batch as the original, or per row) added to every digit id.
        subset: per row, digit index i maps to the i-th smallest of Q ids drawn without replacement from
        1..max_k+Q, so equal significance still shares an id, but training sees ids far apart in one number —
        the relations that long numbers need at test time, where ids are 1..L as usual. With abacus_subset_shift
        S > 0, each row's ids are then raised by k = max(0, U{-S..S}): half the rows keep the low ids every test
        number uses, the others train high ids with the same spacing as low ones (neighbouring ids side by side).
        With abacus_contiguous_frac F > 0, a fraction F of rows take contiguous ids k+1..k+Q (k ~ U{0..pool-Q})
        instead of their subset draw: the answer's extra (carry) digit then has the id right after the last operand
        digit's, as at test time, where with subset ids it is the next drawn id, several higher.
        """
        cfg = self.cfg
        B, Q = ids_BxQ.shape
        if cfg.abacus_train_ids == "shift":
            k = jax.random.randint(rng, (B, 1) if cfg.abacus_k_per_row else (1, 1), 0, cfg.abacus_max_k + 1)
            return jnp.where(ids_BxQ > 0, ids_BxQ + k, 0)
        S = cfg.abacus_subset_shift
        pool = min(cfg.abacus_max_k + Q, cfg.table_size - 1 - S)
        if S:  # split only here, so S = 0 draws exactly the ids it drew before the option existed
            rng, rng_shift = jax.random.split(rng)
        noise = jax.random.uniform(rng, (B, pool))
        chosen = jnp.sort(jnp.argsort(noise, axis=1)[:, :min(Q, pool)] + 1, axis=1)  # sorted ids in 1..pool
        if cfg.abacus_contiguous_frac:  # split only here, so F = 0 draws exactly the ids it drew before
            rng_pick, rng_k = jax.random.split(jax.random.fold_in(rng, 1))  # leaves rng's own draws as they were
            n = chosen.shape[1]
            k = jax.random.randint(rng_k, (B, 1), 0, pool - n + 1)
            pick = jax.random.uniform(rng_pick, (B, 1)) < cfg.abacus_contiguous_frac
            chosen = jnp.where(pick, k + jnp.arange(1, n + 1)[None, :], chosen)
        mapped = jnp.take_along_axis(chosen, jnp.clip(ids_BxQ - 1, 0, chosen.shape[1] - 1), axis=1)
        if S:
            mapped = mapped + jnp.maximum(jax.random.randint(rng_shift, (B, 1), -S, S + 1), 0)
        return jnp.where(ids_BxQ > 0, mapped, 0)

    def _step(self, block_params, h, e, pos_Q, i, cache=None, cache_index=None, out_index_BxA=None):
        """One pass: inject e (always on the first pass), then the block (its output at `out_index_BxA` only, when
        given: see `Layer`)."""
        inject = jnp.logical_or(i == 0, self.cfg.input_injection)
        x = jnp.where(inject, h + e, h)
        return self.block.apply({"params": block_params}, x, pos_Q, cache, cache_index, out_index_BxA)

    def _passes(self, block_params, h, e, pos_Q, passes, cache, start):
        cfg = self.cfg
        if cache is not None and not isinstance(cache, KVCache):   # `unstack_cache`'s: one buffer per pass
            if len(cache) != passes:
                raise ValueError(f"the cache holds {len(cache)} passes, the model runs {passes}")
            new_cache = []
            for i in range(passes):   # unrolled: each pass reads and writes its own buffers, nothing is copied
                p = block_params if cfg.shared else jax.tree_util.tree_map(lambda x: x[i], block_params)
                h, c = self._step(p, h, e, pos_Q, i, cache[i], start)
                new_cache.append(c)
            return h, tuple(new_cache)

        def body(h, xs):
            i, p, c = xs
            h, c = self._step(block_params if cfg.shared else p, h, e, pos_Q, i, c, start)
            return h, c

        xs = (jnp.arange(passes), None if cfg.shared else block_params, cache)
        if passes == 1:  # no loop: XLA would keep a one-trip while loop, stacking every residual for the gradient
            h, c = body(h, jax.tree_util.tree_map(lambda x: x[0], xs))
            return h, jax.tree_util.tree_map(lambda x: x[None], c)
        h, new_cache = jax.lax.scan(body, h, xs, unroll=min(cfg.scan_unroll, passes))
        return h, new_cache

    def sample_progressive(self, rng) -> tuple[jnp.ndarray, jnp.ndarray]:
        """n ~ U{0..T-1} passes without gradient, then k ~ U{1..min(T-n, B)} with gradient (spec §5.2, α = 1)."""
        T, Bp = self.cfg.recurrences, self.cfg.backprop
        r_n, r_k = jax.random.split(rng)
        n = jax.random.randint(r_n, (), 0, T)
        k = jax.random.randint(r_k, (), 1, jnp.minimum(T - n, Bp) + 1)
        return n, k

    def progressive_passes(self, block_params, h, e, pos_Q, n, k):
        """Runs n passes, cuts the gradient, runs k more.

        Both scans have static length (T and B); `lax.cond` skips the passes beyond n and k, so only n + k passes
        are computed and only the last k are differentiated, as in the original.
        """
        cfg = self.cfg
        T, Bp = cfg.recurrences, cfg.backprop

        def make_body(limit, offset):
            def body(h, i):
                h = jax.lax.cond(i < limit, lambda h: self._step(block_params, h, e, pos_Q, i + offset)[0],
                                 lambda h: h, h)
                return h, None
            return body

        h, _ = jax.lax.scan(make_body(n, 0), h, jnp.arange(T), unroll=min(cfg.scan_unroll, T))
        h = jax.lax.stop_gradient(h)
        h, _ = jax.lax.scan(make_body(k, n), h, jnp.arange(Bp), unroll=min(cfg.scan_unroll, Bp))
        return h

    # ---------------------------------------------------------------- loss
    def loss(self, params, batch: dict, rng) -> tuple[jnp.ndarray, dict]:
        """Cross-entropy over answer tokens + EOS (mask[:, 1:]), as the original's mask_before_equals, reduced by
        `cfg.loss_reduction`: "mean" divides the sum over those tokens by their number in the batch; "padded"
        divides it by B * (S - 1) for tokens [B, S] (the original's loss_reduction=none: every row's sum over its
        answer tokens / the padded length S - 1, averaged over the rows, so longer answers weigh more).

        With `batch["loss_pos"]` (int32 [B, A], from `arith_jax.data.loss_positions`: the input positions whose
        next token is a target, padded with -1) the output head, and the last layer of the last pass except its
        keys and values (queries, attention output, residual, LayerNorms, FFN), run only at those A positions per
        row instead of all of them; loss, metrics and gradients are the same.
        """
        cfg = self.cfg
        out_index = None
        if "loss_pos" in batch:   # the last layer's position-wise part (and the head) at the loss positions only
            out_index = jnp.maximum(batch["loss_pos"], 0)
        if cfg.looped and cfg.progressive and cfg.progressive_grad == "branches":
            return self._progressive_branch_loss(params, batch, rng, out_index)
        tokens = batch["tokens"][:, :-1]
        if cfg.recurrences == 1 and out_index is not None:
            e, h, rng, pos_Q = self._embed_and_h0(params["embed"], tokens, None, 0, rng, True)
            block = params["block"] if cfg.shared else jax.tree_util.tree_map(lambda x: x[0], params["block"])
            h, _ = self._step(block, h, e, pos_Q, 0, out_index_BxA=out_index)
            return self._head_loss(params["head"], h, batch, gathered=True)
        h, _ = self.hidden(params, tokens, rng=rng, train=True)
        return self._head_loss(params["head"], h, batch)

    def _progressive_branch_loss(self, params, batch, rng, out_index_BxA=None):
        """The progressive loss with its gradient taken inside a `lax.switch` over k: branch k runs its k passes
        unrolled and differentiates them itself, so nothing is stacked or zero-filled for passes it skips (the
        gradient of a `lax.cond` inside `lax.scan` keeps every pass's residuals, zeros for the skipped ones).
        The same function as `hidden(..., train=True)` + `_head_loss`: same draws, same passes, same gradient."""
        cfg = self.cfg
        e, h, rng, pos_Q = self._embed_and_h0(params["embed"], batch["tokens"][:, :-1], None, 0, rng, True)
        n, k = self.sample_progressive(rng)

        # n passes without gradient: a loop of n trips (its inputs are cut, so nothing differentiates it)
        block_ng, e_ng = jax.lax.stop_gradient((params["block"], e))
        h = jax.lax.fori_loop(0, n, lambda i, h: self._step(block_ng, h, e_ng, pos_Q, i)[0],
                              jax.lax.stop_gradient(h))

        def branch(passes):
            def f(diff, fixed):
                block, head, e = diff
                h, n, pos_Q, batch, out_index = fixed
                for i in range(passes):
                    h = self._step(block, h, e, pos_Q, n + i,
                                   out_index_BxA=out_index if i == passes - 1 else None)[0]
                return self._head_loss(head, h, batch, gathered=out_index is not None)
            return f

        return _switch_value_and_grad(k - 1, [branch(j) for j in range(1, cfg.backprop + 1)],
                                      (params["block"], params["head"], e), (h, n, pos_Q, batch, out_index_BxA))

    def _head_loss(self, head_params, h, batch, gathered=False):
        """(loss, metrics) from the final state h [B, S-1, width] (see `loss`), or, `gathered`, from h at the
        batch's loss positions only ([B, A, width])."""
        tokens, mask = batch["tokens"], batch["mask"]
        targets, m = tokens[:, 1:], mask[:, 1:].astype(jnp.float32)
        if "loss_pos" in batch:
            pos_BxA = batch["loss_pos"]
            valid_BxA = pos_BxA >= 0
            pos_BxA = jnp.where(valid_BxA, pos_BxA, 0)
            if not gathered:
                h = jnp.take_along_axis(h, pos_BxA[..., None], axis=1)
            targets = jnp.take_along_axis(targets, pos_BxA, axis=1)
            m = jnp.take_along_axis(m, pos_BxA, axis=1) * valid_BxA
        logits = self.head.apply({"params": head_params}, h)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        denom = jnp.maximum(m.sum(), 1.0)
        if self.cfg.loss_reduction == "padded":
            loss = (nll * m).sum() / (tokens.shape[0] * (tokens.shape[1] - 1))
        else:
            loss = (nll * m).sum() / denom
        correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
        tok_acc = (correct * m).sum() / denom
        seq_acc = jnp.mean(jnp.all((correct >= 1.0) | (m == 0), axis=1).astype(jnp.float32))
        return loss, {"token_acc": tok_acc, "seq_acc": seq_acc}


def _switch_value_and_grad(index, branches, diff, fixed):
    """(value, aux) = branches[index](diff, fixed), differentiable in `diff` only, with the gradient taken inside
    the chosen branch: the forward pass runs `lax.switch` over the branches' `value_and_grad`s and keeps the
    gradient as its only residual, the backward pass scales it by the value's cotangent. Unlike differentiating a
    `lax.switch` (or `lax.cond`) directly, no residual of an unselected branch is materialised. `fixed` gets no
    gradient."""

    @jax.custom_vjp
    def f(diff, fixed, index):
        return jax.lax.switch(index, branches, diff, fixed)

    def fwd(diff, fixed, index):
        (value, aux), grads = jax.lax.switch(
            index, [jax.value_and_grad(b, has_aux=True) for b in branches], diff, fixed)
        return (value, aux), grads

    def bwd(grads, cotangent):
        ct_value, _ = cotangent
        return jax.tree_util.tree_map(lambda g: (ct_value * g).astype(g.dtype), grads), None, None

    f.defvjp(fwd, bwd)
    return f(diff, fixed, index)


def count_params_formula(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameter count from the config alone (for configs too large to instantiate in tests)."""
    H, F = cfg.width, cfg.ffn
    layer = 4 * H * H + H * F + (F // 2) * H + 4 * H
    if "fire" in cfg.positions:
        layer += 32 + 32 + 32 * cfg.heads + cfg.heads + 2
    blocks = cfg.layers * (1 if cfg.shared else cfg.recurrences)
    head = H * F + (F // 2) * H + 2 * H + H * H + H * vocab_size
    embed = vocab_size * H + 2 * H
    if "abacus" in cfg.positions or "learned" in cfg.positions:
        embed += cfg.table_size * H
    return blocks * layer + head + embed


def describe(cfg: ModelConfig) -> str:
    kind = ("looped" if cfg.looped else "standard w/ II" if cfg.input_injection and cfg.recurrences > 1
            else "standard")
    pos = "+".join(cfg.positions) or "nope"
    return f"{kind} {cfg.layers}x{cfg.recurrences}, width {cfg.width}, {pos}"

