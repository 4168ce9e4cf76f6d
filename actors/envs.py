"""Environment construction: game names as users type them, and vectorised environments behind one interface.

Every environment made here implements `actors.interface.VectorEnv` (its docstring gives the step layout).

Atari uses ale-py's C++ `AtariVectorEnv` with the paper's protocol (experiments.md §5.1): frame skip 4 with a
max-pool over the last two frames, 84x84 grey, 4-frame stack, up to 30 no-op starts, FIRE on reset, minimal
action set, no sticky actions (0.25 with `sticky_actions=True`), and loss of a life as the end of a training
episode while the emulator resets only at game over.
"""
from __future__ import annotations

import difflib
import re

import numpy as np
from ale_py import roms
from ale_py.vector_env import AtariVectorEnv

from actors.interface import Episode, VectorEnv
from actors.popgym_envs import PopgymVector, is_popgym_name, resolve_popgym
from actors.toy_envs import TOY_ENVS


def _squash(name: str) -> str:
    """Lower-case key without separators, so "SpaceInvaders", "space_invaders" and "space-invaders" agree."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _display_name(game: str) -> str:
    return game if game in TOY_ENVS else "".join(part.capitalize() for part in game.split("_"))


def resolve_game(name: str) -> str:
    """The ALE ROM id (e.g. "breakout"), toy environment name (e.g. "memory") or POPGym id (e.g.
    "popgym-RepeatPreviousEasy-v0") that `name` denotes.

    Accepts "Breakout", "breakout", "ALE/Breakout-v5", "BreakoutNoFrameskip-v4", "space_invaders", "MsPacman",
    and POPGym's gymnasium ids. Raises ValueError listing close matches for an unknown name, or saying why a
    POPGym task cannot be played (see `actors.popgym_envs`).
    """
    if is_popgym_name(name):
        return resolve_popgym(name)
    candidates = {_squash(game): game for game in [*roms.get_all_rom_ids(), *TOY_ENVS]}
    stripped = re.sub(r"^ALE/", "", name.strip())
    stripped = re.sub(r"(NoFrameskip|Deterministic)?-v\d+$", "", stripped)
    key = _squash(stripped)
    if key in candidates:
        return candidates[key]
    close = difflib.get_close_matches(key, list(candidates), n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(_display_name(candidates[c]) for c in close)}." if close else ""
    raise ValueError(
        f"unknown game {name!r}.{hint} Pass an Atari game name such as Breakout, ALE/Pong-v5 or space_invaders "
        f"(ale-py ships {len(candidates) - len(TOY_ENVS)} ROMs), a POPGym task such as popgym-RepeatPreviousEasy-v0, "
        f"or a toy environment: {', '.join(TOY_ENVS)}."
    )


class AtariVector:
    """N Atari games in one C++ `AtariVectorEnv` (its own threads), observations [N, 4, 84, 84] uint8."""

    observation_dtype = np.dtype(np.uint8)

    def __init__(
        self,
        game: str,
        num_envs: int,
        seed: int,
        *,
        sticky_actions: bool = False,
        noop_max: int = 30,
        frameskip: int = 4,
        frame_stack: int = 4,
        fire_reset: bool = True,
        episodic_life: bool = True,
        max_episode_frames: int = 108_000,
        num_threads: int = 1,
        record_screen: bool = False,
    ):
        self.num_envs, self.frameskip, self.episodic_life, self.seed = num_envs, frameskip, episodic_life, seed
        # AtariVectorEnv's own `episodic_life` restarts the whole game at every life loss; `life_loss_info`
        # only reports the loss as a termination and keeps playing, which is the training protocol we want.
        # SameStep autoreset hands back the new game's first frame on the step that ended the old one.
        emulation = dict(
            num_threads=num_threads,
            autoreset_mode="SameStep",
            repeat_action_probability=0.25 if sticky_actions else 0.0,
            full_action_space=False,
            frameskip=frameskip,
            noop_max=noop_max,
            use_fire_reset=fire_reset,
            episodic_life=False,
            life_loss_info=episodic_life,
            reward_clipping=False,
            max_num_frames_per_episode=max_episode_frames,
        )
        self.env = AtariVectorEnv(game, num_envs, stack_num=frame_stack, **emulation)
        # The C++ env hands out only preprocessed frames. For videos (`record_screen`), a second emulator with the
        # same settings, seeds and actions plays the identical game (the game depends on the seed and actions
        # alone) and shows the screen in colour: `screens` [N, 210, 160, 3] uint8 after each reset() and step().
        self._screen_env = (
            AtariVectorEnv(game, num_envs, stack_num=1, grayscale=False, img_height=210, img_width=160,
                           maxpool=False, **emulation)
            if record_screen else None
        )
        self.screens: np.ndarray | None = None
        self.num_actions = int(self.env.single_action_space.n)
        self.observation_shape = tuple(self.env.single_observation_space.shape)
        self._lives = np.zeros(num_envs, np.int64)
        self._life_return = np.zeros(num_envs, np.float64)
        self._life_steps = np.zeros(num_envs, np.int64)
        self._game_return = np.zeros(num_envs, np.float64)
        self._game_steps = np.zeros(num_envs, np.int64)

    def reset(self) -> np.ndarray:
        """Start new games in every environment (seeded `seed`, `seed + 1`, ...); obs [N, *obs_shape]."""
        seeds = np.arange(self.seed, self.seed + self.num_envs)
        obs, info = self.env.reset(seed=seeds)
        if self._screen_env is not None:
            self.screens = self._screen_env.reset(seed=seeds)[0][:, 0]
        self._lives[:] = info["lives"]
        for counter in (self._life_return, self._life_steps, self._game_return, self._game_steps):
            counter[:] = 0
        return obs

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Episode]]:
        """actions [N] int -> obs [N, *obs_shape] uint8, reward [N] float32, done [N] bool, ended episodes."""
        actions = np.asarray(actions, dtype=np.int64)
        obs, reward, terminated, truncated, info = self.env.step(actions)
        if self._screen_env is not None:
            self.screens = self._screen_env.step(actions)[0][:, 0]
        reward = reward.astype(np.float32)
        lives = info["lives"].astype(np.int64)
        life_lost = lives < self._lives
        # A termination without fewer lives is a game over: the new game has already started (SameStep).
        game_over = truncated | (terminated & ~life_lost)
        life_over = life_lost | game_over
        self._lives = lives
        for ret, steps in ((self._life_return, self._life_steps), (self._game_return, self._game_steps)):
            ret += reward
            steps += 1
        episodes = []
        for i in np.flatnonzero(life_over):
            episodes.append(Episode("life", int(i), float(self._life_return[i]), int(self._life_steps[i])))
            self._life_return[i] = self._life_steps[i] = 0
            if game_over[i]:
                episodes.append(Episode("game", int(i), float(self._game_return[i]), int(self._game_steps[i])))
                self._game_return[i] = self._game_steps[i] = 0
        done = life_over if self.episodic_life else game_over
        return obs, reward, done, episodes

    def close(self) -> None:
        self.env.close()
        if self._screen_env is not None:
            self._screen_env.close()


def make_vector_env(game: str, num_envs: int, seed: int, **options) -> VectorEnv:
    """A vectorised environment for `game` (any name `resolve_game` accepts) with `num_envs` copies.

    `options` are the Atari protocol switches of `AtariVector` (sticky_actions, noop_max, frameskip,
    frame_stack, fire_reset, episodic_life, max_episode_frames, num_threads, record_screen); toy environments
    and POPGym tasks ignore them.
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be at least 1, got {num_envs}")
    game = resolve_game(game)
    if game in TOY_ENVS:
        return TOY_ENVS[game](num_envs, seed)
    if is_popgym_name(game):
        return PopgymVector(game, num_envs, seed)
    return AtariVector(game, num_envs, seed, **options)


def env_spaces(game: str, **options) -> tuple[tuple[int, ...], int]:
    """(observation_shape, num_actions) of `game` under `options`, read from a throw-away one-env instance."""
    env = make_vector_env(game, 1, seed=0, **options)
    try:
        return env.observation_shape, env.num_actions
    finally:
        env.close()
