"""One process at a time trains a run directory: an advisory lock on `<run_dir>/.lock` that the kernel releases
when the holder exits, however it exits (no stale locks after a crash or SIGKILL)."""
from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path


class RunLockedError(RuntimeError):
    """Another process holds the run directory."""


class RunLock:
    """`with RunLock(run_dir):` holds the run directory; entering raises RunLockedError naming the holder."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is being trained by {holder}; wait for it to finish or stop it, or train "
                "another run with --name"
            ) from None
        os.ftruncate(fd, 0)
        command = " ".join(["python", *sys.argv])[:200]
        try:
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({command})\n".encode(), 0)
        except OSError:  # a full disk: the lock holds without the holder's name; the run's first write says why
            pass
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
