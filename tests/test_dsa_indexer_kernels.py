"""Indexer kernels: the exact threshold top-k (on one device and over keys split across devices) and the TPU
scores kernel (interpret mode), the public op's dispatch (kernel family, block configs, document masking,
tensor-parallel score reduction, sequence-sharded keys), TPU AOT compiles."""

import dataclasses
import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pallas_kernels.blocks import BlockConfigError, IndexerScoresTpuBlocks, load_block_table, tuned_blocks
from pallas_kernels.common import kernel_family
from pallas_kernels.dsa_indexer import indexer_scores, indexer_topk
from pallas_kernels.dsa_indexer.reference import indexer_scores_block
from pallas_kernels.dsa_indexer.topk import exact_topk, sharded_topk
from pallas_kernels.dsa_indexer.tpu import indexer_scores_tpu, kth_largest_key_tpu, quantize_keys_int8
from pallas_kernels.quantize import pack_sequence
from tests.conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

TPU_SCORES = tuned_blocks("indexer_scores", "tpu")
KTH = tuned_blocks("kth_largest_key", "tpu")


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
    rng = np.random.default_rng(k)
    x = rng.normal(size=(13, 700)).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = -np.inf
    x[2] = np.round(x[2])  # ties at the threshold
    x[3] = -np.inf
    xla = np.asarray(exact_topk(jnp.asarray(x), k))
    kth = functools.partial(kth_largest_key_tpu, blocks=KTH, interpret=True)
    kernel = np.asarray(exact_topk(jnp.asarray(x), k, threshold_fn=kth))
    np.testing.assert_array_equal(kernel, xla)


def test_exact_topk_ties_take_the_lowest_index_and_fold_signed_zero():
    x = np.array([[0.0, 1.0, -0.0, 1.0, 0.0, 1.0, -0.0, 2.0]], np.float32)
    got = set(np.asarray(exact_topk(jnp.asarray(x), 6))[0].tolist())
    assert got == {7, 1, 3, 5, 0, 2}  # 2.0, the three 1.0s, then the first two (signed) zeros


@pytest.mark.parametrize("n", [2, 4, 8])
def test_sharded_topk_equals_the_single_device_topk_as_a_set(n):
    """Keys split into n contiguous shards: the union of the shards' selections is exact_topk's set, with ties
    at the threshold straddling shards (taken lowest global index first), -inf keys, a row with nothing
    valid, and k larger than one shard's keys (one shard holds the whole top-k)."""
    rng = np.random.default_rng(n)
    R, S = 6, 16 * n
    x = np.round(rng.normal(size=(R, S)) * 2).astype(np.float32)  # many ties
    x[rng.random((R, S)) < 0.2] = -np.inf
    x[1] = -np.inf
    x[2, :] = 1.0  # all tied: the first k
    x[3, -12:] = 50.0 + np.arange(12)  # the top 12 on the last shard alone
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("context",))
    for k in (5, 12, 24, 3 * S // 2):
        want = np.asarray(exact_topk(jnp.asarray(x), k))
        local = jax.jit(jax.shard_map(lambda s, k=k: sharded_topk(s, k, ("context",)), mesh=mesh,
                                      in_specs=P(None, "context"), out_specs=P(None, "context")))(jnp.asarray(x))
        parts = np.split(np.asarray(local), n, axis=-1)  # each shard reserves min(k, S / n) slots
        assert parts[0].shape[-1] == min(k, S // n)
        for r in range(R):
            got = [int(i) + j * (S // n) for j, p in enumerate(parts) for i in p[r] if i >= 0]
            assert len(got) == len(set(got))
            assert set(got) == {int(i) for i in want[r] if i >= 0}, (k, r)


@pytest.mark.parametrize("impl,interpret", [("reference", False), ("pallas_tpu", True)])
def test_indexer_topk_over_sequence_sharded_keys(impl, interpret):
    """indexer_topk with the keys split over 4 devices (key_shards; query positions relative to each shard's
    first key) selects the single-device top-k, causal and document masks included."""
    n, T = 4, 24
    q, k, w, kw = _topk_case(T, 7, docs=True)
    kw = dict(kw, topk=8, q_block=8, impl=impl, interpret=interpret)
    want = indexer_topk(q, k, w, **kw)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("context",))

    def local(k, valid):
        offset = jax.lax.axis_index("context") * k.shape[1]
        shard = dict(kw, key_valid=valid, query_index=kw["query_index"] - offset,
                     query_start=kw["query_start"] - offset, key_shards=("context",))
        return indexer_topk(q, k, w, **shard)

    got = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(None, "context"), P(None, "context")),
                                out_specs=P(None, None, "context"), check_vma=False))(k, kw["key_valid"])
    parts = np.split(np.asarray(got), n, axis=-1)
    sets = [[{int(i) + j * (T // n) for j, p in enumerate(parts) for i in p[b, t] if i >= 0} for t in range(T)]
            for b in range(2)]
    assert sets == topk_sets(want)


def _inputs(rng, B, T, S, H, D, dtype):
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), dtype)
    k = jnp.asarray(rng.normal(size=(B, S, D)), dtype)
    w = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
    valid = np.ones((B, S), bool)
    valid[0, :9] = False  # left padding
    qi = np.stack([np.arange(S - T, S), np.arange(T) * 3 % S])  # decode-like tail; strided queries
    # Packed documents: row 0's queries all start late (whole key blocks below every start: skipped), row 1's
    # start at the last multiple of 7 at or below the query (short documents); one query sees nothing.
    qs = np.stack([np.maximum(qi[0] - 40, 0) + 130, qi[1] // 7 * 7])
    qs[1, 1] = qi[1, 1] + 1
    return q, k, w, jnp.asarray(valid), jnp.asarray(qi, jnp.int32), jnp.asarray(qs, jnp.int32)


def _assert_same_scores(got, ref):
    got, ref = np.asarray(got), np.asarray(ref)
    assert (np.isfinite(ref) == np.isfinite(got)).all()
    np.testing.assert_allclose(got[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize(
    "dtype,S,block_k", [(jnp.float32, 300, 128), (jnp.bfloat16, 257, 128), (jnp.float32, 64, 2048)])
def test_tpu_scores_kernel_matches_reference(dtype, S, block_k, docs):
    rng = np.random.default_rng(S)
    B, T, H, D = 2, 20, 4, 16
    q, k, w, valid, qi, qs = _inputs(rng, B, T, S, H, D, dtype)
    qs = qs if docs else None
    ref = indexer_scores_block(q, k, w, valid, qi, D**-0.5, qs)
    blocks = IndexerScoresTpuBlocks(block_q=8, block_k=block_k)
    got = indexer_scores_tpu(q, k, w, valid, qi, scale=D**-0.5, query_start=qs, blocks=blocks, interpret=True)
    _assert_same_scores(got, ref)
    if docs:
        assert not np.isfinite(np.asarray(ref)[1, 1]).any()  # the query with an empty document
        if S > 256:
            assert not np.isfinite(np.asarray(ref)[0, :, :128]).any()  # a skipped key block


def test_tpu_scores_kernel_int8_keys():
    rng = np.random.default_rng(1)
    B, T, S, H, D = 2, 16, 200, 4, 32
    q, k, w, valid, qi, qs = _inputs(rng, B, T, S, H, D, jnp.float32)
    kq, ks = quantize_keys_int8(k)
    ref = np.asarray(indexer_scores_block(q, kq.astype(jnp.float32) * ks[..., None], w, valid, qi, D**-0.5, qs))
    blocks = IndexerScoresTpuBlocks(block_q=8, block_k=128)
    got = np.asarray(indexer_scores_tpu(q, kq, w, valid, qi, scale=D**-0.5, query_start=qs, k_scale=ks,
                                        blocks=blocks, interpret=True))
    _assert_same_scores(got, ref)
    with pytest.raises(ValueError, match="int8"):
        indexer_scores_tpu(q, kq.astype(jnp.float32), w, valid, qi, scale=1.0, k_scale=ks, blocks=TPU_SCORES,
                           interpret=True)


@pytest.mark.parametrize("keys", ["bf16", "int8", "packed"])
def test_tpu_scores_kernel_reads_keys_through_page_tables(keys):
    """Keys in a pool of pages of 256 read through page tables (scalar-prefetched; a -1 page masked by
    key_valid) score as the same keys gathered into logical order, for bf16 keys, int8 keys and int8 keys
    packed four positions per uint32 word; the public op passes the tables to the TPU kernel only."""
    rng = np.random.default_rng(4)
    B, T, H, D, page, pool_pages = 2, 4, 4, 128, 256, 7
    pool = jnp.asarray(rng.normal(size=(1, pool_pages * page, D)), jnp.float32)
    pages = jnp.asarray([[5, 0, -1], [2, 6, 3]], jnp.int32)
    S = pages.shape[1] * page
    valid = np.ones((B, S), bool)
    valid[0, 2 * page:] = False  # its third page is -1
    valid[1, -7:] = False
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.bfloat16)
    w = jnp.asarray(rng.uniform(size=(B, T, H)), jnp.float32)
    qi = jnp.asarray([[500, 501, 502, 503], [700, 701, 702, 703]], jnp.int32)
    rows = (jnp.maximum(pages, 0)[:, :, None] * page + jnp.arange(page)).reshape(B, S)
    k, k_scale = pool.astype(jnp.bfloat16), None
    if keys != "bf16":
        k, k_scale = quantize_keys_int8(pool)
    logical = dict(k=k[0][rows], k_scale=None if k_scale is None else k_scale[0][rows])
    if keys == "packed":
        k = pack_sequence(k)
    kw = dict(scale=D**-0.5, blocks=TPU_SCORES, interpret=True)
    got = indexer_scores_tpu(q, k, w, jnp.asarray(valid), qi, k_scale=k_scale, pages=pages, **kw)
    want = indexer_scores_tpu(q, logical["k"], w, jnp.asarray(valid), qi, k_scale=logical["k_scale"], **kw)
    _assert_same_scores(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="Pallas TPU kernel only"):
        indexer_topk(q, k, w, key_valid=jnp.asarray(valid), query_index=qi, topk=8, scale=1.0, q_block=4,
                     k_scale=k_scale, pages=pages)


def test_public_indexer_scores_dispatch():
    rng = np.random.default_rng(3)
    q, k, w, valid, qi, qs = _inputs(rng, 2, 8, 150, 4, 16, jnp.float32)
    kw = dict(key_valid=valid, query_index=qi, query_start=qs, scale=0.25)
    ref = indexer_scores(q, k, w, **kw)
    _assert_same_scores(indexer_scores(q, k, w, impl="pallas_tpu", interpret=True, **kw), ref)
    _assert_same_scores(indexer_scores(q, k, w, impl="pallas_gpu", interpret=True, **kw), ref)


def _topk_case(T, seed, docs):
    rng = np.random.default_rng(seed)
    B, H, D = 2, 4, 16
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
    valid = np.ones((B, T), bool)
    valid[1, :5] = False
    qi = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    kw = dict(key_valid=jnp.asarray(valid), query_index=jnp.asarray(qi), scale=D**-0.5)
    if docs:  # documents of 11 tokens packed in row 0, of 6 in row 1
        kw["query_start"] = jnp.asarray(np.stack([qi[0] // 11 * 11, qi[1] // 6 * 6]), jnp.int32)
    return q, k, w, kw


@pytest.mark.parametrize("T,topk,q_block,docs", [(40, 8, 16, False), (24, 64, 8, False), (40, 8, 16, True)])
def test_pallas_indexer_topk_equals_reference(T, topk, q_block, docs):
    q, k, w, kw = _topk_case(T, T, docs)
    kw.update(topk=topk, q_block=q_block)
    ref = indexer_topk(q, k, w, impl="reference", **kw)
    got = indexer_topk(q, k, w, impl="pallas_tpu", interpret=True, **kw)
    assert got.shape == ref.shape
    assert topk_sets(got) == topk_sets(ref)
    if docs:  # no key outside the query's document
        starts = np.asarray(kw["query_start"])
        for b, t in [(0, 11), (0, 39), (1, 6), (1, 23)]:
            assert min(topk_sets(got)[b][t]) >= starts[b, t]


@pytest.mark.parametrize("impl,interpret", [("reference", False), ("pallas_tpu", True)])
def test_tensor_parallel_indexer_reduces_scores_before_topk(impl, interpret):
    """Heads split over 2 devices in a shard_map: each device's scores are a partial sum, reduce_scores psums
    them. Masked entries are -inf on both devices and stay -inf (no NaN); a query whose document holds no
    visible key gets only empty slots."""
    q, k, w, kw = _topk_case(24, 5, docs=True)
    kw = dict(kw, query_start=kw["query_start"].at[0, 3].set(4), topk=8, q_block=8, impl=impl, interpret=interpret)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tensor",))
    heads = P(None, None, "tensor")
    want = indexer_topk(q, k, w, **kw)
    split = lambda q, w: indexer_topk(q, k, w, reduce_scores=lambda s: jax.lax.psum(s, "tensor"), **kw)
    got = jax.jit(jax.shard_map(split, mesh=mesh, in_specs=(heads, heads), out_specs=P()))(q, w)
    assert topk_sets(got) == topk_sets(want)
    assert (np.asarray(got)[0, 3] == -1).all()
    masks = (kw["key_valid"], kw["query_index"], 0.25, kw["query_start"])
    summed = lambda q, w: jax.lax.psum(indexer_scores_block(q, k, w, *masks), "tensor")
    scores = np.asarray(jax.jit(jax.shard_map(summed, mesh=mesh, in_specs=(heads, heads), out_specs=P()))(q, w))
    assert not np.isnan(scores).any() and np.isneginf(scores[0, 3]).all()


def test_kernel_family_is_explicit():
    assert jax.default_backend() == "cpu"
    with pytest.raises(ValueError, match="set interpret=True to run the TPU kernels in interpret mode on CPU"):
        kernel_family("pallas", False)
    assert kernel_family("pallas", True) == "tpu"
    # A forced family means real kernels when interpret=False, whatever the host (ahead-of-time compiles).
    for interpret in (False, True):
        assert kernel_family("pallas_tpu", interpret) == "tpu"
        assert kernel_family("pallas_gpu", interpret) == "gpu"
    with pytest.raises(ValueError, match="unknown kernel impl"):
        kernel_family("splash", True)
    x = jnp.zeros((1, 4, 2, 8))
    args = dict(key_valid=jnp.ones((1, 4), bool), query_index=jnp.zeros((1, 4), jnp.int32), topk=2, scale=1.0,
                q_block=4)
    with pytest.raises(ValueError, match="unknown kernel impl"):
        indexer_topk(x, x[:, :, 0], x[..., 0], impl="splash", **args)
    with pytest.raises(ValueError, match="set interpret=True"):
        indexer_topk(x, x[:, :, 0], x[..., 0], impl="pallas", **args)


def test_tuned_blocks_are_typed_and_validated(tmp_path):
    table = load_block_table()
    assert {op for op, _ in table} == {"indexer_scores", "kth_largest_key", "sparse_mla_fwd", "sparse_mla_bwd"}
    assert TPU_SCORES == IndexerScoresTpuBlocks(block_q=16, block_k=2048)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TPU_SCORES.block_q = 8
    raw = json.loads((REPO / "pallas_kernels" / "tuned_blocks.json").read_text())

    def bad(edit, match):
        doc = json.loads(json.dumps(raw))
        edit(doc)
        path = tmp_path / "blocks.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(BlockConfigError, match=match):
            load_block_table(path)

    bad(lambda d: d["indexer_scores"]["tpu"]["default"].update(block_z=4),
        r"indexer_scores/tpu/default: unknown field\(s\) \['block_z'\]")
    bad(lambda d: d["sparse_mla_bwd"]["gpu"]["default"].pop("block_h"),
        r"sparse_mla_bwd/gpu/default: missing field\(s\) \['block_h'\]")
    bad(lambda d: d["kth_largest_key"]["tpu"].update({"TPU v5p": {"block_rows": 0}}),
        "kth_largest_key/tpu/TPU v5p: field 'block_rows' must be a positive int, got 0")
    bad(lambda d: d["sparse_mla_fwd"]["tpu"]["default"].update(k_block=256.0), "field 'k_block' must be a positive")
    bad(lambda d: d.update(splash={}), "unknown op")
    bad(lambda d: d.pop("kth_largest_key"), "missing op 'kth_largest_key'")
    bad(lambda d: d["kth_largest_key"].update(gpu={"default": {"block_rows": 8}}), "unknown kernel family")
    with pytest.raises(BlockConfigError, match="indexer_scores/tpu: field 'block_k' must be a positive int"):
        IndexerScoresTpuBlocks(block_q=8, block_k=-1)
    with pytest.raises(TypeError, match="IndexerScoresTpuBlocks"):
        indexer_scores_tpu(*_inputs(np.random.default_rng(0), 1, 8, 16, 2, 8, jnp.float32)[:5], scale=1.0,
                           blocks=KTH, interpret=True)


def test_importing_the_kernels_changes_no_environment_variables():
    code = ("import os; before = dict(os.environ); import pallas_kernels, pallas_kernels.blocks, "
            "pallas_kernels.dsa_indexer.tpu, pallas_kernels.dsa_indexer.gpu, pallas_kernels.sparse_mla.tpu, "
            "pallas_kernels.sparse_mla.gpu; assert dict(os.environ) == before, "
            "set(os.environ.items()) ^ set(before.items())")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


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
    from benchmarks.tpu_aot import compile_for_tpu

    fn, args = indexer_program(B, T, S, int8_keys)  # the public op, impl="pallas_tpu", interpret=False
    compiled = compile_for_tpu(fn, *args, topology=topology)
    # The real Mosaic kernels (scores + threshold search), although this host's backend is CPU.
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 2
    mem = compiled.memory_analysis()
    print(f"indexer {topology} {name} int8={int8_keys}: temp {mem.temp_size_in_bytes / 2**20:.1f} MiB, "
          f"args {mem.argument_size_in_bytes / 2**20:.1f} MiB")
    # Temporaries scale with one query block's [T, S] scores (a few arrays of it), never with S x S.
    assert mem.temp_size_in_bytes < 8 * B * max(T, 8) * S * 4 + (64 << 20)
