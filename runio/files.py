"""Atomic file writes and safe reads, shared by checkpoints, configs, datasets, caches and recordings."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml


class RunFileError(ValueError):
    """A file cannot be read or written; the message names the file, the problem and what to do."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to, renamed onto `path` when the block completes (removed on
    error), so readers see the old file or the new one, never a partial one. The temporary path keeps the
    suffix of `path`, because some writers choose the format from it (video containers, numpy's .npz).

    A full disk raises RunFileError naming the file; the old file is untouched. Write to `open(tmp)`, not to the
    path, when the writer is torch.save: then the OSError that says why a write failed reaches `write_failure`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the rename must not land before the data does
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; results are shared like any other file
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        full = write_failure(e, path)
        if full is not None:
            raise full from None
        if not isinstance(e, KeyboardInterrupt) and any(isinstance(c, KeyboardInterrupt) for c in _chain(e)):
            raise KeyboardInterrupt from None  # torch.save turns Ctrl-C inside a write into a RuntimeError
        raise


# errno of a failed write -> (what happened, what to do)
_FULL = {
    errno.ENOSPC: ("no space left on the device", "free some space"),
    errno.EDQUOT: ("the disk quota is used up", "free some space"),
    errno.EFBIG: ("the file size limit (ulimit -f) was reached", "raise the limit (ulimit -f unlimited)"),
}


def write_failure(error: BaseException, path: str | os.PathLike) -> RunFileError | None:
    """A RunFileError naming `path` when `error` (or an error it was raised from) says the disk is full, the
    quota is spent or the file size limit is reached; None for any other error. Writers that report a short
    write in their own words (torch.save: "unexpected pos ...") keep the OSError in `__context__`."""
    for cause in _chain(error):
        if isinstance(cause, OSError) and cause.errno in _FULL:
            what, fix = _FULL[cause.errno]
            return RunFileError(f"{what} while writing {path}; what was saved before is kept (the previous "
                                f"{Path(path).name}, if any): {fix} and run the same command again")
    return None


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    """`error` and the errors it was raised from or during."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def write_yaml(data: dict, path: str | os.PathLike) -> None:
    """Write `data` as YAML, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n")


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping from `path` (an empty file gives {}); RunFileError for a missing, unreadable or malformed
    file, or one that holds something other than a mapping. Only plain YAML is read (no Python objects)."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise RunFileError(f"{path} does not exist: check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunFileError(f"{path} cannot be read ({e.__class__.__name__}: {e}): pass a readable YAML file") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RunFileError(f"{path} is not valid YAML{at} ({problem}): fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RunFileError(f"{path} must hold a mapping of keys to values, got a {type(data).__name__}: fix the file")
    return data
