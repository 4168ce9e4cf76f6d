"""Ingest ceiling: how many frames/s the learner's input path takes in when actors cost nothing.

    python -m bench.ingest                                   # N = 1, 2, 4, 8 actors; embedded Ray and 3 nodes
    python -m bench.ingest --actors 1 2 --seconds 3 --rays embedded
    python -m bench.ingest --update-s 0 0.5                  # also with a 0.5 s sleep standing in for the update

Synthetic actors (`SyntheticActor`: no emulator, no model) hand out real `Unroll`s as fast as Ray takes them:
Atari-shaped `StackedFrames` observations [T + 1, N, 4, 84, 84] encoded once from random frames (one
environment starts a new episode mid-unroll, so each unroll carries one restacked observation), the step arrays,
and a core state of the size the chosen core carries (delta_lstm by default: 1.6 MB per 8 environments). They run
in the real `ActorPool` (`actor_class=`), feeding the real `Feeder` (ray.wait/ray.get, `batch_unrolls`: decode
and concatenate) of `learner.rl`. The driver loop is the training loop with the update replaced by nothing, or
by a sleep of `--update-s`; it publishes weights of the real model's size after every batch, as training does.

Per cell it reports batches/s x frames per batch (emulator frames, T x N x frameskip per unroll), the wire bytes
taken in (`Unroll.nbytes`), where the feeder thread spends its time and the CPU seconds per second of the
driver's threads, the actors, Ray's own processes and the whole machine. A phase profile then times, one unroll
at a time, each step of the path in isolation: an actor's unroll becoming ready (locally or on another node),
`ray.get` of it, decoding its frames, and concatenating a batch.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import ray
import torch

from actors.actor import ActorPool
from actors.cluster import join_cluster, start_embedded_ray
from actors.interface import Episode
from actors.unroll import StackedFrames, Unroll
from agent.config import load_defaults
from bench.throughput import cpu_name
from learner.impala import batch_unrolls
from learner.rl import Feeder
from models import PolicyNet

OBS_SHAPE = (4, 84, 84)
NUM_ACTIONS = 4  # Breakout's
FRAMESKIP = 4
SETUP_NAMES = {"embedded": "embedded (one node, 127.0.0.1)",
               "loopback": "3-node loopback cluster (`ray start` nodes on 127.0.0.2-4, token auth)"}


def synthetic_observations(rng: np.random.Generator, unroll_length: int, num_envs: int) -> tuple[np.ndarray,
                                                                                              np.ndarray]:
    """Stacked random frames as an Atari actor sees them, and where episodes start.

    Returns:
        (obs, done): obs [T + 1, N, 4, 84, 84] uint8, each stack the previous one shifted by a new frame, except
        that env 0 starts a new episode at step T // 2 (its stack refilled with the first frame); done [T + 1, N].
    """
    S, H, W = OBS_SHAPE
    T, N = unroll_length, num_envs
    sequence = rng.integers(0, 256, (N, S + T, H, W), dtype=np.uint8)
    obs = np.lib.stride_tricks.sliding_window_view(sequence, S, axis=1).transpose(1, 0, 4, 2, 3).copy()
    done = np.zeros((T + 1, N), bool)
    restart = T // 2
    done[restart, 0] = True
    obs[restart, 0] = obs[restart, 0, -1]
    for t in range(restart + 1, T + 1):
        obs[t, 0, :-1] = obs[t - 1, 0, 1:]
    return obs, done


class SyntheticActor:
    """An actor that costs nothing but sending: hands out the same Atari-shaped unroll every call.

    Args:
        num_envs, unroll_length: N and T of its unrolls.
        core_state_shapes: shapes [N, ...] of the core state it sends (the chosen core's, float32).
        seed, index: seed its random frames; index is its slot. torch_threads: ignored (no model).
    """

    def __init__(self, num_envs: int, unroll_length: int, core_state_shapes: list[tuple[int, ...]], seed: int,
                 index: int = 0, torch_threads: int | None = None):
        rng = np.random.default_rng([seed, index])
        T, N = unroll_length, num_envs
        obs, done = synthetic_observations(rng, T, N)
        self.index, self.version = index, -1
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        self.arrays = dict(
            obs=StackedFrames.encode(obs),
            reward=rng.choice(np.array([0.0, 1.0], np.float32), (T + 1, N), p=[0.95, 0.05]),
            done=done,
            last_action=rng.integers(0, NUM_ACTIONS, (T + 1, N)),
            action=rng.integers(0, NUM_ACTIONS, (T + 1, N)),
            policy_logits=rng.standard_normal((T + 1, N, NUM_ACTIONS), np.float32),
            baseline=rng.standard_normal((T + 1, N), np.float32),
            core_state=[rng.standard_normal(shape, np.float32) for shape in core_state_shapes],
        )
        self.episodes = [Episode("life", 0, 1.0, T // 2)]
        self.frames = T * N * FRAMESKIP

    def unroll(self) -> Unroll:
        return Unroll(**self.arrays, version=self.version, actor=self.index, incarnation="synthetic",
                      node=self.node, episodes=self.episodes, frames=self.frames)

    def unroll_from_store(self, version: int, weights: list[ray.ObjectRef]) -> Unroll:
        """`actors.actor.RayActor`'s call: fetches weights of a new version, as a real actor does."""
        if version != self.version:
            ray.get(weights[0])
            self.version = version
        return self.unroll()

    def pid(self) -> int:
        return os.getpid()


SyntheticRayActor = ray.remote(SyntheticActor)


def cpu_seconds(pids) -> float:
    """User + system CPU seconds of the live processes among `pids`."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def thread_cpu_seconds(native_id: int) -> float:
    for thread in psutil.Process().threads():
        if thread.id == native_id:
            return thread.user_time + thread.system_time
    return 0.0


def machine_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot, summed over its cores (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:8]]  # user nice system idle iowait irq softirq
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class TimedPool:
    """An `ActorPool` whose `next_unroll` calls are timed (wall seconds, the feeder's taking of unrolls)."""

    def __init__(self, pool: ActorPool):
        self.pool, self.seconds = pool, 0.0

    def next_unroll(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.pool.next_unroll(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def ray_daemon_pids(roots: list[int], actor_pids: set[int]) -> set[int]:
    """Processes under `roots` (the driver, the `ray start` nodes) other than actors: raylets, GCS, agents,
    idle workers."""
    found = set()
    for root in roots:
        try:
            found |= {p.pid for p in psutil.Process(root).children(recursive=True)}
        except psutil.Error:
            continue
    return found - actor_pids - {os.getpid()}


def measure_cell(num_actors: int, args, model: dict, roots: list[int]) -> dict:
    """Stream unrolls from `num_actors` synthetic actors through `Feeder` for `args.seconds` after a warm-up."""
    actor_kwargs = dict(num_envs=args.envs_per_actor, unroll_length=args.unroll_length,
                        core_state_shapes=model["core_state_shapes"])
    pool = ActorPool(num_actors, actor_kwargs, seed=0, num_cpus=1, unrolls_in_flight=args.unrolls_in_flight,
                     name=f"ingest/{num_actors}/{time.monotonic_ns()}", actor_class=SyntheticRayActor)
    timed = TimedPool(pool)
    feeder = Feeder(timed, args.batch_size // args.envs_per_actor, torch.device("cpu"))
    version = 0
    feeder.publish(version, model["weights"])
    feeder.start()
    try:
        actor_pids = set(ray.get([actor.pid.remote() for actor in pool.actors]))
        daemons = ray_daemon_pids(roots, actor_pids)
        feeder.next_batch(timeout=120)  # the actors are up
        warm_end = time.perf_counter() + args.warmup
        while time.perf_counter() < warm_end:
            feeder.next_batch(timeout=120)
        start = time.perf_counter()
        timed.seconds = 0.0
        before = cpu_sample(feeder, actor_pids, daemons)
        batches = frames = nbytes = 0
        make_s = wait_s = publish_s = 0.0
        while time.perf_counter() - start < args.seconds:
            waiting = time.perf_counter()
            batch = feeder.next_batch(timeout=120)
            wait_s += time.perf_counter() - waiting
            batches, frames, nbytes, make_s = (batches + 1, frames + batch.frames, nbytes + batch.nbytes,
                                               make_s + batch.make_s)
            if args.update_s:
                time.sleep(args.update_s)
            version += 1
            publishing = time.perf_counter()
            feeder.publish(version, model["weights"])
            publish_s += time.perf_counter() - publishing
        elapsed = time.perf_counter() - start
        take_s = timed.seconds
        after = cpu_sample(feeder, actor_pids, daemons)
    finally:
        feeder.stop()
        feeder.join(timeout=10)
        pool.close()
    cpu = {key: (after[key] - before[key]) / elapsed for key in before}
    per_batch_ms = {key: 1e3 * seconds / max(1, batches) for key, seconds in
                    (("take", take_s), ("make", make_s), ("wait", wait_s), ("publish", publish_s))}
    return dict(actors=num_actors, update_s=args.update_s, seconds=elapsed, batches=batches,
                batches_per_s=batches / elapsed, fps=frames / elapsed, bytes_per_s=nbytes / elapsed,
                ms=per_batch_ms, cpu=cpu)


def cpu_sample(feeder: Feeder, actor_pids: set[int], daemons: set[int]) -> dict[str, float]:
    """CPU seconds so far of the feeder thread, the driver's main thread, the whole driver process, the actors,
    Ray's daemons and the machine."""
    return dict(feeder=thread_cpu_seconds(feeder.native_id),
                main=thread_cpu_seconds(threading.main_thread().native_id), driver=cpu_seconds([os.getpid()]),
                actors=cpu_seconds(actor_pids), ray=cpu_seconds(daemons), machine=machine_busy_seconds())


def phase_profile(args, model: dict, repeats: int) -> list[dict]:
    """Each step of the ingest path in isolation, per actor placement (one actor per node, one unroll at a
    time): `ready` = from request to the unroll being in the driver's object store (the actor's work, its put,
    the transfer from its node); `get` = ray.get (deserialise); `decode` = its frames decoded; per batch
    `concat` = `batch_unrolls` of already decoded unrolls, `batch` = the whole `batch_unrolls`."""
    nodes = sorted({n["NodeID"] for n in ray.nodes() if n["Alive"]})
    driver_node = ray.get_runtime_context().get_node_id()
    weights = [ray.put(model["weights"])]
    rows = []
    for node in sorted(nodes, key=lambda n: n != driver_node):
        strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node, soft=False)
        actor = SyntheticRayActor.options(num_cpus=1, scheduling_strategy=strategy).remote(
            args.envs_per_actor, args.unroll_length, model["core_state_shapes"], seed=0)
        ray.get(actor.unroll_from_store.remote(0, weights))  # started, weights loaded
        ready, get, decode, unrolls = [], [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            ref = actor.unroll_from_store.remote(0, weights)
            ray.wait([ref], fetch_local=True)
            ready.append(time.perf_counter() - start)
            start = time.perf_counter()
            unroll = ray.get(ref)
            get.append(time.perf_counter() - start)
            start = time.perf_counter()
            unroll.observations()
            decode.append(time.perf_counter() - start)
            unrolls.append(unroll)
        ray.kill(actor)
        per_batch = args.batch_size // args.envs_per_actor
        batches = [unrolls[i:i + per_batch] for i in range(0, len(unrolls) - per_batch + 1, per_batch)]
        concat, whole = [], []
        for batch in batches:
            decoded = [Unroll(**{**vars(u), "obs": u.observations()}) for u in batch]
            start = time.perf_counter()
            batch_unrolls(decoded)
            concat.append(time.perf_counter() - start)
            start = time.perf_counter()
            batch_unrolls(batch)
            whole.append(time.perf_counter() - start)
        rows.append(dict(node="driver's node" if node == driver_node else "other node",
                         nbytes=unrolls[0].nbytes, **{key: 1e3 * statistics.median(values) for key, values in
                                                      (("ready", ready), ("get", get), ("decode", decode),
                                                       ("concat", concat), ("batch", whole))}))
    return rows


def model_arrays(core: str, num_envs: int) -> dict:
    """The chosen core's state shapes for `num_envs` environments and the weights of the Atari `PolicyNet`."""
    net = PolicyNet(OBS_SHAPE, NUM_ACTIONS, core, load_defaults("cores.yaml")[core])
    return dict(core_state_shapes=[tuple(s.shape) for s in net.initial_state(num_envs)],
                weights={k: v.clone() for k, v in net.state_dict().items()})


def run_setup(args, model: dict, roots: list[int]) -> dict:
    """Every cell and the phase profile on the Ray this process is connected to."""
    cells = []
    for update_s in args.update_s:
        for num_actors in args.actors:
            cell = measure_cell(num_actors, argparse.Namespace(**{**vars(args), "update_s": update_s}), model, roots)
            print(f"{args.rays[0]}: {format_cell(cell)}", flush=True)
            cells.append(cell)
    return dict(cells=cells, profile=phase_profile(args, model, args.profile_repeats))


def run_rays(args, argv: list[str]) -> list[tuple[str, dict]]:
    """Each Ray setup measured by a fresh driver process (Ray reads its authentication settings once per
    process): [(setup, its `run_setup` results)]."""
    results = []
    logical_cpus = max(args.actors) + 1  # Ray's CPU count is a scheduling label: one per actor, whatever the cores
    for setup in args.rays:
        env, extra, cluster = dict(os.environ), ["--logical-cpus", str(logical_cpus)], None
        if setup == "loopback":
            from bench.loopback import LoopbackCluster  # 3 raylets on loopback addresses, token auth

            cluster_root = Path(tempfile.mkdtemp(prefix="rfwp-ingest-"))  # its token and node log
            cluster = LoopbackCluster(cluster_root, num_workers=2, cpus_per_node=-(-logical_cpus // 3))
            env.update(cluster.env)
            extra += ["--address", cluster.address, "--daemon-roots", *(str(node.pid) for node in cluster.nodes)]
        try:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "results.json"
                subprocess.run([sys.executable, "-m", "bench.ingest", *argv, "--rays", setup, "--results-to",
                                str(out), *extra], env=env, check=True)
                results.append((setup, json.loads(out.read_text())))
        finally:
            if cluster is not None:
                cluster.stop()
                shutil.rmtree(cluster_root, ignore_errors=True)
    return results


CELL_HEADER = ("| actors | update s | batches/s | frames/s | MB/s | feeder take ms | feeder make ms | learner wait ms "
               "| publish ms | feeder CPU | main CPU | driver CPU | actors CPU | Ray daemons CPU | machine CPU |\n"
               + "| ---: " * 15 + "|")


def format_cell(cell: dict) -> str:
    ms, cpu = cell["ms"], cell["cpu"]
    return (f"| {cell['actors']} | {cell['update_s']:g} | {cell['batches_per_s']:.2f} | {cell['fps']:,.0f} | "
            f"{cell['bytes_per_s'] / 1e6:.0f} | {ms['take']:.1f} | {ms['make']:.1f} | {ms['wait']:.1f} | "
            f"{ms['publish']:.1f} | "
            + " | ".join(f"{cpu[key]:.2f}" for key in ("feeder", "main", "driver", "actors", "ray", "machine"))
            + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rays", nargs="+", choices=["embedded", "loopback"], default=["embedded", "loopback"],
                        help="embedded: the private single-node Ray; loopback: 3 `ray start` nodes on 127.0.0.2-4")
    parser.add_argument("--update-s", type=float, nargs="+", default=[0.0],
                        help="seconds the learner sleeps per batch in place of the update (0: pure ingest)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per cell")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds streamed before the window")
    parser.add_argument("--core", default="delta_lstm", help="core whose state the unrolls carry")
    parser.add_argument("--envs-per-actor", type=int, default=8)
    parser.add_argument("--unroll-length", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--unrolls-in-flight", type=int, default=1)
    parser.add_argument("--profile-repeats", type=int, default=16, help="unrolls per node in the phase profile")
    parser.add_argument("--results-to", help=argparse.SUPPRESS)  # a setup's driver process writes its JSON here
    parser.add_argument("--logical-cpus", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--daemon-roots", type=int, nargs="*", default=[], help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.batch_size % args.envs_per_actor:
        parser.error(f"--batch-size {args.batch_size} is not a multiple of --envs-per-actor "
                     f"{args.envs_per_actor}; pick one that is")
    if args.results_to:
        torch.set_num_threads(1)
        if args.address:
            join_cluster(args.address)
        else:
            start_embedded_ray(num_cpus=args.logical_cpus)
        try:
            results = run_setup(args, model_arrays(args.core, args.envs_per_actor), args.daemon_roots or [os.getpid()])
        finally:
            ray.shutdown()
        Path(args.results_to).write_text(json.dumps(results))
        return

    load_before = os.getloadavg()
    busy = machine_busy_seconds()
    time.sleep(3)
    idle_busy = (machine_busy_seconds() - busy) / 3  # what the machine's other work takes before the benchmark
    results = run_rays(args, argv)
    load_after = os.getloadavg()

    frames_per_unroll = args.unroll_length * args.envs_per_actor * FRAMESKIP
    print(f"\nMachine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, Ray {ray.__version__}, "
          f"Python {sys.version.split()[0]}. Load average (1/5/15 min) before {load_before[0]:.2f}/"
          f"{load_before[1]:.2f}/{load_before[2]:.2f}, after {load_after[0]:.2f}/{load_after[1]:.2f}/"
          f"{load_after[2]:.2f}; CPU busy before starting (other work): {idle_busy:.2f} cores.")
    print(f"Command: python -m bench.ingest {' '.join(argv)}")
    print(f"Unrolls: T={args.unroll_length}, N={args.envs_per_actor}, {args.core} core state; "
          f"{frames_per_unroll} frames per unroll, B={args.batch_size} "
          f"({args.batch_size // args.envs_per_actor} unrolls per batch).\n")
    for setup, result in results:
        cells, profile = result["cells"], result["profile"]
        print(f"Ray: {SETUP_NAMES[setup]}\n")
        print(CELL_HEADER)
        for cell in cells:
            print(format_cell(cell))
        print("\n| unroll from | MB | ready ms | get ms | decode ms | concat ms/batch | batch_unrolls ms/batch |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for row in profile:
            print(f"| {row['node']} | {row['nbytes'] / 1e6:.2f} | {row['ready']:.1f} | {row['get']:.2f} | "
                  f"{row['decode']:.1f} | {row['concat']:.1f} | {row['batch']:.1f} |")
        print()


if __name__ == "__main__":
    main()
