"""Interleaved rotary embeddings (default and yarn), as transformers computes them for glm_moe_dsa."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from glmjax.config import RopeSpec, yarn_mscale


def inv_freq_and_scale(rope: RopeSpec, dim: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [dim/2] (float32) and the cos/sin scale (yarn's attention_factor, else 1)."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.float32(rope.theta) ** exponent
    if rope.rope_type == "default":
        return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0
    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    omax = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(omax / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = np.float32(1.0) - ramp
    inv_extra = np.float32(1.0) / pos_freqs
    inv_inter = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = inv_inter * (np.float32(1.0) - extrapolation) + inv_extra * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_tables(positions: jax.Array, rope: RopeSpec, dim: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., dim/2] float32 for integer positions [...], already times the attention factor."""
    inv_freq, scale = inv_freq_and_scale(rope, dim)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs (x0,x1),(x2,x3)... of x [B,T,...,dim]; cos/sin [B,T,dim/2].

    Like transformers, the output is de-interleaved: [even rotated..., odd rotated...]. Queries and keys get
    the same permutation, so their dot products are those of the interleaved form."""
    extra = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:]).astype(x.dtype)
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:]).astype(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
