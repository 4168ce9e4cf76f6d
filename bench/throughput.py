"""Training throughput: environment frames/s of the whole system next to the raw vectorised environments.

    python -m bench.throughput --env Breakout --seconds 90 --cores none,lstm,delta_net,delta_lstm

For each core it trains (`learner.rl.train`, the paper's model sizes) for `--warmup + --seconds` and takes
the frames the learner consumed per second over the last `--seconds` (from the run's logs.csv). Next to it,
the same actors' vectorised environments (same number of actors, environments per actor, threads and Ray CPUs)
step with random actions for `--seconds`: the ceiling that emulation alone allows on these cores. Frames are
emulator frames: agent steps x frameskip 4, plus the frames the environment plays itself (no-op starts, and with
the paper's protocol the NOOP/FIRE/2 steps after every lost life). `--atari-protocol` picks the environment
(the paper's wrapper chain by default, or ale-py's vector env); the table's title names it.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray
import torch

from actors.cluster import connect_ray
from actors.envs import ATARI_PROTOCOLS, env_options, make_vector_env
from agent.config import resolve_config, resolve_device
from learner.rl import train


PHASES = ("wait_s", "batch_s", "update_s", "publish_s")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


PROTOCOL_NAMES = {"paper": "the paper's wrapper chain (FIRE after every lost life, gym's time limits)",
                  "ale": "ale-py's C++ vector env (FIRE only at a new game, 108k-frame cap)"}


@ray.remote
def random_play(game: str, num_envs: int, options: dict, seconds: float, seed: int) -> int:
    """Emulator frames stepped in `seconds` by one vector env taking uniformly random actions."""
    env = make_vector_env(game, num_envs, seed=seed, **options)
    rng = np.random.default_rng(seed)
    env.reset()
    frames_before, start = env.frames, time.perf_counter()
    while time.perf_counter() - start < seconds:
        env.step(rng.integers(0, env.num_actions, num_envs))
    played = env.frames - frames_before
    env.close()
    return played


def raw_env_fps(config: dict, num_actors: int, seconds: float) -> float:
    """Frames/s of `num_actors` concurrent vector envs, placed like the training actors."""
    task = random_play.options(num_cpus=config["actor_cpus"])
    refs = [task.remote(config["env"], config["envs_per_actor"], env_options(config), seconds, seed)
            for seed in range(num_actors)]
    return sum(ray.get(refs)) / seconds


def cpu_times() -> tuple[float, float]:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [float(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def training_fps(config: dict, warmup: float) -> dict:
    """Frames/s, updates/s, policy lag, per-phase seconds per update and machine CPU use of a training run,
    measured from its logs (and /proc/stat) after `warmup` seconds."""
    busy: list[tuple[float, float]] = []
    sampler = threading.Timer(warmup, lambda: busy.append(cpu_times()))
    sampler.start()
    summary = train(config, resolve_device(config["device"]))
    busy.append(cpu_times())
    sampler.cancel()
    with open(Path(summary["run_dir"]) / "logs.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if float(row["time_s"]) >= warmup]
    if len(rows) < 2:
        raise RuntimeError(f"too few log rows after the warm-up for core {config['core']}: raise --seconds")
    first, last = rows[0], rows[-1]
    elapsed = float(last["time_s"]) - float(first["time_s"])
    updates_per_s = (int(last["updates"]) - int(first["updates"])) / elapsed
    return {
        "fps": (int(last["frames"]) - int(first["frames"])) / elapsed,
        # Agent steps x frameskip: what other systems (e.g. Sample Factory) count, without the emulator frames of
        # the paper protocol's resets.
        "step_fps": updates_per_s * config["unroll_length"] * config["batch_size"] * config["frameskip"],
        "updates_per_s": updates_per_s,
        "lag": float(np.mean([float(row["policy_lag"]) for row in rows[1:]])),
        **{key: float(np.mean([float(row[key]) for row in rows[1:]])) for key in PHASES},
        "busy": (busy[1][0] - busy[0][0]) / (busy[1][1] - busy[0][1]) if len(busy) == 2 else float("nan"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="Breakout", help="game (default: Breakout)")
    p.add_argument("--cores", default="none,lstm,delta_net,delta_lstm", help="comma-separated cores")
    p.add_argument("--seconds", type=float, default=90, help="measurement window per core (default: 90)")
    p.add_argument("--warmup", type=float, default=30, help="training seconds ignored first (default: 30)")
    p.add_argument("--num-actors", type=int, default=0, help="0: one per CPU minus one (the training default)")
    p.add_argument("--envs-per-actor", type=int, default=8)
    p.add_argument("--unroll-length", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--torso-precision", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--learner-threads", type=int, default=0, help="0: the cores the actors leave free")
    p.add_argument("--atari-protocol", choices=ATARI_PROTOCOLS, default="paper",
                   help="paper: the paper's wrapper chain; ale: ale-py's vector env (default: paper)")
    args = p.parse_args()

    connect_ray(None)
    cluster_cpus = ray.cluster_resources()["CPU"]
    num_actors = args.num_actors or max(1, int(cluster_cpus) - 1)
    with tempfile.TemporaryDirectory() as runs_dir:
        configs = {
            core: resolve_config(None, {
                "env": args.env, "core": core, "num_actors": num_actors, "envs_per_actor": args.envs_per_actor,
                "unroll_length": args.unroll_length, "batch_size": args.batch_size, "device": args.device,
                "runs_dir": runs_dir, "name": f"bench_{core}", "time_limit_s": args.warmup + args.seconds,
                "log_interval_s": 5, "checkpoint_interval_s": 10**9, "snapshot_frames": [],
                "atari_protocol": args.atari_protocol, "torso_precision": args.torso_precision,
                "learner_threads": args.learner_threads,
            })
            for core in args.cores.split(",")
        }
        raw = raw_env_fps(next(iter(configs.values())), num_actors, args.seconds)
        results = {core: training_fps(config, args.warmup) for core, config in configs.items()}
    ray.shutdown()

    device = resolve_device(args.device)
    print(f"\nMachine: {os.cpu_count()} CPUs ({cpu_name()}), learner on {device}, "
          f"torch {torch.__version__}; {args.env}, {num_actors} actor(s) x {args.envs_per_actor} envs, "
          f"T={args.unroll_length}, B={args.batch_size}; {args.seconds:g} s measured after {args.warmup:g} s")
    print(f"Atari protocol: {PROTOCOL_NAMES[args.atari_protocol]} (--atari-protocol {args.atari_protocol})")
    config = next(iter(configs.values()))
    print(f"Torso precision: {config['torso_precision']}; learner threads: {args.learner_threads or 'default'}")
    print("| core | training frames/s | agent steps x frameskip /s | random-action env frames/s | ratio | updates/s "
          "| policy lag | wait / batch / update / publish s per update | machine busy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for core, r in results.items():
        phases = " / ".join(f"{r[key]:.3f}" for key in PHASES)
        print(f"| {core} | {r['fps']:,.0f} | {r['step_fps']:,.0f} | {raw:,.0f} | {r['fps'] / raw:.3f} "
              f"| {r['updates_per_s']:.2f} | {r['lag']:.2f} | {phases} | {r['busy']:.0%} |")


if __name__ == "__main__":
    main()
