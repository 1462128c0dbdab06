"""Sampling and speculative acceptance (glmjax.serve.sampling): filters against a numpy reference, per-row
reproducible randomness, and statistical checks that rejection sampling is lossless. Small vocabularies and
many vmapped trials with fixed seeds, so every statistical test is deterministic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from glmjax.serve.sampling import (
    SamplingArrays,
    greedy_accept,
    rejection_accept,
    sample,
    sampling_arrays,
    target_probs,
)

# The file is compile-bound (a dozen small programs, each run once or twice): XLA's cheapest backend
# optimisation level roughly quarters compile time here and costs little at run time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
jit_probs = jax.jit(target_probs, compiler_options=FAST_COMPILE)
jit_sample = jax.jit(sample, compiler_options=FAST_COMPILE)  # stream traced: one compilation serves every stream
jit_reject = jax.jit(rejection_accept, compiler_options=FAST_COMPILE)
jit_greedy = jax.jit(greedy_accept, compiler_options=FAST_COMPILE)


def rows(n, temperature=1.0, top_k=0, top_p=1.0, seed0=0) -> SamplingArrays:
    return sampling_arrays([temperature] * n, [top_k] * n, [top_p] * n, range(seed0, seed0 + n))


def ref_probs(logits, temperature, top_k, top_p):
    """numpy reference for one row: logits [T, V] -> [T, V] (assumes no ties in the logits)."""
    V = logits.shape[-1]
    if temperature == 0:
        return np.eye(V, dtype=np.float32)[logits.argmax(-1)]
    out = []
    for z in logits.astype(np.float64) / temperature:
        order = np.argsort(-z)
        kk = V if top_k == 0 or top_k > V else top_k
        kept = order[:kk]
        pk = np.exp(z[kept] - z[kept].max())
        pk /= pk.sum()
        n = 1
        while n < kk and pk[:n].sum() < top_p:  # the smallest prefix with mass >= top_p
            n += 1
        p = np.zeros(V)
        p[kept[:n]] = pk[:n] / pk[:n].sum()
        out.append(p)
    return np.array(out)


def chi2_pvalue(tokens, p):
    """p-value of the counts of `tokens` against distribution p [V]; tokens outside p's support must not occur."""
    tokens = np.asarray(tokens).ravel()
    counts = np.bincount(tokens, minlength=len(p))
    support = p > 0
    assert counts[~support].sum() == 0, "drew a token of probability 0"
    p = np.asarray(p, np.float64)[support]
    return stats.chisquare(counts[support], len(tokens) * p / p.sum()).pvalue


# ------------------------------------------------------------------------------------------ target_probs


def test_sampling_arrays_key_matches_prng_key():
    seeds = [0, 7, 2**31 + 5, 2**32 + 3, 2**63 - 1, -1]
    s = sampling_arrays([1.0] * 6, [0] * 6, [1.0] * 6, seeds)
    want = np.stack([np.asarray(jax.random.key_data(jax.random.PRNGKey(x))) for x in seeds])
    np.testing.assert_array_equal(np.asarray(s.key), want)
    assert s.key.dtype == jnp.uint32 and s.temperature.dtype == jnp.float32 and s.top_k.dtype == jnp.int32


@pytest.mark.parametrize("params", [
    # (temperature, top_k, top_p) per row; the first set filters no row (the no-sort path)
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (2.5, 0, 1.0)],
    [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 1, 1.0), (1.0, 0, 0.6), (0.5, 5, 0.8), (2.0, 20, 0.95), (1.0, 0, 0.01)],
])
def test_target_probs_matches_reference(params):
    rng = np.random.default_rng(0)
    B, T, V = len(params), 3, 12
    logits = (rng.normal(size=(B, T, V)) * 2).astype(np.float32)
    t, k, p = zip(*params, strict=True)
    got = np.asarray(jit_probs(jnp.asarray(logits), sampling_arrays(t, k, p, range(B))))
    for b in range(B):
        np.testing.assert_allclose(got[b], ref_probs(logits[b], t[b], k[b], p[b]), atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)


def test_target_probs_greedy_rows_and_ties():
    logits = jnp.asarray([[[0.0, 3.0, 1.0, 3.0, 2.0]], [[0.0, 3.0, 1.0, 3.0, 2.0]]], jnp.float32)
    s = sampling_arrays([0.0, 1.0], [1, 1], [0.5, 1.0], [0, 1])
    got = np.asarray(jit_probs(logits, s))
    np.testing.assert_array_equal(got[0, 0], [0, 1, 0, 0, 0])  # greedy: argmax, lowest id on ties; filters ignored
    np.testing.assert_allclose(got[1, 0], [0, 0.5, 0, 0.5, 0])  # top-k=1 keeps both tokens tied at the k-th value


# ------------------------------------------------------------------------------------------ sample


def test_sample_reproducible_and_slot_independent():
    V, T = 16, 64
    probs = jnp.full((3, T, V), 1.0 / V)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (3, T))
    a = np.asarray(jit_sample(probs, sampling_arrays([1.0] * 3, [0] * 3, [1.0] * 3, [5, 9, 5]), pos, 0))
    np.testing.assert_array_equal(a[0], a[2])  # same seed in different slots: same tokens
    assert (a[0] != a[1]).any()
    assert len(set(a[0].tolist())) > 8  # different positions give different draws
    # The same seed in another slot of another batch, next to different requests.
    b = jit_sample(probs, sampling_arrays([1.0] * 3, [0] * 3, [1.0] * 3, [1, 2, 5]), pos, 0)
    np.testing.assert_array_equal(np.asarray(b)[2], a[0])
    np.testing.assert_array_equal(np.asarray(jit_sample(probs, rows(3), pos, 0)),
                                  np.asarray(jit_sample(probs, rows(3), pos, 0)))
    assert (np.asarray(jit_sample(probs, rows(3), pos, 1)) != np.asarray(
        jit_sample(probs, rows(3), pos, 0))).any()  # streams are independent


def test_sample_distribution_and_greedy():
    V, B, T = 10, 400, 100  # 400 seeds x 100 positions; the first two rows greedy
    p = np.random.default_rng(1).dirichlet(np.ones(V)).astype(np.float32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    s = sampling_arrays([0.0] * 2 + [1.0] * (B - 2), [0] * B, [1.0] * B, range(B))
    tokens = jit_sample(jnp.broadcast_to(jnp.asarray(p), (B, T, V)), s, pos, 0)
    assert tokens.dtype == jnp.int32
    assert (np.asarray(tokens[:2]) == p.argmax()).all()
    assert chi2_pvalue(tokens[2:], p) > 1e-3


# ------------------------------------------------------------------------------------------ acceptance


def test_greedy_accept():
    drafts = jnp.asarray([[1, 2, 3], [1, 2, 3], [1, 2, 3], [4, 2, 3]], jnp.int32)
    target = jnp.asarray([[1, 2, 3, 9], [1, 2, 7, 9], [1, 2, 3, 8], [5, 2, 3, 9]], jnp.int32)
    accepted, emitted = jit_greedy(drafts, target)
    np.testing.assert_array_equal(accepted, [3, 2, 3, 0])
    np.testing.assert_array_equal(emitted, [[1, 2, 3, 9], [1, 2, 7, 9], [1, 2, 3, 8], [5, 2, 3, 9]])


N = 200_000  # trials per statistical test: one batch row each, every row its own seed


def lossless_case(k, greedy_drafts, p_top_k=0):
    """N rows sharing fixed p [k+1, V] and q [k, V] (p optionally top-k filtered, so it has zeros)."""
    V = 8
    rng = np.random.default_rng(10 * k + greedy_drafts + p_top_k)
    p_logits = rng.normal(size=(1, k + 1, V)).astype(np.float32)
    p = np.asarray(jit_probs(jnp.asarray(p_logits), sampling_arrays([1.0], [p_top_k], [1.0], [0])))[0]
    q = rng.dirichlet(np.ones(V), size=k).astype(np.float32)
    s = rows(N, seed0=1000)
    pos = jnp.broadcast_to(jnp.arange(3, 4 + k, dtype=jnp.int32), (N, k + 1))
    pb, qb = jnp.broadcast_to(jnp.asarray(p), (N, k + 1, V)), jnp.broadcast_to(jnp.asarray(q), (N, k, V))
    if greedy_drafts:
        drafts = jnp.broadcast_to(jnp.asarray(q.argmax(-1), jnp.int32), (N, k))
        accepted, emitted = jit_reject(drafts, None, pb, s, pos)
    else:
        drafts = jit_sample(qb, s, pos[:, :k], 1)
        accepted, emitted = jit_reject(drafts, qb, pb, s, pos)
    return p, q, np.asarray(accepted), np.asarray(emitted)


def within_sigmas(hits, n, rate, sigmas=4.0):
    return abs(hits / n - rate) <= sigmas * np.sqrt(rate * (1 - rate) / n) + 1e-12


@pytest.mark.parametrize("k,greedy_drafts,p_top_k", [(1, False, 0), (3, False, 0), (1, True, 0), (3, True, 0),
                                                      (3, False, 3)])
def test_rejection_sampling_is_lossless(k, greedy_drafts, p_top_k):
    p, q, accepted, emitted = lossless_case(k, greedy_drafts, p_top_k)
    assert accepted.min() >= 0 and accepted.max() <= k
    assert chi2_pvalue(emitted[:, 0], p[0]) > 1e-3  # the first token is distributed as p_0
    rate = p[0, q[0].argmax()] if greedy_drafts else np.minimum(p[0], q[0]).sum()
    assert within_sigmas((accepted >= 1).sum(), N, rate)
    if k > 1:  # given the first draft was accepted, the second token is distributed as p_1
        assert chi2_pvalue(emitted[accepted >= 1, 1], p[1]) > 1e-3
        full = accepted == k  # and the bonus token after k acceptances as p_k
        assert full.sum() > 1000
        assert chi2_pvalue(emitted[full, k], p[k]) > 1e-3


def mixed_batch(B=32, k=3, V=8):
    """Random logits, drafts that partly match the target argmax, every other row greedy."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(B, k + 1, V)), jnp.float32)
    temps = [0.0 if b % 2 == 0 else 1.0 for b in range(B)]
    s = sampling_arrays(temps, [0] * B, [1.0] * B, range(B))
    p = jit_probs(logits, s)
    q = jit_probs(jnp.asarray(logits[:, :k] + rng.normal(size=(B, k, V)), jnp.float32), s)
    best = np.asarray(jnp.argmax(logits, -1))[:, :k]
    keep = rng.random((B, k)) < 0.7  # mostly matching drafts, so all accept counts occur
    drafts = jnp.asarray(np.where(keep, best, rng.integers(0, V, (B, k))), jnp.int32)
    pos = jnp.asarray(rng.integers(0, 100, (B, 1)) + np.arange(k + 1), jnp.int32)
    return drafts, q, p, s, pos


def test_rejection_accept_identical_p_q_accepts_all():
    drafts, _, p, s, pos = mixed_batch()
    k = drafts.shape[1]
    drafts = jit_sample(p[:, :k], s, pos[:, :k], 1)
    accepted, emitted = jit_reject(drafts, p[:, :k], p, s, pos)
    assert (np.asarray(accepted) == k).all()
    np.testing.assert_array_equal(np.asarray(emitted)[:, :k], drafts)


@pytest.mark.parametrize("with_q", [False, True])
def test_rejection_accept_greedy_rows_equal_greedy_accept(with_q):
    drafts, q, p, s, pos = mixed_batch()
    accepted, emitted = jit_reject(drafts, q if with_q else None, p, s, pos)
    g_acc, g_emit = jit_greedy(drafts, jnp.argmax(p, -1).astype(jnp.int32))
    greedy = np.asarray(s.temperature) == 0
    np.testing.assert_array_equal(np.asarray(accepted)[greedy], np.asarray(g_acc)[greedy])
    np.testing.assert_array_equal(np.asarray(emitted)[greedy], np.asarray(g_emit)[greedy])
    assert len(set(np.asarray(g_acc)[greedy].tolist())) > 1  # the batch exercises several accept counts


def test_rejection_accept_reproducible_and_slot_independent():
    drafts, q, p, s, pos = mixed_batch()
    first = jit_reject(drafts, q, p, s, pos)
    again = jit_reject(drafts, q, p, s, pos)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    perm = np.random.default_rng(4).permutation(drafts.shape[0])
    s_perm = SamplingArrays(*(x[perm] for x in s))
    shuffled = jit_reject(drafts[perm], q[perm], p[perm], s_perm, pos[perm])
    for a, b in zip(first, shuffled, strict=True):
        np.testing.assert_array_equal(np.asarray(a)[perm], np.asarray(b))
