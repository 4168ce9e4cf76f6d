"""Train an IMPALA agent with any core: `python -m agent.train --env Breakout --core delta_lstm`.

Actors (Ray actors, `actors.actor.ActorPool`) step environments with CPU copies of the policy and return unrolls;
the learner runs here, in the driver: it batches unrolls, takes an RMSProp step (`learner.impala.update`) and
publishes the new weights (one object-store copy per version, which actors fetch when they start their next
unroll). Each actor has at most `unrolls_in_flight` requests outstanding, which bounds the policy lag; the lag
(learner version minus the version that acted) is measured on every unroll that is learned from.

Everything lives in `runs/<name>/`: config.yaml (the resolved config), logs.csv, TensorBoard events and
checkpoint.pt. Running the same command again resumes from the checkpoint.
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import ray
import torch

from actors.actor import ActorPool
from actors.envs import ATARI_PROTOCOLS, env_spaces, resolve_game
from agent.checkpoint import (
    CheckpointMismatchError, check_compatible, load_checkpoint, rng_state, save_checkpoint, set_rng_state
)
from agent.config import CONFIG_DIR, ConfigError, env_options, load_yaml, resolve_config, resolve_device, save_config
from agent.logging import RunLogger
from learner.impala import Hyperparameters, LearnerState, batch_unrolls, update
from models import CORE_NAMES, PolicyNet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = load_yaml(CONFIG_DIR / "atari.yaml")

    def default(key: str) -> str:
        return f"(default: {defaults[key]})"

    p = argparse.ArgumentParser(
        prog="python -m agent.train",
        description="Train an IMPALA agent whose memory is a recurrent core (e.g. a fast weight programmer). "
        "Defaults are the paper's protocol (configs/atari.yaml, sizes in configs/cores.yaml); a --config file "
        "overrides them and flags override both. Running the same command again resumes the run.",
    )
    p.add_argument("--env", help="game as you would type it: Breakout, breakout, ALE/Breakout-v5; "
                   "or 'memory', a toy memory task for smoke tests")
    p.add_argument("--core", help=f"memory of the agent: {', '.join(CORE_NAMES)}")
    p.add_argument("--config", help="YAML file with config keys (those of configs/atari.yaml and core_kwargs)")
    p.add_argument("--name", help="run name; the run lives in RUNS_DIR/NAME (default: <game>_<core>)")
    p.add_argument("--runs-dir", help=f"parent directory of runs {default('runs_dir')}")
    p.add_argument("--ray-address", help="join a Ray cluster started with `ray start --head`: 'auto' or "
                   "host:port (default: start an embedded local Ray sized to this machine)")
    p.add_argument("--num-actors", type=int, help="Ray actors stepping environments (default: 0 = one per CPU "
                   "of the cluster minus one for the learner)")
    p.add_argument("--envs-per-actor", type=int, help=f"environments per actor {default('envs_per_actor')}")
    p.add_argument("--unroll-length", type=int, help=f"T, steps per unroll {default('unroll_length')}")
    p.add_argument("--batch-size", type=int, help="B, environment trajectories per learner update, a multiple "
                   f"of --envs-per-actor {default('batch_size')}")
    p.add_argument("--total-frames", type=int, help="emulator frames (agent steps x frameskip) to train for "
                   f"{default('total_frames')}")
    p.add_argument("--learning-rate", type=float, help=f"RMSProp learning rate {default('learning_rate')}")
    p.add_argument("--entropy-cost", type=float, help=f"entropy regularisation {default('entropy_cost')}")
    p.add_argument("--atari-protocol", choices=ATARI_PROTOCOLS,
                   help="paper: the paper's Atari wrappers (FIRE after every lost life, gym's time limits); ale: "
                   f"ale-py's own vector env, faster {default('atari_protocol')}")
    p.add_argument("--sticky-actions", action="store_true", default=None,
                   help="repeat the previous action with probability 0.25 (Machado et al. 2018; default: off)")
    p.add_argument("--device", help=f"learner device: auto, cpu, cuda, cuda:N {default('device')}")
    p.add_argument("--seed", type=int, help=f"seeds the learner, the actors and the environments {default('seed')}")
    sizes = p.add_argument_group("core sizes", "default: the core's entry in configs/cores.yaml")
    sizes.add_argument("--hidden-size", type=int, help="width of the core (LSTM units, fast-weight model width)")
    sizes.add_argument("--num-layers", type=int, help="stacked layers / fast-weight blocks")
    sizes.add_argument("--num-heads", type=int, help="fast-weight heads")
    sizes.add_argument("--head-dim", type=int, help="size of each fast-weight head")
    sizes.add_argument("--ff-size", type=int, help="feed-forward width of each fast-weight block")
    return p.parse_args(argv)


def connect_ray(address: str | None) -> bool:
    """Start or join Ray unless it is already up (e.g. in tests). Returns whether this call started it."""
    if ray.is_initialized():
        return False
    if address is None:
        # An embedded cluster only talks to itself: keep every Ray socket on 127.0.0.1.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    else:
        ray.init(address=address)
    return True


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


def train(config: dict) -> dict:
    """Run (or resume) the training run that `config` (from `agent.config.resolve_config`) describes.

    Returns a summary: run directory, frames, updates, mean returns of the recent episodes (full games and
    lives), actor replacements and the latest frames/s.
    """
    game = resolve_game(config["env"])
    run_dir = Path(config["runs_dir"]) / config["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / "checkpoint.pt"
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path.exists() else None
    if checkpoint is not None:
        check_compatible(checkpoint, game, config, checkpoint_path)
    save_config(config, run_dir / "config.yaml")

    torch.manual_seed(config["seed"])
    observation_shape, num_actions = env_spaces(game, **env_options(config))
    model_spec = dict(
        observation_shape=list(observation_shape),
        num_actions=num_actions,
        core=config["core"],
        core_kwargs=config["core_kwargs"],
        use_last_action=config["use_last_action"],
    )
    device = resolve_device(config["device"])
    hp = Hyperparameters.from_config(config)
    learner = LearnerState.create(PolicyNet(**model_spec).to(device), hp)
    if checkpoint is not None:
        learner.load_state_dict(checkpoint["learner"])
        set_rng_state(checkpoint["rng"])
        print(f"Resuming {run_dir} at {format_count(learner.frames)} frames, {learner.updates} updates", flush=True)
    del checkpoint

    def save(path: Path) -> None:
        payload = {"learner": learner.state_dict(), "config": config, "game": game, "model_spec": model_spec,
                   "rng": rng_state()}
        save_checkpoint(payload, path)

    game_returns: collections.deque = collections.deque(maxlen=100)
    life_returns: collections.deque = collections.deque(maxlen=100)
    games, fps, pool = 0, float("nan"), None

    def summary() -> dict:
        return {
            "run_dir": str(run_dir),
            "frames": learner.frames,
            "updates": learner.updates,
            "mean_game_return": mean_or_nan(game_returns),
            "mean_life_return": mean_or_nan(life_returns),
            "actor_replacements": pool.replacements if pool else 0,
            "fps": fps,
        }

    if learner.frames >= config["total_frames"]:
        print(f"{run_dir} has trained for its {format_count(config['total_frames'])} frames; raise --total-frames "
              "to train on", flush=True)
        return summary()

    T, N, B = config["unroll_length"], config["envs_per_actor"], config["batch_size"]
    owns_ray = connect_ray(config["ray_address"])
    logger = RunLogger(run_dir, start=learner.frames)
    try:
        cluster_cpus = ray.cluster_resources().get("CPU", 0)
        num_actors = config["num_actors"] or max(1, int((cluster_cpus - 1) // config["actor_cpus"]))
        if num_actors * config["actor_cpus"] > cluster_cpus:
            raise ConfigError(
                f"{num_actors} actors x {config['actor_cpus']} CPUs exceed the Ray cluster's {cluster_cpus:g} CPUs; "
                "lower --num-actors (or actor_cpus), or add nodes to the cluster"
            )
        # The learner shares this machine with the actors: by default it takes the cores they leave free.
        local_cpus_left = (os.cpu_count() or 1) - int(num_actors * config["actor_cpus"])
        torch.set_num_threads(config["learner_threads"] or max(1, local_cpus_left))
        pool = ActorPool(
            num_actors,
            dict(game=game, env_options=env_options(config), num_envs=N, model_spec=model_spec, unroll_length=T),
            seed=config["seed"],
            stream=learner.updates,
            num_cpus=config["actor_cpus"],
            unrolls_in_flight=config["unrolls_in_flight"],
            name=f"{config['name']}/{uuid.uuid4().hex[:6]}",  # unique across sessions of the run
        )
        weights = [ray.put(learner.weights())]  # one object-store copy per version
        print(f"Training {config['core']} on {game}: {num_actors} actor{'s' * (num_actors != 1)} x {N} envs, "
              f"T={T}, B={B}, device {device}; run directory {run_dir}", flush=True)

        ready: list[dict] = []
        interval = {"lag": [], "stats": [], "frames": learner.frames, "updates": learner.updates}
        last_log = last_checkpoint = start_time = time.time()
        snapshots = [f for f in config["snapshot_frames"] if f > learner.frames]
        deadline = start_time + config["time_limit_s"] if config["time_limit_s"] > 0 else float("inf")
        while learner.frames < config["total_frames"] and time.time() < deadline:
            unroll = pool.next_unroll(learner.updates, weights)
            if unroll is not None:
                ready.append(unroll)
                for episode in unroll["episodes"]:
                    (game_returns if episode.kind == "game" else life_returns).append(episode.episode_return)
                    games += episode.kind == "game"

            if len(ready) * N >= B:
                batch, ready = ready[: B // N], ready[B // N :]
                interval["lag"] += [learner.updates - u["version"] for u in batch]
                tensors, core_state = batch_unrolls(batch, device)
                interval["stats"].append(update(learner, tensors, core_state, hp, sum(u["frames"] for u in batch)))
                weights = [ray.put(learner.weights())]
                for snapshot in [f for f in snapshots if f <= learner.frames]:
                    save(run_dir / f"checkpoint_{snapshot}.pt")
                    snapshots.remove(snapshot)

            now = time.time()
            if now - last_log >= config["log_interval_s"] and interval["stats"]:
                fps = (learner.frames - interval["frames"]) / (now - last_log)
                row = {
                    "frames": learner.frames,
                    "updates": learner.updates,
                    "fps": fps,
                    "updates_per_s": (learner.updates - interval["updates"]) / (now - last_log),
                    "mean_game_return": mean_or_nan(game_returns),
                    "mean_life_return": mean_or_nan(life_returns),
                    "games": games,
                    "policy_lag": mean_or_nan(interval["lag"]),
                    "policy_lag_max": max(interval["lag"]),
                    "actor_replacements": pool.replacements,
                    **{key: mean_or_nan([s[key] for s in interval["stats"]]) for key in interval["stats"][0]},
                    "time_s": now - start_time,
                }
                logger.log(row)
                eta = (config["total_frames"] - learner.frames) / fps if fps > 0 else float("inf")
                print(
                    f"[{config['name']}] frames {format_count(learner.frames)}/{format_count(config['total_frames'])}"
                    f" | {fps:,.0f} fps | updates {learner.updates:,} | return {format_mean(row['mean_game_return'])}"
                    f" (life {format_mean(row['mean_life_return'])}, {games} games) | lag {row['policy_lag']:.1f}"
                    f" (max {row['policy_lag_max']}) | eta {format_duration(eta)}",
                    flush=True,
                )
                interval = {"lag": [], "stats": [], "frames": learner.frames, "updates": learner.updates}
                last_log = now
            if now - last_checkpoint >= config["checkpoint_interval_s"]:
                save(checkpoint_path)
                last_checkpoint = now
        save(checkpoint_path)
        status = "Done" if learner.frames >= config["total_frames"] else "Time limit reached"
        print(f"{status}: {format_count(learner.frames)} frames, {learner.updates} updates; checkpoint "
              f"{checkpoint_path}", flush=True)
    except KeyboardInterrupt:
        save(checkpoint_path)
        print(f"Interrupted: checkpoint saved at {format_count(learner.frames)} frames; run the same command to "
              "resume", flush=True)
    finally:
        if pool is not None:
            pool.close()
        logger.close()
        if owns_ray:
            ray.shutdown()
    return summary()


def main(argv: list[str] | None = None) -> dict:
    args = vars(parse_args(argv))
    config_file = args.pop("config")
    try:
        return train(resolve_config(config_file, args))
    except (ConfigError, CheckpointMismatchError) as e:  # the user's to fix: a message, not a traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
