"""The training entrypoint: config resolution and flags, then end to end on real ALE with the embedded Ray."""
from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

import pytest
import yaml

from agent.config import ConfigError, resolve_config
from agent.train import main, parse_args


def test_config_precedence_defaults_file_flags(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("unroll_length: 20\nbatch_size: 16\nlearning_rate: 1\ncore_kwargs: {num_layers: 3}\n")
    config = resolve_config(path, {"env": "ALE/Pong-v5", "core": "delta_net", "batch_size": 8, "hidden_size": 64,
                                   "num_heads": 2, "seed": None})
    assert config["unroll_length"] == 20 and config["batch_size"] == 8  # file over defaults, flags over the file
    assert config["learning_rate"] == 1.0 and isinstance(config["learning_rate"], float)
    assert config["discount"] == 0.99 and config["seed"] == 1  # defaults where nothing was given
    assert config["core_kwargs"] == dict(hidden_size=64, num_layers=3, num_heads=2, head_dim=32, ff_size=512,
                                         dropout=0.0)
    assert config["name"] == "pong_delta_net"
    lstm = resolve_config(None, {"env": "breakout", "core": "lstm"})
    assert lstm["core_kwargs"] == {"hidden_size": 256, "num_layers": 1} and lstm["unroll_length"] == 50


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"env": "Breakot", "core": "lstm"}, "Close matches: Breakout"),
        ({"env": "Breakout", "core": "delta_lstmm"}, "Did you mean 'delta_lstm'"),
        ({"env": "Breakout"}, "no core given: pass --core"),
        ({"env": "Breakout", "core": "lstm", "batch_size": 12}, "multiple of envs_per_actor 8"),
        ({"env": "Breakout", "core": "lstm", "lerning_rate": 0.1}, "Did you mean learning_rate"),
        ({"env": "Breakout", "core": "lstm", "seed": "one"}, "'seed' in the command line must be a whole number"),
        ({"env": "Breakout", "core": "delta_net", "hidden_size": 64}, "must equal hidden_size 64"),
        ({"env": "Breakout", "core": "lstm", "atari_protocol": "modern"}, "atari_protocol must be one of paper, ale"),
    ],
)
def test_config_errors_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(None, overrides)


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--env", "--core", "--config", "--name", "--ray-address", "--num-actors", "--envs-per-actor",
                 "--unroll-length", "--batch-size", "--total-frames", "--device", "--seed", "--hidden-size",
                 "--num-layers", "--num-heads", "--head-dim", "--ff-size", "--atari-protocol", "--sticky-actions"]:
        assert flag in text


def test_bad_game_exits_with_a_message(capsys):
    with pytest.raises(SystemExit, match="unknown game 'Breakot'.*Breakout"):
        main(["--env", "Breakot", "--core", "lstm"])


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_end_to_end_resume_and_lost_actors(ray_session, tmp_path, capsys):
    """Two actors on real Breakout: logs and checkpoints appear, killed actors are replaced, the run resumes."""
    settings = tmp_path / "quick.yaml"
    settings.write_text("log_interval_s: 1\ncheckpoint_interval_s: 2\nsnapshot_frames: [800]\n")
    argv = ["--env", "Breakout", "--core", "lstm", "--hidden-size", "32", "--num-actors", "2",
            "--envs-per-actor", "2", "--unroll-length", "10", "--batch-size", "4", "--device", "cpu",
            "--runs-dir", str(tmp_path), "--name", "e2e", "--config", str(settings)]
    run_dir = tmp_path / "e2e"

    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(main(argv + ["--total-frames", "4800"])))
    thread.start()
    deadline = time.time() + 120
    while not (run_dir / "logs.csv").exists() and thread.is_alive() and time.time() < deadline:
        time.sleep(0.2)
    assert thread.is_alive(), "training ended before an actor could be killed"
    names = sorted(n for n in ray_session.util.list_named_actors() if n.startswith("e2e/"))
    assert len(names) == 2
    ray_session.kill(ray_session.get_actor(names[0]), no_restart=False)  # Ray restarts this one itself
    ray_session.kill(ray_session.get_actor(names[1]))  # this one is gone for good: the learner replaces it
    thread.join(timeout=240)
    assert not thread.is_alive() and result, "training did not finish"
    assert result["frames"] >= 4800 and result["actor_replacements"] >= 1

    for name in ["config.yaml", "logs.csv", "checkpoint.pt", "checkpoint_800.pt"]:
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["core_kwargs"]["hidden_size"] == 32
    rows = read_rows(run_dir / "logs.csv")
    assert rows and {"fps", "policy_lag", "mean_game_return", "mean_life_return", "total_loss"} <= set(rows[0])
    assert "fps" in capsys.readouterr().out  # the progress line

    # The same command again resumes: the run is already complete, so nothing is trained twice.
    again = main(argv + ["--total-frames", "4800"])
    assert (again["frames"], again["updates"]) == (result["frames"], result["updates"])
    assert "Resuming" in capsys.readouterr().out
    # With a longer budget it continues from the checkpoint's counters, and the logs continue too.
    longer = main(argv + ["--total-frames", "7200"])
    assert longer["frames"] >= 7200
    # Each update consumes T x B agent steps of 4 frames, and the frames of the resets at lost lives among them.
    step_frames = (longer["updates"] - result["updates"]) * 10 * 4 * 4
    assert 0 < step_frames <= longer["frames"] - result["frames"] < 1.25 * step_frames
    frames = [int(row["frames"]) for row in read_rows(run_dir / "logs.csv")]
    assert frames == sorted(frames) and frames[-1] > result["frames"]

    # A checkpoint for another core is refused with a message, before any work.
    with pytest.raises(SystemExit, match="core: checkpoint 'lstm', requested 'none'.*another --name"):
        main(argv + ["--core", "none", "--total-frames", "7200"])
