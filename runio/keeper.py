"""A checkpoint keeper: a small process beside the trainer that holds its latest state in memory and writes it
as the checkpoint if the trainer dies without saying goodbye.

A Ray driver is ended at once, with no Python code run, when its node's raylet dies (its cluster's head is lost):
no `finally` can save the run then. The trainer hands the keeper its state every log interval (`keep`); after a
clean end it says `close`; if its pipe closes without that, the keeper writes the last state it got and prints
one line. What is lost is at most one log interval, where a checkpoint interval would be lost otherwise.

    keeper = CheckpointKeeper(run_dir / "checkpoint.pt")
    keeper.keep(checkpoint_bytes(payload), frames)   # often
    keeper.close()                                   # on every clean end
"""
from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

_HEADER = struct.Struct("<QQ")  # payload length, frames


class CheckpointKeeper:
    """The trainer's side: starts `python -m runio.keeper PATH` and feeds it states."""

    def __init__(self, path: str | Path):
        # A session of its own: Ctrl-C in the terminal is the trainer's to handle, not the keeper's.
        self.process = subprocess.Popen([sys.executable, "-m", "runio.keeper", str(path)], stdin=subprocess.PIPE,
                                        start_new_session=True)

    def keep(self, payload: bytes, frames: int) -> None:
        """Hand over the latest state (the bytes of a checkpoint) at `frames`."""
        try:
            self.process.stdin.write(_HEADER.pack(len(payload), frames) + payload)
            self.process.stdin.flush()
        except BrokenPipeError:  # the keeper is gone; the trainer's own checkpoints go on
            pass

    def close(self) -> None:
        """The trainer ends cleanly (its own checkpoint is written): the keeper exits without writing."""
        try:
            self.process.stdin.write(_HEADER.pack(0, 0))
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        self.process.wait()


def _read_exactly(stream, size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def main(path: str) -> None:
    """The keeper's side: read states from stdin until `close` or EOF; on EOF, save the last complete one."""
    latest: tuple[bytes, int] | None = None
    stdin = sys.stdin.buffer
    while (header := _read_exactly(stdin, _HEADER.size)) is not None:
        size, frames = _HEADER.unpack(header)
        if size == 0:
            return  # a clean end
        payload = _read_exactly(stdin, size)
        if payload is None:
            break  # the trainer died while handing over a state: keep the previous one
        latest = (payload, frames)
    if latest is not None:
        from runio.checkpoint import save_checkpoint
        from runio.files import RunFileError

        try:
            save_checkpoint(latest[0], path)
        except (RunFileError, OSError) as e:
            print(f"The trainer ended without saving, and its last state could not be saved either: {e}",
                  file=sys.stderr, flush=True)
            return
        print(f"The trainer ended without saving (e.g. its Ray cluster was lost); its state at {latest[1]:,} "
              f"frames was saved to {path}: run the same command to resume", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
