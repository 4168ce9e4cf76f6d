"""Evaluate trained policies: `python -m agent.evaluate --checkpoint runs/x/checkpoint.pt --episodes 30`.

Two modes, both for one checkpoint or several (files, or run directories meaning every `*.pt` in them), with one
table row per checkpoint:

- play (default): full games on real ALE with the training protocol of the checkpoint's run (its game and
  environment options; the paper's test protocol: greedy actions, the core state carried across steps and reset
  at every lost life as in training). Game `i` uses env seed `--seed + i` for every checkpoint. Reports
  full-game returns (the headline) and per-life returns: mean, median, std, min, max and a bootstrap 95%
  confidence interval of the mean. `--record DIR` keeps a video, a trajectory and `summary.json`.
  `--reject-negative-returns` discards games with a negative return and plays on until each run has
  `--episodes` others (the paper's scorer for BattleZone and UpNDown).
- re-score (`--episodes-dir DIR`): replays every episode recorded in DIR in the emulator, checks that it
  reproduces the recorded rewards and observations, and compares the policy's greedy actions and values with
  what was recorded (action agreement; value error against the discounted clipped returns that followed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from actors.envs import env_options, resolve_game
from actors.recording import (
    Trajectory,
    TrajectoryError,
    discounted_returns,
    load_trajectories,
    play_episode,
    replay,
    save_trajectory,
    write_json,
)
from agent.config import ConfigError, resolve_device
from learner.rl import CHECKPOINT_KEYS, policy_from_checkpoint
from models import CORE_NAMES, PolicyNet
from runio.checkpoint import CheckpointError, load_checkpoint

BOOTSTRAP_SAMPLES = 10_000
MAX_GAMES_PER_KEPT_GAME = 10  # --reject-negative-returns gives up on a run after this many games per game kept
PROGRESS_EVERY_STEPS = 500
TRAJECTORY_FILES = ("episode_*.json", "episode_*.npz", "episode_*.mp4", "summary.json")


class EvaluationError(ValueError):
    """Bad input to the evaluation: the message says what is wrong and how to fix it."""


def find_checkpoints(paths: list[str]) -> list[Path]:
    """The checkpoint files named by `paths`: files as given, directories expanded to the `*.pt` in them."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            in_dir = sorted(path.glob("*.pt"))
            if not in_dir:
                raise EvaluationError(f"{path} holds no checkpoint (*.pt): pass a run directory of agent.train")
            found += in_dir
        elif path.is_file():
            found.append(path)
        else:
            raise EvaluationError(
                f"checkpoint {path} not found: pass a checkpoint written by `python -m agent.train` "
                "(runs/<name>/checkpoint.pt) or a run directory"
            )
    return found


def load_evaluated_policy(path: Path, device: torch.device) -> tuple[PolicyNet, dict]:
    """The policy of checkpoint `path` (eval mode, on `device`) and the checkpoint; EvaluationError if the file
    is unreadable, is not a training checkpoint, or needs a core or game this installation lacks."""
    try:
        checkpoint = load_checkpoint(path, required_keys=CHECKPOINT_KEYS)
    except CheckpointError as e:
        raise EvaluationError(f"{e}: evaluate another checkpoint of the run (checkpoint.prev.pt, "
                              "checkpoint_<frames>.pt) or train again") from None
    core = checkpoint["model_spec"].get("core")
    if core not in CORE_NAMES:
        raise EvaluationError(
            f"{path} was trained with core {core!r}, which this rfwp does not have (cores: {', '.join(CORE_NAMES)}): "
            "evaluate it with the rfwp version that trained it"
        )
    try:
        resolve_game(checkpoint["game"])
    except ValueError as e:
        raise EvaluationError(f"{path} plays a game this installation lacks: {e}") from None
    try:
        net = policy_from_checkpoint(checkpoint, device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise EvaluationError(f"{path}: its weights do not fit its model spec ({str(e).splitlines()[0]})") from None
    return net, checkpoint


def describe(values: list[float], seed: int = 0) -> dict:
    """count, mean, median, std (population), min, max and `ci95`, the percentile bootstrap 95% confidence
    interval of the mean (BOOTSTRAP_SAMPLES resamples, generator seeded with `seed`); None where undefined."""
    x = np.asarray(values, np.float64)
    if len(x) == 0:
        return {"count": 0, **dict.fromkeys(("mean", "median", "std", "min", "max", "ci95"))}
    resampled = x[np.random.default_rng(seed).integers(0, len(x), (BOOTSTRAP_SAMPLES, len(x)))].mean(axis=1)
    return {
        "count": len(x),
        "mean": float(x.mean()),
        "median": float(np.median(x)),
        "std": float(x.std()),
        "min": float(x.min()),
        "max": float(x.max()),
        "ci95": [float(v) for v in np.percentile(resampled, [2.5, 97.5])],
    }


def prepare_record_dir(directory: Path, game: str, overwrite: bool) -> None:
    """Create `directory`, refusing one that holds episodes of another game, or any episodes without
    `overwrite` (which deletes them)."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(directory.glob("episode_*.json"))
    if not existing:
        return
    try:
        recorded_game = json.loads(existing[0].read_text()).get("game")
    except (ValueError, AttributeError):
        recorded_game = None
    if recorded_game != game:
        raise EvaluationError(
            f"{directory} holds recorded episodes of {recorded_game or 'an unreadable game'}, not {game}: "
            "record into another directory"
        )
    if not overwrite:
        raise EvaluationError(
            f"{directory} already holds {len(existing)} recorded episodes: pass --overwrite to replace them, or "
            "record into another directory"
        )
    for pattern in TRAJECTORY_FILES:
        for path in directory.glob(pattern):
            path.unlink()


def evaluate_policy(
    net: PolicyNet,
    checkpoint: dict,
    path: Path,
    label: str,
    *,
    episodes: int,
    runs: int,
    greedy: bool,
    seed: int,
    max_steps: int | None,
    device: torch.device,
    record_dir: Path | None,
    reject_negative_returns: bool = False,
) -> dict:
    """Play `runs * episodes` games (env seeds `seed`, `seed + 1`, ...), recording them into `record_dir` if given.

    With `reject_negative_returns`, a game with a negative return is not counted and the run plays another game
    (the next seed) instead, up to MAX_GAMES_PER_KEPT_GAME * `episodes` games per run.

    Returns the summary (also written as summary.json): the checkpoint, its frames, game and core, the protocol,
    `game_returns` and `life_returns` (`describe` of the full-game and per-life returns of the counted games),
    `runs` (the mean return of each run's counted games, and their mean and std), `games_cut_by_max_steps`,
    `games_rejected` and `episodes` (seed, return, per-life returns, steps, how each game ended and whether it
    was rejected).
    """
    game, options = checkpoint["game"], env_options(checkpoint["config"])
    frames = int(checkpoint["learner"]["frames"])
    metas: list[dict] = []
    run_returns: list[list[float]] = []
    with tqdm(total=runs * episodes, desc=label, unit="game", dynamic_ncols=True) as bar:

        def show_steps(steps: int) -> None:
            if steps % PROGRESS_EVERY_STEPS == 0:  # a full game lasts up to 100k steps: show that it moves
                bar.set_postfix(steps=steps)

        for _ in range(runs):
            kept: list[float] = []
            for _ in range(MAX_GAMES_PER_KEPT_GAME * episodes if reject_negative_returns else episodes):
                i = len(metas)
                stem = f"episode_{i:04d}"
                trajectory = play_episode(
                    net, game, options, seed + i, greedy=greedy, max_steps=max_steps, device=device,
                    video_path=record_dir / f"{stem}.mp4" if record_dir is not None else None,
                    meta={"checkpoint": str(path), "frames": frames, "core": checkpoint["model_spec"]["core"]},
                    on_step=show_steps,
                )
                if record_dir is not None:
                    save_trajectory(trajectory, record_dir, stem)
                rejected = reject_negative_returns and trajectory.meta["return"] < 0
                metas.append({"episode": stem, **trajectory.meta, "rejected": rejected})
                bar.set_postfix(last=f"{trajectory.meta['return']:g}", steps=trajectory.meta["steps"])
                if not rejected:
                    kept.append(trajectory.meta["return"])
                    bar.update()
                    if len(kept) == episodes:
                        break
            run_returns.append(kept)
    counted = [m for m in metas if not m["rejected"]]
    returns = [m["return"] for m in counted]
    run_means = [float(np.mean(r)) if r else float("nan") for r in run_returns]
    return {
        "checkpoint": label,
        "checkpoint_path": str(path),
        "frames": frames,
        "game": game,
        "core": checkpoint["model_spec"]["core"],
        "protocol": {"policy": "greedy" if greedy else "sampled", "episodes": episodes, "runs": runs, "seed": seed,
                     "max_steps": max_steps, "reject_negative_returns": reject_negative_returns,
                     "env_options": options},
        "game_returns": describe(returns),
        "life_returns": describe([r for m in counted for r in m["life_returns"]]),
        "runs": {"means": run_means, "mean": float(np.mean(run_means)), "std": float(np.std(run_means))},
        "games_cut_by_max_steps": sum(m["ended"] == "max_steps" for m in counted),
        "games_rejected": len(metas) - len(counted),
        "episodes": [{key: m[key] for key in ("episode", "seed", "return", "life_returns", "steps", "ended",
                                              "rejected")} for m in metas],
    }


def rescore_policy(
    net: PolicyNet, checkpoint: dict, path: Path, label: str, trajectories: dict[str, Trajectory],
    device: torch.device,
) -> dict:
    """Replay every recorded episode with `net` and compare its greedy actions and values with the recording.

    Value errors are mean absolute errors against the discounted clipped returns (the checkpoint's discount and
    reward clip) that followed each step, for this policy (`value_mae`) and the recorded one
    (`recorded_value_mae`), over the steps that reproduced the recorded situation.
    """
    config = checkpoint["config"]
    agree = compared = 0
    value_error = recorded_error = 0.0
    episodes = []
    for stem, trajectory in tqdm(trajectories.items(), desc=label, unit="episode", dynamic_ncols=True):
        result = replay(net, trajectory, device)
        n = result.compared
        targets = discounted_returns(trajectory.rewards, trajectory.done, config["discount"], config["reward_clip"])
        agreed = result.greedy_actions == trajectory.actions[:n]
        agree += int(agreed.sum())
        value_error += float(np.abs(result.values - targets[:n]).sum())
        recorded_error += float(np.abs(trajectory.values[:n] - targets[:n]).sum())
        compared += n
        episodes.append({"episode": stem, "reproduced": result.reproduced, "mismatch": result.mismatch,
                         "steps_compared": n,
                         "action_agreement": float(agreed.mean()) if n else None})
    return {
        "checkpoint": label,
        "checkpoint_path": str(path),
        "frames": int(checkpoint["learner"]["frames"]),
        "game": checkpoint["game"],
        "core": checkpoint["model_spec"]["core"],
        "episodes_reproduced": sum(e["reproduced"] for e in episodes),
        "steps_compared": compared,
        "action_agreement": agree / compared if compared else None,
        "value_mae": value_error / compared if compared else None,
        "recorded_value_mae": recorded_error / compared if compared else None,
        "episodes": episodes,
    }


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _number(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def evaluation_table(summaries: list[dict]) -> str:
    """Returns per full game (mean to 95% CI and the run means) beside the mean return per life, under a title
    line that says so."""
    headers = ["checkpoint", "frames", "full games", "mean", "median", "std", "min", "max", "95% CI",
               "mean per life"]
    with_runs = summaries[0]["protocol"]["runs"] > 1
    rejecting = summaries[0]["protocol"]["reject_negative_returns"]
    headers += ["run means (mean ± std)"] if with_runs else []
    headers += ["rejected games"] if rejecting else []
    rows = []
    for s in summaries:
        g = s["game_returns"]
        row = [s["checkpoint"], f"{s['frames']:,}", str(g["count"]),
               *(_number(g[k]) for k in ("mean", "median", "std")), _number(g["min"], "g"), _number(g["max"], "g"),
               f"[{g['ci95'][0]:.2f}, {g['ci95'][1]:.2f}]", _number(s["life_returns"]["mean"])]
        row += [f"{s['runs']['mean']:.2f} ± {s['runs']['std']:.2f}"] if with_runs else []
        rows.append(row + ([str(s["games_rejected"])] if rejecting else []))
    title = ("Returns per full game (to game over or the time limit), not per life; 'mean per life' averages the "
             "return of each life" + ("; games with a negative return were rejected and replaced" if rejecting else ""))
    return title + "\n" + format_table(headers, rows)


def rescore_table(results: list[dict], episodes: int) -> str:
    headers = ["checkpoint", "frames", "reproduced", "steps", "action agreement", "value MAE", "recorded value MAE"]
    rows = [[r["checkpoint"], f"{r['frames']:,}", f"{r['episodes_reproduced']}/{episodes}", str(r["steps_compared"]),
             _number(r["action_agreement"], ".3f"), _number(r["value_mae"], ".3f"),
             _number(r["recorded_value_mae"], ".3f")] for r in results]
    return format_table(headers, rows)


def labels_for(paths: list[Path]) -> list[str]:
    """Row names: the file stems, prefixed by the run directory where stems repeat."""
    stems = [p.stem for p in paths]
    return [p.stem if stems.count(p.stem) == 1 else f"{p.parent.name}/{p.stem}" for p in paths]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m agent.evaluate",
        description="Play full Atari games with trained policies (greedy by default, the paper's protocol) and "
        "report returns, or re-score policies on episodes recorded earlier.",
    )
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="PATH",
                   help="checkpoint files of agent.train, or run directories (every *.pt in them): one row each")
    p.add_argument("--episodes", type=int, default=30, help="games per run (default: 30)")
    p.add_argument("--runs", type=int, default=1,
                   help="repeat the --episodes games this many times with new seeds; the table adds the mean and "
                   "std of the run means (the paper: 5 runs of 30; default: 1)")
    p.add_argument("--sample", action="store_true", help="sample actions from the policy instead of the argmax")
    p.add_argument("--seed", type=int, default=0, help="env seed of the first game; game i uses seed + i (default: 0)")
    p.add_argument("--max-steps", type=int,
                   help="cut each game after this many agent steps (default: none; the protocol's time limit ends "
                   "a game: 400k frames for most games with the paper's, 108k with ale-py's)")
    p.add_argument("--reject-negative-returns", action="store_true",
                   help="discard games with a negative return and play others until each run has --episodes "
                   "games (the paper's scorer for BattleZone and UpNDown, against a suspected emulator bug)")
    p.add_argument("--record", type=Path, metavar="DIR",
                   help="write a video (.mp4), a trajectory (.npz + .json) per game and summary.json to DIR "
                   "(DIR/<checkpoint> for several checkpoints)")
    p.add_argument("--overwrite", action="store_true", help="replace episodes already recorded in the --record DIR")
    p.add_argument("--episodes-dir", type=Path, metavar="DIR",
                   help="re-score the checkpoints on the episodes recorded in DIR instead of playing new games")
    p.add_argument("--output", type=Path, metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--device", default="auto", help="device of the policy: auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; one-game inference is latency-bound, so more only contend (default: 1)")
    args = p.parse_args(argv)
    for name in ("episodes", "runs", "max_steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.episodes_dir is not None and (args.record is not None or args.sample):
        p.error("--episodes-dir re-scores recorded episodes: it cannot be combined with --record or --sample")
    return args


def run(args: argparse.Namespace) -> list[dict]:
    """Evaluate or re-score every checkpoint of `args`; print the table and return one result dict per
    checkpoint, ordered by training frames."""
    paths = find_checkpoints(args.checkpoint)
    labels = labels_for(paths)
    try:
        device = resolve_device(args.device)
    except ConfigError as e:
        raise EvaluationError(str(e)) from None
    trajectories = None
    if args.episodes_dir is not None:
        trajectories = load_trajectories(args.episodes_dir)
    results = []
    for path, label in zip(paths, labels):
        net, checkpoint = load_evaluated_policy(path, device)
        game = checkpoint["game"]
        if trajectories is not None:
            recorded = {t.meta["game"] for t in trajectories.values()}
            if recorded != {game}:
                raise EvaluationError(
                    f"{args.episodes_dir} holds episodes of {', '.join(sorted(recorded))}, but {path} plays {game}: "
                    f"re-score it on episodes recorded with a {game} checkpoint"
                )
            results.append(rescore_policy(net, checkpoint, path, label, trajectories, device))
            continue
        record_dir = None
        if args.record is not None:
            record_dir = args.record if len(paths) == 1 else args.record / label.replace("/", "_")
            prepare_record_dir(record_dir, game, args.overwrite)
        summary = evaluate_policy(
            net, checkpoint, path, label, episodes=args.episodes, runs=args.runs, greedy=not args.sample,
            seed=args.seed, max_steps=args.max_steps, device=device, record_dir=record_dir,
            reject_negative_returns=args.reject_negative_returns,
        )
        if record_dir is not None:
            write_json(summary, record_dir / "summary.json")
        results.append(summary)
    results.sort(key=lambda r: r["frames"])
    first = results[0]
    if trajectories is not None:
        print(f"\nRe-scored on {len(trajectories)} episodes of {first['game']} recorded in {args.episodes_dir}")
        print(rescore_table(results, len(trajectories)))
        for episode in first["episodes"]:  # whether an episode replays does not depend on the policy
            if not episode["reproduced"]:
                print(f"{episode['episode']} did not replay as recorded: {episode['mismatch']}")
    else:
        games = args.runs * args.episodes
        played = max(len(r["episodes"]) for r in results)
        print(f"\n{', '.join(sorted({r['game'] for r in results}))}: {games} full games per checkpoint, {first['protocol']['policy']} actions, "
              f"env seeds {args.seed}..{args.seed + played - 1}"
              + (f", at most {args.max_steps} steps per game" if args.max_steps else ""))
        for r in results:
            if r["game_returns"]["count"] < games:
                print(f"{r['checkpoint']}: only {r['game_returns']['count']} of {len(r['episodes'])} games played had "
                      "a non-negative return; its row counts those")
        print(evaluation_table(results))
        if args.record is not None:
            print(f"Videos, trajectories and summary.json in {args.record}")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_json({"mode": "rescore" if trajectories is not None else "evaluate", "results": results}, args.output)
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    except (EvaluationError, TrajectoryError) as e:
        sys.exit(f"error: {e}")
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
