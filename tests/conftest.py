"""Shared fixtures. Ray starts once per test session (each start costs seconds), in-process and on 127.0.0.1;
torch runs on one thread."""
from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs torch on one thread: the small models of the tests are fastest there, results do not
    depend on the machine's core count, and OpenMP spinning cannot stall a test on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_session():
    """An embedded Ray with 2 CPUs for every test that needs one; shut down at the end of the session."""
    # Without this Ray binds to the machine's external address even for a local cluster; tests stay on loopback.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
