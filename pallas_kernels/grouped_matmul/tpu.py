"""Grouped matmul on TPU: jax's megablox `gmm` (Pallas Mosaic), which runs only the tiles that hold routed
rows and keeps its tile metadata in scalar-prefetch memory, so it scales past the ~1M-row SMEM limit of
XLA's ragged_dot lowering. Its backward (gmm against rhs.T, tgmm) is megablox's own custom_vjp."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import cdiv

TM = 128  # rows per tile (a multiple of 16 keeps bf16 tiles aligned)


def _tile(dim: int) -> int:
    # Mosaic blocks must be multiples of 128 lanes or span the whole dimension.
    return 128 if dim % 128 == 0 else dim


def gmm_megablox(lhs, rhs, group_sizes, *, transpose_rhs: bool, out_dtype, interpret: bool):
    """lhs [M,K], rhs [G,K,N] ([G,N,K] with transpose_rhs), group_sizes [G] int32 -> [M,N] out_dtype."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    mp = cdiv(m, TM) * TM
    # megablox leaves rows past sum(group_sizes) unwritten (garbage), in the output and in dlhs: mask both.
    valid = (jnp.arange(mp) < jnp.sum(group_sizes))[:, None]
    x = jnp.where(valid, jnp.pad(lhs, ((0, mp - m), (0, 0))), 0)
    dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
    # The kernel accumulates in float32 whatever it returns: asking for out_dtype directly keeps the output
    # and its cotangent (the backward's [M, N] input) out of float32 when out_dtype is bf16.
    y = gmm(x.astype(dtype), rhs.astype(dtype), group_sizes.astype(jnp.int32), jnp.dtype(out_dtype),
            (TM, _tile(k), _tile(n)), None, None, transpose_rhs, interpret)
    return jnp.where(valid, y, 0)[:m]
