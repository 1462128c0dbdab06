"""FP8 KV cache: the row quantization, the kernels reading quantized rows (reference, Pallas TPU and GPU in
interpret mode) against the same rows dequantized, the cache layout, and the logit error against the bf16
cache on the trained demo model. FP8 serving on a sequence-sharded mesh: tests/test_serve_engine.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import glmjax
from benchmarks.kv_fp8_error import cache_logits, compare, demo_tokens
from glmjax.serve.kv_cache import Rows, _scatter, bytes_per_token, init_cache
from pallas_kernels.dsa_indexer import indexer_scores, indexer_topk
from pallas_kernels.quantize import (
    FP8,
    QuantizedRows,
    dequantize,
    fold_rows,
    pack_sequence,
    quantize,
    quantize_rows,
    take_rows,
    unpack_sequence,
)
from pallas_kernels.sparse_mla import sparse_mla
from tests.conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


@pytest.mark.parametrize("dtype,bound", [(FP8, 2.0**-4), (jnp.int8, 0.5 / 127)])
def test_row_quantization_error_is_bounded(dtype, bound):
    """Per-row absmax scales: e4m3 keeps every value within 2^-4 of itself (relative; values above the row's
    amax / 2^14 stay normal), int8 within half a step of amax / 127; zero rows stay zero."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 512)).astype(np.float32) * rng.lognormal(0, 2, (64, 1)).astype(np.float32)
    x[3] = 0.0
    values, scale = quantize(jnp.asarray(x), dtype)
    assert values.dtype == dtype and scale.shape == (64,)
    back = np.asarray(values.astype(jnp.float32) * scale[:, None])
    amax = np.abs(x).max(-1, keepdims=True)
    if dtype == FP8:
        normal = np.abs(x) > amax * 2.0**-14
        assert np.all(np.abs(back - x)[normal] <= bound * np.abs(x)[normal] + 1e-30)
    else:
        assert np.all(np.abs(back - x) <= bound * amax + 1e-6)
    assert np.all(back[3] == 0)


@pytest.mark.parametrize("impl,interpret", [("reference", False), ("pallas_tpu", True), ("pallas_gpu", True)])
def test_sparse_mla_reads_quantized_rows_as_their_dequantized_values(impl, interpret):
    """Every impl given QuantizedRows (512 -> 64 latent dims here, rope 32 dims unquantized) computes the same
    attention as over the dequantized rows; only the selected rows are read."""
    B, T, S, H, r, p, K = 2, 5, 96, 16, 64, 32, 16
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(B, T, H, r + p)), jnp.float32)
    rows = quantize_rows(jnp.asarray(rng.normal(size=(B, S, r + p)), jnp.float32), r)
    idx = np.stack([[rng.choice(S, K, replace=False) for _ in range(T)] for _ in range(B)]).astype(np.int32)
    idx[0, 1, 5:] = -1
    kw = dict(scale=(r + p) ** -0.5, v_dim=r, q_block=4, impl=impl, interpret=interpret)
    got_out, got_lse = sparse_mla(q, rows, jnp.asarray(idx), **kw)
    want_out, want_lse = sparse_mla(q, dequantize(rows, jnp.float32), jnp.asarray(idx), **kw)
    np.testing.assert_allclose(got_out, want_out, atol=2e-5)
    np.testing.assert_allclose(got_lse, want_lse, atol=2e-5)
    if impl != "pallas_gpu":  # the TPU layout's folded rope tail (4 positions per row here) reads the same rows
        folded = rows._replace(tail=fold_rows(rows.tail, 4))
        assert folded.tail_fold == 4 and folded.shape == rows.shape
        np.testing.assert_array_equal(sparse_mla(q, folded, jnp.asarray(idx), **kw)[0], got_out)


def test_indexer_reference_takes_quantized_keys():
    rng = np.random.default_rng(2)
    B, T, S, H, D = 2, 6, 40, 4, 32
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
    values, scale = quantize(jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32), FP8)
    kw = dict(key_valid=jnp.ones((B, S), bool), query_index=jnp.full((B, T), S - 1, jnp.int32), topk=8,
              scale=D**-0.5, q_block=4)
    got = indexer_topk(q, values, w, k_scale=scale, **kw)
    want = indexer_topk(q, values.astype(jnp.float32) * scale[..., None], w, **kw)
    np.testing.assert_array_equal(np.sort(np.asarray(got), -1), np.sort(np.asarray(want), -1))


def test_packed_values_hold_the_same_numbers():
    """The TPU layout packs four fp8 values per uint32 word: the same rows come back."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 7, 576)), jnp.float32)
    plain, packed = quantize_rows(x, 512), quantize_rows(x, 512, jnp.uint32)
    assert packed.values.shape == (3, 7, 128) and packed.packed and packed.shape == plain.shape == (3, 7, 576)
    np.testing.assert_array_equal(dequantize(packed, jnp.float32), dequantize(plain, jnp.float32))


def test_fp8_cache_layout_and_bytes():
    """GLM-5.2 per token: latent rows 512 fp8 + a float32 scale + 64 bf16 rope values, indexer keys 128 8-bit
    + a scale (GPU and reference: 1.80x the 576-wide bf16 cache's tokens per byte). The TPU layout packs the
    values in uint32, folds the rope tails of two positions into one 128-lane row and packs the int8 keys four
    positions per uint32 word along the sequence: as many bytes (1.98x the 640-wide bf16 cache)."""
    cfg = glmjax.load_config(REPO / "configs" / "glm-5.2.json")
    assert bytes_per_token(cfg, mtp=True, quant="fp8") == 79 * (512 + 4 + 64 * 2) + 22 * (128 + 4)
    assert bytes_per_token(cfg, mtp=True) == 79 * 576 * 2 + 22 * 128 * 2
    assert bytes_per_token(cfg, mtp=True, quant="fp8", lane_padded=True) == bytes_per_token(cfg, mtp=True, quant="fp8")
    assert bytes_per_token(cfg, mtp=True, lane_padded=True) == 79 * 640 * 2 + 22 * 128 * 2
    small = cfg.replace(num_hidden_layers=3, first_k_dense_replace=1)
    lat = init_cache(small, 2, 16, mtp=True, quant="fp8").latent[0]
    assert isinstance(lat, QuantizedRows) and lat.values.dtype == FP8 and lat.tail.dtype == jnp.bfloat16
    assert lat.shape[-1] == 576
    tpu = init_cache(small, 2, 16, mtp=True, quant="fp8", lane_padded=True)
    keys, lat = tpu.index_keys[0], tpu.latent[0]
    assert lat.packed and lat.tail_fold == 2 and lat.tail.shape == (1, 1, 2, 8, 128) and lat.shape[-1] == 576
    assert tpu.width == 576 and keys.sequence_packed and not keys.packed
    assert keys.values.shape == (1, 2, 4, 128) and keys.values.dtype == jnp.uint32 and keys.shape == (1, 2, 16, 128)


def test_sequence_packed_keys_hold_the_same_numbers_for_the_tpu_kernel():
    """int8 keys packed four positions per word along the sequence unpack to themselves, and the TPU scores
    kernel (interpret mode) reading the words gives the scores it gives for the int8 array, and the
    reference's for the dequantized keys."""
    B, T, H, D, S = 2, 8, 4, 128, 512
    rng = np.random.default_rng(4)
    values, scale = quantize(jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32), jnp.int8)
    words = pack_sequence(values)
    assert words.shape == (B, S // 4, D) and words.dtype == jnp.uint32
    np.testing.assert_array_equal(unpack_sequence(words), values)
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.bfloat16)
    w = jnp.asarray(rng.uniform(size=(B, T, H)), jnp.float32)
    kw = dict(key_valid=jnp.ones((B, S), bool), query_index=jnp.broadcast_to(jnp.arange(S - T, S), (B, T)),
              scale=D**-0.5, k_scale=scale)
    packed = indexer_scores(q, words, w, impl="pallas_tpu", interpret=True, **kw)
    int8 = indexer_scores(q, values, w, impl="pallas_tpu", interpret=True, **kw)
    np.testing.assert_allclose(packed, int8, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(packed, indexer_scores(q, words, w, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("paged", [False, True], ids=["slots", "paged"])
def test_packed_writes_equal_unpacked_writes(paged):
    """The TPU layout's packed rows (int8 keys 4 positions per word, rope tails 2 positions per 128-lane row):
    writes of 1 to 9 rows at every offset within a packed row (a write reads and rewrites the rows it
    touches) leave the same numbers as the GPU layout's unpacked buffers, through a page table too, without
    touching the positions before a call's start."""
    cfg = glmjax.load_config(REPO / "configs" / "glm-5.2.json").replace(num_hidden_layers=3, first_k_dense_replace=1)
    kw = dict(mtp=False, quant="fp8", scan_layers=True) | (dict(page_size=8, num_pages=6) if paged else {})
    plain, tpu = init_cache(cfg, 2, 24, **kw), init_cache(cfg, 2, 24, lane_padded=True, **kw)
    assert tpu.index_keys[0].sequence_packed and tpu.latent[0].tail_fold == 2
    pages = jnp.asarray([[4, 0, 2], [1, 5, -1]], jnp.int32) if paged else None  # slot 1 has no third page
    rng = np.random.default_rng(5)
    lengths = np.zeros(2, np.int32)
    bufs = {"plain": (plain.latent[0], plain.index_keys[0]), "tpu": (tpu.latent[0], tpu.index_keys[0])}
    for T in (3, 1, 9, 4, 2, 5):
        lat, keys = (jnp.asarray(rng.normal(size=(2, T, d)), jnp.float32) for d in (576, 128))
        rows = Rows(None, jnp.asarray(lengths), jnp.full((2,), T, jnp.int32), pages)
        bufs = {k: (_scatter(a, (0, 0), rows, lat), _scatter(b, (0,), rows, keys)) for k, (a, b) in bufs.items()}
        lengths += T

    def logical(buf, index):  # [2, 24, D] dequantized (paged: through the table)
        buf = take_rows(buf, index)
        if paged:
            buf = jax.tree.map(lambda x: x[jnp.maximum(pages, 0)].reshape(2, -1, *x.shape[2:]), buf)
        return dequantize(buf, jnp.float32)

    for i, index in enumerate([(0, 0), (0,)]):
        got, want = logical(bufs["tpu"][i], index), logical(bufs["plain"][i], index)
        np.testing.assert_array_equal(got, want)
        assert np.abs(np.asarray(got[:, :24 - 8 * paged])).sum(-1).min() > 0  # every position written


@pytest.mark.parametrize("lane_padded", [False, True], ids=["int8-keys", "tpu-layout"])
def test_fp8_cache_logits_stay_close_to_the_bf16_cache_on_the_demo_model(lane_padded):
    """The trained demo model, 128 tokens of this repository's Python in chunks of 32 (each chunk reads the rows
    the earlier ones wrote), float32 compute: the FP8 cache's next-token distributions (int8 indexer keys, or
    the TPU layout: packed values and keys) stay within a mean KL of 1e-3 nats of the bf16 cache's and agree
    on the top token at >= 95% of positions (figures over 2 x 512 tokens: docs/serving.md)."""
    demo = REPO / "models" / "demo"
    model = glmjax.load_pretrained(demo, options=glmjax.ModelOptions(q_block=64))
    tokens = demo_tokens(demo, 128, 1)
    ref = cache_logits(model, tokens, quant="none", chunk=32)
    got = cache_logits(model, tokens, quant="fp8", chunk=32, lane_padded=lane_padded)
    r = compare(ref[:, 32:], got[:, 32:])
    assert r["kl"] < 1e-3 and r["top1"] >= 0.95, r
