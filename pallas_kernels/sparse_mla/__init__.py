"""Sparse MLA attention (absorbed form) over top-k selected latent rows, and the indexer-loss probabilities.

`sparse_mla(q, kv, indices, ..., q_block, impl, interpret)`: "reference" (pure JAX, differentiated by autodiff),
or a Pallas impl whose forward and backward are both kernels, joined by a custom_vjp: the backward is sparse
too (dq from the selected rows, dkv by scatter-add into the latent rows), so training pays sparse cost. No
gradient flows into `indices` (top-k selection is discrete) or through `lse`. Every impl walks the queries in
blocks of q_block: the reference with lax.map, the kernel wrappers with lax.map forward and lax.scan backward
(inside the custom_vjp, so the float32 dkv accumulator is the scan carry rather than a cotangent summed in
kv's dtype). `attention_probs_at` (loss_terms.py) gives attention's probabilities at the selected rows.
`merge_shards` combines the partial results of shards that each attended over their own rows (a
sequence-sharded KV cache) by log-sum-exp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.blocks import tuned_blocks
from pallas_kernels.common import check_q_block, kernel_family
from pallas_kernels.quantize import QuantizedRows
from pallas_kernels.sparse_mla.loss_terms import attention_probs_at
from pallas_kernels.sparse_mla.reference import sparse_mla_reference

__all__ = ["attention_probs_at", "merge_shards", "sparse_mla"]


def _kernels(family: str):
    if family == "tpu":
        from pallas_kernels.sparse_mla.tpu import sparse_mla_bwd_tpu as bwd
        from pallas_kernels.sparse_mla.tpu import sparse_mla_fwd_tpu as fwd
    else:
        from pallas_kernels.sparse_mla.gpu import sparse_mla_bwd_gpu as bwd
        from pallas_kernels.sparse_mla.gpu import sparse_mla_fwd_gpu as fwd
    return fwd, bwd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _sparse_mla_pallas(q, kv, indices, scale, v_dim, q_block, family, interpret):
    return _fwd(q, kv, indices, scale, v_dim, q_block, family, interpret)[0]


def _fwd(q, kv, indices, scale, v_dim, q_block, family, interpret):
    fwd, _ = _kernels(family)
    out, lse = fwd(q, kv, indices, scale=scale, v_dim=v_dim, q_block=q_block,
                   blocks=tuned_blocks("sparse_mla_fwd", family), interpret=interpret)
    return (out, lse), (q, kv, indices, out, lse)


def _bwd(scale, v_dim, q_block, family, interpret, res, cts):
    q, kv, indices, out, lse = res
    d_out, _ = cts  # lse is returned under stop_gradient: its cotangent is zero
    _, bwd = _kernels(family)
    dq, dkv = bwd(q, kv, indices, out, lse, d_out, scale=scale, v_dim=v_dim, q_block=q_block,
                  blocks=tuned_blocks("sparse_mla_bwd", family), interpret=interpret)
    return dq, dkv, None


_sparse_mla_pallas.defvjp(_fwd, _bwd)


def sparse_mla(q, kv, indices, *, scale: float, v_dim: int, q_block: int, impl: str = "reference",
               interpret: bool = False):
    """q [B,T,H,Dk], kv [B,S,Dk], indices [B,T,K] int32 (-1 = empty) -> (out [B,T,H,v_dim], lse [B,T,H]).

    Serving caches (forward only, no gradient): kv may be QuantizedRows (pallas_kernels.quantize; its first
    v_dim dims 8-bit with per-row scales, the rope dims in q's dtype: only the selected rows are read and
    dequantized), and kv [1, S, Dk] is one pool of rows shared by every batch row (a paged cache; indices
    are rows of the pool).

    See `sparse_mla_reference` for the semantics. lse carries no gradient. q_block: queries per block, for
    every impl. impl: "reference" or a Pallas impl (see common.kernel_family); interpret is ignored by the
    reference."""
    check_q_block(q_block)
    if impl == "reference":
        out, lse = sparse_mla_reference(q, kv, indices, scale=scale, v_dim=v_dim, q_block=q_block)
    elif isinstance(kv, QuantizedRows) or kv.shape[0] != q.shape[0]:  # a serving cache: the forward kernel alone
        family = kernel_family(impl, interpret)
        fwd, _ = _kernels(family)
        out, lse = fwd(jax.lax.stop_gradient(q), kv, indices, scale=float(scale), v_dim=int(v_dim), q_block=q_block,
                       blocks=tuned_blocks("sparse_mla_fwd", family), interpret=interpret)
    else:
        family = kernel_family(impl, interpret)
        out, lse = _sparse_mla_pallas(q, kv, indices, float(scale), int(v_dim), q_block, family, bool(interpret))
    return out, jax.lax.stop_gradient(lse)


def merge_shards(out, lse, axes: tuple[str, ...]):
    """Attention over rows split across the devices of mesh `axes` (inside shard_map), from each shard's
    attention over its own selected rows: out [B,T,H,v] and lse [B,T,H] (-inf where the shard selected
    nothing) -> (out, lse) over the union of the rows, the same on every shard, out in its dtype.

    out = sum_i out_i exp(lse_i - lse), lse = log sum_i exp(lse_i): two small all-reduces (a max and a sum)
    of the [B,T,H] weights, one of out in float32. A query with no row anywhere keeps out 0 and lse -inf."""
    m = jax.lax.pmax(lse, axes)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m)  # 0 for a shard without rows
    total = jax.lax.psum(w, axes)
    merged = jax.lax.psum(out.astype(jnp.float32) * w[..., None], axes)
    merged = merged / jnp.where(total > 0, total, 1.0)[..., None]
    return merged.astype(out.dtype), m + jnp.log(total)
