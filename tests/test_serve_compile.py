"""The serving engine's speculative step compiled ahead of time for a multi-chip TPU (v5p 2x2x1, 4 chips) under a
tensor x expert mesh (a bf16 slot cache, a paged FP8 cache), and with an FP8 cache split over the sequence
(v5p 2x2x2, context x tensor x expert), at GLM-5.2's dims with two decoder layers (one dense, one MoE) plus
the MTP layer, 16 experts and a 16K vocabulary (as tests/test_aot_model.py). The full 753B step (64 slots x
128K on v5p:4x4x4, or one 1M-token request) is `python serve.py --compile-only`; it takes minutes on a CPU
host."""

import importlib.util

import jax.numpy as jnp
import pytest

import glmjax
from glmjax.errors import ConfigError
from glmjax.serve.kv_cache import bytes_per_token
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")

TOPOLOGY = "v5p:2x2x1"
MESH = {"tensor": 2, "expert": 2}
SLOTS, MAX_LEN, K = 4, 4096, 3


def small_glm52():
    cfg = glmjax.load_config(REPO / "configs" / "glm-5.2.json")
    return cfg.replace(num_hidden_layers=2, first_k_dense_replace=1, index_topk_pattern="FS", index_topk_freq=None,
                       index_skip_topk_offset=None, n_routed_experts=16, n_group=1, topk_group=1, vocab_size=16384)


def test_speculative_step_compiles_on_a_tensor_expert_mesh():
    import benchmarks.tpu_aot  # noqa: F401  (libtpu environment)
    from glmjax.serve.compile_only import compile_serve_step

    cfg = small_glm52()
    report = compile_serve_step(cfg, TOPOLOGY, MESH, slots=SLOTS, max_len=MAX_LEN, k=K)
    print(report.table())
    assert report.program == "speculative" and report.chips == 4 and report.slot_split == 2
    assert report.mosaic_kernels > 0  # indexer scores, top-k, sparse MLA, megablox
    # Lane-padded bf16 rows of the 2 layers + MTP, indexer keys of the full layers + MTP; slots split over
    # expert (the batch axes), rows replicated over tensor.
    per_token = bytes_per_token(cfg, mtp=True, dtype=jnp.bfloat16, lane_padded=True)
    assert per_token == 3 * 640 * 2 + 2 * 128 * 2
    assert report.cache_bytes == per_token * SLOTS * MAX_LEN // MESH["expert"]
    assert report.weight_bytes > 0 and report.temp_bytes > 0
    assert 0 < report.output_bytes < 2**20  # tokens [B, k+1] and accepted [B]: all else aliases an input
    assert report.total_bytes == (report.weight_bytes + report.cache_bytes + report.state_bytes
                                  + report.temp_bytes + report.output_bytes)
    assert report.aliased_bytes >= report.cache_bytes + report.state_bytes  # cache and state updated in place
    assert report.flops > 0
    table = report.table()
    assert "total per chip" in table and "HBM per chip" in table and "updated in place: yes" in table


@pytest.mark.slow  # 82 s of compilation on 2 cores; the speculative step above compiles the same layers
def test_batched_prefill_compiles_on_a_tensor_expert_mesh():
    """The engine's largest prefill call for 3 requests (4 rows of a 256-token chunk, the MTP rows and k
    drafts) compiles with the Mosaic kernels and updates the cache in place."""
    import benchmarks.tpu_aot  # noqa: F401
    from glmjax.serve.compile_only import compile_serve_step

    report = compile_serve_step(small_glm52(), TOPOLOGY, MESH, slots=SLOTS, max_len=MAX_LEN, k=K,
                                program="prefill", prefill_chunk=256, prefill_batch=3)
    print(report.table())
    assert report.program == "prefill" and report.tokens == 4 * 256 and report.mosaic_kernels > 0
    assert report.aliased_bytes >= report.cache_bytes + report.state_bytes
    assert "1024-token prefill chunks" in report.table()


def test_fp8_sequence_sharded_step_compiles_with_the_mosaic_kernels():
    """One 256K-token request, its FP8 cache (the TPU layout: values packed in uint32, the rope tails of two
    positions per 128-lane row, int8 indexer keys packed four positions per uint32 word along the sequence)
    split over context x expert (4 shards), heads over tensor: the Mosaic kernels lower
    inside the sharded attention, each chip holds a quarter of the sequence, and the step updates the cache
    in place. No cache buffer is relayouted on the way: the temporaries stay under half the cache (one copy
    of the largest latent buffer would take them past it)."""
    import benchmarks.tpu_aot  # noqa: F401
    from glmjax.serve.compile_only import compile_serve_step
    from glmjax.serve.engine import serve_rules

    cfg, max_len = small_glm52(), 262144
    report = compile_serve_step(cfg, "v5p:2x2x2", {"context": 2, "tensor": 2, "expert": 2}, slots=1,
                                max_len=max_len, k=K, rules=serve_rules(("context", "expert")), kv_quant="fp8")
    print(report.table())
    assert report.seq_split == 4 and report.slot_split == 1 and report.mosaic_kernels > 0
    per_token = bytes_per_token(cfg, mtp=True, quant="fp8", lane_padded=True)
    assert per_token == 3 * (512 + 4 + 64 * 2) + 2 * (128 + 4)
    assert report.cache_bytes == per_token * max_len // 4
    assert report.aliased_bytes >= report.cache_bytes + report.state_bytes
    assert report.temp_bytes < report.cache_bytes / 2
    assert "KV cache, fp8 (1 of 1 slots x 65,536 of 262,144 tokens)" in report.table()


def test_paged_fp8_step_compiles_with_its_pools_split_over_the_slot_groups():
    """A paged FP8 cache (pages of 256 tokens, as many as 4 full slots take) on the tensor x expert mesh: each
    slot group's chips hold its half of the pools and of the page table, the step updates them in place, and
    reading keys and rows through the table copies no pool (one latent pool's copy would take the
    temporaries past half the cache). (Paged and split over the sequence: compiled at full size in
    docs/serving.md; on 8 CPU devices in tests/test_serve_engine.py.)"""
    import benchmarks.tpu_aot  # noqa: F401
    from glmjax.serve.compile_only import compile_serve_step

    cfg, max_len, pages = small_glm52(), 65536, SLOTS * 65536 // 256
    report = compile_serve_step(cfg, TOPOLOGY, MESH, slots=SLOTS, max_len=max_len, k=K, kv_quant="fp8",
                                page_size=256)
    print(report.table())
    per_token = bytes_per_token(cfg, mtp=True, quant="fp8", lane_padded=True)
    assert per_token == 3 * (512 + 4 + 64 * 2) + 2 * (128 + 4) == bytes_per_token(cfg, mtp=True, quant="fp8")
    table = SLOTS * (max_len // 256) * 4 // MESH["expert"]  # int32 page table, its rows split with the slots
    assert report.cache_bytes == per_token * pages * 256 // MESH["expert"] + table
    assert report.aliased_bytes >= report.cache_bytes + report.state_bytes
    assert report.temp_bytes < report.cache_bytes / 2 and report.mosaic_kernels > 0
    assert "KV cache, fp8, paged (512 of 1,024 pages of 256 tokens + table)" in report.table()
    with pytest.raises(ConfigError, match="2 slot groups x 2 sequence shards; use a multiple of 4"):
        compile_serve_step(cfg, "v5p:2x2x2", {"context": 2, "tensor": 2, "expert": 2}, slots=SLOTS,
                           max_len=max_len, k=K, page_size=256, num_pages=1022)


def test_slots_must_split_over_the_batch_axes():
    import benchmarks.tpu_aot  # noqa: F401
    from glmjax.serve.compile_only import compile_serve_step

    with pytest.raises(ConfigError, match="multiple of 2"):
        compile_serve_step(small_glm52(), TOPOLOGY, MESH, slots=3, max_len=MAX_LEN, k=K)
    with pytest.raises(ConfigError, match="has 2 devices"):
        compile_serve_step(small_glm52(), TOPOLOGY, {"tensor": 2}, slots=SLOTS, max_len=MAX_LEN, k=K)
    with pytest.raises(ConfigError, match="multiple of 128"):  # the TPU indexer reads pages in 128-key blocks
        compile_serve_step(small_glm52(), TOPOLOGY, MESH, slots=SLOTS, max_len=MAX_LEN, k=K, page_size=64)
    with pytest.raises(ConfigError, match="multiple of 2"):
        compile_serve_step(small_glm52(), TOPOLOGY, MESH, slots=SLOTS, max_len=MAX_LEN, k=K, page_size=128,
                           num_pages=33)
