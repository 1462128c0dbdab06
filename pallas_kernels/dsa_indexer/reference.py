"""Pure-JAX reference of the DSA lightning indexer: scores and exact top-k, chunked over query blocks.

score[b, t, s] = sum_h w[b, t, h] * relu(q[b, t, h] . k[b, s]) * scale, for keys s that are valid and not
after the query (s <= query_index[b, t]). Each query keeps the `topk` best keys. Memory is
O(q_block * heads * S) per block; no [T, S] array exists for the whole sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import INVALID_INDEX, map_query_blocks


def indexer_scores_block(q, k, w, key_valid, query_index, scale):
    """q [B,bq,H,D], k [B,S,D], w [B,bq,H] f32, key_valid [B,S] bool, query_index [B,bq] -> [B,bq,S] f32,
    -inf where masked."""
    logits = jnp.einsum("bqhd,bsd->bqhs", q.astype(jnp.float32), k.astype(jnp.float32))
    scores = jnp.einsum("bqhs,bqh->bqs", jax.nn.relu(logits * scale), w.astype(jnp.float32))
    s_idx = jnp.arange(k.shape[1], dtype=jnp.int32)
    allowed = key_valid[:, None, :] & (s_idx[None, None, :] <= query_index[:, :, None])
    return jnp.where(allowed, scores, -jnp.inf)


def indexer_topk_reference(q, k, w, *, key_valid, query_index, topk: int, scale: float, q_block: int = 128):
    """Top-k key indices per query.

    Args:
      q: [B, T, H, D] indexer queries (rope applied). k: [B, S, D] indexer keys (rope applied).
      w: [B, T, H] float32 per-head weights. key_valid: [B, S] bool. query_index: [B, T] int32, the key
      position of each query (causality). topk: keys kept per query.
    Returns:
      [B, T, min(topk, S)] int32 key indices, best first; INVALID_INDEX (-1) in slots with no valid key.
    """
    K = min(topk, k.shape[1])

    def block(qb, wb, qib):
        scores = indexer_scores_block(qb, k, wb, key_valid, qib, scale)
        vals, idx = jax.lax.top_k(scores, K)
        return jnp.where(vals > -jnp.inf, idx.astype(jnp.int32), INVALID_INDEX)

    return map_query_blocks(block, q_block, q, w, query_index)
