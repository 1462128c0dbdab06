"""Attention's side of the DSA indexer loss: the sparse attention probabilities at the selected rows.

The indexer loss pulls the indexer's distribution over the selected keys towards attention's, summed over
heads. Given the lse that `sparse_mla` returns, each probability is one dot product, so this recomputes the
logits of the K selected rows per query block (gather + einsum, like the reference) and exponentiates against
lse. It is a training target: no gradient flows through it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import gather_rows, map_query_blocks


def attention_probs_at(q, kv, indices, lse, *, scale: float, q_block: int):
    """probs[b,t,j] = sum_h exp(q[b,t,h] . kv[b, indices[b,t,j]] * scale - lse[b,t,h]), 0 where indices < 0.

    q [B,T,H,Dk]; kv [B,S,Dk'] with Dk' >= Dk (a lane-padded cache: only the first Dk dims are used); indices
    [B,T,K] int32; lse [B,T,H] float32 as returned by `sparse_mla` -> [B,T,K] float32, under stop_gradient.
    With the heads split over devices each device's result is a partial sum over its heads (the caller psums)."""
    Dk = q.shape[-1]
    if kv.shape[-1] < Dk:
        raise ValueError(f"attention_probs_at: kv width {kv.shape[-1]} is below q's {Dk}")
    q, kv, lse = jax.lax.stop_gradient((q, kv, lse))

    def block(qb, ib, lb):
        valid = ib >= 0
        rows = gather_rows(kv, ib)[..., :Dk]  # [B,bq,K,Dk]
        logits = jnp.einsum("bqhd,bqkd->bqhk", qb, rows, preferred_element_type=jnp.float32) * scale
        # A query with no valid row has lse = -inf; its slots are all empty, so mask before exp (no inf - inf).
        lse_safe = jnp.where(jnp.isfinite(lb), lb, 0.0)[..., None]
        p = jnp.where(valid[:, :, None, :], jnp.exp(logits - lse_safe), 0.0)
        return jnp.sum(p, axis=2)

    return map_query_blocks(block, q_block, q, indices, lse.astype(jnp.float32), pad_values=(0, -1, 0))
