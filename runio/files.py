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

    A full disk raises RunFileError naming the file; the old file is untouched.
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
        if _is_disk_full(e):
            raise RunFileError(
                f"no space left on the device while writing {path}; the previous {path.name} (if any) is "
                "unchanged: free some space and run the same command again"
            ) from None
        raise


def _is_disk_full(error: BaseException) -> bool:
    # torch.save reports a short write as a RuntimeError ("unexpected pos ..."), not as ENOSPC.
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, RuntimeError) and "unexpected pos" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


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
