"""Shared fixtures. Ray starts once per test session (each start costs seconds), in-process and on 127.0.0.1;
torch runs on one thread. No RAY_* variable is set: the product keeps its Ray on loopback by itself."""
from __future__ import annotations

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
    """The product's embedded Ray (private, on 127.0.0.1) with 2 CPUs for every test that needs one; shut down at
    the end of the session."""
    import ray

    from actors.cluster import start_embedded_ray

    start_embedded_ray(num_cpus=2)
    yield ray
    ray.shutdown()
