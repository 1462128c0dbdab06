"""Pure-JAX reference of the DSA lightning indexer: scores and exact top-k, chunked over query blocks.

score[b, t, s] = sum_h w[b, t, h] * relu(q[b, t, h] . k[b, s] * scale), for keys s that are valid, not after
the query (s <= query_index[b, t]) and in its document (s >= query_start[b, t], packed sequences). Each query
keeps the `topk` best keys. Memory is O(q_block * heads * S) per block; no [T, S] array exists for the whole
sequence (blocks take more than q_block queries only while they stay under common.REFERENCE_BLOCK_ELEMENTS).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import INVALID_INDEX, map_query_blocks, reference_q_block


def allowed_keys(key_valid, query_index, query_start, S: int):
    """[B,S] bool, [B,bq] int32, [B,bq] int32 or None -> [B,bq,S] bool: the keys each query may select."""
    s_idx = jnp.arange(S, dtype=jnp.int32)[None, None, :]
    allowed = key_valid[:, None, :] & (s_idx <= query_index[:, :, None])
    if query_start is not None:
        allowed &= s_idx >= query_start[:, :, None]
    return allowed


def indexer_scores_block(q, k, w, key_valid, query_index, scale, query_start=None):
    """q [B,bq,H,D], k [B,S,D], w [B,bq,H] f32, key_valid [B,S] bool, query_index [B,bq] int32, query_start
    [B,bq] int32 or None -> [B,bq,S] f32, -inf where masked."""
    logits = jnp.einsum("bqhd,bsd->bqhs", q.astype(jnp.float32), k.astype(jnp.float32))
    scores = jnp.einsum("bqhs,bqh->bqs", jax.nn.relu(logits * scale), w.astype(jnp.float32))
    return jnp.where(allowed_keys(key_valid, query_index, query_start, k.shape[1]), scores, -jnp.inf)


def indexer_topk_reference(q, k, w, *, key_valid, query_index, topk: int, scale: float, q_block: int,
                           query_start=None, reduce_scores=None):
    """Top-k key indices per query.

    Args:
      q: [B, T, H, D] indexer queries (rope applied). k: [B, S, D] indexer keys (rope applied).
      w: [B, T, H] float32 per-head weights. key_valid: [B, S] bool. query_index: [B, T] int32, the key
      position of each query (causality). query_start: [B, T] int32 or None, the first key of each query's
      document. topk: keys kept per query. reduce_scores: applied to each block's scores [B, bq, S] before
      the top-k (a psum over devices holding the other heads).
    Returns:
      [B, T, min(topk, S)] int32 key indices, best first; INVALID_INDEX (-1) in slots with no valid key.
    """
    K = min(topk, k.shape[1])
    qs = jnp.zeros_like(query_index) if query_start is None else query_start

    def block(qb, wb, qib, qsb):
        scores = indexer_scores_block(qb, k, wb, key_valid, qib, scale, qsb)
        if reduce_scores is not None:
            scores = reduce_scores(scores)
        vals, idx = jax.lax.top_k(scores, K)
        return jnp.where(vals > -jnp.inf, idx.astype(jnp.int32), INVALID_INDEX)

    return map_query_blocks(block, reference_block(q, k, q_block), q, w, query_index, qs)


def reference_block(q, k, q_block: int) -> int:
    """The reference's query block for q [B, T, H, D] against keys k [B, S, D]: its [bq, H, S] logits bound it
    (common.reference_q_block)."""
    B, T, H, _ = q.shape
    return reference_q_block(q_block, T, B * H * k.shape[1])
