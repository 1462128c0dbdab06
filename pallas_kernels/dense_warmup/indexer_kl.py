"""The DSA indexer's KL over every allowed key (the dense warm-up), blockwise: no [T, S] array.

For query t, with p the attention distribution of the layers the indexer serves (each layer's softmax
summed over heads, averaged over the layers, L1-normalised over the keys) and I the indexer's scores:

    KL_t = sum_s p_s (log p_s - log softmax(I)_s) = A / P - log P - C / P + LSE(I)

where P = sum_s p~_s, A = sum_s p~_s log p~_s and C = sum_s p~_s I_s over the unnormalised p~, and LSE(I) is
the indexer's log-sum-exp. All four are sums over keys, so one pass over key blocks (an online LSE) gives
the loss. Its gradient with respect to the scores is g_t (softmax(I)_t - p_t): the backward pass visits
the key blocks again, recomputes both distributions and pulls that back through the indexer's scores.
Attention probabilities come from each layer's absorbed queries, latent rows and log-sum-exp (what
`dense_mla` returned), so only one [q_block, heads, k_block] block of them exists at a time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import check_q_block, from_query_blocks, to_query_blocks
from pallas_kernels.dense_warmup.attention import block_mask, key_block_range, pad_keys


def index_scores(q, k, w, scale: float):
    """q [B,bq,HI,DI], k [B,bk,DI], w [B,bq,HI] -> [B,bq,bk] f32: sum_h w_h relu(scale q_h . k)."""
    logits = jnp.einsum("bqhd,bkd->bqhk", q.astype(jnp.float32), k.astype(jnp.float32))
    return jnp.einsum("bqhk,bqh->bqk", jax.nn.relu(logits * scale), w.astype(jnp.float32))


def attention_mass(targets, qbs, lbs, start: int | jax.Array, k_block: int, ok, scale: float):
    """[B,bq,bk] f32: the layers' attention probabilities at keys start + [0, k_block), summed over heads and
    layers (0 where not ok). qbs / lbs: each layer's query block [B,bq,H,Dk] and lse [B,bq,H]."""
    total = 0.0
    for (_, kv, _), qb, lb in zip(targets, qbs, lbs, strict=True):
        rows = jax.lax.dynamic_slice_in_dim(kv, start, k_block, axis=1)[..., :qb.shape[-1]]
        s = jnp.einsum("bqhd,bkd->bqhk", qb, rows, preferred_element_type=jnp.float32) * scale
        lb = jnp.where(jnp.isfinite(lb), lb, jnp.inf)  # a query with no key: probability 0
        total = total + jnp.sum(jnp.exp(s - lb[..., None]), axis=2)
    return jnp.where(ok, total, 0.0)


def _prepare(targets, ik, key_valid, k_block):
    targets = tuple((q, pad_keys(kv, k_block), lse) for q, kv, lse in targets)
    return targets, pad_keys(ik, k_block), pad_keys(key_valid, k_block)


def _blocks(targets, iq, iw, query_index, query_start, bq):
    qbs = [to_query_blocks(q, bq) for q, _, _ in targets]
    lbs = [to_query_blocks(lse, bq, -jnp.inf) for _, _, lse in targets]
    return (qbs, lbs, to_query_blocks(iq, bq), to_query_blocks(iw, bq), to_query_blocks(query_index, bq, -1),
            to_query_blocks(query_start, bq))


def _forward(targets, iq, ik, iw, key_valid, query_index, query_start, scale, index_scale, q_block, k_block):
    """-> kl [B,T], has [B,T], and the residuals the backward pass needs (lse of the scores, P)."""
    T = iq.shape[1]
    bq = min(q_block, T)
    targets, ik, kvalid = _prepare(targets, ik, key_valid, k_block)
    nk = ik.shape[1] // k_block
    qbs, lbs, iqb, iwb, qib, qsb = _blocks(targets, iq, iw, query_index, query_start, bq)

    def block(xs):
        qb_l, lb_l, iq_b, iw_b, qi, qs = xs
        B = qi.shape[0]

        def step(j, carry):
            m, l, P, A, C = carry
            start = j * k_block
            ok = block_mask(kvalid, qi, qs, start, k_block)
            scores = index_scores(iq_b, jax.lax.dynamic_slice_in_dim(ik, start, k_block, axis=1), iw_b,
                                  index_scale)
            scores = jnp.where(ok, scores, -jnp.inf)
            p = attention_mass(targets, qb_l, lb_l, start, k_block, ok, scale)
            m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            corr = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
            l = l * corr + jnp.sum(jnp.exp(scores - m_safe[..., None]), axis=-1)
            plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
            return (m_new, l, P + jnp.sum(p, -1), A + jnp.sum(plogp, -1),
                    C + jnp.sum(jnp.where(p > 0, p * jnp.where(ok, scores, 0.0), 0.0), -1))

        z = jnp.zeros((B, qi.shape[1]), jnp.float32)
        lo, hi = key_block_range(qi, qs, k_block, nk)
        m, l, P, A, C = jax.lax.fori_loop(lo, hi, step, (jnp.full_like(z, -jnp.inf), z, z, z, z))
        has = (P > 0) & (l > 0)
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
        Ps = jnp.where(has, P, 1.0)
        kl = jnp.where(has, A / Ps - jnp.log(Ps) - C / Ps + jnp.where(has, lse, 0.0), 0.0)
        return kl, has, lse, P

    kl, has, lse, P = jax.lax.map(block, (qbs, lbs, iqb, iwb, qib, qsb))
    kl, has, lse, P = (from_query_blocks(a, T) for a in (kl, has, lse, P))
    return kl, has, lse, P


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _kl(targets, iq, ik, iw, key_valid, query_index, query_start, scale, index_scale, q_block, k_block):
    kl, has, _, _ = _forward(targets, iq, ik, iw, key_valid, query_index, query_start, scale, index_scale,
                             q_block, k_block)
    return kl, has


def _kl_fwd(targets, iq, ik, iw, key_valid, query_index, query_start, scale, index_scale, q_block, k_block):
    kl, has, lse, P = _forward(targets, iq, ik, iw, key_valid, query_index, query_start, scale, index_scale,
                               q_block, k_block)
    return (kl, has), (targets, iq, ik, iw, key_valid, query_index, query_start, has, lse, P)


def _kl_bwd(scale, index_scale, q_block, k_block, res, cts):
    targets, iq, ik, iw, key_valid, query_index, query_start, has, lse, P = res
    g = jnp.where(has, cts[0], 0.0)
    T, S = iq.shape[1], ik.shape[1]
    bq = min(q_block, T)
    targets_p, ik_p, kvalid = _prepare(targets, ik, key_valid, k_block)
    nk = ik_p.shape[1] // k_block
    qbs, lbs, iqb, iwb, qib, qsb = _blocks(targets_p, iq, iw, query_index, query_start, bq)
    gb, lseb = to_query_blocks(g, bq), to_query_blocks(lse, bq)
    Pb = to_query_blocks(jnp.where(has, P, 1.0), bq, 1.0)

    def block(dik, xs):
        qb_l, lb_l, iq_b, iw_b, qi, qs, g_b, lse_b, P_b = xs

        def step(j, carry):
            diq, diw, dik = carry
            start = j * k_block
            ok = block_mask(kvalid, qi, qs, start, k_block)
            k_blk = jax.lax.dynamic_slice_in_dim(ik_p, start, k_block, axis=1)
            scores, pull = jax.vjp(lambda q, k, w: index_scores(q, k, w, index_scale), iq_b, k_blk, iw_b)
            p = attention_mass(targets_p, qb_l, lb_l, start, k_block, ok, scale)
            soft = jnp.exp(jnp.where(ok, scores, -jnp.inf) - jnp.where(jnp.isfinite(lse_b), lse_b, 0.0)[..., None])
            d = jnp.where(ok, g_b[..., None] * (soft - p / P_b[..., None]), 0.0)
            dq, dk, dw = pull(d)
            dik = jax.lax.dynamic_update_slice_in_dim(
                dik, jax.lax.dynamic_slice_in_dim(dik, start, k_block, axis=1) + dk, start, axis=1)
            return diq + dq, diw + dw, dik

        lo, hi = key_block_range(qi, qs, k_block, nk)
        diq0 = jnp.zeros(iq_b.shape, jnp.float32)
        diw0 = jnp.zeros(iw_b.shape, jnp.float32)
        diq, diw, dik = jax.lax.fori_loop(lo, hi, step, (diq0, diw0, dik))
        return dik, (diq, diw)

    dik0 = jnp.zeros(ik_p.shape, jnp.float32)
    dik, (diq, diw) = jax.lax.scan(block, dik0, (qbs, lbs, iqb, iwb, qib, qsb, gb, lseb, Pb))
    diq, diw = from_query_blocks(diq, T), from_query_blocks(diw, T)
    return (None, diq.astype(iq.dtype), dik[:, :S].astype(ik.dtype), diw.astype(iw.dtype), None, None, None)


_kl.defvjp(_kl_fwd, _kl_bwd)


def dense_indexer_kl(targets, iq, ik, iw, *, key_valid, query_index, query_start, scale: float,
                     index_scale: float, q_block: int, k_block: int = 512):
    """Per-query KL(p || softmax(indexer scores)) over every allowed key.

    targets: one (q [B,T,H,Dk], kv [B,S,Dk'], lse [B,T,H]) per attention layer the indexer serves (absorbed
    queries, latent rows, `dense_mla`'s lse; no gradient); iq [B,T,HI,DI], ik [B,S,DI], iw [B,T,HI] the
    indexer's queries, keys and head weights; key_valid [B,S]; query_index / query_start [B,T] int32 (as
    `dense_mla`). scale: attention's; index_scale: the indexer's. -> (kl [B,T] float32, has [B,T] bool: the
    query has an allowed key; kl is 0 where it has none). Differentiable with respect to iq, ik and iw."""
    check_q_block(q_block)
    targets = tuple(tuple(jax.lax.stop_gradient(a) for a in t) for t in targets)
    return _kl(targets, iq, ik, iw, key_valid, query_index, query_start, scale, index_scale, q_block, k_block)
