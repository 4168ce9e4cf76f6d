"""Tiny vectorised environments for smoke tests of the agents (`--env memory`).

They implement `actors.interface.VectorEnv` and are selected by name like the Atari games.
"""
from __future__ import annotations

import numpy as np

from actors.interface import Episode


class MemoryEnv:
    """Remember a cue: a feed-forward agent can do no better than chance.

    Each episode lasts `delay + 2` steps. Step 0 shows one of `num_cues` cues (one-hot); the next `delay` steps
    are blank; the last step raises a query flag, and the action taken there earns +1 if it names the cue and
    -1 otherwise (every other action earns 0). Observations are [num_cues + 1] float32 vectors. Chance return is
    2 / num_cues - 1; the best return is 1.
    """

    observation_dtype = np.dtype(np.float32)
    frameskip = 1

    def __init__(self, num_envs: int, seed: int, num_cues: int = 4, delay: int = 5):
        self.num_envs, self.num_cues, self.delay = num_envs, num_cues, delay
        self.num_actions = num_cues
        self.observation_shape = (num_cues + 1,)
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._cue = np.zeros(num_envs, np.int64)
        self._t = np.zeros(num_envs, np.int64)
        self._return = np.zeros(num_envs, np.float64)
        self.frames = 0

    def _observe(self) -> np.ndarray:
        obs = np.zeros((self.num_envs, self.num_cues + 1), np.float32)
        first = self._t == 0
        obs[first, self._cue[first]] = 1.0
        obs[self._t == self.delay + 1, self.num_cues] = 1.0
        return obs

    def _new_episodes(self, mask: np.ndarray) -> None:
        self._cue[mask] = self._rng.integers(0, self.num_cues, size=int(mask.sum()))
        self._t[mask] = 0
        self._return[mask] = 0.0

    def reset(self) -> np.ndarray:
        """New episodes everywhere (random generator re-seeded with `seed`); obs [N, num_cues + 1]."""
        self._rng = np.random.default_rng(self.seed)
        self._new_episodes(np.ones(self.num_envs, bool))
        return self._observe()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Episode]]:
        """actions [N] -> obs [N, num_cues + 1], reward [N] float32, done [N] bool, ended episodes."""
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},), got {actions.shape}")
        done = self._t == self.delay + 1
        self.frames += self.num_envs
        reward = np.where(done, np.where(actions == self._cue, 1.0, -1.0), 0.0).astype(np.float32)
        self._return += reward
        episodes = []
        for i in np.flatnonzero(done):
            for kind in ("life", "game"):  # one life per game
                episodes.append(Episode(kind, int(i), float(self._return[i]), self.delay + 2))
        self._t += 1
        self._new_episodes(done)
        return self._observe(), reward, done, episodes

    def close(self) -> None:
        pass


TOY_ENVS = {"memory": MemoryEnv}
