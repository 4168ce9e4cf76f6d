"""A Ray cluster on one machine for tests and benchmarks: separate `ray start` nodes (each its own raylet) on
loopback addresses, started and stopped by this code alone (by process group, never `ray stop`)."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class LoopbackCluster:
    """A Ray cluster of separate `ray start` nodes (each its own raylet) on loopback addresses: the head on
    127.0.0.2, worker i on 127.0.0.(3 + i), like machines of their own; a private temp dir and token
    authentication as Ray ships it. Each node runs in its own process group, so that `remove` and `stop` end
    exactly the processes this object started.

    `env` is what a driver needs to join it: RAY_AUTH_MODE=token and the token's path.
    """

    def __init__(self, root: Path, num_workers: int = 2, cpus_per_node: int = 1):
        self.root = root
        # Ray's socket paths must stay under 107 bytes: a short private temp dir, not the test's deep one.
        self.temp_dir = tempfile.mkdtemp(prefix="rfwp-ray-")
        token = root / "token"
        token.write_text(secrets.token_hex(16))
        with socket.socket() as s:  # a free port for the head's GCS
            s.bind(("127.0.0.2", 0))
            self.port = s.getsockname()[1]
        self.address = f"127.0.0.2:{self.port}"
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        ray_cli = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", f"--num-cpus={cpus_per_node}",
                   "--disable-usage-stats", "--object-store-memory=100000000"]
        self.nodes: list[subprocess.Popen] = []
        self.log = open(root / "nodes.log", "w")

        def start(ip, args):
            return subprocess.Popen(ray_cli + [f"--node-ip-address={ip}", *args], env={**os.environ, **self.env},
                                    stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

        self.nodes.append(start("127.0.0.2", ["--head", f"--port={self.port}", "--include-dashboard=false",
                                              f"--temp-dir={self.temp_dir}"]))
        try:
            self._wait_for_nodes(1)
            for i in range(num_workers):  # one at a time: a busy machine times out raylets that start together
                self.nodes.append(start(f"127.0.0.{3 + i}", [f"--address={self.address}"]))
                self._wait_for_nodes(2 + i)
        except BaseException:
            self.stop()
            raise

    def _wait_for_nodes(self, count: int, timeout: float = 90) -> None:
        probe = ("import ray; ray.init(address=%r, _node_ip_address='127.0.0.2', logging_level='ERROR'); "
                 "print(sum(n['Alive'] for n in ray.nodes()))" % self.address)
        deadline = time.time() + timeout
        while time.time() < deadline and all(node.poll() is None for node in self.nodes):
            try:
                out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **self.env},
                                     capture_output=True, text=True, timeout=30)
            except subprocess.TimeoutExpired:
                continue
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(1)
        raise RuntimeError(f"the loopback cluster did not reach {count} nodes; see {self.log.name}")

    def remove(self, index: int) -> None:
        """Kill node `index` (0 is the head) and every process it started, as if its machine were lost."""
        os.killpg(self.nodes[index].pid, signal.SIGKILL)
        self.nodes[index].wait()

    def stop(self) -> None:
        """End every process this cluster started: SIGTERM to each node's process group, then SIGKILL to what is
        left of the groups."""
        for node in reversed(self.nodes):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
        for node in self.nodes:
            try:
                node.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(node.pid, signal.SIGKILL)  # the node's raylet, workers and agents, if any outlived it
            except ProcessLookupError:
                pass
            node.wait()
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
