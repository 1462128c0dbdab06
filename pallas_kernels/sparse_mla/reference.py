"""Pure-JAX reference of sparse MLA attention in absorbed form, chunked over query blocks.

Every query head attends over the same latent rows (one "KV head" of kv_lora_rank + rope dims, 576 for
GLM-5.2), and only over the rows its top-k indices select. The values are the first `v_dim` dims of the rows.
Per block the gathered rows are [B, q_block, K, Dk]; no [T, S] array exists. With few rows in all (S <= 8K)
it scores every row instead and masks the unselected: [B, q_block, H, S] per block, no gather. Blocks take
more than q_block queries while they stay under common.REFERENCE_BLOCK_ELEMENTS.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import gather_rows, map_query_blocks, reference_q_block, selected_mask
from pallas_kernels.quantize import QuantizedRows, dequantize

# Score every row while S <= DENSE_BELOW * K. A dense product runs near the CPU's matmul peak and a gather
# of [bq, K, Dk] rows with a small product per query does not: the CPU training benchmark (K = 64) at 8 x 512
# tokens took 1.09x less time per step at 8 than at 4; at 2 x 1024 dense (16) took 1.23x more.
DENSE_BELOW = 8


def sparse_mla_reference(q, kv, indices, *, scale: float, v_dim: int, q_block: int):
    """Attention of each query over its selected latent rows.

    Args:
      q: [B, T, H, Dk] absorbed queries (q_nope @ W_UK, then the roped q, concatenated).
      kv: [B, S, Dk] latent rows (normed kv latent, then the roped shared key), or QuantizedRows of them
        (dequantized to q's dtype as they are read); [1, S, Dk]: one pool of rows for every batch row (a paged
        cache; indices are rows of the pool).
      indices: [B, T, K] int32 selected rows; negative entries are empty slots.
      scale: softmax scale. v_dim: the first v_dim dims of each row are its value. q_block: queries per block
        (more while a block stays small: common.reference_q_block).
    Returns:
      out [B, T, H, v_dim] in q.dtype (zeros for a query with no valid row) and lse [B, T, H] float32
      (-inf for such a query).
    """

    S, K = kv.shape[1], indices.shape[-1]
    # With few rows in all (S <= DENSE_BELOW * K: short sequences, small caches), scoring every row and masking
    # the unselected ones costs little more than the selected rows alone and avoids gathering a [bq, K, Dk]
    # copy per query; the indexer's selections are distinct, so the two forms agree.
    dense = S <= DENSE_BELOW * K and kv.shape[0] == q.shape[0]  # (not over a shared pool of rows)
    if dense and isinstance(kv, QuantizedRows):
        kv = dequantize(kv, q.dtype)

    def block(qb, ib):
        if dense:
            valid = selected_mask(ib, S)  # [B,bq,S]
            logits = jnp.einsum("bqhd,bsd->bqhs", qb, kv, preferred_element_type=jnp.float32) * scale
        else:
            valid = ib >= 0
            rows = gather_rows(kv, ib, q.dtype)  # [B,bq,K,Dk]
            logits = jnp.einsum("bqhd,bqkd->bqhk", qb, rows, preferred_element_type=jnp.float32) * scale
        logits = jnp.where(valid[:, :, None, :], logits, -jnp.inf)
        # The shift changes neither the probabilities nor lse, so its gradient is exactly zero: without the
        # stop_gradient autodiff still spends passes over [.., S] on it (the CPU training step: 1.03x).
        m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
        m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(logits - m_safe)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        probs = (p / jnp.where(denom > 0, denom, 1.0)).astype(q.dtype)
        if dense:
            out = jnp.einsum("bqhs,bsv->bqhv", probs, kv[..., :v_dim], preferred_element_type=jnp.float32)
        else:
            out = jnp.einsum("bqhk,bqkv->bqhv", probs, rows[..., :v_dim], preferred_element_type=jnp.float32)
        lse = (m_safe + jnp.log(denom))[..., 0]
        return out.astype(q.dtype), lse

    B, T, H, Dk = q.shape
    per_query = B * H * S if dense else B * K * max(Dk, H)  # [bq, H, S] logits, or [bq, K, Dk] gathered rows
    return map_query_blocks(block, reference_q_block(q_block, T, per_query), q, indices, pad_values=(0, -1))
