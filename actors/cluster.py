"""Where the actors run: a private embedded Ray on this machine, or an existing Ray cluster of many machines.

The embedded Ray keeps every socket (driver, GCS, raylet, workers, agents) on 127.0.0.1 and never joins another
cluster that happens to run on the machine, with nothing asked of the user's shell. Joining a cluster
(`address="auto"` or "host:port") uses Ray's own settings, token authentication included (README, "On a Ray
cluster").
"""
from __future__ import annotations

import os

import ray
from ray._private import ray_constants
from ray._private.utils import read_ray_address


class ClusterError(RuntimeError):
    """The Ray cluster cannot be joined or was lost; the message says what to check."""


def start_embedded_ray(num_cpus: int | None = None) -> None:
    """Start a private single-node Ray on 127.0.0.1 with `num_cpus` CPUs (default: the machine's)."""
    # Ray swaps a loopback address for the machine's network address unless told that clusters are off. This
    # process read that switch when Ray was imported; the processes it starts read it from the environment.
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # address="local" always starts a new Ray, where a bare ray.init() would join a `ray start` cluster.
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False)


def join_cluster(address: str) -> None:
    """Connect this process to the Ray cluster at `address` ("auto" or "host:port"); ClusterError saying what to
    check when that fails."""
    target = (read_ray_address() if address == "auto" else address) or ""
    host = target.rsplit(":", 1)[0].strip("[]")
    # A driver finds its local raylet by its own node address; beside a head on a loopback address (a cluster on
    # one machine), that is the head's address, which Ray would otherwise swap for the machine's network address.
    node_ip = {"_node_ip_address": host} if host.startswith("127.") else {}
    try:
        ray.init(address=address, **node_ip)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(
            f"cannot join the Ray cluster at {address!r} ({first}). Check that `ray start --head` runs there, that "
            "this machine reaches its port, and that RAY_AUTH_MODE and the token match the cluster's "
            "(README, 'On a Ray cluster')"
        ) from None


def connect_ray(address: str | None) -> bool:
    """Start the embedded Ray (`address` None) or join a cluster, unless Ray is already up in this process (e.g.
    in tests). Returns whether this call connected (and so should shut Ray down at the end)."""
    if ray.is_initialized():
        return False
    if address is None:
        start_embedded_ray()
    else:
        join_cluster(address)
    return True


def alive_nodes() -> dict[str, str]:
    """Node id -> node IP address of every node the cluster reports alive."""
    return {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}
