"""Grouped matmul on GPU: XLA's `lax.ragged_dot`, which XLA:GPU lowers to a grouped GEMM."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gmm_ragged_dot(lhs, rhs, group_sizes, *, transpose_rhs: bool, out_dtype):
    """lhs [M,K], rhs [G,K,N] ([G,N,K] with transpose_rhs), group_sizes [G] int32 -> [M,N] out_dtype."""
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
    y = jax.lax.ragged_dot(lhs.astype(dtype), rhs.astype(dtype), group_sizes.astype(jnp.int32),
                           preferred_element_type=jnp.float32)
    return y.astype(out_dtype)
