"""GPU (Pallas Triton) DSA kernels: interpret-mode numerics against the pure-JAX references on CPU, and
lowering for an abstract H200 at the real GLM-5.2 shapes (lowering only: no GPU here, nothing compiles)."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from pallas_kernels.blocks import tuned_blocks
from pallas_kernels.dsa_indexer.gpu import indexer_scores_gpu, quantize_keys_fp8
from pallas_kernels.dsa_indexer.reference import indexer_scores_block
from pallas_kernels.quantize import QuantizedRows
from pallas_kernels.sparse_mla.gpu import sparse_mla_bwd_gpu, sparse_mla_fwd_gpu
from pallas_kernels.sparse_mla.reference import sparse_mla_reference

SCORES = tuned_blocks("indexer_scores", "gpu")
FWD = tuned_blocks("sparse_mla_fwd", "gpu")
BWD = tuned_blocks("sparse_mla_bwd", "gpu")


def _scores_blocks(block_k, block_rows=SCORES.block_rows):
    return dataclasses.replace(SCORES, block_k=block_k, block_rows=block_rows)

# jax 0.12 deprecates the Pallas Triton backend (in favour of Mosaic GPU); it still lowers and is what we test.
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

TRITON_CALL = "__gpu$xla.gpu.triton"


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def _assert_scores_close(out, ref, atol, rtol):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(ref))  # the same masked positions
    fin = np.isfinite(ref)
    assert fin.any()
    np.testing.assert_allclose(out[fin], ref[fin], atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------------------
# indexer scores


def _indexer_inputs(B, T, H, D, S, dtype, seed=0):
    kq, kk, kw = _keys(3, seed)
    q = jax.random.normal(kq, (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, D), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (B, T, H), jnp.float32) * H**-0.5
    return q, k, w


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("block_rows", [128, 8])
def test_indexer_scores_match_reference(dtype, block_rows):
    """Ragged S (70, not a multiple of 32), left padding in batch row 1, query positions spread over the
    context (the causal skip drops whole key blocks for the early ones), several query blocks (block_rows=8:
    4 queries per program, the 16-row minimum)."""
    B, T, H, D, S = 2, 5, 4, 32, 70
    q, k, w = _indexer_inputs(B, T, H, D, S, dtype)
    key_valid = jnp.ones((B, S), bool).at[1, :9].set(False)
    query_index = jnp.array([[0, 3, 20, 40, 69], [9, 31, 32, 64, 65]], jnp.int32)
    out = indexer_scores_gpu(q, k, w, key_valid, query_index, scale=D**-0.5, blocks=_scores_blocks(32, block_rows),
                             interpret=True)
    ref = indexer_scores_block(q, k, w, key_valid, query_index, D**-0.5)
    tol = 1e-5 if dtype == jnp.float32 else 1e-4  # bf16 products are exact in f32: only summation order differs
    _assert_scores_close(out, ref, atol=tol, rtol=tol)
    # query 0 of row 0 sees only key 0; query 0 of row 1 sees only key 9 (keys 0..8 are padding)
    assert np.isfinite(np.asarray(out)[0, 0]).sum() == 1 and np.isfinite(np.asarray(out)[1, 0]).sum() == 1


def test_indexer_scores_document_masking():
    """Packed documents (query_start): keys before a query's document are masked; in row 0 every query's
    document starts at or after key 32, so the first 32-key tile is skipped outright; one query sees nothing."""
    B, T, H, D, S = 2, 6, 4, 32, 100
    q, k, w = _indexer_inputs(B, T, H, D, S, jnp.float32, seed=4)
    key_valid = jnp.ones((B, S), bool).at[1, :3].set(False)
    query_index = jnp.array([[40, 41, 60, 70, 90, 99], [2, 10, 20, 30, 50, 99]], jnp.int32)
    query_start = jnp.array([[32, 41, 41, 65, 65, 95], [0, 0, 11, 11, 51, 60]], jnp.int32)
    out = indexer_scores_gpu(q, k, w, key_valid, query_index, scale=D**-0.5, query_start=query_start,
                             blocks=_scores_blocks(32, 8), interpret=True)
    ref = indexer_scores_block(q, k, w, key_valid, query_index, D**-0.5, query_start)
    _assert_scores_close(out, ref, atol=1e-5, rtol=1e-5)
    out = np.asarray(out)
    assert np.isneginf(out[0, :, :32]).all() and np.isfinite(out[0, 1]).sum() == 1  # only key 41
    assert np.isneginf(out[1, 4]).all() and np.isfinite(out[1, 0]).sum() == 0  # empty: 51 > 50; padding


def test_indexer_scores_decode_query_at_end_of_long_context():
    """One decode query per sequence at the end of a (longer) context, with H padded 3 -> 4 and D 48 -> 64."""
    B, T, H, D, S = 2, 1, 3, 48, 300
    q, k, w = _indexer_inputs(B, T, H, D, S, jnp.bfloat16, seed=1)
    key_valid = jnp.ones((B, S), bool).at[0, :17].set(False)
    query_index = jnp.array([[S - 1], [250]], jnp.int32)
    out = indexer_scores_gpu(q, k, w, key_valid, query_index, scale=D**-0.5, blocks=_scores_blocks(64),
                             interpret=True)
    ref = indexer_scores_block(q, k, w, key_valid, query_index, D**-0.5)
    _assert_scores_close(out, ref, atol=1e-4, rtol=1e-4)
    assert np.isfinite(np.asarray(out)[1, 0]).sum() == 251


@pytest.mark.parametrize("q_dtype", [jnp.bfloat16, jnp.float32])
def test_indexer_scores_fp8_keys_match_dequantized_reference(q_dtype):
    B, T, H, D, S = 1, 4, 4, 32, 50
    q, k, w = _indexer_inputs(B, T, H, D, S, jnp.float32, seed=2)
    q = q.astype(q_dtype)
    k = k * jnp.linspace(0.1, 10.0, S)[None, :, None]  # per-token magnitudes differ: the scale matters
    k_fp8, k_scale = quantize_keys_fp8(k)
    assert k_fp8.dtype == jnp.float8_e4m3fn and k_scale.shape == (B, S) and k_scale.dtype == jnp.float32
    key_valid = jnp.ones((B, S), bool)
    query_index = jnp.array([[10, 20, 33, 49]], jnp.int32)
    out = indexer_scores_gpu(q, k_fp8, w, key_valid, query_index, scale=D**-0.5, k_scale=k_scale,
                             blocks=_scores_blocks(16), interpret=True)
    k_deq = k_fp8.astype(jnp.float32) * k_scale[..., None]
    ref = indexer_scores_block(q, k_deq, w, key_valid, query_index, D**-0.5)
    _assert_scores_close(out, ref, atol=1e-4, rtol=1e-4)


def test_quantize_keys_fp8_error_is_bounded():
    k = jax.random.normal(_keys(1, 3)[0], (2, 64, 128), jnp.float32) * jnp.arange(1, 65)[None, :, None]
    k = k.at[1, 5].set(0.0)  # an all-zero row must not divide by zero
    k_fp8, k_scale = quantize_keys_fp8(k)
    k_deq = np.asarray(k_fp8.astype(jnp.float32) * k_scale[..., None])
    amax = np.abs(np.asarray(k)).max(-1, keepdims=True)
    assert np.all(np.abs(k_deq - np.asarray(k)) <= amax * 2.0**-4 + 1e-12)  # e4m3: 3 mantissa bits
    assert np.all(k_deq[1, 5] == 0.0) and float(k_scale[1, 5]) == 1.0
    np.testing.assert_allclose(np.abs(k_deq).max(-1), amax[..., 0], rtol=1e-6)  # amax maps to 448 exactly


def test_indexer_scores_rejects_bad_inputs():
    q, k, w = _indexer_inputs(1, 2, 4, 32, 16, jnp.bfloat16)
    kv, qi = jnp.ones((1, 16), bool), jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="k_scale"):
        indexer_scores_gpu(q, k.astype(jnp.float8_e4m3fn), w, kv, qi, scale=1.0, blocks=SCORES, interpret=True)
    with pytest.raises(ValueError, match="does not match"):
        indexer_scores_gpu(q, k[..., :16], w, kv, qi, scale=1.0, blocks=SCORES, interpret=True)
    with pytest.raises(ValueError, match="query_start"):
        indexer_scores_gpu(q, k, w, kv, qi, query_start=qi[:, :1], scale=1.0, blocks=SCORES, interpret=True)


# ----------------------------------------------------------------------------------------------------------
# sparse MLA


def _mla_inputs(B, T, H, Dk, S, K, dtype, seed=0):
    kq, kk, kd = _keys(3, seed)
    q = jax.random.normal(kq, (B, T, H, Dk), jnp.float32).astype(dtype)
    kv = jax.random.normal(kk, (B, S, Dk), jnp.float32).astype(dtype)
    rng = np.random.RandomState(seed)
    idx = np.stack([np.stack([rng.permutation(S)[:K] for _ in range(T)]) for _ in range(B)]).astype(np.int32)
    idx[0, 0, 5:] = -1  # short context: trailing empty slots
    idx[0, 1, :] = -1  # a query with no valid row
    if T > 2:
        idx[B - 1, 2, ::3] = -1  # empty slots scattered
    return q, kv, jnp.asarray(idx), kd


def _check_fwd(q, kv, idx, v_dim, tol, block_k, q_block=8, **kw):
    scale = q.shape[-1] ** -0.5
    blocks = dataclasses.replace(FWD, block_k=block_k)
    out, lse = sparse_mla_fwd_gpu(q, kv, idx, scale=scale, v_dim=v_dim, q_block=q_block, blocks=blocks,
                                  interpret=True, **kw)
    ref_out, ref_lse = sparse_mla_reference(q, kv, idx, scale=scale, v_dim=v_dim, q_block=8)
    assert out.dtype == q.dtype and out.shape == ref_out.shape and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=tol, rtol=tol)
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert np.isneginf(lse[0, 1]).all() and np.all(np.asarray(out)[0, 1] == 0)  # the query with no valid row
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=tol, rtol=tol)
    return out, lse


@pytest.mark.parametrize("num_splits,q_block", [(1, 8), (2, 8), (None, 8), (2, 2)])
def test_sparse_mla_fwd_matches_reference(num_splits, q_block):
    """Dk = 64 + 32, ragged K = 20 over blocks of 16, empty slots, a query with no valid row; split-K too;
    q_block = 2: two query blocks (the last one padded)."""
    q, kv, idx, _ = _mla_inputs(2, 3, 4, 96, 50, 20, jnp.float32)
    _check_fwd(q, kv, idx, 64, 1e-5, block_k=16, q_block=q_block, num_splits=num_splits)


def test_sparse_mla_fwd_glm_row_layout_bf16():
    """The GLM-5.2 row (512 latent + 64 rope), bf16, 4 heads (padded to 16 in the kernel), 2 splits."""
    q, kv, idx, _ = _mla_inputs(1, 2, 4, 576, 40, 24, jnp.bfloat16, seed=1)
    _check_fwd(q, kv, idx, 512, 2e-2, block_k=16, num_splits=2)


def _check_bwd(q, kv, idx, kd, v_dim, tol, block_k, block_h=BWD.block_h, q_block=8):
    scale = q.shape[-1] ** -0.5
    out, lse = sparse_mla_fwd_gpu(q, kv, idx, scale=scale, v_dim=v_dim, q_block=8,
                                  blocks=dataclasses.replace(FWD, block_k=16), interpret=True)
    d_out = jax.random.normal(kd, out.shape, jnp.float32).astype(q.dtype)

    def loss(q, kv):
        o, _ = sparse_mla_reference(q, kv, idx, scale=scale, v_dim=v_dim, q_block=8)
        return jnp.sum(o.astype(jnp.float32) * d_out.astype(jnp.float32))

    ref_dq, ref_dkv = jax.grad(loss, argnums=(0, 1))(q, kv)
    blocks = dataclasses.replace(BWD, block_k=block_k, block_h=block_h)
    dq, dkv = sparse_mla_bwd_gpu(q, kv, idx, out, lse, d_out, scale=scale, v_dim=v_dim, q_block=q_block,
                                 blocks=blocks, interpret=True)
    assert dq.dtype == q.dtype and dkv.dtype == kv.dtype and dq.shape == q.shape and dkv.shape == kv.shape
    f32 = lambda x: np.asarray(x, np.float32)
    assert np.all(f32(dq)[0, 1] == 0)  # no valid row, no gradient
    never = np.setdiff1d(np.arange(kv.shape[1]), np.asarray(idx)[0])  # rows batch 0 never selected
    assert np.all(f32(dkv)[0, never] == 0)
    np.testing.assert_allclose(f32(dq), f32(ref_dq), atol=tol, rtol=tol)
    np.testing.assert_allclose(f32(dkv), f32(ref_dkv), atol=tol, rtol=tol)


@pytest.mark.parametrize("block_h,q_block", [(16, 8), (32, 8), (32, 2)])
def test_sparse_mla_bwd_matches_grad_of_reference(block_h, q_block):
    """dq / dkv against jax.grad through the reference; H = 20 pads to 32, so block_h=16 makes 2 head blocks
    whose row gradients meet in the same dkv rows; q_block = 2: the dkv accumulator is carried over 2 blocks."""
    q, kv, idx, kd = _mla_inputs(2, 3, 20, 96, 50, 20, jnp.float32, seed=2)
    _check_bwd(q, kv, idx, kd, 64, 1e-4, block_k=16, block_h=block_h, q_block=q_block)


def test_sparse_mla_bwd_glm_row_layout_bf16():
    q, kv, idx, kd = _mla_inputs(1, 2, 4, 576, 40, 24, jnp.bfloat16, seed=3)
    _check_bwd(q, kv, idx, kd, 512, 5e-2, block_k=16)


def test_sparse_mla_rejects_row_split_that_is_not_powers_of_two():
    q, kv, idx, _ = _mla_inputs(1, 2, 4, 96, 20, 8, jnp.float32)
    kw = dict(scale=1.0, q_block=8, blocks=FWD, interpret=True)
    with pytest.raises(ValueError, match="powers of two"):
        sparse_mla_fwd_gpu(q, kv, idx, v_dim=48, **kw)
    with pytest.raises(ValueError, match="dtype"):
        sparse_mla_fwd_gpu(q.astype(jnp.bfloat16), kv, idx, v_dim=64, **kw)


# ----------------------------------------------------------------------------------------------------------
# lowering for an abstract H200 at the real GLM-5.2 shapes


H200_MESH = AbstractMesh((1,), ("x",), (AxisType.Explicit,),
                         abstract_device=AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda"))
S_REAL, K_REAL = 131072, 2048


def _lower_h200(fn, *args) -> str:
    with jax.sharding.use_abstract_mesh(H200_MESH):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _grids(text):
    return [tuple(int(v) for v in g) for g in re.findall(r"grid_x = (\d+).*?grid_y = (\d+).*?grid_z = (\d+)", text)]


@pytest.mark.parametrize("k_dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
@pytest.mark.parametrize("B,T", [(1, 64), (8, 1)])
def test_indexer_scores_lowers_for_h200(k_dtype, B, T):
    sds = jax.ShapeDtypeStruct
    args = [sds((B, T, 32, 128), jnp.bfloat16), sds((B, S_REAL, 128), k_dtype), sds((B, T, 32), jnp.float32),
            sds((B, S_REAL), jnp.bool_), sds((B, T), jnp.int32), sds((B, T), jnp.int32)]
    fp8 = k_dtype == jnp.float8_e4m3fn
    if fp8:
        args.append(sds((B, S_REAL), jnp.float32))

    def f(q, k, w, key_valid, query_index, query_start, k_scale=None):
        return indexer_scores_gpu(q, k, w, key_valid, query_index, scale=128**-0.5, query_start=query_start,
                                  k_scale=k_scale, blocks=SCORES)

    text = _lower_h200(f, *args)
    assert text.count(TRITON_CALL) == 1 and "dsa_indexer_scores" in text
    # (query blocks of 4 (prefill) or 1 (decode) queries, key blocks of 128, batch)
    assert _grids(text) == [(T // min(T, 4), S_REAL // 128, B)]
    assert f"tensor<{B}x{T}x{S_REAL}xf32>" in text


@pytest.mark.parametrize("B,T", [(1, 64), (8, 1)])
def test_sparse_mla_fwd_bwd_lower_for_h200(B, T):
    sds = jax.ShapeDtypeStruct
    args = (sds((B, T, 64, 576), jnp.bfloat16), sds((B, S_REAL, 576), jnp.bfloat16), sds((B, T, K_REAL), jnp.int32))
    scale = 256**-0.5

    def f(q, kv, idx):
        kw = dict(scale=scale, v_dim=512, q_block=64)
        out, lse = sparse_mla_fwd_gpu(q, kv, idx, blocks=FWD, **kw)
        dq, dkv = sparse_mla_bwd_gpu(q, kv, idx, out, lse, out, blocks=BWD, **kw)
        return out, lse, dq, dkv

    text = _lower_h200(f, *args)
    assert text.count(TRITON_CALL) == 2 and "sparse_mla_fwd" in text and "sparse_mla_bwd" in text
    fwd_grid, bwd_grid = _grids(text)
    # forward: (T * head blocks, splits, B) with all 64 heads per program; splits fill ~132 SMs
    splits = {(1, 64): 4, (8, 1): 8}[(B, T)]
    assert fwd_grid == (T, splits, B)
    assert bwd_grid == (T, 2, B)  # backward: 2 head blocks of 32
    assert f"tensor<{B}x{S_REAL + 1}x576xf32>" in text  # the float32 dkv accumulator (with its dump row)


def test_sparse_mla_fwd_over_a_shared_fp8_pool_lowers_for_h200():
    """A paged FP8 serving cache at the real shapes: one pool of 1M rows for 8 decode rows of 4 tokens, its
    latent values float8_e4m3fn with per-row scales and the rope dims bf16: the forward kernel takes the
    three arrays and indexes the pool for every batch row."""
    sds = jax.ShapeDtypeStruct
    N = 8 * S_REAL
    kv = QuantizedRows(sds((1, N, 512), jnp.float8_e4m3fn), sds((1, N), jnp.float32), sds((1, N, 64), jnp.bfloat16))
    args = (sds((8, 4, 64, 576), jnp.bfloat16), kv, sds((8, 4, K_REAL), jnp.int32))

    def f(q, kv, idx):
        return sparse_mla_fwd_gpu(q, kv, idx, scale=256**-0.5, v_dim=512, q_block=64, blocks=FWD)

    text = _lower_h200(f, *args)
    assert text.count(TRITON_CALL) == 1 and "sparse_mla_fwd" in text
    assert f"tensor<1x{N}x512xf8E4M3FN>" in text and f"tensor<1x{N}x64xbf16>" in text
