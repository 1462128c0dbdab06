"""pallas_kernels/dense_warmup: blockwise dense MLA and the indexer KL over every key, against the sparse ops
given every allowed key (the references they must equal), with their gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.model.decoder import indexer_kl
from pallas_kernels.dense_warmup import dense_indexer_kl, dense_mla
from pallas_kernels.dsa_indexer.loss_terms import indexer_scores_at
from pallas_kernels.sparse_mla.loss_terms import attention_probs_at
from pallas_kernels.sparse_mla.reference import sparse_mla_reference

B, T, H, Dk, Dv, HI, DI = 2, 40, 3, 24, 16, 2, 8


def inputs():
    ks = jax.random.split(jax.random.key(0), 7)
    valid = jnp.ones((B, T), bool).at[1, :5].set(False)  # left padding: queries 0-4 of row 1 have no key
    tok = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    start = jnp.where(tok >= 17, 17, 0).astype(jnp.int32)  # two packed documents
    layers = [(jax.random.normal(ks[2 * i], (B, T, H, Dk)), jax.random.normal(ks[2 * i + 1], (B, T, Dk)))
              for i in range(2)]
    indexer = (jax.random.normal(ks[4], (B, T, HI, DI)), jax.random.normal(ks[5], (B, T, DI)),
               jax.random.normal(ks[6], (B, T, HI)))
    return valid, tok, start, layers, indexer


def every_allowed_key(valid, tok, start):
    """[B,T,T] indices: every key each query may see (then -1), as a top-k with k >= T selects them."""
    s = jnp.arange(T)
    allowed = valid[:, None, :] & (s <= tok[..., None]) & (s >= start[..., None])
    return -jnp.sort(-jnp.where(allowed, s, -1), axis=-1).astype(jnp.int32)


@pytest.mark.parametrize("q_block,k_block", [(16, 8), (64, 512), (7, 5)])
def test_dense_mla_equals_attention_over_every_selected_key(q_block, k_block):
    valid, tok, start, layers, _ = inputs()
    q, kv = layers[0]
    out, lse = dense_mla(q, kv, key_valid=valid, query_index=tok, query_start=start, scale=0.3, v_dim=Dv,
                         q_block=q_block, k_block=k_block)
    want, want_lse = sparse_mla_reference(q, kv, every_allowed_key(valid, tok, start), scale=0.3, v_dim=Dv,
                                          q_block=16)
    np.testing.assert_allclose(out, want, atol=2e-6)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(want_lse))
    assert not np.isfinite(lse[1, :5]).any() and not np.asarray(out[1, :5]).any()
    np.testing.assert_allclose(jnp.where(jnp.isfinite(lse), lse, 0), jnp.where(jnp.isfinite(lse), want_lse, 0),
                               atol=2e-6)


@pytest.mark.parametrize("q_block,k_block", [(7, 5)])  # blocks that divide nothing
def test_dense_indexer_kl_and_gradient_equal_the_kl_over_every_selected_key(q_block, k_block):
    """Two layers share the indexer (an IndexShare group): p is their head-summed, averaged, L1-normalised
    attention."""
    valid, tok, start, layers, indexer = inputs()
    idx = every_allowed_key(valid, tok, start)
    kw = dict(key_valid=valid, query_index=tok, query_start=start)
    targets = [(q, kv, dense_mla(q, kv, scale=0.3, v_dim=Dv, q_block=16, **kw)[1]) for q, kv in layers]

    def dense(iq, ik, iw):
        kl, has = dense_indexer_kl(targets, iq, ik, iw, scale=0.3, index_scale=0.5, q_block=q_block,
                                   k_block=k_block, **kw)
        return jnp.sum(jnp.where(valid & has, kl, 0.0)), jnp.sum(valid & has).astype(jnp.float32)

    def sparse(iq, ik, iw):
        probs = [attention_probs_at(q, kv, idx, sparse_mla_reference(q, kv, idx, scale=0.3, v_dim=Dv,
                                                                     q_block=16)[1], scale=0.3, q_block=16)
                 for q, kv in layers]
        return indexer_kl(probs, indexer_scores_at(iq, ik, iw, idx, scale=0.5, q_block=16), valid)

    got, want = dense(*indexer), sparse(*indexer)
    assert float(got[1]) == float(want[1]) == B * T - 5
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    grads = jax.grad(lambda *a: dense(*a)[0], argnums=(0, 1, 2))(*indexer)
    want_grads = jax.grad(lambda *a: sparse(*a)[0], argnums=(0, 1, 2))(*indexer)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5 * float(np.abs(w).max()))
    # The targets pass no gradient: the warm-up trains the indexers alone.
    dq = jax.grad(lambda q: dense_indexer_kl([(q, *targets[0][1:])], *indexer, scale=0.3, index_scale=0.5,
                                             q_block=q_block, k_block=k_block, **kw)[0].sum())(targets[0][0])
    assert not np.asarray(dq).any()
