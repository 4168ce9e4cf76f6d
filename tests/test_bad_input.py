"""Every bad input a new user meets, through the real command lines in subprocesses: a non-zero exit, exactly one
line on stderr that names the value, file or flag and the fix, no traceback, nothing on stdout, no Ray started,
and no code from a file ever run. Then a disk that fills up in the middle of a run."""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
RAY_STARTED = "Started a local Ray instance"
# The smallest real run: the toy memory task, one actor, 10 frames per update.
TINY = ["--env", "memory", "--core", "lstm", "--hidden-size", "16", "--num-actors", "1", "--envs-per-actor", "2",
        "--unroll-length", "5", "--batch-size", "2", "--device", "cpu"]
TRAINED_FRAMES = 100


def command(module: str, *args, limit_file_bytes: int | None = None, wrap: list[str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m module args` from the repository root; `limit_file_bytes` sets RLIMIT_FSIZE in the child (a
    write past it fails with EFBIG: Python ignores SIGXFSZ), `wrap` runs it under another command."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    argv = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run((wrap or []) + argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit if limit_file_bytes is not None else None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run directory of a finished tiny run (one checkpoint.pt, logs, config)."""
    runs = tmp_path_factory.mktemp("trained")
    result = command("agent.train", *TINY, "--total-frames", TRAINED_FRAMES, "--runs-dir", runs, "--name", "run")
    assert result.returncode == 0, result.stderr[-2000:]
    return runs / "run"


class Payload:
    """Pickles to a call of os.system: loading it with weights_only=False would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def truncated(path: Path, trained: Path) -> None:
    data = (trained / "checkpoint.pt").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def unsafe_pickle(path: Path, trained: Path) -> None:
    """A checkpoint that looks like rfwp's but carries code: `<dir>/code_ran` appears if anything runs it."""
    torch.save({"learner": Payload(path.parent / "code_ran"), "config": {}, "game": "memory", "model_spec": {}},
               path)


BAD_CHECKPOINTS = {
    "truncated": (truncated, "truncated or not a checkpoint"),
    "empty": (lambda path, trained: path.write_bytes(b""), "the file is empty"),
    "text": (lambda path, trained: path.write_text("not a checkpoint\n"), "truncated or not a checkpoint"),
    "foreign_dict": (lambda path, trained: torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, path),
                     "lacks learner, config, game, model_spec"),
    "unsafe_pickle": (unsafe_pickle, "could run code when loaded, which rfwp never loads"),
}


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    """The line, after checking the exit code, the single stderr line with `expected` in it, and the rest."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-2000:]
    assert "Traceback" not in output and RAY_STARTED not in output, output[-2000:]
    assert result.stdout == "", result.stdout[-2000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_resuming_from_a_bad_checkpoint(kind, trained, tmp_path):
    make, reason = BAD_CHECKPOINTS[kind]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    make(run_dir / "checkpoint.pt", trained)
    result = command("agent.train", *TINY, "--total-frames", 200, "--runs-dir", tmp_path, "--name", "run")
    assert_one_line_error(result, f"{run_dir / 'checkpoint.pt'} ", reason, "No loadable checkpoint is left",
                          "run the same command to start the run again", "another --name")
    assert not (run_dir / "code_ran").exists()
    assert not (run_dir / "checkpoint.pt").exists()  # moved aside, kept for inspection
    (aside,) = run_dir.glob("checkpoint.pt.damaged-*")
    if kind == "unsafe_pickle":  # the payload is live: loading it the unsafe way runs it
        torch.load(aside, weights_only=False)
        assert (run_dir / "code_ran").exists()


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_evaluating_a_bad_checkpoint(kind, trained, tmp_path):
    make, reason = BAD_CHECKPOINTS[kind]
    path = tmp_path / "model.pt"
    make(path, trained)
    result = command("agent.evaluate", "--checkpoint", path, "--device", "cpu", "--episodes", 1)
    assert_one_line_error(result, f"{path} ", reason, "evaluate another checkpoint of the run")
    assert not (tmp_path / "code_ran").exists()
    assert path.exists()  # evaluation never moves a user's file


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("learning_rate: -0.1", "learning_rate must be greater than 0, got -0.1"),
        ("actor_cpus: 0", "actor_cpus must be greater than 0, got 0.0"),
        ("discount: 1.5", "discount must be between 0 and 1, got 1.5"),
        ("reward_clip: -1", "reward_clip must be greater than 0, got -1.0"),
        ("grad_norm_clip: -40", "grad_norm_clip must be greater than 0 (or 0 for none), got -40.0"),
        ("learning_rate: [1, 2\nseed: 3", "is not valid YAML at line 2, column 5"),
    ],
    ids=["learning_rate", "actor_cpus", "discount", "reward_clip", "grad_norm_clip", "broken_yaml"],
)
def test_bad_config_file(setting, expected, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(setting + "\n")
    result = command("agent.train", *TINY, "--config", path, "--runs-dir", tmp_path)
    key = setting.split(":")[0]
    fix = "fix the file" if "YAML" in expected else f"fix {key} in {path}"
    assert_one_line_error(result, expected, str(path), fix)
    assert not (tmp_path / "memory_lstm").exists()  # refused before the run directory was made


def test_bad_flag_names_the_flag(tmp_path):
    result = command("agent.train", *TINY, "--learning-rate", "-0.1", "--runs-dir", tmp_path)
    assert_one_line_error(result, "learning_rate must be greater than 0, got -0.1 (from the command line)",
                          "fix --learning-rate")


def test_supervised_sliding_stride_longer_than_the_segment_is_refused_before_training(tmp_path):
    result = command("agent.supervised", "--task", "wikitext103", "--core", "lstm", "--segment-len", 64,
                     "--sliding-stride", 100, "--data-dir", tmp_path / "absent", "--runs-dir", tmp_path)
    assert_one_line_error(result, "sliding_stride 100 is larger than segment_len 64", "--sliding-stride")
    assert not (tmp_path / "absent").exists() and not list(tmp_path.rglob("config.yaml"))


def test_learning_rate_in_exponent_notation_is_accepted(trained, tmp_path):
    """YAML reads `1e-4` as a string; it is a learning rate all the same. The finished run exits before Ray."""
    shutil.copytree(trained, tmp_path / "run")
    path = tmp_path / "mine.yaml"
    path.write_text("learning_rate: 1e-4\n")
    result = command("agent.train", *TINY, "--total-frames", TRAINED_FRAMES, "--config", path, "--runs-dir",
                     tmp_path, "--name", "run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "has trained for its" in result.stdout and RAY_STARTED not in result.stderr
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["learning_rate"] == 1e-4


def test_file_size_limit_at_the_first_write(tmp_path):
    """`ulimit -f` below the size of config.yaml: the first write of the run fails with EFBIG."""
    result = command("agent.train", *TINY, "--runs-dir", tmp_path, limit_file_bytes=300)
    line = assert_one_line_error(result, "the file size limit (ulimit -f) was reached while writing",
                                 "config.yaml", "raise the limit")
    assert str(tmp_path / "memory_lstm" / "config.yaml") in line
    assert [p.name for p in (tmp_path / "memory_lstm").iterdir()] == [".lock"]  # no partial file left


def mount_namespace_with_tmpfs(mount_point: Path, size: str, fill: bool = False) -> list[str]:
    """A command prefix that runs its command in a private mount namespace with a tmpfs of `size` at
    `mount_point` (filled up when `fill`): real ENOSPC, and the mount ends with the command. Skips the test
    where mounting is not allowed."""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "-o",
                            "size=64k", "tmpfs", str(mount_point)], capture_output=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip("mounting a tmpfs in a private mount namespace is not allowed here (needs root)")
    script = f'mount -t tmpfs -o size={size} tmpfs "$0"'
    if fill:
        script += ' && (dd if=/dev/zero of="$0/filler" bs=4k 2>/dev/null; true)'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script + ' && shift && exec "$@"',
            str(mount_point), "--"]


def test_full_disk_at_the_first_write(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    result = command("agent.train", *TINY, "--runs-dir", disk, wrap=mount_namespace_with_tmpfs(disk, "64k", True))
    assert_one_line_error(result, "no space left on the device while writing", "config.yaml", "free some space")
    assert not any(disk.iterdir())  # the tmpfs went away with the process


def test_disk_full_at_a_checkpoint_keeps_the_previous_one(trained, tmp_path):
    """Resume a run on a disk too small for a second checkpoint: the run stops with one line that says so, and
    the checkpoint on disk is the old one, byte for byte."""
    disk = tmp_path / "disk"
    disk.mkdir()
    before = (trained / "checkpoint.pt").read_bytes()
    size_k = (len(before) * 3 // 2) // 1024  # room for the run's files and half a checkpoint more
    # The tmpfs lives only while the command runs: copy the run in, train, and copy back what is left.
    keep = tmp_path / "after"
    wrap = mount_namespace_with_tmpfs(disk, f"{size_k}k")
    script = (f'cp -a "{trained}" "{disk}/run" && "$@"; code=$?; cp -a "{disk}/run" "{keep}"; exit $code')
    result = subprocess.run(
        wrap + ["sh", "-c", script, "sh", sys.executable, "-m", "agent.train", *TINY, "--total-frames", "200",
                "--runs-dir", str(disk), "--name", "run"],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no space left on the device while writing") and "checkpoint.pt" in last, last
    assert "run the same command again" in last
    assert (keep / "checkpoint.pt").read_bytes() == before
    assert not list(keep.glob(".checkpoint.pt.*"))  # the partial file was removed
    assert torch.load(keep / "checkpoint.pt", weights_only=True)["learner"]["frames"] == TRAINED_FRAMES
