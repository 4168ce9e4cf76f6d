"""Tables and plots from training runs: `python -m agent.report RUN_DIRS... --out report/`.

A run directory (from `agent.train`) holds config.yaml (env, core, seed) and logs.csv (frames,
mean_game_return, ...). A directory without config.yaml stands for the run directories directly inside it.

What it writes to `--out`:
- `report.md`: final scores per task and core (mean, std and count over seeds), and aggregates over the tasks
  of each suite with stratified bootstrap 95% confidence intervals (rliable): interquartile mean (IQM), mean and
  optimality gap (the shortfall below a normalised score of 1).
- `curves_<suite>.png`: learning curves per task, the mean over seeds with a 95% confidence band.
- `aggregates_<suite>.png`: the aggregate estimates with their intervals.

Scores: a run's final score is its last logged `mean_game_return` (the mean return of its latest 100 games).
Atari games are human-normalised, (score - random) / (human - random), with the reference scores below; POPGym
returns are used as they are (each task already scales them to [-1, 1], 1 being the best possible).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from actors.envs import resolve_game
from actors.popgym_envs import is_popgym_name
from runio.files import atomic_path

# Random and human scores (random, human) of the 57 Atari games, as published with DQN (Mnih et al., Nature 2015)
# and completed to 57 games in DeepMind's later Atari work (e.g. Badia et al. 2020, "Agent57"). Keys are ale-py
# ROM ids.
ATARI_RANDOM_HUMAN = {
    "alien": (227.8, 7127.7), "amidar": (5.8, 1719.5), "assault": (222.4, 742.0), "asterix": (210.0, 8503.3),
    "asteroids": (719.1, 47388.7), "atlantis": (12850.0, 29028.1), "bank_heist": (14.2, 753.1),
    "battle_zone": (2360.0, 37187.5), "beam_rider": (363.9, 16926.5), "berzerk": (123.7, 2630.4),
    "bowling": (23.1, 160.7), "boxing": (0.1, 12.1), "breakout": (1.7, 30.5), "centipede": (2090.9, 12017.0),
    "chopper_command": (811.0, 7387.8), "crazy_climber": (10780.5, 35829.4), "defender": (2874.5, 18688.9),
    "demon_attack": (152.1, 1971.0), "double_dunk": (-18.6, -16.4), "enduro": (0.0, 860.5),
    "fishing_derby": (-91.7, -38.7), "freeway": (0.0, 29.6), "frostbite": (65.2, 4334.7),
    "gopher": (257.6, 2412.5), "gravitar": (173.0, 3351.4), "hero": (1027.0, 30826.4),
    "ice_hockey": (-11.2, 0.9), "jamesbond": (29.0, 302.8), "kangaroo": (52.0, 3035.0), "krull": (1598.0, 2665.5),
    "kung_fu_master": (258.5, 22736.3), "montezuma_revenge": (0.0, 4753.3), "ms_pacman": (307.3, 6951.6),
    "name_this_game": (2292.3, 8049.0), "phoenix": (761.4, 7242.6), "pitfall": (-229.4, 6463.7),
    "pong": (-20.7, 14.6), "private_eye": (24.9, 69571.3), "qbert": (163.9, 13455.0),
    "riverraid": (1338.5, 17118.0), "road_runner": (11.5, 7845.0), "robotank": (2.2, 11.9),
    "seaquest": (68.4, 42054.7), "skiing": (-17098.1, -4336.9), "solaris": (1236.3, 12326.7),
    "space_invaders": (148.0, 1668.7), "star_gunner": (664.0, 10250.0), "surround": (-10.0, 6.5),
    "tennis": (-23.8, -8.3), "time_pilot": (3568.0, 5229.2), "tutankham": (11.4, 167.6),
    "up_n_down": (533.4, 11693.2), "venture": (0.0, 1187.5), "video_pinball": (16256.9, 17667.9),
    "wizard_of_wor": (563.5, 4756.5), "yars_revenge": (3092.9, 54576.9), "zaxxon": (32.5, 9173.3),
}
AGGREGATES = ("IQM", "mean", "optimality gap")


class ReportError(ValueError):
    """Runs that cannot be reported; the message says what to change."""


@dataclass
class Run:
    path: Path
    task: str  # resolved game name
    core: str
    seed: int
    frames: np.ndarray  # [K] logged frame counts
    returns: np.ndarray  # [K] mean_game_return at those frames (NaN before the first game)

    @property
    def final(self) -> float:
        finite = self.returns[np.isfinite(self.returns)]
        return float(finite[-1]) if len(finite) else math.nan


def suite_of(task: str) -> str:
    return "popgym" if is_popgym_name(task) else "atari" if task in ATARI_RANDOM_HUMAN else "other"


def normalised(task: str, score: float | np.ndarray) -> float | np.ndarray:
    """Human-normalised score for Atari games; POPGym and other returns unchanged."""
    if task in ATARI_RANDOM_HUMAN:
        random, human = ATARI_RANDOM_HUMAN[task]
        return (score - random) / (human - random)
    return score


def run_dirs(paths: list[str | Path]) -> list[Path]:
    """`paths`, with a directory that has no config.yaml replaced by its subdirectories that have one."""
    found = []
    for path in map(Path, paths):
        if (path / "config.yaml").is_file():
            found.append(path)
        elif path.is_dir() and (inner := sorted(p.parent for p in path.glob("*/config.yaml"))):
            found += inner
        else:
            raise ReportError(f"{path} is not a run directory (no config.yaml) and holds none: pass run directories "
                              "written by agent.train")
    return found


def load_run(path: Path) -> Run:
    """A run directory's config and logged returns."""
    with open(path / "config.yaml") as f:
        config = yaml.safe_load(f)
    logs = path / "logs.csv"
    if not logs.is_file():
        raise ReportError(f"{path} has no logs.csv yet: let the run log at least once, or leave it out")
    with open(logs, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "mean_game_return" not in rows[0]:
        raise ReportError(f"{logs} has no mean_game_return column: pass runs of agent.train")
    try:
        task = resolve_game(config["env"])
    except ValueError as e:
        raise ReportError(f"{path}: {e}") from None
    return Run(
        path=path,
        task=task,
        core=config["core"],
        seed=int(config["seed"]),
        frames=np.array([float(r["frames"]) for r in rows]),
        returns=np.array([float(r["mean_game_return"] or "nan") for r in rows]),
    )


def score_matrices(runs: list[Run]) -> tuple[list[str], dict[str, np.ndarray]]:
    """(tasks, {core: normalised final scores [num_seeds, num_tasks]}) for runs of one suite.

    Seeds pair across tasks by rank; every core and task must have the same number of runs.
    """
    tasks = sorted({r.task for r in runs})
    cores = sorted({r.core for r in runs})
    counts = {(c, t): sum(r.core == c and r.task == t for r in runs) for c in cores for t in tasks}
    if len(set(counts.values())) != 1:
        listing = ", ".join(f"{c}/{t}: {n}" for (c, t), n in counts.items())
        raise ReportError(f"aggregates need the same number of runs for every core and task, got {listing}: "
                          "pass a complete grid of runs")
    scores = {}
    for core in cores:
        columns = [sorted((r for r in runs if r.core == core and r.task == t), key=lambda r: r.seed) for t in tasks]
        scores[core] = np.array([[normalised(t, r.final) for r in col] for t, col in zip(tasks, columns)]).T
    return tasks, scores


def aggregate_functions():
    from rliable import metrics

    return lambda scores: np.array([
        metrics.aggregate_iqm(scores), metrics.aggregate_mean(scores), metrics.aggregate_optimality_gap(scores)
    ])


def aggregate(scores: dict[str, np.ndarray], reps: int = 50_000, seed: int = 0) -> tuple[dict, dict]:
    """rliable's point estimates and stratified bootstrap 95% intervals of IQM, mean and optimality gap.

    Args:
        scores: {core: normalised scores [num_runs, num_tasks]}.
    Returns:
        ({core: [3]}, {core: [2, 3]} lower and upper bounds), in the order of AGGREGATES.
    """
    from rliable import library as rly

    # rliable 1.2 draws its resamples from numpy's global generator (its `random_state` argument is not used
    # for them): seed that one for reproducible intervals, and give the caller's state back afterwards.
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return rly.get_interval_estimates(scores, aggregate_functions(), reps=reps)
    finally:
        np.random.set_state(state)


def learning_curve(runs: list[Run], points: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames [P], mean [P], half-width of the 95% t-interval [P]) over seeds, on a grid over the frames every
    run reached; each run is linearly interpolated between its logged rows (NaN rows dropped)."""
    from scipy import stats

    curves = [(r.frames[np.isfinite(r.returns)], r.returns[np.isfinite(r.returns)]) for r in runs]
    curves = [(f, y) for f, y in curves if len(f)]
    if not curves:
        return np.array([]), np.array([]), np.array([])
    grid = np.linspace(max(f[0] for f, _ in curves), min(f[-1] for f, _ in curves), points)
    values = np.array([np.interp(grid, f, y) for f, y in curves])
    mean = values.mean(0)
    if len(values) < 2:
        return grid, mean, np.zeros_like(mean)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(0, ddof=1) / math.sqrt(len(values))
    return grid, mean, half


def plot_curves(runs: list[Run], suite: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r.task for r in runs})
    cores = sorted({r.core for r in runs})
    columns = min(3, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for core in cores:
            frames, mean, half = learning_curve([r for r in runs if r.task == task and r.core == core])
            if len(frames):
                line, = ax.plot(frames, mean, label=core)
                ax.fill_between(frames, mean - half, mean + half, color=line.get_color(), alpha=0.2)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("frames")
        ax.set_ylabel("human-normalised return" if suite == "atari" else "return")
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def plot_aggregates(points: dict, intervals: dict, suite: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cores = sorted(points)
    fig, axes = plt.subplots(1, len(AGGREGATES), figsize=(4 * len(AGGREGATES), 0.45 * len(cores) + 1.2))
    for k, (ax, name) in enumerate(zip(axes, AGGREGATES)):
        for row, core in enumerate(cores):
            low, high = intervals[core][0][k], intervals[core][1][k]
            ax.barh(row, high - low, left=low, height=0.6, alpha=0.6)
            ax.plot([points[core][k]] * 2, [row - 0.3, row + 0.3], color="black")
        ax.set_yticks(range(len(cores)), cores if k == 0 else [""] * len(cores))
        ax.set_title(name)
    fig.suptitle(f"{suite}: {'human-normalised score' if suite == 'atari' else 'return'}, 95% CIs", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(headers) - 1)) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def report(paths: list[str | Path], out: str | Path, reps: int = 50_000, seed: int = 0) -> dict:
    """Write report.md and the PNGs for the runs under `paths` into `out`; returns
    {suite: {"tasks", "scores", "points", "intervals", "files"}}."""
    runs = [load_run(p) for p in run_dirs(paths)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections, result = ["# Report", "", f"{len(runs)} runs. Final score: the last logged mean_game_return "
                        "(mean return of the latest 100 games)."], {}
    for suite in sorted({suite_of(r.task) for r in runs}):
        suite_runs = [r for r in runs if suite_of(r.task) == suite]
        tasks, scores = score_matrices(suite_runs)
        unit = "human-normalised score" if suite == "atari" else "return"
        cores = sorted(scores)
        finals = [[task] + [f"{np.mean(scores[c][:, j]):.3f} ± {np.std(scores[c][:, j], ddof=0):.3f}"
                            for c in cores] for j, task in enumerate(tasks)]
        sections += ["", f"## {suite}: final {unit} per task (mean ± std over {len(scores[cores[0]])} seeds)", "",
                     markdown_table(["task", *cores], finals)]
        points, intervals = aggregate(scores, reps=reps, seed=seed)
        rows = [[core] + [f"{points[core][k]:.3f} [{intervals[core][0][k]:.3f}, {intervals[core][1][k]:.3f}]"
                          for k in range(len(AGGREGATES))] for core in cores]
        sections += ["", f"## {suite}: aggregates over {len(tasks)} tasks ({unit}; stratified bootstrap 95% CIs, "
                     f"{reps} resamples)", "", markdown_table(["core", *AGGREGATES], rows)]
        files = [out / f"curves_{suite}.png", out / f"aggregates_{suite}.png"]
        plot_curves(suite_runs, suite, files[0])
        plot_aggregates(points, intervals, suite, files[1])
        sections += ["", *[f"![{f.stem}]({f.name})" for f in files]]
        result[suite] = {"tasks": tasks, "scores": scores, "points": points, "intervals": intervals,
                         "files": files}
    text = "\n".join(sections) + "\n"
    with atomic_path(out / "report.md") as tmp:
        Path(tmp).write_text(text)
    print(text, end="")
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m agent.report", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories of agent.train, or directories holding them")
    p.add_argument("--out", default="report", help="directory for report.md and the PNGs (default: report)")
    p.add_argument("--reps", type=int, default=50_000, help="bootstrap resamples (default: 50000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    args = p.parse_args(argv)
    try:
        return report(args.runs, args.out, reps=args.reps, seed=args.seed)
    except ReportError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
