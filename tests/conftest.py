"""Test setup: 8 host CPU devices (for the sharding tests) must be requested before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).parent.parent
