"""The chunked DSA references against dense, whole-sequence computations (small shapes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dsa_indexer import indexer_topk
from pallas_kernels.sparse_mla import sparse_mla


def dense_scores(q, k, w, key_valid, scale):
    s = np.einsum("bthd,bsd->bths", q, k) * scale
    s = np.einsum("bths,bth->bts", np.maximum(s, 0), w)
    T, S = s.shape[1:]
    allowed = key_valid[:, None, :] & (np.arange(S)[None, None, :] <= np.arange(T)[None, :, None])
    return np.where(allowed, s, -np.inf)


@pytest.mark.parametrize("T,topk,q_block", [(37, 8, 8), (20, 64, 7), (64, 16, 64)])
def test_indexer_topk_equals_dense_topk(T, topk, q_block):
    B, H, D = 2, 4, 16
    rng = np.random.default_rng(T)
    q, k = rng.normal(size=(B, T, H, D)).astype(np.float32), rng.normal(size=(B, T, D)).astype(np.float32)
    w = rng.normal(size=(B, T, H)).astype(np.float32)
    key_valid = np.ones((B, T), bool)
    key_valid[0, :5] = False  # left padding
    qi = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    idx = np.asarray(indexer_topk(q, k, w, key_valid=key_valid, query_index=qi, topk=topk, scale=D**-0.5,
                                  q_block=q_block))
    K = min(topk, T)
    assert idx.shape == (B, T, K)
    scores = dense_scores(q, k, w, key_valid, D**-0.5)
    for b in range(B):
        for t in range(T):
            finite = np.isfinite(scores[b, t])
            n_valid = int(finite.sum())
            want = set(np.argsort(-scores[b, t], kind="stable")[: min(K, n_valid)].tolist())
            got = idx[b, t]
            assert set(got[got >= 0].tolist()) == want, (b, t)
            assert (got < 0).sum() == K - min(K, n_valid)  # empty slots marked, not filled with masked keys


def test_indexer_topk_ties_are_deterministic():
    B, T, H, D = 1, 16, 2, 8
    q = np.zeros((B, T, H, D), np.float32)  # every score ties at 0
    k = np.ones((B, T, D), np.float32)
    w = np.ones((B, T, H), np.float32)
    qi = np.arange(T, dtype=np.int32)[None]
    args = dict(key_valid=np.ones((B, T), bool), query_index=qi, topk=4, scale=1.0)
    a = np.asarray(indexer_topk(q, k, w, q_block=4, **args))
    b = np.asarray(indexer_topk(q, k, w, q_block=16, **args))
    np.testing.assert_array_equal(a, b)
    assert set(a[0, 10].tolist()) == {0, 1, 2, 3}  # ties go to the lowest key index


def dense_sparse_mla(q, kv, idx, scale, v_dim):
    B, T, H, _ = q.shape
    S = kv.shape[1]
    sel = np.zeros((B, T, S), bool)
    for b in range(B):
        for t in range(T):
            sel[b, t, idx[b, t][idx[b, t] >= 0]] = True
    logits = jnp.einsum("bthd,bsd->bths", q, kv) * scale
    logits = jnp.where(sel[:, :, None, :], logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    p = jnp.where(sel.any(-1)[:, :, None, None], p, 0.0)
    return jnp.einsum("bths,bsv->bthv", p, kv[..., :v_dim])


def test_sparse_mla_equals_dense_masked_attention_forward_and_backward():
    B, T, H, Dk, v_dim, K = 2, 24, 3, 40, 32, 6
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, H, Dk)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(B, T, Dk)), jnp.float32)
    idx = np.full((B, T, K), -1, np.int32)
    for b in range(B):
        for t in range(T):
            n = min(K, t + 1) - (t % 5 == 0)  # some queries with fewer rows, one with none
            idx[b, t, :max(n, 0)] = rng.choice(t + 1, size=max(n, 0), replace=False)
    scale = Dk**-0.5

    def ours(q, kv):
        return sparse_mla(q, kv, jnp.asarray(idx), scale=scale, v_dim=v_dim, q_block=5)[0]

    np.testing.assert_allclose(ours(q, kv), dense_sparse_mla(q, kv, idx, scale, v_dim), atol=1e-5)
    assert np.all(np.asarray(ours(q, kv))[0, 0] == 0)  # query 0 has no row: zeros, not NaN
    ct = jnp.asarray(rng.normal(size=(B, T, H, v_dim)), jnp.float32)
    g_ours = jax.grad(lambda q, kv: jnp.sum(ours(q, kv) * ct), argnums=(0, 1))(q, kv)
    g_ref = jax.grad(lambda q, kv: jnp.sum(dense_sparse_mla(q, kv, idx, scale, v_dim) * ct), argnums=(0, 1))(q, kv)
    for a, b in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert np.all(np.isfinite(np.asarray(a)))
