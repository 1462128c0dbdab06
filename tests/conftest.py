"""Test setup: 8 host CPU devices (for the sharding tests) must be requested before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

# A session-local persistent compilation cache: tests that build the same program twice (a training run and
# its resumption, repeated model builds) compile it once. Fresh per session, so nothing stale carries over.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="glmjax-jax-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).parent.parent
