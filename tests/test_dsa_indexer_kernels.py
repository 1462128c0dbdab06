"""Indexer kernels: the exact threshold top-k and the TPU scores kernel (interpret mode), plus TPU AOT compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dsa_indexer import indexer_topk
from pallas_kernels.dsa_indexer.reference import indexer_scores_block
from pallas_kernels.dsa_indexer.topk import exact_topk
from pallas_kernels.dsa_indexer.tpu import indexer_scores_tpu, kth_largest_key_tpu, quantize_keys_int8


def topk_sets(idx):
    return [[set(int(i) for i in row if i >= 0) for row in b] for b in np.asarray(idx)]


@pytest.mark.parametrize("seed", range(6))
def test_exact_topk_equals_lax_top_k(seed):
    rng = np.random.default_rng(seed)
    R, S = 7, int(rng.integers(1, 400))
    k = int(rng.integers(1, 80))
    x = rng.normal(size=(R, S)).astype(np.float32)
    x[rng.random((R, S)) < 0.3] = -np.inf  # masked keys
    x[1] = -np.inf  # a row with nothing valid
    got = np.asarray(exact_topk(jnp.asarray(x), k))
    vals, idx = jax.lax.top_k(jnp.asarray(x), min(k, S))
    assert got.shape == (R, min(k, S))
    for r in range(R):
        want = {int(i) for i, v in zip(np.asarray(idx[r]), np.asarray(vals[r]), strict=True) if v > -np.inf}
        assert {int(i) for i in got[r] if i >= 0} == want
        assert (got[r] < 0).sum() == min(k, S) - len(want)  # empty slots marked -1


@pytest.mark.parametrize("k", [1, 5, 64, 700])
def test_tpu_threshold_kernel_matches_xla_search(k):
    import functools

    rng = np.random.default_rng(k)
    x = rng.normal(size=(13, 700)).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = -np.inf
    x[2] = np.round(x[2])  # ties at the threshold
    x[3] = -np.inf
    xla = np.asarray(exact_topk(jnp.asarray(x), k))
    kernel = np.asarray(exact_topk(jnp.asarray(x), k, threshold_fn=functools.partial(kth_largest_key_tpu,
                                                                                      interpret=True)))
    np.testing.assert_array_equal(kernel, xla)


def test_exact_topk_ties_take_the_lowest_index_and_fold_signed_zero():
    x = np.array([[0.0, 1.0, -0.0, 1.0, 0.0, 1.0, -0.0, 2.0]], np.float32)
    got = set(np.asarray(exact_topk(jnp.asarray(x), 6))[0].tolist())
    assert got == {7, 1, 3, 5, 0, 2}  # 2.0, the three 1.0s, then the first two (signed) zeros


def _inputs(rng, B, T, S, H, D, dtype):
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), dtype)
    k = jnp.asarray(rng.normal(size=(B, S, D)), dtype)
    w = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
    valid = np.ones((B, S), bool)
    valid[0, :9] = False  # left padding
    qi = np.stack([np.arange(S - T, S), np.arange(T) * 3 % S])  # decode-like tail; strided queries
    return q, k, w, jnp.asarray(valid), jnp.asarray(qi, jnp.int32)


@pytest.mark.parametrize(
    "dtype,S,block_k", [(jnp.float32, 300, 128), (jnp.bfloat16, 257, 128), (jnp.float32, 64, 2048)])
def test_tpu_scores_kernel_matches_reference(dtype, S, block_k):
    rng = np.random.default_rng(S)
    B, T, H, D = 2, 20, 4, 16
    q, k, w, valid, qi = _inputs(rng, B, T, S, H, D, dtype)
    ref = np.asarray(indexer_scores_block(q, k, w, valid, qi, D**-0.5))
    got = np.asarray(indexer_scores_tpu(q, k, w, valid, qi, scale=D**-0.5, block_q=8, block_k=block_k,
                                        interpret=True))
    assert (np.isfinite(ref) == np.isfinite(got)).all()
    np.testing.assert_allclose(got[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-5, atol=1e-4)


def test_tpu_scores_kernel_int8_keys():
    rng = np.random.default_rng(1)
    B, T, S, H, D = 2, 16, 200, 4, 32
    q, k, w, valid, qi = _inputs(rng, B, T, S, H, D, jnp.float32)
    kq, ks = quantize_keys_int8(k)
    ref = np.asarray(indexer_scores_block(q, kq.astype(jnp.float32) * ks[..., None], w, valid, qi, D**-0.5))
    got = np.asarray(indexer_scores_tpu(q, kq, w, valid, qi, scale=D**-0.5, k_scale=ks, block_q=8, block_k=128,
                                        interpret=True))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="int8"):
        indexer_scores_tpu(q, kq.astype(jnp.float32), w, valid, qi, scale=1.0, k_scale=ks, interpret=True)


@pytest.mark.parametrize("T,topk,q_block", [(40, 8, 16), (24, 64, 8)])
def test_pallas_indexer_topk_equals_reference(T, topk, q_block):
    rng = np.random.default_rng(T)
    B, H, D = 2, 4, 16
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
    valid = np.ones((B, T), bool)
    valid[1, :5] = False
    qi = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    kw = dict(key_valid=jnp.asarray(valid), query_index=qi, topk=topk, scale=D**-0.5, q_block=q_block)
    ref = indexer_topk(q, k, w, impl="reference", **kw)
    got = indexer_topk(q, k, w, impl="pallas_tpu", **kw)
    assert got.shape == ref.shape
    assert topk_sets(got) == topk_sets(ref)


def test_unknown_impl_is_an_error():
    x = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="unknown kernel impl"):
        indexer_topk(x, x[:, :, 0], x[..., 0], key_valid=jnp.ones((1, 4), bool),
                     query_index=jnp.zeros((1, 4), jnp.int32), topk=2, scale=1.0, impl="splash")


# ---- ahead-of-time compilation for TPU at GLM-5.2 shapes (32 indexer heads x 128, top-k 2048)

AOT_CASES = [
    # (name, B, queries, context)
    ("prefill 8K", 1, 64, 8192),
    ("prefill 128K", 1, 64, 131072),
    ("decode 128K", 8, 1, 131072),
    pytest.param("decode 1M", 1, 1, 1048576, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(
    "topology,int8_keys", [("v5p:2x2x1", False), ("v6e:2x2", False), ("v5p:2x2x1", True)])  # int8 MXU: v5p
@pytest.mark.parametrize("name,B,T,S", AOT_CASES)
def test_indexer_compiles_for_tpu(topology, name, B, T, S, int8_keys):
    from benchmarks.compile_report import indexer_program
    from pallas_kernels.tpu_aot import compile_for_tpu

    fn, args = indexer_program(B, T, S, int8_keys)
    compiled = compile_for_tpu(fn, *args, topology=topology)
    mem = compiled.memory_analysis()
    print(f"indexer {topology} {name} int8={int8_keys}: temp {mem.temp_size_in_bytes / 2**20:.1f} MiB, "
          f"args {mem.argument_size_in_bytes / 2**20:.1f} MiB")
    # Temporaries scale with one query block's [T, S] scores (a few arrays of it), never with S x S.
    assert mem.temp_size_in_bytes < 8 * B * max(T, 8) * S * 4 + (64 << 20)
