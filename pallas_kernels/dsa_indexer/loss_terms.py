"""The indexer's side of the DSA indexer loss: its scores at the keys attention selected.

The indexer loss compares, per query, the indexer's distribution over the selected keys with attention's
(`pallas_kernels.sparse_mla.attention_probs_at`). Only K scores per query are needed, so this gathers the K
keys instead of scoring all S: memory per query block is [B, bq, K, D] gathered keys and [B, bq, H, K]
logits; no [T, S] array exists, in the backward pass either (each block is a checkpoint, recomputed
one at a time). Pure JAX, differentiated by autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import gather_rows, map_query_blocks


def indexer_scores_at(q, k, w, indices, *, scale: float, q_block: int):
    """score[b,t,j] = sum_h w[b,t,h] * relu(q[b,t,h] . k[b, indices[b,t,j]] * scale), -inf where indices < 0.

    q [B,T,H,D], k [B,S,D], w [B,T,H] float32, indices [B,T,K] int32 -> [B,T,K] float32, differentiable with
    respect to q, k and w. With the heads split over devices each device's result is a partial sum over its
    heads (empty slots are -inf on every device, so a psum keeps them -inf)."""
    # The key gradient is accumulated across query blocks (lax.map's transpose); in float32, not k's dtype.
    kf = k.astype(jnp.float32)

    def block(qb, wb, ib):
        rows = gather_rows(kf, ib)  # [B,bq,K,D]
        logits = jnp.einsum("bqhd,bqkd->bqhk", qb.astype(jnp.float32), rows)
        scores = jnp.einsum("bqhk,bqh->bqk", jax.nn.relu(logits * scale), wb.astype(jnp.float32))
        return jnp.where(ib >= 0, scores, -jnp.inf)

    return map_query_blocks(block, q_block, q, w, indices, pad_values=(0, 0, -1), remat=True)
