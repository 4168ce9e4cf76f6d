"""Checkpoints: written atomically with the previous one kept, loaded without running code, checked against the
run that asks for them.

A checkpoint is a dict of tensors and plain Python values (what is in it is the writer's business: the RL
learner's and the supervised trainer's layouts are documented where they are written). `save_checkpoint` keeps the
file it replaces as `<stem>.prev<suffix>`, so a checkpoint damaged after it was written (a disk error, a copy
cut short) costs one checkpoint interval, not the run: `load_latest` falls back to it and sets the damaged file
aside.
"""
from __future__ import annotations

import io
import os
import pickle
import time
import zipfile
from pathlib import Path

import torch

from runio.files import RunFileError, atomic_path


class CheckpointError(RunFileError):
    """A checkpoint file cannot be loaded: truncated, empty, not a checkpoint, or not loadable without running
    code from it."""


class CheckpointMismatchError(ValueError):
    """The checkpoint in a run directory belongs to another run (game, task, core or model)."""


def previous_path(path: str | Path) -> Path:
    """Where `save_checkpoint(..., path)` keeps the checkpoint it replaced."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(payload: dict | bytes, path: str | Path, keep_previous: bool = True) -> None:
    """Write `payload` (a dict, or the bytes of one `checkpoint_bytes` made) to `path` atomically; with
    `keep_previous`, the file it replaces becomes `previous_path(path)`. A crash at any point leaves a loadable
    `path` or `previous_path(path)`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object, so that a full disk surfaces as ENOSPC, not "unexpected pos"
            if isinstance(payload, bytes):
                f.write(payload)
            else:
                torch.save(payload, f)
        if keep_previous and path.exists():
            # A hard link, renamed over the old previous: `path` stays in place until the new file replaces it.
            with atomic_path(previous_path(path)) as prev_tmp:
                os.unlink(prev_tmp)
                os.link(path, prev_tmp)


def checkpoint_bytes(payload: dict) -> bytes:
    """`payload` serialised as `save_checkpoint` writes it."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    required_keys: tuple[str, ...] = ()) -> dict:
    """Read a checkpoint with `weights_only=True`, so loading cannot run code from the file.

    Raises CheckpointError (one line: the file and what is wrong) for a missing, truncated, empty or foreign
    file, one that would need code to load, or one without `required_keys`.
    """
    path = Path(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, IndexError, KeyError,
            AttributeError, TypeError, OSError, UnicodeDecodeError) as e:
        if isinstance(e, pickle.UnpicklingError) and "GLOBAL" in str(e):  # a class or function it would call
            reason = "it holds Python objects that could run code when loaded, which rfwp never loads"
        elif path.stat().st_size == 0:
            reason = "the file is empty"
        else:
            reason = f"truncated or not a checkpoint ({type(e).__name__})"
        raise CheckpointError(f"{path} is not a readable checkpoint: {reason}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a checkpoint of rfwp: it holds a {type(data).__name__}, not a dict")
    missing = [key for key in required_keys if key not in data]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this kind of run: it lacks {', '.join(missing)}")
    return data


def load_latest(path: str | Path, map_location: str | torch.device = "cpu",
                required_keys: tuple[str, ...] = ()) -> dict | None:
    """The checkpoint at `path`, or else the previous one that `save_checkpoint` kept; None when neither exists.

    A damaged file is renamed to `<name>.damaged-<unix time>` (kept for inspection, never deleted); a fallback
    prints one line that says why. Raises CheckpointError when every existing candidate is damaged.
    """
    errors = []
    for candidate in (Path(path), previous_path(path)):
        if not candidate.exists():
            continue
        try:
            checkpoint = load_checkpoint(candidate, map_location, required_keys)
        except CheckpointError as e:
            aside = candidate.with_name(f"{candidate.name}.damaged-{int(time.time())}")
            os.replace(candidate, aside)
            errors.append(f"{e} (moved aside to {aside.name})")
            continue
        if candidate != Path(path):
            why = "; ".join(errors) or f"{path} is missing"
            print(f"warning: {why}; falling back to the previous checkpoint {candidate}", flush=True)
        return checkpoint
    if errors:
        raise CheckpointError(f"{'; '.join(errors)}. No loadable checkpoint is left: run the same command to "
                              "start the run again from the beginning, or start a new run with another --name")
    return None


def check_identity(saved: dict, requested: dict, path: str | Path) -> None:
    """Raise CheckpointMismatchError unless every key of `requested` (what makes a run this run: game, task,
    core, sizes, observation protocol) has the same value in `saved`."""
    differences = [
        f"{key}: checkpoint {saved.get(key)!r}, requested {value!r}" for key, value in requested.items()
        if saved.get(key) != value
    ]
    if differences:
        run_dir = Path(path).parent
        raise CheckpointMismatchError(
            f"{path} belongs to another run ({'; '.join(differences)}). Resume it with the same settings, or "
            f"start a new run with another --name (or remove {run_dir})."
        )


def rng_state() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """The process's torch RNG states (CPU, and every CUDA device when CUDA is in use)."""
    state: dict = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
