"""Training on Ray as users run it, in subprocesses with no RAY_* variable set: the embedded Ray stays on
loopback, scheduler signals leave a checkpoint and the documented exit codes, one process trains a run directory
at a time, and a real multi-node cluster (separate `ray start` nodes on loopback addresses) trains across nodes
and survives losing one."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from runio.checkpoint import load_checkpoint
from support import LoopbackCluster

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def clean_env(**extra) -> dict:
    """The user's environment without any RAY_* variable (the product must not need one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def start_training(tmp_path: Path, name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    quick = tmp_path / "quick.yaml"
    quick.write_text("log_interval_s: 1\ncheckpoint_interval_s: 1000\n")
    argv = [sys.executable, "-m", "agent.train", "--env", "memory", "--core", "delta_net", "--hidden-size", "32",
            "--num-heads", "2", "--head-dim", "16", "--envs-per-actor", "4", "--unroll-length", "10",
            "--batch-size", "8", "--device", "cpu", "--runs-dir", str(tmp_path), "--name", name,
            "--config", str(quick), *args]
    return subprocess.Popen(argv, cwd=REPO, env=env or clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_line(process: subprocess.Popen, text: str, timeout: float = 180) -> list[str]:
    """Lines of the process's output up to the first containing `text`."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never printed; output:\n{''.join(lines)}")


def listening_addresses(pid: int) -> list[tuple[str, str]]:
    """(process name, address) of every listening TCP socket of `pid` and its descendants."""
    root = psutil.Process(pid)
    found = []
    for process in [root, *root.children(recursive=True)]:
        try:
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((process.name(), conn.laddr.ip))
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_embedded_ray_is_private_signals_checkpoint_and_one_trainer_per_run(tmp_path):
    run = start_training(tmp_path, "solo", "--total-frames", "100000000")
    try:
        wait_for_line(run, "frames ")  # trained and logged at least once
        sockets = listening_addresses(run.pid)
        names = {name for name, _ in sockets}
        assert {"gcs_server", "raylet"} <= names and len(sockets) >= 5, sockets
        assert all(ip in LOOPBACK for _, ip in sockets), f"listening beyond loopback: {sockets}"

        # A second training of the same run directory is refused with one line naming the holder.
        second = start_training(tmp_path, "solo", "--total-frames", "100000000")
        out, _ = second.communicate(timeout=120)
        assert second.returncode != 0 and "Traceback" not in out
        assert f"pid {run.pid}" in out and "is being trained by" in out, out
        assert not (tmp_path / "solo" / "checkpoint.pt").exists(), "the first run was not touched"

        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=120)
        assert run.returncode == 143, out
        assert "Terminated (SIGTERM): checkpoint saved" in out
    finally:
        if run.poll() is None:
            run.kill()
    first = load_checkpoint(tmp_path / "solo" / "checkpoint.pt")
    assert first["learner"]["updates"] > 0

    resumed = start_training(tmp_path, "solo", "--total-frames", "100000000")
    try:
        lines = wait_for_line(resumed, "frames ")
        assert any("Resuming" in line for line in lines)
        resumed.send_signal(signal.SIGINT)
        out, _ = resumed.communicate(timeout=120)
        assert resumed.returncode == 130, out
        assert "Interrupted: checkpoint saved" in out
    finally:
        if resumed.poll() is None:
            resumed.kill()
    second = load_checkpoint(tmp_path / "solo" / "checkpoint.pt")
    assert second["learner"]["updates"] > first["learner"]["updates"]
    assert load_checkpoint(tmp_path / "solo" / "checkpoint.prev.pt")["learner"]["updates"] == \
        first["learner"]["updates"], "the previous checkpoint is kept"


@pytest.mark.slow
def test_trains_across_a_multi_node_cluster_and_survives_losing_a_node(tmp_path):
    cluster = LoopbackCluster(tmp_path, num_workers=2, cpus_per_node=1)
    try:
        run = start_training(tmp_path, "cluster", "--ray-address", cluster.address, "--num-actors", "3",
                             "--total-frames", "120000", env=clean_env(**cluster.env))
        try:
            lines = wait_for_line(run, "Actors: ")
            start_line = next(line for line in lines if line.startswith("Training"))
            assert "3 nodes" in start_line and cluster.address in start_line
            placement = lines[-1]
            assert placement.count(" on 127.0.0.") >= 2, f"actors on one node only: {placement}"
            cluster.remove(2)  # a worker machine is lost mid-run
            out, _ = run.communicate(timeout=300)
        finally:
            if run.poll() is None:
                run.kill()
        assert run.returncode == 0, "".join(lines) + out
        assert "Lost Ray node 127.0.0.4" in out and "Done:" in out
        with open(tmp_path / "cluster" / "logs.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert int(rows[-1]["nodes_lost"]) == 1 and int(rows[-1]["nodes"]) == 2
        assert int(rows[-1]["frames"]) >= 120000 > int(rows[0]["frames"])
    finally:
        cluster.stop()


@pytest.mark.slow
def test_losing_the_head_ends_the_run_with_the_keepers_checkpoint(tmp_path):
    """Ray ends a driver without running any Python when its node's raylet dies: the checkpoint keeper saves the
    state of the last log interval and says so, and the run resumes from it."""
    cluster = LoopbackCluster(tmp_path, num_workers=1, cpus_per_node=1)
    try:
        run = start_training(tmp_path, "headless", "--ray-address", cluster.address, "--num-actors", "2",
                             "--total-frames", "100000000", env=clean_env(**cluster.env))
        try:
            wait_for_line(run, "frames ")
            cluster.remove(0)  # the head: the driver's own raylet and the GCS
            out, _ = run.communicate(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
    finally:
        cluster.stop()
    assert run.returncode != 0
    assert "The trainer ended without saving" in out and "run the same command to resume" in out, out
    assert load_checkpoint(tmp_path / "headless" / "checkpoint.pt")["learner"]["updates"] >= 1
