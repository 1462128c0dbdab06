"""TPU (Pallas Mosaic) sparse MLA kernels: interpret mode against the reference, and AOT compiles for TPU.

The numerics run the kernels with interpret=True on CPU against `sparse_mla_reference` (forward) and its
jax.grad (backward). The compile tests build for one chip of v5p / v6e at GLM-5.2 shapes (H = 64, Dk = 576,
v = 512, K = 2048) with libtpu on this CPU host and print each program's memory analysis (pytest -s).
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.blocks import SparseMlaBwdTpuBlocks, SparseMlaFwdTpuBlocks, tuned_blocks
from pallas_kernels.sparse_mla import sparse_mla
from pallas_kernels.sparse_mla.reference import sparse_mla_reference
from pallas_kernels.sparse_mla.tpu import _plan, sparse_mla_bwd_tpu, sparse_mla_fwd_tpu

FWD = tuned_blocks("sparse_mla_fwd", "tpu")
BWD = tuned_blocks("sparse_mla_bwd", "tpu")

# ------------------------------------------------------------------------------------------ numerics


def _inputs(key, B, T, H, Dk, S, K, dtype, kv_width=None):
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (B, T, H, Dk), jnp.float32).astype(dtype)
    kv = jax.random.normal(ks[1], (B, S, Dk), jnp.float32).astype(dtype)
    # distinct indices per query, causal-ish: query t of batch b sees rows < offset + t (a left-padding pattern)
    perm = jnp.argsort(jax.random.uniform(ks[2], (B, T, S)), axis=-1)[..., :K].astype(jnp.int32)
    limit = (jnp.arange(T)[None, :, None] + jnp.array([S // 2, 0])[:B, None, None])
    idx = jnp.where(perm < limit, perm, -1)  # batch 1 starts with no visible row at all
    idx = jnp.where(jax.random.uniform(ks[3], (B, T, K)) < 0.2, -1, idx)  # scattered empty slots
    idx = idx.at[0, 3].set(-1)  # a query with no valid row
    idx = idx.at[0, 5, :].set(jnp.arange(K, dtype=jnp.int32))  # a full row of valid slots
    d_out = jax.random.normal(ks[4], (B, T, H, min(Dk, 128)), jnp.float32).astype(dtype)
    if kv_width is not None:  # a cache stored pre-padded to the lane width; the extra columns hold junk
        junk = jax.random.normal(ks[5], (B, S, kv_width - Dk), jnp.float32).astype(dtype)
        kv = jnp.concatenate([kv, junk], axis=-1)
    return q, kv, idx, d_out


def _ref_grads(q, kv, idx, d_out, scale, v_dim):
    f = lambda q, kv: jnp.sum(sparse_mla_reference(q, kv, idx, scale=scale, v_dim=v_dim, q_block=8)[0]
                              .astype(jnp.float32) * d_out.astype(jnp.float32))
    return jax.grad(f, argnums=(0, 1))(q, kv)


CASES = [
    # dtype, Dk, v_dim, q_block, k_block, atol
    pytest.param(jnp.float32, 192, 128, 8, 8, 2e-5, id="f32-Dk192-qb8-kb8"),
    pytest.param(jnp.float32, 192, 128, 64, 16, 2e-5, id="f32-Dk192-qb64-kb16"),
    pytest.param(jnp.bfloat16, 192, 128, 4, 8, 6e-2, id="bf16-Dk192-qb4-kb8"),
]


@pytest.mark.parametrize("dtype,Dk,v_dim,q_block,k_block,atol", CASES)
def test_forward_and_backward_match_reference(dtype, Dk, v_dim, q_block, k_block, atol):
    _check_against_reference(dtype, Dk, v_dim, q_block, k_block, atol)


def test_plan_keeps_q_block_and_divides_the_tokens():
    # bq is q_block (or T); tq (tokens per grid step) divides the B * bq tokens of a block.
    assert _plan(2, 13, 24, 9, 8, 24) == (9, 18, 8, 24, 3)  # 18 tokens, at most 24 // 8 = 3 per step
    assert _plan(3, 13, 24, 5, 8, 64) == (5, 15, 8, 24, 5)  # 15 tokens: 8 per step would not divide, 5 does
    assert _plan(1, 4, 2048, 128, 512, 4096) == (4, 4, 512, 2048, 4)
    with pytest.raises(ValueError, match="q_block"):
        _plan(1, 4, 16, 0, 8, 64)


def test_several_token_steps_per_call():
    """3 tokens per grid step (B * bq = 2 * 9 tokens per call: 6 token steps) and 3 k steps, forward and back."""
    _check_against_reference(jnp.float32, 192, 128, 9, 8, 2e-5, rows_per_step=24)


def _check_against_reference(dtype, Dk, v_dim, q_block, k_block, atol, rows_per_step=4096):
    B, T, H, S, K = 2, 13, 4, 40, 24
    q, kv, idx, d_out = _inputs(jax.random.key(0), B, T, H, Dk, S, K, dtype)
    d_out = d_out[..., :v_dim]
    scale = Dk**-0.5
    kw = dict(scale=scale, v_dim=v_dim, q_block=q_block, interpret=True)
    fwd_blocks = SparseMlaFwdTpuBlocks(k_block=k_block, rows_per_step=rows_per_step)
    bwd_blocks = SparseMlaBwdTpuBlocks(k_block=k_block, rows_per_step=rows_per_step)

    out, lse = sparse_mla_fwd_tpu(q, kv, idx, blocks=fwd_blocks, **kw)
    ref_out, ref_lse = sparse_mla_reference(q, kv, idx, scale=scale, v_dim=v_dim, q_block=8)
    assert out.shape == (B, T, H, v_dim) and out.dtype == dtype
    assert lse.shape == (B, T, H) and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=atol, rtol=atol)
    empty = ~np.isfinite(np.asarray(ref_lse))
    assert empty[0, 3].all() and empty[1, 0].all()  # the no-valid-row queries exist in the data
    np.testing.assert_array_equal(~np.isfinite(np.asarray(lse)), empty)
    np.testing.assert_allclose(np.where(empty, 0, lse), np.where(empty, 0, ref_lse), atol=atol, rtol=atol)
    assert not np.asarray(out, np.float32)[empty].any()

    dq, dkv = sparse_mla_bwd_tpu(q, kv, idx, out, lse, d_out, blocks=bwd_blocks, **kw)
    ref_dq, ref_dkv = _ref_grads(q, kv, idx, d_out, scale, v_dim)
    assert dq.shape == q.shape and dq.dtype == dtype and dkv.shape == kv.shape and dkv.dtype == dtype
    for got, want in ((dq, ref_dq), (dkv, ref_dkv)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        tol = atol * max(1.0, np.abs(want).max())
        np.testing.assert_allclose(got, want, atol=tol, rtol=atol)
    assert not np.asarray(dq, np.float32)[empty.any(-1)].any()


def test_prepadded_cache_and_glm_dims():
    """kv stored 640 wide (the layout a serving cache should use) at GLM's Dk = 576 / v = 512, H = 2."""
    B, T, H, Dk, S, K, v_dim = 1, 5, 2, 576, 24, 16, 512
    q, kv640, idx, _ = _inputs(jax.random.key(1), B, T, H, Dk, S, K, jnp.float32, kv_width=640)
    d_out = jax.random.normal(jax.random.key(2), (B, T, H, v_dim), jnp.float32)
    kv = kv640[..., :Dk]
    scale = Dk**-0.5
    kw = dict(scale=scale, v_dim=v_dim, q_block=4, interpret=True)
    fwd_blocks = SparseMlaFwdTpuBlocks(k_block=8, rows_per_step=4096)
    bwd_blocks = SparseMlaBwdTpuBlocks(k_block=8, rows_per_step=2048)
    out, lse = sparse_mla_fwd_tpu(q, kv640, idx, blocks=fwd_blocks, **kw)
    ref_out, ref_lse = sparse_mla_reference(q, kv, idx, scale=scale, v_dim=v_dim, q_block=4)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=2e-5)
    dq, dkv = sparse_mla_bwd_tpu(q, kv640, idx, out, lse, d_out, blocks=bwd_blocks, **kw)
    ref_dq, ref_dkv = _ref_grads(q, kv, idx, d_out, scale, v_dim)
    assert dkv.shape == (B, S, 640)
    np.testing.assert_allclose(dq, ref_dq, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(dkv[..., :Dk], ref_dkv, atol=2e-5, rtol=2e-5)
    assert not np.asarray(dkv[..., Dk:]).any()
    # the unpadded cache gives the same answer
    out2, _ = sparse_mla_fwd_tpu(q, kv, idx, blocks=fwd_blocks, **kw)
    np.testing.assert_allclose(out2, out, atol=1e-6, rtol=1e-6)


def test_bad_inputs_raise():
    q = jnp.zeros((1, 4, 2, 192))
    kv = jnp.zeros((1, 8, 192))
    idx = jnp.zeros((1, 4, 8), jnp.int32)
    kw = dict(scale=1.0, q_block=4, blocks=FWD, interpret=True)
    with pytest.raises(ValueError, match="kv width"):
        sparse_mla_fwd_tpu(q, jnp.zeros((1, 8, 200)), idx, v_dim=128, **kw)
    with pytest.raises(ValueError, match="dtype"):
        sparse_mla_fwd_tpu(q, kv.astype(jnp.bfloat16), idx, v_dim=128, **kw)
    with pytest.raises(ValueError, match="v_dim"):
        sparse_mla_fwd_tpu(q, kv, idx, v_dim=256, **kw)
    with pytest.raises(TypeError, match="SparseMlaFwdTpuBlocks"):
        sparse_mla_fwd_tpu(q, kv, idx, v_dim=128, **dict(kw, blocks=BWD))


def test_public_op_blocks_queries_for_every_impl():
    """sparse_mla with q_block < T (3 query blocks, the last one ragged): the Pallas TPU path (interpreted) and
    the reference agree forward and backward, inside the custom_vjp."""
    B, T, H, Dk, v_dim, S, K = 2, 13, 4, 192, 128, 40, 24
    q, kv, idx, d_out = _inputs(jax.random.key(3), B, T, H, Dk, S, K, jnp.float32)
    d_out = d_out[..., :v_dim]

    def run(impl, interpret):
        f = lambda q, kv: sparse_mla(q, kv, idx, scale=Dk**-0.5, v_dim=v_dim, q_block=5, impl=impl,
                                     interpret=interpret)
        (out, lse), vjp = jax.vjp(f, q, kv)
        return out, lse, *vjp((d_out, jnp.zeros_like(lse)))

    for got, want in zip(run("pallas_tpu", True), run("reference", False), strict=True):
        got, want = np.asarray(got), np.asarray(want)
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
        fin = np.isfinite(want)
        np.testing.assert_allclose(got[fin], want[fin], atol=2e-5 * max(1.0, np.abs(want[fin]).max()), rtol=2e-5)


# ---------------------------------------------------------------------------------- TPU AOT compiles

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")

H, DK, V, K = 64, 576, 512, 2048
CHIPS = ["v5p:2x2x1", "v6e:2x2"]


def _compile(topology, kind, B, T, S, kv_width=DK):
    from benchmarks.compile_report import attention_program
    from benchmarks.tpu_aot import compile_for_tpu, memory_summary

    fn, args = attention_program(B, T, S, backward=kind == "bwd", width=kv_width)  # q_block 64, tuned blocks
    compiled = compile_for_tpu(fn, *args, topology=topology)
    mem = memory_summary(compiled)
    layout = compiled.input_formats[0][1].layout.major_to_minor
    print(f"\n{topology} {kind} q[{B},{T},{H},{DK}] kv[{B},{S},{kv_width}] K={K}: {mem} kv layout {layout}")
    return compiled, mem


def _budget(B, T, S, kind, kv_width=DK):
    """What the program may hold: one query block's gathered rows (and float32 d_rows, backward), a padded copy
    and a relayout of the cache, the float32 dkv accumulator; none of it scales with T * S."""
    bq = min(64, T)
    rows = B * bq * K * 640 * 2
    cache = B * S * 640 * 2 * (2 if kv_width == DK else 0)
    if kind == "fwd":
        return 2 * rows + cache + (8 << 20)
    return 2 * rows + 2 * B * bq * K * 640 * 4 + cache + 2 * B * S * 640 * 4 + (8 << 20)


PREFILL = [(1, 64, 8192, "fwd"), (1, 64, 131072, "fwd"), (1, 64, 8192, "bwd"),
           pytest.param(1, 64, 131072, "bwd", marks=pytest.mark.slow)]
DECODE = [(8, 1, 131072, "fwd"), pytest.param(1, 1, 1048576, "fwd", marks=pytest.mark.slow)]


@needs_libtpu
@pytest.mark.parametrize("topology", CHIPS)
@pytest.mark.parametrize("B,T,S,kind", PREFILL + DECODE)
def test_compiles_for_tpu(topology, B, T, S, kind):
    compiled, mem = _compile(topology, kind, B, T, S)
    assert mem["temp_size_in_bytes"] < _budget(B, T, S, kind)
    if T > 1 and S >= 64 * K:  # where a dense [T, S, H] f32 score array outweighs one block's gathered rows
        assert mem["temp_size_in_bytes"] < T * S * H * 4
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    assert cost["flops"] >= 2 * B * T * H * K * (DK + V)  # the kernels' CostEstimate is seen


@needs_libtpu
def test_temp_memory_does_not_grow_with_tokens():
    """Four query blocks hold no more temporaries than one (lax.map walks the blocks)."""
    _, one = _compile("v5p:2x2x1", "fwd", 1, 64, 8192)
    _, four = _compile("v5p:2x2x1", "fwd", 1, 256, 8192)
    assert four["temp_size_in_bytes"] < 1.1 * one["temp_size_in_bytes"]


@needs_libtpu
def test_public_op_compiled_for_tpu_from_this_cpu_host_holds_mosaic_kernels():
    """impl="pallas_tpu", interpret=False: forward and backward of the public op (through its custom_vjp) are
    the real Mosaic kernels when compiled for a v5p here, although this host's backend is CPU."""
    from benchmarks.tpu_aot import compile_for_tpu

    sd = jax.ShapeDtypeStruct

    def loss(q, kv, idx):
        out, _ = sparse_mla(q, kv, idx, scale=0.1, v_dim=128, q_block=8, impl="pallas_tpu", interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    fn = jax.grad(loss, argnums=(0, 1))
    compiled = compile_for_tpu(fn, sd((1, 16, 8, 192), jnp.bfloat16), sd((1, 64, 192), jnp.bfloat16),
                               sd((1, 16, 32), jnp.int32), topology="v5p:2x2x1")
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 2  # sparse_mla_fwd, _bwd


@needs_libtpu
@pytest.mark.parametrize("topology", CHIPS)
def test_lane_padded_cache_is_not_copied(topology):
    """A 1M-token cache stored 640 wide is gathered in place (row-major entry layout, no cache-sized temp);
    576 wide it gets a column-major entry layout and a whole-cache relayout copy (shown for the record)."""
    S = 1 << 20
    compiled, mem = _compile(topology, "fwd", 1, 1, S, kv_width=640)
    assert compiled.input_formats[0][1].layout.major_to_minor == (0, 1, 2)
    assert mem["temp_size_in_bytes"] < 32 << 20  # the cache is 1.34 GB
