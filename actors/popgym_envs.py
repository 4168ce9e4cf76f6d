"""POPGym's partially observable tasks (`popgym-RepeatPreviousEasy-v0`, ...) behind `actors.interface.VectorEnv`.

POPGym's environments are plain Python, one episode per object, each far faster than the policy that drives it
(tens to hundreds of thousands of steps per second). `PopgymVector` steps N of them in a loop and writes their
observations into one preallocated float32 array, so an actor's time goes to the policy, not to the wrapping.

Observations are flattened into one vector: a `Discrete(n)` value becomes a one-hot of size n, a
`MultiDiscrete` a one-hot per component, concatenated; a `Box` is copied as it is; a `Tuple` concatenates the
encodings of its parts. Actions must be `Discrete`: the policy has one categorical head, so tasks with
`MultiDiscrete` (Battleship, MineSweeper) or continuous (the Pendulum tasks) actions are refused when the name
is resolved, before anything starts. Every POPGym episode is one "life" and one "game"; an episode's return is
POPGym's, already scaled by the task into [-1, 1].
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import popgym  # noqa: F401  (importing it registers POPGym's gymnasium ids)
from gymnasium import spaces

from actors.interface import Episode

PREFIX = "popgym-"

# Writes one observation into its row of the observation array (the row is zero beforehand).
Writer = Callable[[np.ndarray, object], None]


def is_popgym_name(name: str) -> bool:
    return name.strip().lower().startswith(PREFIX)


def _registered_ids() -> list[str]:
    return [env_id for env_id in gym.registry if env_id.startswith(PREFIX)]


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def resolve_popgym(name: str) -> str:
    """The registered POPGym id that `name` denotes (case and separators aside), if its actions are Discrete.

    Raises ValueError naming close matches for an unknown id, or the action space of a task rfwp cannot drive.
    """
    ids = _registered_ids()
    by_key = {_squash(env_id): env_id for env_id in ids}
    key = _squash(name)
    if key not in by_key:
        close = difflib.get_close_matches(key, list(by_key), n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(by_key[c] for c in close)}." if close else ""
        raise ValueError(
            f"unknown POPGym task {name!r}.{hint} POPGym ids look like popgym-RepeatPreviousEasy-v0 "
            f"({len(ids)} are registered)."
        )
    env_id = by_key[key]
    action_space = _make(env_id).action_space
    if not isinstance(action_space, spaces.Discrete):
        raise ValueError(
            f"{env_id} has a {action_space} action space; rfwp's policy has one categorical head and drives only "
            "POPGym tasks with Discrete actions (e.g. popgym-RepeatPreviousEasy-v0, popgym-CountRecallEasy-v0)."
        )
    return env_id


def _make(env_id: str) -> gym.Env:
    # The bare environment: gymnasium's checker and order-enforcing wrappers would cost more than the task.
    return gym.make(env_id, disable_env_checker=True).unwrapped


def observation_encoder(space: gym.Space, offset: int = 0) -> tuple[int, Writer]:
    """(size, write) for observations of `space` placed at `offset` of a flat float row.

    `write(row, value)` sets row[offset : offset + size] from `value`, assuming the row is zero there.
    """
    if isinstance(space, spaces.Discrete):
        start = int(space.start)

        def write_discrete(row: np.ndarray, value) -> None:
            row[offset + int(value) - start] = 1.0

        return int(space.n), write_discrete
    if isinstance(space, spaces.MultiDiscrete):
        sizes = np.asarray(space.nvec).ravel()
        starts = offset + np.concatenate([[0], np.cumsum(sizes)[:-1]]) - np.asarray(space.start).ravel()

        def write_multi(row: np.ndarray, value) -> None:
            row[starts + np.asarray(value).ravel()] = 1.0

        return int(sizes.sum()), write_multi
    if isinstance(space, spaces.Box):
        size = int(np.prod(space.shape))

        def write_box(row: np.ndarray, value) -> None:
            row[offset : offset + size] = np.asarray(value, np.float32).ravel()

        return size, write_box
    if isinstance(space, spaces.Tuple):
        writers, size = [], 0
        for part in space.spaces:
            part_size, write = observation_encoder(part, offset + size)
            writers.append(write)
            size += part_size

        def write_tuple(row: np.ndarray, value) -> None:
            for write, part_value in zip(writers, value):
                write(row, part_value)

        return size, write_tuple
    raise ValueError(f"POPGym observation space {space} is not supported: expected Discrete, MultiDiscrete, Box "
                     "or Tuple")


class PopgymVector:
    """`num_envs` copies of the POPGym task `env_id`, observations [N, D] float32 (the flat encoding above).

    Environment i is seeded with `seed + i` at `reset()`; later episodes continue its random stream.
    """

    observation_dtype = np.dtype(np.float32)
    frameskip = 1

    def __init__(self, env_id: str, num_envs: int, seed: int):
        self.env_id, self.num_envs, self.seed = env_id, num_envs, seed
        self.envs = [_make(env_id) for _ in range(num_envs)]
        action_space = self.envs[0].action_space
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(f"{env_id} has a {action_space} action space; only Discrete actions are supported")
        self.num_actions, self._action_start = int(action_space.n), int(action_space.start)
        size, self._write = observation_encoder(self.envs[0].observation_space)
        self.observation_shape = (size,)
        self._obs = np.zeros((num_envs, size), np.float32)
        self._return = np.zeros(num_envs, np.float64)
        self._length = np.zeros(num_envs, np.int64)
        self.frames = 0  # agent steps of all environments: POPGym has no frame skip

    def reset(self) -> np.ndarray:
        """New episodes everywhere; obs [N, D] (a fresh array)."""
        self._obs[:] = 0.0
        for i, env in enumerate(self.envs):
            value, _ = env.reset(seed=self.seed + i)
            self._write(self._obs[i], value)
        self._return[:] = 0.0
        self._length[:] = 0
        return self._obs.copy()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Episode]]:
        """actions [N] int -> obs [N, D] float32, reward [N] float32, done [N] bool, ended episodes.

        Where an episode ends, `obs` is already the first observation of the next one and `reward` the last of
        the one that ended (the layout of `actors.interface`).
        """
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},), got {actions.shape}")
        reward = np.empty(self.num_envs, np.float32)
        done = np.empty(self.num_envs, bool)
        episodes = []
        self.frames += self.num_envs
        self._obs[:] = 0.0
        for i, (env, action) in enumerate(zip(self.envs, actions.tolist())):
            value, r, terminated, truncated, _ = env.step(action + self._action_start)
            reward[i], done[i] = r, terminated or truncated
            self._return[i] += r
            self._length[i] += 1
            if done[i]:
                for kind in ("life", "game"):  # one life per game
                    episodes.append(Episode(kind, i, float(self._return[i]), int(self._length[i])))
                self._return[i], self._length[i] = 0.0, 0
                value, _ = env.reset()
            self._write(self._obs[i], value)
        return self._obs.copy(), reward, done, episodes

    def close(self) -> None:
        for env in self.envs:
            env.close()
