"""`python -m agent.evaluate`: playing and recording full games on real ALE, replaying recorded episodes, re-scoring
checkpoints on them, and the errors for bad input.

The checkpoints are written the way `agent.train` writes them (same payload, through `save_checkpoint`), with
untrained small delta_net policies: training one for real takes longer than these tests together.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from actors.envs import env_options, env_spaces, make_vector_env, resolve_game
from actors.recording import video_writer, discounted_returns, load_trajectories, load_trajectory, replay, save_trajectory
from agent.config import resolve_config
from agent.evaluate import describe, load_evaluated_policy, main
from learner.impala import Hyperparameters, LearnerState
from models import PolicyNet
from runio.checkpoint import load_checkpoint, rng_state, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
# Env seeds 2 and 3 with this sampled policy give Breakout games that end (game over) within 200 steps and
# score points; greedy games are cut at 60 steps (an untrained greedy policy loses a game in about 100: the
# environment presses FIRE after every lost life).
SAMPLED = ["--sample", "--seed", "2", "--episodes", "2", "--max-steps", "300"]
GREEDY = ["--seed", "0", "--episodes", "2", "--max-steps", "60"]


def write_checkpoint(path: Path, *, seed: int, frames: int, env: str = "breakout") -> None:
    """A checkpoint as agent.train saves it, of an untrained policy initialised from `seed`."""
    config = resolve_config(overrides=dict(env=env, core="delta_net", hidden_size=32, num_heads=2, head_dim=16,
                                           ff_size=64))
    game = resolve_game(env)
    observation_shape, num_actions = env_spaces(game, **env_options(config))
    model_spec = dict(observation_shape=list(observation_shape), num_actions=num_actions, core="delta_net",
                      core_kwargs=config["core_kwargs"], use_last_action=False)
    torch.manual_seed(seed)
    learner = LearnerState.create(PolicyNet(**model_spec), Hyperparameters.from_config(config))
    learner.frames = frames
    save_checkpoint({"learner": learner.state_dict(), "config": config, "game": game, "model_spec": model_spec,
                     "rng": rng_state()}, path)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One-game inference as the CLI runs it (--threads 1): on a busy 2-core machine two threads are ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory with two checkpoints of different weights: checkpoint_200.pt, then checkpoint.pt."""
    directory = tmp_path_factory.mktemp("run")
    write_checkpoint(directory / "checkpoint.pt", seed=0, frames=400)
    write_checkpoint(directory / "checkpoint_200.pt", seed=1, frames=200)
    return directory


@pytest.fixture(scope="module")
def sampled(run_dir, tmp_path_factory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("sampled")
    [summary] = main(["--checkpoint", str(run_dir / "checkpoint.pt"), *SAMPLED, "--record", str(directory)])
    return directory, summary


@pytest.fixture(scope="module")
def greedy(run_dir, tmp_path_factory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("greedy")
    [summary] = main(["--checkpoint", str(run_dir / "checkpoint.pt"), *GREEDY, "--record", str(directory)])
    return directory, summary


def policy(path: Path):
    return load_evaluated_policy(path, torch.device("cpu"))[0]


def video_frames(path: Path) -> list[np.ndarray]:
    """The decoded RGB frames [210, 160, 3] of an mp4, after checking that it is H.264 (what browsers play)."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["size"] == (160, 210), meta
    frames = [np.frombuffer(frame, np.uint8).reshape(210, 160, 3) for frame in reader]
    assert imageio_ffmpeg.count_frames_and_secs(str(path))[0] == len(frames)
    return frames


def test_videos_are_h264_with_every_frame_in_its_colours(tmp_path):
    """Frames whose colours and content are known: each decodes to its own colours (RGB, in order)."""
    frames = []
    for i in range(40):
        frame = np.zeros((210, 160, 3), np.uint8)
        frame[:, :, i % 3] = 100 + 3 * i  # a flat colour that changes every frame
        frame[60:120, 40:100] = (250, 250, 250)  # and a white box that stays
        frames.append(frame)
    path = tmp_path / "video.mp4"
    with video_writer(path, fps=15) as video:
        for frame in frames:
            video.write(frame)
    decoded = video_frames(path)
    assert len(decoded) == len(frames)
    for i, (frame, original) in enumerate(zip(decoded, frames)):
        assert np.abs(frame[5:50, 5:150].astype(int) - original[0, 0]).max() <= 8, i
        assert (frame[70:110, 50:90] >= 240).all(), i
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]  # written atomically, no temporary left


def previous(x: np.ndarray) -> torch.Tensor:
    """x [T] -> [T, 1]: at each step the previous step's value (0 at the first), as the policy's inputs."""
    return torch.from_numpy(np.concatenate([np.zeros(1, x.dtype), x[:-1]]))[:, None]


def life_returns_from(rewards: np.ndarray, done: np.ndarray) -> list[float]:
    """Per-life returns recomputed from the per-step arrays: a life ends before each step with done set."""
    starts = [*np.flatnonzero(done), len(rewards)]
    return [float(rewards[a:b].sum()) for a, b in zip(starts[:-1], starts[1:])]


@pytest.mark.parametrize("recording", ["sampled", "greedy"])
def test_recorded_games_videos_and_summary(recording, request):
    directory, summary = request.getfixturevalue(recording)
    trajectories = load_trajectories(directory)
    assert list(trajectories) == ["episode_0000", "episode_0001"]
    for stem, trajectory in trajectories.items():
        steps = trajectory.meta["steps"]
        frames = video_frames(directory / f"{stem}.mp4")
        assert len(frames) == steps == len(trajectory.actions) > 0
        assert frames[0].shape == (210, 160, 3) and frames[0].std() > 0  # the colour screen, not a blank
        assert np.allclose(trajectory.probs.sum(axis=1), 1, atol=1e-5) and trajectory.done[0]
    returns = [float(t.rewards.sum()) for t in trajectories.values()]
    lives = [r for t in trajectories.values() for r in life_returns_from(t.rewards, t.done)]
    on_disk = json.loads((directory / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert [e["return"] for e in summary["episodes"]] == returns
    assert [e["seed"] for e in summary["episodes"]] == [t.meta["seed"] for t in trajectories.values()]
    g = summary["game_returns"]
    assert g["count"] == 2
    assert g["mean"] == pytest.approx(np.mean(returns)) and g["median"] == pytest.approx(np.median(returns))
    assert g["std"] == pytest.approx(np.std(returns))
    assert (g["min"], g["max"]) == (min(returns), max(returns))
    assert g["ci95"] == pytest.approx(describe(returns)["ci95"])
    assert g["min"] <= g["ci95"][0] <= g["mean"] <= g["ci95"][1] <= g["max"]
    assert summary["life_returns"]["count"] == len(lives)
    assert summary["life_returns"]["mean"] == pytest.approx(np.mean(lives))
    assert [r for e in summary["episodes"] for r in e["life_returns"]] == lives


def test_sampled_games_are_full_games_with_lives_and_points(sampled):
    _, summary = sampled
    assert [e["ended"] for e in summary["episodes"]] == ["game_over", "game_over"]
    assert all(len(e["life_returns"]) == 5 for e in summary["episodes"])  # Breakout: five lives per game
    assert summary["game_returns"]["max"] > 0


def test_recorded_policy_outputs_are_the_learners_view_of_the_episode(sampled, run_dir):
    """The played policy is fed as in training: core state carried across steps and reset at each lost life, last
    reward in. Rerunning the whole episode in one call, as the learner does, gives the recorded outputs."""
    trajectory = load_trajectory(sampled[0] / "episode_0000.json")
    assert trajectory.done[1:].sum() == 4  # four lives lost before the game ended
    env = make_vector_env("breakout", 1, seed=trajectory.meta["seed"], **trajectory.meta["env_options"])
    observations = [env.reset()[0]]
    for action in trajectory.actions[:-1]:
        observations.append(env.step(np.array([action]))[0][0])
    env.close()
    net = policy(run_dir / "checkpoint.pt")
    with torch.no_grad():
        out, _ = net(torch.from_numpy(np.stack(observations))[:, None], previous(trajectory.rewards),
                     previous(trajectory.actions), torch.from_numpy(trajectory.done)[:, None], net.initial_state(1))
    assert torch.softmax(out["policy_logits"][:, 0], -1).numpy() == pytest.approx(trajectory.probs, abs=1e-5)
    assert out["baseline"][:, 0].numpy() == pytest.approx(trajectory.values, abs=1e-5)


def test_replay_reproduces_recorded_rewards(sampled, run_dir):
    directory, _ = sampled
    net = policy(run_dir / "checkpoint.pt")
    for trajectory in load_trajectories(directory).values():
        result = replay(net, trajectory)
        assert result.reproduced, result.mismatch
        assert result.compared == len(trajectory.rewards)
    assert any(t.rewards.any() for t in load_trajectories(directory).values())


def test_replay_detects_an_altered_action_or_reward(sampled, run_dir):
    directory, _ = sampled
    net = policy(run_dir / "checkpoint.pt")
    trajectory = load_trajectory(directory / "episode_0000.json")
    # RIGHT (2) or LEFT (3) moves the paddle, so the frame after step 10 must differ.
    trajectory.actions[10] = 2 if trajectory.actions[10] != 2 else 3
    result = replay(net, trajectory)
    assert not result.reproduced and result.mismatch.startswith("step 10:") and result.compared == 11

    trajectory = load_trajectory(directory / "episode_0001.json")
    scoring_step = int(np.flatnonzero(trajectory.rewards)[0])
    trajectory.rewards[scoring_step] += 1
    result = replay(net, trajectory)
    assert result.mismatch.startswith(f"step {scoring_step}: reward")


def test_rescoring_own_greedy_episodes_agrees_fully(greedy, run_dir):
    directory, _ = greedy
    [result] = main(["--checkpoint", str(run_dir / "checkpoint.pt"), "--episodes-dir", str(directory)])
    assert result["episodes_reproduced"] == 2 and result["steps_compared"] == 120
    assert result["action_agreement"] == 1.0
    assert result["value_mae"] == pytest.approx(result["recorded_value_mae"], rel=1e-12)


def test_rescoring_a_run_directory_compares_checkpoints_on_the_same_episodes(greedy, run_dir, tmp_path, capsys):
    directory, _ = greedy
    altered = tmp_path / "altered"
    shutil.copytree(directory, altered)
    trajectory = load_trajectory(altered / "episode_0001.json")
    trajectory.actions[5] = 2 if trajectory.actions[5] != 2 else 3
    save_trajectory(trajectory, altered, "episode_0001")
    output = tmp_path / "rescore.json"
    results = main(["--checkpoint", str(run_dir), "--episodes-dir", str(altered), "--output", str(output)])
    assert [r["checkpoint"] for r in results] == ["checkpoint_200", "checkpoint"]  # ordered by frames
    for r in results:
        assert r["episodes_reproduced"] == 1
        assert [e["reproduced"] for e in r["episodes"]] == [True, False]
        assert r["episodes"][1]["mismatch"].startswith("step 5:")
        assert r["steps_compared"] == 60 + 6
    other, same = results
    # The policy that recorded the episodes disagrees only with the altered action.
    assert same["action_agreement"] == 65 / 66 and same["value_mae"] == pytest.approx(same["recorded_value_mae"])
    assert other["value_mae"] != pytest.approx(other["recorded_value_mae"])  # other weights, other values
    assert json.loads(output.read_text())["results"] == json.loads(json.dumps(results))
    table = capsys.readouterr().out
    assert "checkpoint_200" in table and "1/2" in table


def test_run_directory_gives_one_row_per_checkpoint(run_dir, tmp_path, capsys):
    record = tmp_path / "episodes"
    results = main(["--checkpoint", str(run_dir), "--episodes", "1", "--max-steps", "10", "--record", str(record)])
    assert [(r["checkpoint"], r["frames"]) for r in results] == [("checkpoint_200", 200), ("checkpoint", 400)]
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("checkpoint")]
    assert len(rows) == 3  # header and two rows
    for label in ("checkpoint", "checkpoint_200"):
        assert (record / label / "summary.json").exists() and (record / label / "episode_0000.mp4").exists()


def test_recording_into_a_used_directory(greedy, run_dir, tmp_path):
    directory, _ = greedy
    used = tmp_path / "used"
    shutil.copytree(directory, used)
    args = ["--checkpoint", str(run_dir / "checkpoint.pt"), "--episodes", "1", "--max-steps", "5",
            "--record", str(used)]
    with pytest.raises(SystemExit, match="already holds 2 recorded episodes: pass --overwrite"):
        main(args)
    main([*args, "--overwrite"])
    assert sorted(p.name for p in used.iterdir()) == [
        "episode_0000.json", "episode_0000.mp4", "episode_0000.npz", "summary.json"]
    meta = json.loads((used / "episode_0000.json").read_text())
    meta["game"] = "pong"
    (used / "episode_0000.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="holds recorded episodes of pong, not breakout"):
        main([*args, "--overwrite"])


def test_episodes_of_another_game_are_refused(greedy, run_dir, tmp_path):
    pong = tmp_path / "pong"
    shutil.copytree(greedy[0], pong)
    for path in pong.glob("episode_*.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "game": "pong"}))
    with pytest.raises(SystemExit, match=r"holds episodes of pong, but .*checkpoint.pt plays breakout"):
        main(["--checkpoint", str(run_dir / "checkpoint.pt"), "--episodes-dir", str(pong)])


def test_corrupt_recorded_episode_is_refused(greedy, run_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(greedy[0], broken)
    (broken / "episode_0001.npz").write_bytes(b"not a zip file")
    with pytest.raises(SystemExit, match="episode_0001.json .or its .npz. is corrupt"):
        main(["--checkpoint", str(run_dir / "checkpoint.pt"), "--episodes-dir", str(broken)])


def test_bad_checkpoints_get_clear_errors(run_dir, tmp_path):
    good = (run_dir / "checkpoint.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.pt").write_text("hello\n")
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    checkpoint["model_spec"]["core"] = "gru"
    save_checkpoint(checkpoint, tmp_path / "unknown_core.pt")
    save_checkpoint({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    cases = {
        "missing.pt": "checkpoint .*missing.pt not found: pass a checkpoint written by `python -m agent.train`",
        "truncated.pt": "truncated.pt is not a readable checkpoint: truncated or not a checkpoint",
        "text.pt": "text.pt is not a readable checkpoint",
        "unknown_core.pt": "trained with core 'gru', which this rfwp does not have .cores: none, lstm, .*delta_net",
        "other.pt": "other.pt is not a checkpoint of this kind of run: it lacks learner, config, game, model_spec",
    }
    for name, message in cases.items():
        with pytest.raises(SystemExit, match=message):
            main(["--checkpoint", str(tmp_path / name), "--episodes", "1"])
    with pytest.raises(SystemExit, match="2"):  # argparse's usage error
        main(["--checkpoint", str(run_dir), "--episodes-dir", str(tmp_path), "--sample"])
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(SystemExit, match="holds no checkpoint"):
        main(["--checkpoint", str(empty)])
    with pytest.raises(SystemExit, match="invalid device 'tpu7': use auto, cpu, cuda or cuda:N"):
        main(["--checkpoint", str(run_dir), "--device", "tpu7"])


def test_command_line_reports_errors_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "agent.evaluate", "--checkpoint", str(tmp_path / "nope.pt")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("error: checkpoint") and "Traceback" not in done.stderr


def test_toy_environment_checkpoints_evaluate_in_runs_but_have_no_video(tmp_path, capsys):
    write_checkpoint(tmp_path / "memory.pt", seed=0, frames=0, env="memory")
    [summary] = main(["--checkpoint", str(tmp_path / "memory.pt"), "--episodes", "3", "--runs", "2"])
    assert summary["game"] == "memory" and summary["game_returns"]["count"] == 6
    assert [e["seed"] for e in summary["episodes"]] == list(range(6))
    assert all(e["steps"] == 7 and e["ended"] == "game_over" for e in summary["episodes"])
    returns = [e["return"] for e in summary["episodes"]]
    assert summary["runs"]["means"] == pytest.approx([np.mean(returns[:3]), np.mean(returns[3:])])
    assert "run means (mean ± std)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="memory has no screen to record: evaluate it without --record"):
        main(["--checkpoint", str(tmp_path / "memory.pt"), "--episodes", "1", "--record", str(tmp_path / "rec")])


def test_discounted_returns_stop_at_episode_ends_and_clip():
    rewards = np.array([0.0, 5.0, 0.0, -3.0], np.float32)
    done = np.array([True, False, True, False])
    returns = discounted_returns(rewards, done, discount=0.5, reward_clip=1.0)
    assert returns == pytest.approx([0.5, 1.0, -0.5, -1.0])


def test_negative_returns_are_rejected_and_replaced(tmp_path, capsys):
    """The memory task's games return +1 or -1: rejected ones are replaced by the next seeds until each run has
    its games, and the table says what it counts."""
    write_checkpoint(tmp_path / "memory.pt", seed=0, frames=100, env="memory")
    [summary] = main(["--checkpoint", str(tmp_path / "memory.pt"), "--episodes", "3", "--runs", "2",
                      "--reject-negative-returns"])
    episodes = summary["episodes"]
    assert [e["seed"] for e in episodes] == list(range(len(episodes)))  # seeds run on through rejected games
    assert {e["return"] for e in episodes} == {1.0, -1.0}
    assert all(e["rejected"] == (e["return"] < 0) for e in episodes)
    assert summary["games_rejected"] == sum(e["return"] < 0 for e in episodes) > 0
    assert summary["game_returns"]["count"] == 6 and summary["game_returns"]["mean"] == 1.0
    assert summary["runs"]["means"] == [1.0, 1.0] and summary["life_returns"]["count"] == 6
    out = capsys.readouterr().out
    assert "Returns per full game" in out and "not per life" in out
    assert "rejected games" in out and "mean per life" in out
    # Without the option every game counts.
    [plain] = main(["--checkpoint", str(tmp_path / "memory.pt"), "--episodes", "3"])
    assert [e["seed"] for e in plain["episodes"]] == [0, 1, 2] and plain["games_rejected"] == 0
    assert plain["game_returns"]["mean"] == pytest.approx(np.mean([e["return"] for e in episodes[:3]]))
    assert "rejected games" not in capsys.readouterr().out
