"""Test setup: 8 virtual CPU devices, so sharding tests get real meshes."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def ckdir(tmp_path):
    """A fresh directory for checkpoints."""
    return tmp_path
