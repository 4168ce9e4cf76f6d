"""Train an IMPALA agent with any core: `python -m agent.train --env Breakout --core delta_lstm`.

The command line of `learner.rl.train` (which documents the run: actors, learner, run directory, resumption).
Exit codes: 0 when the run finished or reached its time limit, 130 after Ctrl-C and 143 after SIGTERM (both
with a checkpoint written), 1 for bad input (one line on stderr) or a lost Ray cluster (with a checkpoint).
"""
from __future__ import annotations

import argparse
import sys

from actors.cluster import ClusterError
from actors.envs import ATARI_PROTOCOLS
from actors.cluster import ClusterError
from agent.config import CORE_SIZE_KEYS, ConfigError, add_core_size_flags, load_defaults, resolve_config, resolve_device
from learner.rl import train
from models import CORE_NAMES
from models.ops import BACKEND_NAMES
from runio.checkpoint import CheckpointMismatchError
from runio.files import RunFileError
from runio.lock import RunLockedError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = load_defaults("atari.yaml")

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
                   "host:port (default: start a private embedded Ray on 127.0.0.1 sized to this machine)")
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
    p.add_argument("--backend", choices=BACKEND_NAMES, help="fast-weight rules: auto runs the fused kernels (built "
                   "once, before the actors start), reference the plain PyTorch loops; actors always run on the CPU, "
                   f"so with cuda they run the cpu kernels {default('backend')}")
    p.add_argument("--torso-precision", choices=("auto", "float32", "bfloat16"), help="precision of the torso's "
                   "convolutions (weights, core and losses stay float32); auto: bfloat16 where the learner's device "
                   f"computes it natively {default('torso_precision')}")
    p.add_argument("--seed", type=int, help=f"seeds the learner, the actors and the environments {default('seed')}")
    p.add_argument("--time-limit-s", type=float, help="stop with a checkpoint after this many seconds "
                   f"{default('time_limit_s')}")
    add_core_size_flags(p, CORE_SIZE_KEYS, "default: the core's entry in configs/cores.yaml")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = vars(parse_args(argv))
    config_file = args.pop("config")
    try:
        config = resolve_config(config_file, args)
        summary = train(config, resolve_device(config["device"]))
    except (ConfigError, CheckpointMismatchError, RunFileError, RunLockedError, ClusterError) as e:
        sys.exit(f"error: {e}")  # the user's to fix: one line, not a traceback
    if summary["exit_code"]:
        sys.exit(summary["exit_code"])
    return summary


if __name__ == "__main__":
    main()
