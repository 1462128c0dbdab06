"""Dense reference of the grouped matmul: every row against every group's matrix, then a mask.

O(M * G * K * N): for tests only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_ids_of_rows(group_sizes: jax.Array, m: int) -> jax.Array:
    """[G] sizes -> [m] group of each row; rows past sum(group_sizes) get G (no group)."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(m), side="right").astype(jnp.int32)


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                             transpose_rhs: bool = False, preferred_element_type=jnp.float32) -> jax.Array:
    """lhs [M,K], rhs [G,K,N] ([G,N,K] with transpose_rhs), group_sizes [G] int32 -> [M,N].

    Rows [start_g, start_g + size_g) of lhs are multiplied by rhs[g]; rows past sum(group_sizes) are 0."""
    G = rhs.shape[0]
    w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    all_groups = jnp.einsum("mk,gkn->gmn", lhs, w, preferred_element_type=jnp.float32)  # [G, M, N]
    onehot = jax.nn.one_hot(group_ids_of_rows(group_sizes, lhs.shape[0]), G, dtype=jnp.float32)  # [M, G]
    return jnp.einsum("gmn,mg->mn", all_groups, onehot).astype(preferred_element_type)
