"""Test setup: 8 host CPU devices (for the sharding tests) must be requested before jax is imported."""

import os

# The suite's programs are tiny and many: compiling them is most of its time, and LLVM's optimization of the
# CPU code costs more than it saves. At level 0 the mesh training test takes 40 s instead of 70 and the suite
# 997 s instead of 1045 with more tests in it (2 cores; every test passes either way). TPU ahead-of-time
# compiles are unaffected.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

# A session-local persistent compilation cache: tests that build the same program twice (a training run and
# its resumption, repeated model builds) compile it once. Fresh per session, so nothing stale carries over.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="glmjax-jax-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

import pytest  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each test module's compiled programs are dropped when it ends (the serving engine's program table
    included): the suite builds hundreds of programs over meshes of 8 devices, and keeping all of them alive
    in one process only grows its memory. The persistent compilation cache above still serves repeats."""
    yield
    from glmjax.serve import engine

    engine._PROGRAMS.clear()
    jax.clear_caches()
REPO = Path(__file__).parent.parent


def three_layer_indexshare_config():
    """indexshare_freq's config (IndexShare, MTP, n_group 4) cut from 7 layers to 3 that still hold every kind
    of layer it has: dense with a full indexer, MoE sharing that layer's top-k, MoE with its own indexer. For
    tests that build a random model for its structure: each layer is its own code in a compiled step, and
    compiling is nearly all of their time."""
    import glmjax

    return glmjax.load_config(GOLDEN / "indexshare_freq" / "config.json").replace(
        num_hidden_layers=3, first_k_dense_replace=1, index_topk_freq=2, index_skip_topk_offset=1)
