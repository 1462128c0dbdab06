"""Dense MLA attention for the DSA dense warm-up, blockwise over queries and keys (no [T, S] array).

During the warm-up every query attends to all its allowed keys (valid, not after it, in its document) and
the main model is frozen: only the indexers learn, from their KL to this attention's distribution. So the
attention here is forward-only (its inputs are detached) and pure JAX: an online-softmax loop over key
blocks inside a map over query blocks, each query block visiting only the key blocks its queries can see.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import check_q_block, map_query_blocks, pad_axis


def key_block_range(query_index, query_start, k_block: int, num_blocks: int):
    """The key blocks [lo, hi) a query block [B, bq] of positions can attend to (causal, document start)."""
    lo = jnp.min(jnp.maximum(query_start, 0)) // k_block
    hi = jnp.minimum(jnp.max(query_index) // k_block + 1, num_blocks)
    return lo, jnp.maximum(hi, lo)


def block_mask(key_valid, query_index, query_start, start: int | jax.Array, k_block: int):
    """[B, bq, k_block] bool: key positions start + [0, k_block) each query may attend to. key_valid is the
    whole (padded) [B, S] mask."""
    valid = jax.lax.dynamic_slice_in_dim(key_valid, start, k_block, axis=1)
    pos = start + jnp.arange(k_block, dtype=jnp.int32)
    return (valid[:, None, :] & (pos[None, None, :] <= query_index[:, :, None])
            & (pos[None, None, :] >= query_start[:, :, None]))


def pad_keys(x, k_block: int):
    """Pads the key axis (1) of x [B, S, ...] to a multiple of k_block (padded keys are never valid)."""
    return pad_axis(x, 1, k_block, False if x.dtype == jnp.bool_ else 0)


def dense_mla(q, kv, *, key_valid, query_index, query_start, scale: float, v_dim: int, q_block: int,
              k_block: int = 512):
    """Causal MLA attention over every allowed key, without gradient.

    q [B,T,H,Dk] (absorbed queries), kv [B,S,Dk'] latent rows with Dk' >= Dk (scores over the first Dk
    dims, values the first v_dim); key_valid [B,S] bool; query_index / query_start [B,T] int32 (a query at
    position t of a document starting at s0 sees keys s0 <= s <= t). -> (out [B,T,H,v_dim] in q.dtype, 0 for
    a query with no allowed key; lse [B,T,H] float32, -inf there), as `sparse_mla` returns them with every
    allowed key selected. Memory per query block is O(q_block * H * k_block)."""
    check_q_block(q_block)
    Dk = q.shape[-1]
    q, kv = jax.lax.stop_gradient((q, kv))
    kv = pad_keys(kv, k_block)
    kvalid = pad_keys(key_valid, k_block)
    nk = kv.shape[1] // k_block

    def block(qb, qi, qs):
        B, bq, H, _ = qb.shape

        def step(j, carry):
            m, l, acc = carry
            start = j * k_block
            rows = jax.lax.dynamic_slice_in_dim(kv, start, k_block, axis=1)
            ok = block_mask(kvalid, qi, qs, start, k_block)[:, :, None, :]  # [B,bq,1,bk]
            s = jnp.einsum("bqhd,bkd->bqhk", qb, rows[..., :Dk], preferred_element_type=jnp.float32) * scale
            s = jnp.where(ok, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
            l = l * corr + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bqhk,bkv->bqhv", p.astype(kv.dtype), rows[..., :v_dim],
                            preferred_element_type=jnp.float32)
            return m_new, l, acc * corr[..., None] + pv

        init = (jnp.full((B, bq, H), -jnp.inf, jnp.float32), jnp.zeros((B, bq, H), jnp.float32),
                jnp.zeros((B, bq, H, v_dim), jnp.float32))
        lo, hi = key_block_range(qi, qs, k_block, nk)
        m, l, acc = jax.lax.fori_loop(lo, hi, step, init)
        has = l > 0
        out = jnp.where(has[..., None], acc / jnp.where(has, l, 1.0)[..., None], 0.0)
        lse = jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)
        return out.astype(q.dtype), lse

    return map_query_blocks(block, q_block, q, query_index, query_start, pad_values=(0, -1, 0))
