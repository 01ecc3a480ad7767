"""The E2E symbolic-regression transformer (Kamienny et al. 2022, spec e2e_sr.md §4): point embedder, encoder over
the points with no positional information, and a decoder that writes the prefix expression.

Shapes: B datasets, N points, P = 3 * (max_dim + 1) point tokens per point, T target tokens, D model width,
V decoder vocabulary, H heads. Decoding uses R = B * G rows (G beams or samples per dataset).

- Embedder: each point's P float-token ids are embedded (emb_dim), flattened, and mapped by
  Dense(P * emb_dim * emb_expansion) -> ReLU -> Dense(D) to one vector per point.
- Encoder: LayerNorm on the embeddings, then `enc_layers` layers of self-attention + ReLU FFN. No positions, so the
  encoder is permutation-equivariant and the decoder's cross-attention permutation-invariant over points.
- Decoder: token embedding + learned positions, LayerNorm, `dec_layers` layers of causal self-attention,
  cross-attention to the points and FFN; logits = h @ embedding^T + bias (tied output layer).
- `norm="post"` is the original (residual add, then LayerNorm, eps 1e-12); `norm="pre"` normalises each sub-layer's
  input and adds a final LayerNorm.

Training batches may be packed (sr_jax.data, `pack`): several datasets per row, with segment ids on the points
and target tokens. The encoder then attends within a segment, the decoder's positions restart at each segment (the
batch's `target_position`), its self-attention is causal within a segment and its cross-attention reaches only its
own dataset's points; the loss skips the position where one target ends and the next begins. Same loss as one
dataset per row, up to rounding.

The model is a pure pair `init(rng) -> params` / functions of params. Decoding (core_jax.decode) runs against
`tokens_to_logits(tokens_Rx1, cache) -> (logits_RxV, cache)` built by `decoder_fn`: the points are encoded and the
cross-attention keys/values projected once per dataset, and each step attends the G rows of a dataset to them as G
queries (no copy of the memory per beam).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from core_jax.attention import Attention, KVCache
from sr_jax.vocab import EOS, PAD, POINT_PAD, POINT_VOCAB_SIZE, TOKENS_PER_FLOAT, DecoderVocab, point_tables


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    emb_dim: int = 64             # embedding of each point token (the original's emb_emb_dim)
    emb_expansion: int = 1        # embedder hidden = P * emb_dim * emb_expansion
    width: int = 512              # D
    heads: int = 16
    enc_layers: int = 4
    dec_layers: int = 16
    ffn_mult: int = 4             # FFN hidden = ffn_mult * D (ReLU)
    max_dim: int = 10             # input variables a point can have
    max_len: int = 200            # decoder positions: the longest target incl. BOS and EOS
    norm: Literal["post", "pre"] = "post"
    dtype: Literal["float32", "bfloat16"] = "float32"
    deferred_norm: bool = False   # attention normalises after the value product (core_jax Attention; same function)

    def __post_init__(self):
        for key in ("emb_dim", "emb_expansion", "width", "heads", "enc_layers", "dec_layers", "ffn_mult",
                    "max_dim", "max_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.width % self.heads:
            raise ValueError(f"model.width {self.width} must be divisible by model.heads {self.heads}")
        if self.max_dim > 10:
            raise ValueError(f"model.max_dim is at most 10 (variables x_0..x_9), got {self.max_dim}")
        if self.max_len < 4:
            raise ValueError(f"model.max_len must be >= 4 (BOS, a leaf, EOS), got {self.max_len}")

    @property
    def point_tokens(self) -> int:
        return TOKENS_PER_FLOAT * (self.max_dim + 1)

    @property
    def compute_dtype(self):
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[self.dtype]


def _norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-12, dtype=jnp.float32, name=name)


def _attention(cfg: ModelConfig, name: str) -> Attention:
    return Attention(cfg.heads, use_bias=True, dtype=cfg.compute_dtype, deferred_norm=cfg.deferred_norm, name=name)


class FFN(nn.Module):
    hidden: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="dense_in")(x))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="dense_out")(h)


# Point-token ids a sign slot holds: "+", "-", <INPUT_PAD> (a missing dimension), and the padding points' ids
# (0 in sr_jax.data's batches, <PAD> elsewhere; their encodings are masked out).
_POINT_TABLES = point_tables()
SIGN_SLOT_IDS = (*(int(i) for i in _POINT_TABLES.sign_ids), _POINT_TABLES.input_pad, 0, POINT_PAD)
# The mantissas are the vocabulary's last ids; every id below them (specials, signs, exponents) has a table row.
FIRST_MANTISSA_ID = int(_POINT_TABLES.mantissa_ids[0])
assert (_POINT_TABLES.mantissa_ids == FIRST_MANTISSA_ID + np.arange(len(_POINT_TABLES.mantissa_ids))).all()
assert (FIRST_MANTISSA_ID + len(_POINT_TABLES.mantissa_ids) == POINT_VOCAB_SIZE
        and _POINT_TABLES.exponent_ids.max() < FIRST_MANTISSA_ID)
EXPONENT_TABLE_MIN_EMB = 64   # from this point-token embedding width, exponent slots are read from tables (below)


class _DenseParams(nn.Module):
    """The kernel and bias of an `nn.Dense(features)` on `fan_in` inputs: same names, shapes and initial values."""

    @nn.compact
    def __call__(self, fan_in: int, features: int):
        return (self.param("kernel", nn.initializers.lecun_normal(), (fan_in, features), jnp.float32),
                self.param("bias", nn.initializers.zeros, (features,), jnp.float32))


class PointEmbedder(nn.Module):
    """Dense(P * emb_dim * emb_expansion) -> ReLU -> Dense(D) on each point's P embedded tokens, flattened.

    The first layer is computed per kind of slot (same parameters, same function up to rounding): the point's
    (sign, mantissa, exponent) slots hold tokens from different parts of the vocabulary. A sign slot holds one of
    `SIGN_SLOT_IDS` (any other id there would contribute nothing), so its share of the product is a [ids, hidden]
    table per slot, read by a one-hot product of width 11 x 5 instead of 11 x emb_dim dense columns; from
    `EXPONENT_TABLE_MIN_EMB`, the exponent slots (ids below the first mantissa id: specials, signs, exponents) are
    read from per-slot tables of their ~200 possible rows (a gather and, in the backward pass, a scatter-add,
    cheaper than the dense columns at emb_dim 64, dearer at 16). The mantissa slots (10,000 ids) stay a dense
    product (BENCHMARKS.md, "Training against the original", says what this saves).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, points_BxNxP):
        cfg = self.cfg
        B, N, P = points_BxNxP.shape
        dt, emb_dim = cfg.compute_dtype, cfg.emb_dim
        F = P // TOKENS_PER_FLOAT
        hidden = P * emb_dim * cfg.emb_expansion
        embed = nn.Embed(POINT_VOCAB_SIZE, emb_dim, embedding_init=nn.initializers.normal(emb_dim ** -0.5),
                         name="token")
        kernel, bias = _DenseParams(name="hidden")(P * emb_dim, hidden)
        tok_BxNxFx3 = points_BxNxP.reshape(B, N, F, TOKENS_PER_FLOAT)
        w_Fx3xExH = kernel.astype(dt).reshape(F, TOKENS_PER_FLOAT, emb_dim, hidden)
        exponent_tables = emb_dim >= EXPONENT_TABLE_MIN_EMB
        dense_slots = (1,) if exponent_tables else (1, 2)
        e = embed(tok_BxNxFx3[..., dense_slots]).astype(dt).reshape(B, N, -1)
        h = e @ w_Fx3xExH[:, dense_slots].reshape(-1, hidden)
        table = embed.embedding
        ids = jnp.array(SIGN_SLOT_IDS, jnp.int32)
        sign_rows = jnp.einsum("ve,feh->fvh", table[ids].astype(dt), w_Fx3xExH[:, 0]).reshape(-1, hidden)
        onehot = (tok_BxNxFx3[..., 0, None] == ids).astype(dt).reshape(B, N, -1)
        h = h + onehot @ sign_rows
        if exponent_tables:   # rows[v * F + f] = embedding[v] @ kernel block of slot f's exponent
            w_ExFH = jnp.transpose(w_Fx3xExH[:, 2], (1, 0, 2)).reshape(emb_dim, F * hidden)
            rows = (table[:FIRST_MANTISSA_ID].astype(dt) @ w_ExFH).reshape(FIRST_MANTISSA_ID * F, hidden)
            idx_BxNxF = jnp.minimum(tok_BxNxFx3[..., 2], FIRST_MANTISSA_ID - 1) * F + jnp.arange(F)
            for f in range(F):
                h = h + rows[idx_BxNxF[..., f]]
        h = nn.relu(h + bias.astype(dt))
        return nn.Dense(cfg.width, dtype=dt, name="out")(h)


class _Sublayer(nn.Module):
    """Residual wrapper: post-LN LN(x + f(x)) or pre-LN x + f(LN(x))."""

    pre: bool

    @nn.compact
    def __call__(self, x, f):
        if self.pre:
            return x + f(_norm("norm")(x).astype(x.dtype))
        return _norm("norm")(x + f(x)).astype(x.dtype)


class EncoderLayer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxNxD, mask_BxN, segment_BxN=None):
        cfg = self.cfg
        attn = _attention(cfg, "attn")
        x = _Sublayer(cfg.norm == "pre", name="sub_attn")(
            x_BxNxD, lambda h: attn(h, kv_mask_BxK=mask_BxN, q_segment_BxQ=segment_BxN, kv_segment_BxK=segment_BxN)[0])
        x = _Sublayer(cfg.norm == "pre", name="sub_ffn")(x, FFN(cfg.ffn_mult * cfg.width, cfg.compute_dtype,
                                                                name="ffn"))
        return jnp.where(mask_BxN[..., None], x, 0)


class Encoder(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, points_BxNxP, mask_BxN, segment_BxN=None):
        cfg = self.cfg
        x = PointEmbedder(cfg, name="embedder")(points_BxNxP)
        if cfg.norm == "post":
            x = _norm("norm_emb")(x).astype(cfg.compute_dtype)
        x = jnp.where(mask_BxN[..., None], x, 0)
        for i in range(cfg.enc_layers):
            x = EncoderLayer(cfg, name=f"layer{i}")(x, mask_BxN, segment_BxN)
        if cfg.norm == "pre":
            x = jnp.where(mask_BxN[..., None], _norm("norm_out")(x), 0).astype(cfg.compute_dtype)
        return x


class DecodeCache(NamedTuple):
    """Self-attention keys/values of every decoder layer ([R, max_len, H, D/H] each) and the next write slot."""

    layers: tuple
    index: jnp.ndarray


class DecoderLayer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, *, memory_BxNxD=None, memory_mask_BxN=None, memory_kv=None, cache=None,
                 cache_index=None, pos_T=None, kv_only=False, segment_BxT=None, memory_segment_BxN=None):
        cfg = self.cfg
        cross = _attention(cfg, "cross")
        if kv_only:
            return cross(None, memory_BxNxD, kv_only=True)
        pre = cfg.norm == "pre"
        self_attn = _attention(cfg, "self")
        new_cache = None

        def attend_self(h):
            nonlocal new_cache
            out, new_cache = self_attn(h, q_pos_Q=pos_T, causal=True, cache=cache, cache_index=cache_index,
                                       q_segment_BxQ=segment_BxT, kv_segment_BxK=segment_BxT)
            return out

        def attend_memory(h):
            if memory_kv is None:
                return cross(h, memory_BxNxD, kv_mask_BxK=memory_mask_BxN, q_segment_BxQ=segment_BxT,
                             kv_segment_BxK=memory_segment_BxN)[0]
            # decoding: the G rows of each dataset are G queries to that dataset's memory
            R, Q, D = h.shape
            B = memory_kv.k_BxSxHxD.shape[0]
            out = cross(h.reshape(B, (R // B) * Q, D), memory_kv=memory_kv, kv_mask_BxK=memory_mask_BxN)[0]
            return out.reshape(R, Q, D)

        x = _Sublayer(pre, name="sub_self")(x_BxTxD, attend_self)
        x = _Sublayer(pre, name="sub_cross")(x, attend_memory)
        x = _Sublayer(pre, name="sub_ffn")(x, FFN(cfg.ffn_mult * cfg.width, cfg.compute_dtype, name="ffn"))
        return x, new_cache


class Decoder(nn.Module):
    cfg: ModelConfig
    vocab_size: int

    @nn.compact
    def __call__(self, tokens_BxT, *, memory_BxNxD=None, memory_mask_BxN=None, memory_kvs=None, cache=None,
                 kv_only=False, segment_BxT=None, position_BxT=None, memory_segment_BxN=None):
        """Logits [B, T, V] (and the advanced cache). Packed rows: `segment_BxT` and `memory_segment_BxN` (segment
        ids of the tokens and of the memory's points) and `position_BxT` (each token's position in its own
        sequence); otherwise positions are 0.. (or continue from the cache's index)."""
        cfg = self.cfg
        layers = [DecoderLayer(cfg, name=f"layer{i}") for i in range(cfg.dec_layers)]
        if kv_only:
            return tuple(layer(None, memory_BxNxD=memory_BxNxD, kv_only=True) for layer in layers)
        embed = nn.Embed(self.vocab_size, cfg.width, embedding_init=nn.initializers.normal(cfg.width ** -0.5),
                         name="token")
        start = 0 if cache is None else cache.index
        pos_T = start + jnp.arange(tokens_BxT.shape[1])
        positions = nn.Embed(cfg.max_len, cfg.width, embedding_init=nn.initializers.normal(cfg.width ** -0.5),
                             name="position")
        x = embed(tokens_BxT) + (positions(pos_T)[None] if position_BxT is None else positions(position_BxT))
        if cfg.norm == "post":
            x = _norm("norm_emb")(x)
        x = x.astype(cfg.compute_dtype)
        new_layers = []
        for i, layer in enumerate(layers):
            x, c = layer(x, memory_BxNxD=memory_BxNxD, memory_mask_BxN=memory_mask_BxN,
                         memory_kv=None if memory_kvs is None else memory_kvs[i],
                         cache=None if cache is None else cache.layers[i], cache_index=start, pos_T=pos_T,
                         segment_BxT=segment_BxT, memory_segment_BxN=memory_segment_BxN)
            new_layers.append(c)
        if cfg.norm == "pre":
            x = _norm("norm_out")(x)
        bias = self.param("out_bias", nn.initializers.zeros, (self.vocab_size,), jnp.float32)
        logits = embed.attend(x.astype(jnp.float32)) + bias
        new_cache = None if cache is None else DecodeCache(tuple(new_layers), cache.index + tokens_BxT.shape[1])
        return logits, new_cache


class DecodeContext(NamedTuple):
    """What decoding needs from the encoder, computed once per dataset: cross-attention keys/values per layer."""

    memory_kvs: tuple
    memory_mask_BxN: jnp.ndarray


class E2EModel:
    """Pure functions of params around the Linen modules; holds no parameters itself."""

    def __init__(self, cfg: ModelConfig, vocab: DecoderVocab = DecoderVocab()):
        self.cfg, self.vocab = cfg, vocab
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg, len(vocab))

    def __hash__(self):
        return hash((self.cfg, self.vocab))

    def __eq__(self, other):
        return isinstance(other, E2EModel) and (self.cfg, self.vocab) == (other.cfg, other.vocab)

    # ---------------------------------------------------------------- parameters
    def init(self, rng) -> dict:
        r_enc, r_dec = jax.random.split(rng)
        points = jnp.zeros((1, 2, self.cfg.point_tokens), jnp.int32)
        mask = jnp.ones((1, 2), bool)
        memory = jnp.zeros((1, 2, self.cfg.width), jnp.float32)
        tokens = jnp.zeros((1, 3), jnp.int32)
        return {"encoder": self.encoder.init(r_enc, points, mask)["params"],
                "decoder": self.decoder.init(r_dec, tokens, memory_BxNxD=memory, memory_mask_BxN=mask)["params"]}

    @staticmethod
    def num_params(params) -> int:
        return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))

    # ---------------------------------------------------------------- forward
    def encode(self, params, points_BxNxP, mask_BxN, segment_BxN=None) -> jnp.ndarray:
        return self.encoder.apply({"params": params["encoder"]}, points_BxNxP, mask_BxN, segment_BxN)

    def logits(self, params, points_BxNxP, mask_BxN, tokens_BxT, *, point_segment_BxN=None, segment_BxT=None,
               position_BxT=None) -> jnp.ndarray:
        """Teacher-forced next-token logits [B, T, V] (float32); packed rows with the segment ids and positions of
        sr_jax.data's packed batches."""
        memory = self.encode(params, points_BxNxP, mask_BxN, point_segment_BxN)
        logits, _ = self.decoder.apply({"params": params["decoder"]}, tokens_BxT, memory_BxNxD=memory,
                                       memory_mask_BxN=mask_BxN, segment_BxT=segment_BxT,
                                       position_BxT=position_BxT, memory_segment_BxN=point_segment_BxN)
        return logits

    def loss(self, params, batch: dict, rng=None) -> tuple[jnp.ndarray, dict]:
        """Token-level mean cross-entropy of target[:, 1:] given target[:, :-1] (spec §4.2), PAD masked; in a
        packed batch (with `target_segment`) also the position where one target ends and the next begins.
        `seq_acc`: the fraction of examples (targets) predicted entirely right."""
        target = batch["target"]
        labels = target[:, 1:]
        packed = "target_segment" in batch
        if packed:
            seg = batch["target_segment"]
            logits = self.logits(params, batch["points"], batch["point_mask"], target[:, :-1],
                                 point_segment_BxN=batch["point_segment"], segment_BxT=seg[:, :-1],
                                 position_BxT=batch["target_position"][:, :-1])
            m = ((labels != PAD) & (seg[:, 1:] == seg[:, :-1])).astype(jnp.float32)
        else:
            logits = self.logits(params, batch["points"], batch["point_mask"], target[:, :-1])
            m = (labels != PAD).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
        denom = jnp.maximum(m.sum(), 1.0)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        if packed:
            seq_acc = _packed_seq_acc(correct, m, seg[:, 1:])
        else:
            seq_acc = jnp.mean(jnp.all((correct > 0) | (m == 0), axis=1).astype(jnp.float32))
        return (nll * m).sum() / denom, {"token_acc": (correct * m).sum() / denom, "seq_acc": seq_acc}

    # ---------------------------------------------------------------- decoding
    def context(self, params, points_BxNxP, mask_BxN) -> DecodeContext:
        memory = self.encode(params, points_BxNxP, mask_BxN)
        kvs = self.decoder.apply({"params": params["decoder"]}, None, memory_BxNxD=memory, kv_only=True)
        return DecodeContext(kvs, mask_BxN)

    def init_cache(self, rows: int, length: int | None = None) -> DecodeCache:
        cfg = self.cfg
        length = length or cfg.max_len
        if length > cfg.max_len:
            raise ValueError(f"decoding length {length} exceeds the model's position table ({cfg.max_len})")
        shape = (rows, length, cfg.heads, cfg.width // cfg.heads)
        layers = tuple(KVCache(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
                       for _ in range(cfg.dec_layers))
        return DecodeCache(layers, jnp.zeros((), jnp.int32))

    def decoder_fn(self, params, context: DecodeContext):
        """`tokens_to_logits(tokens_Rx1, cache) -> (logits_RxV, cache)` for core_jax.decode; R = B * G rows, the
        G rows of dataset b being rows b*G .. b*G+G-1."""
        def tokens_to_logits(tokens_Rx1, cache: DecodeCache):
            logits, cache = self.decoder.apply({"params": params["decoder"]}, tokens_Rx1,
                                               memory_kvs=context.memory_kvs,
                                               memory_mask_BxN=context.memory_mask_BxN, cache=cache)
            return logits[:, -1], cache
        return tokens_to_logits


def _packed_seq_acc(correct_BxT, m_BxT, segment_BxT) -> jnp.ndarray:
    """Fraction of the examples in packed rows whose predicted tokens (m = 1) are all correct: per-(row, segment)
    counts of predicted and of wrong tokens; segment ids are < T + 1 (each example has at least 2 tokens)."""
    B, T = segment_BxT.shape
    ids = (jnp.arange(B)[:, None] * (T + 1) + segment_BxT).reshape(-1)
    n_bins = B * (T + 1)
    tokens = jax.ops.segment_sum(m_BxT.reshape(-1), ids, n_bins)
    wrong = jax.ops.segment_sum((m_BxT * (1 - correct_BxT)).reshape(-1), ids, n_bins)
    present = tokens > 0
    return jnp.sum(present & (wrong == 0)) / jnp.maximum(jnp.sum(present), 1)


def bos(rows: int) -> jnp.ndarray:
    return jnp.full((rows,), EOS, jnp.int32)
