"""Test setup: 8 simulated CPU devices (for the sharding tests) and shared fixtures."""

import os

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests import layouts  # noqa: E402


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture
def packed_batch():
  """A small packed multi-turn batch with padding: dict of [4, 48] int32 numpy arrays."""
  return layouts.random_packed_batch(np.random.default_rng(1234), batch=4, length=48)
