"""The chunked DSA references and the indexer-loss terms against dense, whole-sequence computations (small
shapes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pallas_kernels.dsa_indexer import indexer_scores_at, indexer_topk
from pallas_kernels.sparse_mla import attention_probs_at, merge_shards, sparse_mla


def dense_scores(q, k, w, key_valid, scale, query_start=None):
    s = np.einsum("bthd,bsd->bths", q, k) * scale
    s = np.einsum("bths,bth->bts", np.maximum(s, 0), w)
    T, S = s.shape[1:]
    s_idx = np.arange(S)[None, None, :]
    allowed = key_valid[:, None, :] & (s_idx <= np.arange(T)[None, :, None])
    if query_start is not None:
        allowed &= s_idx >= query_start[:, :, None]
    return np.where(allowed, s, -np.inf)


@pytest.mark.parametrize("T,topk,q_block,docs", [(37, 8, 8, False), (20, 64, 7, False), (64, 16, 64, False),
                                                 (37, 8, 8, True), (20, 64, 7, True)])
def test_indexer_topk_equals_dense_topk(T, topk, q_block, docs):
    B, H, D = 2, 4, 16
    rng = np.random.default_rng(T)
    q, k = rng.normal(size=(B, T, H, D)).astype(np.float32), rng.normal(size=(B, T, D)).astype(np.float32)
    w = rng.normal(size=(B, T, H)).astype(np.float32)
    key_valid = np.ones((B, T), bool)
    key_valid[0, :5] = False  # left padding
    qi = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    # Packed documents: row 0 holds documents of 9 tokens (the first starts inside the padding), row 1 of 4.
    qs = np.stack([qi[0] // 9 * 9, qi[1] // 4 * 4]).astype(np.int32) if docs else None
    idx = np.asarray(indexer_topk(q, k, w, key_valid=key_valid, query_index=qi, query_start=qs, topk=topk,
                                  scale=D**-0.5, q_block=q_block))
    K = min(topk, T)
    assert idx.shape == (B, T, K)
    scores = dense_scores(q, k, w, key_valid, D**-0.5, qs)
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


def test_attention_over_rows_split_across_devices_merges_by_log_sum_exp():
    """Each of 4 devices attends over its own share of every query's rows (local indices into its quarter of
    kv); merge_shards gives the single-device output and lse, including queries whose rows all sit on one
    shard and a query with no row at all (zeros and -inf, not NaN)."""
    B, T, S, H, Dk, v_dim, K, n = 2, 6, 32, 3, 24, 16, 8, 4
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(B, T, H, Dk)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(B, S, Dk)), jnp.float32)
    idx = np.stack([[rng.choice(S, K, replace=False) for _ in range(T)] for _ in range(B)]).astype(np.int32)
    idx[0, 1] = np.arange(K) + 16  # all on shard 2
    idx[1, 2] = -1  # nothing selected
    kw = dict(scale=Dk**-0.5, v_dim=v_dim, q_block=4)
    want_out, want_lse = sparse_mla(q, kv, jnp.asarray(idx), **kw)
    # Shard j keeps its rows, in local indices, in K slots (-1 elsewhere).
    local = np.concatenate([np.where(idx // (S // n) == j, idx % (S // n), -1) for j in range(n)], axis=-1)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("context",))

    def shard(kv, ix):
        return merge_shards(*sparse_mla(q, kv, ix, **kw), ("context",))

    out, lse = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=(P(None, "context"), P(None, None, "context")),
                                     out_specs=(P(), P())))(kv, jnp.asarray(local))
    np.testing.assert_allclose(out, want_out, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)
    assert np.all(np.asarray(out)[1, 2] == 0) and np.all(np.isneginf(np.asarray(lse)[1, 2]))


# ---- indexer-loss terms


def _selection(rng, B, T, S, K):
    """Distinct causal indices per query, with empty slots (short contexts, scattered, one query with none)."""
    idx = np.full((B, T, K), -1, np.int32)
    for b in range(B):
        for t in range(T):
            n = min(K, t + 1)
            idx[b, t, :n] = rng.choice(t + 1, size=n, replace=False)
    idx[rng.random(idx.shape) < 0.2] = -1
    idx[0, 2] = -1
    return idx


def test_indexer_scores_at_equals_dense_scores_and_gradients():
    B, T, H, D, K = 2, 19, 4, 16, 6
    rng = np.random.default_rng(7)
    q, k = rng.normal(size=(B, T, H, D)).astype(np.float32), rng.normal(size=(B, T, D)).astype(np.float32)
    w = rng.normal(size=(B, T, H)).astype(np.float32)
    idx = _selection(rng, B, T, T, K)
    scale = D**-0.5

    def dense(q, k, w):  # every key scored, then the selected ones read out
        s = jnp.einsum("bths,bth->bts", jax.nn.relu(jnp.einsum("bthd,bsd->bths", q, k) * scale), w)
        return jnp.where(idx >= 0, jnp.take_along_axis(s, jnp.maximum(jnp.asarray(idx), 0), axis=-1), -jnp.inf)

    got = indexer_scores_at(q, k, w, jnp.asarray(idx), scale=scale, q_block=4)
    want = dense(q, k, w)
    assert got.shape == (B, T, K) and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.isneginf(got), idx < 0)
    np.testing.assert_allclose(np.asarray(got)[idx >= 0], np.asarray(want)[idx >= 0], rtol=1e-5, atol=1e-5)
    # A loss over the selected slots only (the -inf ones masked), as the indexer loss uses them.
    ct = rng.normal(size=(B, T, K)).astype(np.float32)
    loss = lambda f: lambda *a: jnp.sum(jnp.where(idx >= 0, f(*a), 0.0) * ct)
    g_got = jax.grad(loss(lambda *a: indexer_scores_at(*a, jnp.asarray(idx), scale=scale, q_block=4)),
                     argnums=(0, 1, 2))(q, k, w)
    g_want = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, w)
    for a, b in zip(g_got, g_want, strict=True):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # Head-split partial sums add up to the whole (what a psum over the tensor axis computes).
    halves = [indexer_scores_at(q[:, :, s], k, w[:, :, s], jnp.asarray(idx), scale=scale, q_block=8)
              for s in (slice(0, 2), slice(2, 4))]
    np.testing.assert_allclose(np.asarray(halves[0] + halves[1])[idx >= 0], np.asarray(got)[idx >= 0], atol=1e-5)
    assert np.isneginf(np.asarray(halves[0] + halves[1])[idx < 0]).all()


def test_indexer_scores_at_backward_holds_one_block_of_gathered_keys():
    """Each query block is a checkpoint: the gradient's compiled temporaries stay far below the [T, K, D] gather
    that a plain map's linearisation saves over all blocks (128 MiB here; 16 GiB per chip for GLM-5.2)."""
    B, T, H, D, K = 1, 1024, 4, 128, 256
    f = lambda q, k, w, i: jnp.sum(jnp.where(i >= 0, indexer_scores_at(q, k, w, i, scale=0.1, q_block=128), 0))  # noqa: E731
    shapes = [jax.ShapeDtypeStruct(s, d) for s, d in (((B, T, H, D), jnp.float32), ((B, T, D), jnp.float32),
                                                      ((B, T, H), jnp.float32), ((B, T, K), jnp.int32))]
    compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(*shapes).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 0.5 * B * T * K * D * 4


def test_attention_probs_at_equals_dense_softmax():
    B, T, H, Dk, v_dim, K = 2, 13, 3, 40, 32, 5
    rng = np.random.default_rng(8)
    q = jnp.asarray(rng.normal(size=(B, T, H, Dk)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(B, T, Dk)), jnp.float32)
    idx = _selection(rng, B, T, T, K)
    scale = Dk**-0.5
    _, lse = sparse_mla(q, kv, jnp.asarray(idx), scale=scale, v_dim=v_dim, q_block=4)
    got = attention_probs_at(q, kv, jnp.asarray(idx), lse, scale=scale, q_block=3)
    # Dense: softmax over every key restricted to the selected ones, summed over heads, read at the slots.
    sel = np.zeros((B, T, T), bool)
    for b in range(B):
        for t in range(T):
            sel[b, t, idx[b, t][idx[b, t] >= 0]] = True
    logits = jnp.where(sel[:, :, None, :], jnp.einsum("bthd,bsd->bths", q, kv) * scale, -jnp.inf)
    p = jnp.nan_to_num(jax.nn.softmax(logits, axis=-1)).sum(axis=2)  # [B,T,S]; NaN rows are queries with none
    want = np.where(idx >= 0, np.take_along_axis(np.asarray(p), np.maximum(idx, 0), axis=-1), 0.0)
    assert got.shape == (B, T, K) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got).sum(-1)[idx.max(-1) >= 0], H, rtol=1e-5)  # each head sums to 1
    assert np.all(np.asarray(got)[0, 2] == 0)  # the query with no row
    # No gradient flows through it; a lane-padded (wider) cache gives the same result.
    g = jax.grad(lambda q: jnp.sum(attention_probs_at(q, kv, jnp.asarray(idx), lse, scale=scale, q_block=3)))(q)
    assert not np.asarray(g).any()
    wide = jnp.concatenate([kv, jnp.ones((B, T, 24), jnp.float32)], axis=-1)
    np.testing.assert_allclose(attention_probs_at(q, wide, jnp.asarray(idx), lse, scale=scale, q_block=3), got,
                               rtol=1e-6)
