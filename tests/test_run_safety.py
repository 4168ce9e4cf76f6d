"""Runs survive crashes: a checkpoint write cut short leaves the previous checkpoints as they were, a damaged
checkpoint falls back to the previous one, and a run interrupted with Ctrl-C resumes with logs (CSV and
TensorBoard) that read as if it had never stopped."""
from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from runio.checkpoint import CheckpointError, load_checkpoint, load_latest, previous_path, save_checkpoint
from runio.files import RunFileError

REPO = Path(__file__).resolve().parent.parent


def payload(step: int) -> dict:
    return {"step": step, "weights": torch.full((1000,), float(step))}


class FailingFile:
    """A file that takes `limit` bytes and then fails with `error`, as a disk that fills up or a process killed
    mid-write would."""

    def __init__(self, file, limit: int, error: BaseException):
        self.file, self.limit, self.error, self.written = file, limit, error, 0

    def write(self, data) -> int:
        if self.written + len(data) > self.limit:
            self.file.write(bytes(data)[: self.limit - self.written])
            self.written = self.limit
            raise self.error
        self.written += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("I/O error"),
                                   KeyboardInterrupt()], ids=["disk_full", "other_failure", "ctrl_c"])
def test_a_write_that_fails_part_way_leaves_the_previous_checkpoints_unchanged(error, tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(payload(1), path)
    save_checkpoint(payload(2), path)
    latest, previous = path.read_bytes(), previous_path(path).read_bytes()
    real_save = torch.save

    def save_cut_short(obj, f, *args, **kwargs):
        real_save(obj, FailingFile(f, len(latest) // 2, error), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_cut_short)
    # Ctrl-C stays Ctrl-C (torch.save reports it as a RuntimeError), so that the run saves and exits with 130.
    expected = {OSError: RunFileError, RuntimeError: RuntimeError, KeyboardInterrupt: KeyboardInterrupt}[type(error)]
    with pytest.raises(expected) as raised:
        save_checkpoint(payload(3), path)
    monkeypatch.undo()
    if expected is RunFileError:
        assert f"no space left on the device while writing {path}" in str(raised.value)
    assert path.read_bytes() == latest and previous_path(path).read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]  # no partial file
    assert load_checkpoint(path)["step"] == 2 and load_checkpoint(previous_path(path))["step"] == 1


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(payload(1), path)
    save_checkpoint(payload(2), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # a copy cut short

    checkpoint = load_latest(path)
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["weights"], torch.full((1000,), 1.0))
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"warning: {path} is not a readable checkpoint") and "falling back to the previous " \
        f"checkpoint {previous_path(path)}" in line
    (aside,) = tmp_path.glob("checkpoint.pt.damaged-*")
    assert aside.read_bytes() == data[: len(data) // 3] and f"moved aside to {aside.name}" in line
    # Both damaged: one error that names both and says what to do.
    save_checkpoint(payload(3), path)
    path.write_bytes(b"")
    previous_path(path).write_text("garbage")
    with pytest.raises(CheckpointError, match="the file is empty.*checkpoint.prev.pt is not a readable.*"
                       "No loadable checkpoint is left: run the same command"):
        load_latest(path)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def train_command(run_dir: Path, total_frames: int) -> list[str]:
    return [sys.executable, "-m", "agent.train", "--env", "memory", "--core", "lstm", "--hidden-size", "16",
            "--num-actors", "1", "--envs-per-actor", "2", "--unroll-length", "5", "--batch-size", "2",
            "--device", "cpu", "--config", str(run_dir.parent / "quick.yaml"), "--runs-dir", str(run_dir.parent),
            "--name", run_dir.name, "--total-frames", str(total_frames)]


def train(run_dir: Path, total_frames: int) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(run_dir, total_frames), cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


def check_logs(run_dir: Path, end: int) -> list[dict]:
    """The checks of logs that read as if the run had never stopped; returns the CSV rows."""
    text = (run_dir / "logs.csv").read_text()
    assert text.count("frames,") == 1 and text.startswith("frames,")  # one header, at the top
    rows = read_rows(run_dir / "logs.csv")
    frames = [int(r["frames"]) for r in rows]
    assert frames == sorted(set(frames)) and frames[-1] == end  # every value once, increasing, to the end
    for key in ("games", "updates", "time_s"):
        values = [float(r[key]) for r in rows]
        assert all(b > a for a, b in zip(values, values[1:])) or key == "games", (key, values)
        assert values == sorted(values), (key, values)  # counters continue, never restart from 0
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"total_loss", "games", "time_s", "fps"} <= set(tags)
    for tag in tags:
        steps = [e.step for e in events.Scalars(tag)]
        assert steps == sorted(set(steps)), tag  # each step once per tag
    assert [e.step for e in events.Scalars("total_loss")] == frames
    assert [e.value for e in events.Scalars("time_s")] == pytest.approx([float(r["time_s"]) for r in rows])
    return rows


@pytest.mark.slow
def test_interrupted_run_resumes_with_continuous_logs(tmp_path):
    """Ctrl-C after a few log rows, resume to the end: every frames value once, counters continue, TensorBoard
    agrees. Then the latest checkpoint is damaged: the run falls back to the previous one, and the logs drop
    what came after it."""
    (tmp_path / "quick.yaml").write_text("log_interval_s: 0.3\n")
    run_dir = tmp_path / "run"
    total = 8000  # long enough that the run is still training when the interrupt comes
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(train_command(run_dir, total), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            if (run_dir / "logs.csv").exists() and len(read_rows(run_dir / "logs.csv")) >= 4:
                break
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) == 130, (tmp_path / "first.log").read_text()[-3000:]
    first = (tmp_path / "first.log").read_text()
    assert "Interrupted: checkpoint saved" in first and "Traceback" not in first
    interrupted = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    stopped_at, games, seconds = (interrupted["learner"]["frames"], interrupted["counters"]["games"],
                                  interrupted["counters"]["time_s"])
    assert 0 < stopped_at < total and games > 0 and seconds > 0
    before = read_rows(run_dir / "logs.csv")

    resumed = train(run_dir, total)
    assert f"Resuming {run_dir} at " in resumed.stdout
    assert f" frames, {interrupted['learner']['updates']} updates" in resumed.stdout
    rows = check_logs(run_dir, total)
    assert rows[: len(before)] == before  # the rows of the first session are kept as they were
    after = rows[len(before)]
    assert int(after["frames"]) > stopped_at and float(after["time_s"]) > seconds and int(after["games"]) >= games

    # The end checkpoint is damaged: the next session resumes from the one of the interruption.
    end = run_dir / "checkpoint.pt"
    end.write_bytes(end.read_bytes()[:1000])
    again = train(run_dir, total + 200)
    warning = [line for line in again.stdout.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"{end} is not a readable checkpoint" in warning[0]
    assert f"falling back to the previous checkpoint {previous_path(end)}" in warning[0]
    assert f" frames, {interrupted['learner']['updates']} updates" in again.stdout  # resumed at the interruption
    rows = check_logs(run_dir, total + 200)
    assert rows[: len(before)] == before and int(rows[len(before)]["frames"]) > stopped_at
