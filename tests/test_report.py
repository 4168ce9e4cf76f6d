"""agent.report on small synthetic runs: scores, rliable's aggregates and intervals, readable PNGs."""
from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest
import yaml
from rliable import library as rly
from rliable import metrics
from scipy import stats

from agent.report import AGGREGATES, main

TASKS = ("popgym-RepeatPreviousEasy-v0", "popgym-CountRecallEasy-v0")


def write_run(root, name: str, env: str, core: str, seed: int, returns: list[float]) -> None:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"env": env, "core": core, "seed": seed, "name": name}))
    with open(run / "logs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["frames", "updates", "mean_game_return"])
        writer.writeheader()
        for i, value in enumerate(returns):
            writer.writerow({"frames": 1000 * (i + 1), "updates": i + 1, "mean_game_return": value})


@pytest.fixture
def popgym_runs(tmp_path):
    """2 cores x 2 tasks x 4 seeds; the final returns are `finals[core][seed, task]`."""
    rng = np.random.default_rng(0)
    finals = {"lstm": rng.uniform(0, 1, (4, 2)), "none": rng.uniform(-0.6, 0, (4, 2))}
    for core, table in finals.items():
        for seed in range(4):
            for t, task in enumerate(TASKS):
                curve = list(np.linspace(-0.5, table[seed, t], 6))
                write_run(tmp_path / "runs", f"{task}_{core}_{seed}", task, core, seed, ["", *curve])
    return tmp_path / "runs", finals


def test_report_matches_rliable_called_directly(popgym_runs, tmp_path):
    runs, finals = popgym_runs
    out = tmp_path / "out"
    result = main([str(runs), "--out", str(out), "--reps", "2000", "--seed", "3"])["popgym"]
    assert result["tasks"] == sorted(TASKS)
    order = [TASKS.index(t) for t in result["tasks"]]
    for core in finals:
        assert np.allclose(result["scores"][core], finals[core][:, order])  # POPGym returns as they are

    def aggregates(x):
        return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x), metrics.aggregate_optimality_gap(x)])

    np.random.seed(3)  # rliable 1.2 resamples with numpy's global generator
    expected_points, expected_intervals = rly.get_interval_estimates(
        {c: finals[c][:, order] for c in sorted(finals)}, aggregates, reps=2000
    )
    for core in finals:
        assert np.array_equal(result["points"][core], expected_points[core])
        assert np.array_equal(result["intervals"][core], expected_intervals[core])
        # Against the definitions: IQM is the 25%-trimmed mean of all scores, the gap the mean shortfall below 1.
        flat = finals[core].ravel()
        assert result["points"][core][0] == pytest.approx(stats.trim_mean(flat, 0.25))
        assert result["points"][core][2] == pytest.approx(np.mean(1 - np.minimum(flat, 1)))
        low, high = result["intervals"][core]
        assert np.all(low <= result["points"][core]) and np.all(result["points"][core] <= high)

    text = (out / "report.md").read_text()
    assert all(name in text for name in AGGREGATES) and "popgym-CountRecallEasy-v0" in text
    # Two tasks side by side at 4.5 x 3.2 inches each, 100 dpi; three aggregate panels at 4 inches each.
    for name, (height, width) in (("curves_popgym.png", (320, 900)), ("aggregates_popgym.png", (210, 1200))):
        image = cv2.imread(str(out / name))
        assert image is not None and image.shape == (height, width, 3), name
        assert image.std() > 10, f"{name} is not blank"


def test_atari_scores_are_human_normalised(tmp_path):
    # Breakout: random 1.7, human 30.5; Pong: random -20.7, human 14.6.
    for seed, (breakout, pong) in enumerate([(30.5, -20.7), (16.1, 14.6)]):
        write_run(tmp_path, f"b{seed}", "Breakout", "lstm", seed, [breakout])
        write_run(tmp_path, f"p{seed}", "ALE/Pong-v5", "lstm", seed, [pong])
    result = main([str(tmp_path), "--out", str(tmp_path / "out"), "--reps", "100"])["atari"]
    assert result["tasks"] == ["breakout", "pong"]
    assert np.allclose(result["scores"]["lstm"], [[1.0, 0.0], [0.5, 1.0]])


def test_incomplete_grid_is_refused_with_one_line(popgym_runs, tmp_path):
    runs, _ = popgym_runs
    extra = tmp_path / "extra"
    write_run(extra, "one_more", TASKS[0], "lstm", 9, [0.1])
    with pytest.raises(SystemExit, match="same number of runs for every core and task.*lstm/popgym-Count"):
        main([str(runs), str(extra), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="is not a run directory"):
        main([str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
