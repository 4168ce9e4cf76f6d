"""Checkpoints: written atomically, loaded without running code, checked against the requested run.

A checkpoint is a dict of tensors and plain Python values:
`learner` (`learner.impala.LearnerState.state_dict()`: model, optimiser, frame and update counters; the learning
rate schedule is a function of the frame counter and `config["total_frames"]`), `config` (the resolved run
config), `game` (the ALE ROM id), `model_spec` (the `models.PolicyNet` arguments) and `rng` (the learner's torch
RNG states as tensors).
"""
from __future__ import annotations

from pathlib import Path

import torch

from agent.files import atomic_path
from models import PolicyNet

# Keys that change what the checkpoint's model is or sees; anything else may change between resumptions.
IDENTITY_KEYS = ("core", "core_kwargs", "use_last_action", "frame_stack", "frameskip")


class CheckpointMismatchError(ValueError):
    """The checkpoint in a run directory belongs to a different game, core or model."""


def save_checkpoint(payload: dict, path: str | Path) -> None:
    """Write `payload` to `path` atomically."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint; `weights_only=True`, so loading cannot run code from the file."""
    return torch.load(path, map_location=map_location, weights_only=True)


def rng_state() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """The learner process's torch RNG states (CPU, and every CUDA device when CUDA is in use)."""
    state: dict = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_compatible(checkpoint: dict, game: str, config: dict, path: str | Path) -> None:
    """Raise CheckpointMismatchError unless `checkpoint` was trained on `game` with the model `config` asks for."""
    saved = checkpoint["config"]
    differences = [f"game: checkpoint {checkpoint['game']!r}, requested {game!r}"] if checkpoint["game"] != game else []
    differences += [
        f"{key}: checkpoint {saved.get(key)!r}, requested {config[key]!r}"
        for key in IDENTITY_KEYS
        if saved.get(key) != config[key]
    ]
    if differences:
        run_dir = Path(path).parent
        raise CheckpointMismatchError(
            f"{path} does not match the requested run ({'; '.join(differences)}). Resume it with the same "
            f"game and core settings, or start a new run with another --name (or remove {run_dir})."
        )


def policy_from_checkpoint(checkpoint: dict, device: str | torch.device = "cpu") -> PolicyNet:
    """The trained `PolicyNet` of a loaded checkpoint dict, in eval mode, on `device`."""
    net = PolicyNet(**checkpoint["model_spec"])
    net.load_state_dict(checkpoint["learner"]["model"])
    return net.to(device).eval()


def load_policy(path: str | Path, device: str | torch.device = "cpu") -> tuple[PolicyNet, dict]:
    """The trained `PolicyNet` of a checkpoint file (in eval mode, on `device`) and the checkpoint dict."""
    checkpoint = load_checkpoint(path, map_location=device)
    return policy_from_checkpoint(checkpoint, device), checkpoint
