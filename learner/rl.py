"""The IMPALA training loop: actors on Ray play and send unrolls, the learner batches them, takes an RMSProp step
(`learner.impala.update`) and publishes the new weights.

    summary = train(config)    # config from agent.config.resolve_config; runs or resumes runs/<name>/

The learner never waits for data that is already produced: a feeder thread takes unrolls as actors finish them,
decodes their frames, concatenates a batch and copies it to the learner's device while the current update runs.
Each actor has at most `unrolls_in_flight` requests outstanding, which bounds the policy lag (learner version
minus the version that acted), measured on every unroll learned from. The log has per-phase seconds per update:
waiting for a batch, making it (in the feeder, overlapped), the update, publishing the weights.

Faults: Ray restarts a dead actor (on another node when its node is gone) and retries its unroll; an actor gone
for good is replaced; both, and every node that joins or leaves, get a line and counters in the log. When no
unroll arrives for `cluster_timeout_s` (the cluster is unreachable), the run stops with a checkpoint.

Everything lives in `runs/<name>/`: config.yaml, logs.csv, TensorBoard events and checkpoint.pt (with the
previous one kept as checkpoint.prev.pt). A checkpoint holds `learner` (`LearnerState.state_dict()`), `config`,
`game`, `model_spec` (the `PolicyNet` arguments), `counters` (games, training seconds) and `rng`. Running the
same command again resumes; SIGTERM and Ctrl-C write a checkpoint and exit with 143 and 130.
"""
from __future__ import annotations

import collections
import math
import os
import queue
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch

from actors.actor import ActorPool
from actors.cluster import ClusterError, alive_nodes, connect_ray
from actors.envs import env_options, env_spaces, resolve_game
from actors.unroll import Unroll
import cuda_ext
from learner.impala import Hyperparameters, LearnerState, batch_unrolls, update
from models import PolicyNet
from models.ops import backend_label, resolve_backend
from runio.checkpoint import (
    check_identity, checkpoint_bytes, load_latest, rng_state, save_checkpoint, set_rng_state
)
from runio.files import RunFileError, write_yaml
from runio.keeper import CheckpointKeeper
from runio.lock import RunLock
from runio.logs import RunLogger

CHECKPOINT_KEYS = ("learner", "config", "game", "model_spec")
# Config keys that change what the checkpoint's model is or sees; anything else may change between sessions.
IDENTITY_KEYS = ("core", "core_kwargs", "use_last_action", "frame_stack", "frameskip")
EXIT_CODES = {"done": 0, "time_limit": 0, "interrupted": 130, "terminated": 143, "cluster_lost": 1}


def prepare_kernels(backend: str, device: torch.device) -> tuple[str, str]:
    """Build the fused kernels the run needs (once per install, with a visible message) before any actor starts,
    so that no actor builds or waits; returns the backends the learner and the actors (CPU) will run."""
    actor_choice = "cpu" if backend == "cuda" else backend
    if actor_choice in ("auto", "cpu"):
        cuda_ext.ensure_built("cpu")
    if device.type == "cuda" and backend in ("auto", "cuda"):
        cuda_ext.ensure_built("cuda")
    return resolve_backend(backend, device.type), resolve_backend(actor_choice, "cpu")


def run_identity(game: str, config: dict) -> dict:
    """What a checkpoint must share with the run that resumes or evaluates it."""
    return {"game": game, **{key: config[key] for key in IDENTITY_KEYS}}


def policy_from_checkpoint(checkpoint: dict, device: str | torch.device = "cpu") -> PolicyNet:
    """The trained `PolicyNet` of a loaded checkpoint dict, in eval mode, on `device`."""
    net = PolicyNet(**checkpoint["model_spec"])
    net.load_state_dict(checkpoint["learner"]["model"])
    return net.to(device).eval()


class Stop(Exception):
    """Raised in the training loop by SIGTERM."""


@dataclass
class Batch:
    """A learner batch made by the feeder: tensors on the learner's device and what the log needs of it."""

    tensors: dict[str, torch.Tensor]
    core_state: tuple[torch.Tensor, ...]
    frames: int
    versions: list[int]
    episodes: list
    nbytes: int
    make_s: float


class Feeder(threading.Thread):
    """Takes unrolls from `pool` as actors finish them and makes batches of `unrolls_per_batch` on `device`,
    keeping up to `depth` ready (one is enough to overlap; more would only add policy lag). The learner publishes
    weights with `publish`; the feeder hands them to actors with their next request."""

    def __init__(self, pool: ActorPool, unrolls_per_batch: int, device: torch.device, depth: int = 1):
        super().__init__(name="rfwp-feeder", daemon=True)
        self.pool, self.unrolls_per_batch, self.device = pool, unrolls_per_batch, device
        self.batches: queue.Queue[Batch] = queue.Queue(maxsize=depth)
        self.weights: tuple[int, list[ray.ObjectRef]] | None = None
        self.error: BaseException | None = None
        self.last_unroll = time.monotonic()
        self._stopping = threading.Event()

    def publish(self, version: int, weights: dict[str, torch.Tensor]) -> None:
        self.weights = (version, [ray.put(weights)])  # one object-store copy per version

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        try:
            ready: list[Unroll] = []
            while not self._stopping.is_set():
                unroll = self.pool.next_unroll(*self.weights, timeout=0.5)
                if unroll is None:
                    continue
                self.last_unroll = time.monotonic()
                ready.append(unroll)
                if len(ready) < self.unrolls_per_batch:
                    continue
                start = time.perf_counter()
                tensors, core_state = batch_unrolls(ready)
                if self.device.type == "cuda":
                    tensors = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in tensors.items()}
                    core_state = tuple(s.pin_memory().to(self.device, non_blocking=True) for s in core_state)
                batch = Batch(tensors, core_state, sum(u.frames for u in ready), [u.version for u in ready],
                              [e for u in ready for e in u.episodes], sum(u.nbytes for u in ready),
                              time.perf_counter() - start)
                ready = []
                while not self._stopping.is_set():
                    try:
                        self.batches.put(batch, timeout=0.5)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the learner thread, which stops the run with it
            self.error = e

    def next_batch(self, timeout: float) -> Batch:
        """The next batch; ClusterError when the feeder failed or no unroll came for `timeout` seconds."""
        while True:
            if self.error is not None:
                raise ClusterError(f"the actors cannot be reached ({type(self.error).__name__}: "
                                   f"{str(self.error).splitlines()[0] if str(self.error) else ''})")
            try:
                return self.batches.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() - self.last_unroll > timeout:
                    raise ClusterError(f"no unroll arrived for {timeout:.0f} s: the Ray cluster or its actors "
                                       "are unreachable") from None


@dataclass
class Interval:
    """What the log row of one log interval averages."""

    start: float
    frames: int
    updates: int
    lag: list[int] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("wait_s", "batch_s", "update_s",
                                                                             "publish_s"), 0.0))
    nbytes: int = 0
    frames_received: int = 0


def format_count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{days}d{hours:02d}h" if days else f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def mean_or_nan(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def format_mean(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


def describe_nodes(per_node: dict[str, int], nodes: dict[str, str]) -> str:
    """'3 on 127.0.0.1 (1a2b3c4d), 2 on ...': actors per node, by address and short node id."""
    return ", ".join(f"{count} on {nodes.get(node, '?')} ({node[:8]})" for node, count in sorted(per_node.items()))


def train(config: dict, device: torch.device) -> dict:
    """Run (or resume) the training run that `config` (from `agent.config.resolve_config`) describes, with the
    learner on `device`.

    Returns a summary: run directory, how it ended (`status`, and `exit_code` for the command line), frames,
    updates, mean returns of the recent episodes (full games and lives), actor restarts and replacements, lost
    nodes and the latest frames/s.
    """
    game = resolve_game(config["env"])
    run_dir = Path(config["runs_dir"]) / config["name"]
    with RunLock(run_dir):
        return _train_locked(config, device, game, run_dir)


def _train_locked(config: dict, device: torch.device, game: str, run_dir: Path) -> dict:
    checkpoint_path = run_dir / "checkpoint.pt"
    checkpoint = load_latest(checkpoint_path, required_keys=CHECKPOINT_KEYS)
    if checkpoint is not None:
        check_identity(run_identity(checkpoint["game"], checkpoint["config"]), run_identity(game, config),
                       checkpoint_path)
    write_yaml(config, run_dir / "config.yaml")

    torch.manual_seed(config["seed"])
    observation_shape, num_actions = env_spaces(game, **env_options(config))
    model_spec = dict(observation_shape=list(observation_shape), num_actions=num_actions, core=config["core"],
                      core_kwargs=config["core_kwargs"], use_last_action=config["use_last_action"],
                      reward_clip=config["reward_clip"], torso_precision=config["torso_precision"])
    hp = Hyperparameters.from_config(config)
    learner_backend, actor_backend = prepare_kernels(config["backend"], device)
    learner = LearnerState.create(PolicyNet(**model_spec, backend=learner_backend).to(device), hp)
    counters = {"games": 0, "time_s": 0.0}
    if checkpoint is not None:
        learner.load_state_dict(checkpoint["learner"])
        counters.update(checkpoint.get("counters", {}))
        set_rng_state(checkpoint["rng"])
        print(f"Resuming {run_dir} at {format_count(learner.frames)} frames, {learner.updates} updates", flush=True)
    del checkpoint

    def payload() -> dict:
        return {"learner": learner.state_dict(), "config": config, "game": game, "model_spec": model_spec,
                "counters": counters, "rng": rng_state()}

    def save(path: Path) -> None:
        save_checkpoint(payload(), path)

    game_returns: collections.deque = collections.deque(maxlen=100)
    life_returns: collections.deque = collections.deque(maxlen=100)
    summary = {"run_dir": str(run_dir), "fps": float("nan"), "actor_restarts": 0, "actor_replacements": 0,
               "nodes_lost": 0}

    def finish(status: str) -> dict:
        summary.update(status=status, exit_code=EXIT_CODES[status], frames=learner.frames, updates=learner.updates,
                       games=counters["games"], mean_game_return=mean_or_nan(game_returns),
                       mean_life_return=mean_or_nan(life_returns))
        return summary

    if learner.frames >= config["total_frames"]:
        print(f"{run_dir} has trained for its {format_count(config['total_frames'])} frames; raise --total-frames "
              "to train on", flush=True)
        return finish("done")

    T, N, B = config["unroll_length"], config["envs_per_actor"], config["batch_size"]
    owns_ray = connect_ray(config["ray_address"])
    logger = RunLogger(run_dir, start=learner.frames)
    keeper = CheckpointKeeper(checkpoint_path)  # saves the run if this process is ended without warning
    pool = feeder = status = None
    # SIGTERM (a scheduler's stop) ends the run like Ctrl-C; signal handlers can only be set in the main thread.
    in_main = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_stop) if in_main else None
    try:
        cluster_cpus = ray.cluster_resources().get("CPU", 0)
        num_actors = config["num_actors"] or max(1, int((cluster_cpus - 1) // config["actor_cpus"]))
        if num_actors * config["actor_cpus"] > cluster_cpus:
            raise ClusterError(
                f"{num_actors} actors x {config['actor_cpus']} CPUs exceed the Ray cluster's {cluster_cpus:g} "
                "CPUs; lower --num-actors (or actor_cpus), or add nodes to the cluster"
            )
        # The learner shares its machine with the actors there: by default it takes the cores they leave free.
        local_actors = num_actors if config["ray_address"] is None else 0
        torch.set_num_threads(config["learner_threads"] or max(1, (os.cpu_count() or 1) - int(
            local_actors * config["actor_cpus"])))
        pool = ActorPool(
            num_actors,
            dict(game=game, env_options={**env_options(config), "num_threads": config["env_threads"]}, num_envs=N,
                 model_spec={**model_spec, "backend": actor_backend}, unroll_length=T),
            seed=config["seed"],
            stream=learner.updates,
            num_cpus=config["actor_cpus"],
            unrolls_in_flight=config["unrolls_in_flight"],
            name=f"{config['name']}/{uuid.uuid4().hex[:6]}",  # unique across sessions of the run
        )
        feeder = Feeder(pool, B // N, device)
        feeder.publish(learner.updates, learner.weights())
        nodes = alive_nodes()
        print(f"Training {config['core']} on {game}: {num_actors} actor{'s' * (num_actors != 1)} x {N} envs, "
              f"T={T}, B={B}, learner on {device}, torso in {config['torso_precision']}; fast-weight rules: "
              f"learner {backend_label(learner_backend)}, "
              f"actors {backend_label(actor_backend)}; Ray: {len(nodes)} node{'s' * (len(nodes) != 1)} "
              f"({'embedded, 127.0.0.1' if config['ray_address'] is None else config['ray_address']}); "
              f"run directory {run_dir}", flush=True)
        feeder.start()

        interval = Interval(time.time(), learner.frames, learner.updates)
        last_checkpoint = session_start = time.time()
        time_before = counters["time_s"]
        snapshots = [f for f in config["snapshot_frames"] if f > learner.frames]
        deadline = session_start + config["time_limit_s"] if config["time_limit_s"] > 0 else float("inf")
        placement = ""
        while learner.frames < config["total_frames"] and time.time() < deadline:
            start = time.perf_counter()
            batch = feeder.next_batch(config["cluster_timeout_s"])
            waited = time.perf_counter()
            interval.lag += [learner.updates - v for v in batch.versions]
            interval.stats.append(update(learner, batch.tensors, batch.core_state, hp, batch.frames))
            updated = time.perf_counter()
            feeder.publish(learner.updates, learner.weights())
            published = time.perf_counter()
            for key, seconds in (("wait_s", waited - start), ("batch_s", batch.make_s),
                                 ("update_s", updated - waited), ("publish_s", published - updated)):
                interval.phases[key] += seconds
            interval.nbytes += batch.nbytes
            interval.frames_received += batch.frames
            for episode in batch.episodes:
                (game_returns if episode.kind == "game" else life_returns).append(episode.episode_return)
                counters["games"] += episode.kind == "game"
            for snapshot in [f for f in snapshots if f <= learner.frames]:
                save(run_dir / f"checkpoint_{snapshot}.pt")
                snapshots.remove(snapshot)

            now = time.time()
            counters["time_s"] = time_before + now - session_start
            # The last update always logs, so that the logs end at the run's final counters.
            if now - interval.start >= config["log_interval_s"] or learner.frames >= config["total_frames"]:
                current = alive_nodes()
                for node in nodes.keys() - current.keys():
                    summary["nodes_lost"] += 1
                    print(f"Lost Ray node {nodes[node]} ({node[:8]}): Ray restarts its actors on the surviving "
                          "nodes and retries their unrolls", flush=True)
                for node in current.keys() - nodes.keys():
                    print(f"Ray node {current[node]} ({node[:8]}) joined the cluster", flush=True)
                nodes = current
                current_placement = describe_nodes(pool.actors_per_node(), nodes)
                if all(pool.nodes) and current_placement != placement:
                    placement = current_placement
                    print(f"Actors: {placement}", flush=True)
                summary.update(actor_restarts=pool.restarts, actor_replacements=pool.replacements)
                summary["fps"] = _log_interval(logger, interval, learner, counters, summary, nodes, pool,
                                               game_returns, life_returns, config, now)
                interval = Interval(now, learner.frames, learner.updates)
                keeper.keep(checkpoint_bytes(payload()), learner.frames)
            if now - last_checkpoint >= config["checkpoint_interval_s"]:
                save(checkpoint_path)
                last_checkpoint = now
        save(checkpoint_path)
        status = "done" if learner.frames >= config["total_frames"] else "time_limit"
        print(f"{'Done' if status == 'done' else 'Time limit reached'}: {format_count(learner.frames)} frames, "
              f"{learner.updates} updates; checkpoint {checkpoint_path}", flush=True)
    except (KeyboardInterrupt, Stop) as e:
        save(checkpoint_path)
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated"
        print(f"{'Interrupted' if status == 'interrupted' else 'Terminated (SIGTERM)'}: checkpoint saved at "
              f"{format_count(learner.frames)} frames; run the same command to resume", flush=True)
    except ClusterError as e:
        if pool is None:
            raise
        save(checkpoint_path)
        status = "cluster_lost"
        print(f"Stopped: {e}; checkpoint saved at {format_count(learner.frames)} frames. Run the same command to "
              "resume once the cluster is back", flush=True)
    except RunFileError:
        keeper.close()  # the disk refused the trainer's own checkpoint: it would refuse the keeper's too
        raise
    finally:
        if in_main:
            # The checkpoint is written: a second Ctrl-C must not cut the shutdown short with a traceback.
            previous_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, previous_sigterm)
        if status is not None:
            keeper.close()  # every handled way out wrote the checkpoint; otherwise the keeper writes the last state
        if feeder is not None:
            feeder.stop()
            feeder.join(timeout=10)
        if pool is not None:
            try:
                pool.close()
            except Exception:  # a lost cluster cannot be told to stop its actors; Ray ends them with the driver
                pass
        logger.close()
        if owns_ray:
            ray.shutdown()
        if in_main:
            signal.signal(signal.SIGINT, previous_sigint)
    return finish(status)


def _raise_stop(signum, frame) -> None:
    raise Stop()


def _log_interval(logger: RunLogger, interval: Interval, learner: LearnerState, counters: dict, summary: dict,
                  nodes: dict, pool: ActorPool, game_returns, life_returns, config: dict, now: float) -> float:
    """Write the interval's log row and progress line; returns its frames/s."""
    seconds = now - interval.start
    updates = max(1, learner.updates - interval.updates)
    fps = (learner.frames - interval.frames) / seconds
    row = {
        "frames": learner.frames,
        "updates": learner.updates,
        "fps": fps,
        "updates_per_s": (learner.updates - interval.updates) / seconds,
        "mean_game_return": mean_or_nan(game_returns),
        "mean_life_return": mean_or_nan(life_returns),
        "games": counters["games"],
        "policy_lag": mean_or_nan(interval.lag),
        "policy_lag_max": max(interval.lag),
        "actor_restarts": pool.restarts,
        "actor_replacements": pool.replacements,
        "nodes": len(nodes),
        "nodes_lost": summary["nodes_lost"],
        **{key: value / updates for key, value in interval.phases.items()},
        "bytes_per_frame": interval.nbytes / max(1, interval.frames_received),
        **{key: mean_or_nan([s[key] for s in interval.stats]) for key in interval.stats[0]},
        "time_s": counters["time_s"],
    }
    logger.log(row)
    for node, count in pool.actors_per_node().items():  # TensorBoard only: the set of nodes changes
        logger.writer.add_scalar(f"actors_on_node/{nodes.get(node, '?')}_{node[:8]}", count, learner.frames)
    eta = (config["total_frames"] - learner.frames) / fps if fps > 0 else float("inf")
    print(
        f"[{config['name']}] frames {format_count(learner.frames)}/{format_count(config['total_frames'])}"
        f" | {fps:,.0f} fps | updates {learner.updates:,} | return {format_mean(row['mean_game_return'])}"
        f" (life {format_mean(row['mean_life_return'])}, {counters['games']} games) | lag {row['policy_lag']:.1f}"
        f" (max {row['policy_lag_max']}) | wait {row['wait_s']:.3f}s update {row['update_s']:.3f}s"
        f" | eta {format_duration(eta)}",
        flush=True,
    )
    return fps
