"""Ray tier: one in-process Ray instance per test module, with explicit small CPU counts."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # Logical CPUs: ranks are mostly idle between steps; 2 physical cores run them all.
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
