"""The interface every vectorised environment of `actors` implements.

Step layout (as in TorchBeast): `done[i]` means `obs[i]` is the first observation of a new training episode and
`reward[i]` is the last reward of the episode that ended. Rewards are not clipped (the learner clips them).
`episodes` lists the episodes that ended on this step, per life and per full game.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np


class Episode(NamedTuple):
    """An episode that ended: `kind` is "life" (one life, the training episode) or "game" (a full game)."""

    kind: str
    env_index: int
    episode_return: float
    length: int  # agent steps


class VectorEnv(Protocol):
    num_envs: int
    num_actions: int
    observation_shape: tuple[int, ...]
    observation_dtype: np.dtype
    frameskip: int  # emulator frames per agent step
    frames: int  # emulator frames played since construction: agent steps' and the environment's own (resets)

    def reset(self) -> np.ndarray:
        """New episodes everywhere; obs [N, *observation_shape]."""

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Episode]]:
        """actions [N] int -> obs [N, *observation_shape], reward [N] float32, done [N] bool, ended episodes."""

    def close(self) -> None:
        """Release the environments."""
