"""Test configuration. The 8-device XLA flag is set in the root conftest.py, before jax is imported."""

import jax
import pytest


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, f"tests expect 8 CPU devices, got {jax.devices()}"
