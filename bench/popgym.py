"""POPGym benchmark: every core on a fixed set of POPGym Easy tasks, several seeds, then `agent.report`.

    python -m bench.popgym --runs-dir runs/popgym --out docs/popgym
    python -m bench.popgym --smoke --runs-dir /tmp/popgym_smoke --out /tmp/popgym_smoke/report

Each run is `agent.train` with configs/popgym.yaml (one actor and the learner, previous action fed to the core,
the model sizes of configs/cores.yaml) for `--frames` agent steps, one run after another in one Ray session, so
each run has the machine's cores to itself. Runs that finished earlier are skipped (their directory holds a
checkpoint that reached the frames), so an interrupted benchmark resumes. The report (final returns per task
and core, rliable aggregates over the tasks, learning curves) goes to `--out`; a `timing.csv` beside it gives
each run's wall time and frames per second.

The default grid is 6 tasks x 8 cores x 3 seeds at 200k agent steps per run (about two hours on a 2-core
machine: docs/benchmarks.md), far shorter than POPGym's own runs (millions of steps): scores measure what each
core learns on a small CPU budget, not its ceiling.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import ray

from actors.cluster import connect_ray
from agent.config import CONFIG_DIR, resolve_config, resolve_device
from agent.report import report
from learner.rl import train
from models import CORE_NAMES

# Diagnostic tasks (recall a fixed or relative position, reproduce a sequence) and memory games (count, match
# pairs, compare with the previous card); all with Discrete actions.
TASKS = (
    "popgym-RepeatFirstEasy-v0",
    "popgym-RepeatPreviousEasy-v0",
    "popgym-AutoencodeEasy-v0",
    "popgym-CountRecallEasy-v0",
    "popgym-ConcentrationEasy-v0",
    "popgym-HigherLowerEasy-v0",
)
SEEDS = (1, 2, 3)
FRAMES = 200_000
SMOKE = dict(tasks=TASKS[:2], seeds=(1,), frames=2_000, log_interval_s=0.2)  # logs even such short runs


def run_name(task: str, core: str, seed: int) -> str:
    return f"{task.removeprefix('popgym-').removesuffix('-v0')}_{core}_s{seed}"


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m bench.popgym", description=__doc__.split("\n")[0])
    p.add_argument("--runs-dir", default="runs/popgym", help="parent of the run directories (default: runs/popgym)")
    p.add_argument("--out", default="docs/popgym", help="report directory (default: docs/popgym)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated POPGym ids (default: the six above)")
    p.add_argument("--cores", default=",".join(CORE_NAMES), help="comma-separated cores (default: all)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds (default: 1,2,3)")
    p.add_argument("--frames", type=int, default=FRAMES, help=f"agent steps per run (default: {FRAMES})")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny check of the whole pipeline: {len(SMOKE['tasks'])} tasks, 1 seed, "
                   f"{SMOKE['frames']} steps per run, every core")
    p.add_argument("--reps", type=int, default=50_000, help="bootstrap resamples of the report (default: 50000)")
    args = p.parse_args(argv)
    tasks, seeds, frames = args.tasks.split(","), [int(s) for s in args.seeds.split(",")], args.frames
    log_interval = None  # configs/popgym.yaml's
    if args.smoke:
        tasks, seeds, frames, log_interval = SMOKE["tasks"], SMOKE["seeds"], SMOKE["frames"], SMOKE["log_interval_s"]
    cores = args.cores.split(",")
    runs_dir, out = Path(args.runs_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    owns_ray = connect_ray(None)
    timings, run_dirs = [], []
    try:
        for task in tasks:
            for core in cores:
                for seed in seeds:
                    config = resolve_config(CONFIG_DIR / "popgym.yaml", dict(
                        env=task, core=core, seed=seed, total_frames=frames, runs_dir=str(runs_dir),
                        name=run_name(task, core, seed), log_interval_s=log_interval,
                    ))
                    start = time.time()
                    summary = train(config, resolve_device(config["device"]))
                    run_dirs.append(summary["run_dir"])
                    timings.append({"run": config["name"], "task": task, "core": core, "seed": seed,
                                    "frames": summary["frames"], "wall_s": round(time.time() - start, 2),
                                    "fps": round(summary["fps"], 1)})
    finally:
        if owns_ray:
            ray.shutdown()
    with open(out / "timing.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(timings[0]))
        writer.writeheader()
        writer.writerows(timings)
    report(run_dirs, out, reps=args.reps)
    return out


if __name__ == "__main__":
    main()
