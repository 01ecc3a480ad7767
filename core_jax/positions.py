"""Attention-level position schemes shared by both packages: RoPE (rotation of q/k) and FIRE (additive bias).

Token-level schemes (Abacus, learned absolute) live with the embeddings of the package that needs them.
Positions are 1-D (shared by every row of a batch): prompts in a batch have equal length, so this costs nothing and
keeps FIRE's bias at [heads, Q, K] instead of [batch, heads, Q, K].
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


def apply_rope(x_BxLxHxD: jnp.ndarray, pos_L: jnp.ndarray, base: float = 10000.0) -> jnp.ndarray:
    """GPT-NeoX 'rotate_half' RoPE over the full head dim (the original's variant); positions [L] or [B, L]."""
    d = x_BxLxHxD.shape[-1]
    half = d // 2
    inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles_LxH = pos_L.astype(jnp.float32)[..., None] * inv_freq   # pos_L may also be per row: [B, L]
    angles = jnp.concatenate([angles_LxH, angles_LxH], axis=-1)[..., None, :]
    if pos_L.ndim == 1:
        angles = angles[None]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x = x_BxLxHxD.astype(jnp.float32)
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x_BxLxHxD.dtype)


class FireBias(nn.Module):
    """FIRE (Li et al. 2023): bias[h, i, j] = MLP(log(|c(p_i - p_j)| + 1) / (log(|c max(p_i, L)| + 1) + eps)).

    c and the L multiplier are trainable, init_L is frozen; one module per attention layer (shared across the
    passes of a looped model because the layer is).
    """

    num_heads: int
    hidden: int = 32
    init_c: float = 0.1
    init_L: float = 512.0
    eps: float = 1e-6

    @nn.compact
    def __call__(self, q_pos_Q: jnp.ndarray, k_pos_K: jnp.ndarray) -> jnp.ndarray:
        c = self.param("c", lambda _: jnp.array(self.init_c, jnp.float32))
        l_mult = self.param("L_multiplier", lambda _: jnp.array(1.0, jnp.float32))
        q = q_pos_Q.astype(jnp.float32)
        k = k_pos_K.astype(jnp.float32)
        rel_QxK = q[:, None] - k[None, :]
        thr = jnp.abs(l_mult * self.init_L)
        norm_Q = jnp.maximum(q, thr)
        rel = jnp.log(jnp.abs(c * rel_QxK) + 1.0)
        norm = jnp.log(jnp.abs(c * norm_Q) + 1.0)[:, None]
        feats_QxKx1 = (rel / (norm + self.eps))[..., None]
        h = nn.relu(nn.Dense(self.hidden, name="mlp_in")(feats_QxKx1))
        bias_QxKxH = nn.Dense(self.num_heads, name="mlp_out")(h)
        return jnp.transpose(bias_QxKxH, (2, 0, 1))
