"""Environment construction: game names as users type them, and vectorised environments behind one interface.

Every environment made here implements `actors.interface.VectorEnv` (its docstring gives the step layout).

Atari comes in two protocols (`atari_protocol`):

- "paper" (default), `PaperAtariVector`: the wrapper chain of the paper's code (OpenAI baselines' atari_wrappers
  on gym's `<Game>NoFrameskip-v4`), played on ale-py's `ALEInterface`: 1-30 no-op frames after a new game, frame
  skip 4 with a max-pool of the last two RGB screens, a lost life ends the training episode and is followed by a
  NOOP step, FIRE and action 2 (games with FIRE), 84x84 grey by OpenCV, the 4-frame stack refilled with the first
  frame of every training episode, and gym's per-game time limit.
- "ale", `AtariVector`: ale-py's C++ `AtariVectorEnv`, the modern preprocessing: FIRE only at a new game, the
  stack zero-filled at a new game and kept across lost lives, the ALE's 108k-frame cap.

Both: minimal action set, no sticky actions (0.25 with `sticky_actions=True`), unclipped rewards, and a lost life
as the end of a training episode while the emulator resets only at game over (`episodic_life`).
"""
from __future__ import annotations

import difflib
import re

import cv2
import numpy as np
from ale_py import Action, ALEInterface, LoggerMode, roms
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


ATARI_PROTOCOLS = ("paper", "ale")
ALE_FRAME_CAP = 108_000  # ale-py's default episode cap, 30 minutes of play


def gym_time_limit(game: str) -> int:
    """Emulator frames after which gym's `<Game>NoFrameskip-v4` ends an episode (its TimeLimit wrapper).

    Old gym registered these ids with `max_episode_steps = 100_000 * frameskip`, where frameskip is that of the
    game's `Deterministic` id: 3 for SpaceInvaders, 4 for every other game. ale-py registers the ids again
    without a TimeLimit (and with its own 108k-frame cap), so the rule is written out here.
    """
    return 100_000 * (3 if game == "space_invaders" else 4)


class EpisodeTracker:
    """Returns and lengths (agent steps) of the current life and game of N environments."""

    def __init__(self, num_envs: int):
        self.life_return = np.zeros(num_envs, np.float64)
        self.life_steps = np.zeros(num_envs, np.int64)
        self.game_return = np.zeros(num_envs, np.float64)
        self.game_steps = np.zeros(num_envs, np.int64)

    def reset(self) -> None:
        for counter in (self.life_return, self.life_steps, self.game_return, self.game_steps):
            counter[:] = 0

    def step(self, reward: np.ndarray, life_over: np.ndarray, game_over: np.ndarray) -> list[Episode]:
        """Count one agent step (reward, life_over, game_over: [N]); the episodes that it ended."""
        for ret, steps in ((self.life_return, self.life_steps), (self.game_return, self.game_steps)):
            ret += reward
            steps += 1
        episodes = []
        for i in np.flatnonzero(life_over | game_over):
            episodes.append(Episode("life", int(i), float(self.life_return[i]), int(self.life_steps[i])))
            self.life_return[i] = self.life_steps[i] = 0
            if game_over[i]:
                episodes.append(Episode("game", int(i), float(self.game_return[i]), int(self.game_steps[i])))
                self.game_return[i] = self.game_steps[i] = 0
        return episodes


class AtariVector:
    """N Atari games in one C++ `AtariVectorEnv` (its own threads), observations [N, 4, 84, 84] uint8: the "ale"
    protocol."""

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
        max_episode_frames: int = ALE_FRAME_CAP,
        num_threads: int = 1,
        record_screen: bool = False,
    ):
        self.num_envs, self.frameskip, self.episodic_life, self.seed = num_envs, frameskip, episodic_life, seed
        self.frames = 0
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
        self._episodes = EpisodeTracker(num_envs)

    def reset(self) -> np.ndarray:
        """Start new games in every environment (seeded `seed`, `seed + 1`, ...); obs [N, *obs_shape]."""
        seeds = np.arange(self.seed, self.seed + self.num_envs)
        obs, info = self.env.reset(seed=seeds)
        self._frame_numbers = info["frame_number"].astype(np.int64)
        if self._screen_env is not None:
            self.screens = self._screen_env.reset(seed=seeds)[0][:, 0]
        self._lives[:] = info["lives"]
        self._episodes.reset()
        return obs

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Episode]]:
        """actions [N] int -> obs [N, *obs_shape] uint8, reward [N] float32, done [N] bool, ended episodes."""
        actions = np.asarray(actions, dtype=np.int64)
        obs, reward, terminated, truncated, info = self.env.step(actions)
        if self._screen_env is not None:
            self.screens = self._screen_env.step(actions)[0][:, 0]
        reward = reward.astype(np.float32)
        # The ALE's frame counter runs on across games (it restarts only when a seed reloads the ROM at reset()),
        # so its increase also counts the no-op frames of new games.
        frame_numbers = info["frame_number"].astype(np.int64)
        self.frames += int((frame_numbers - self._frame_numbers).sum())
        self._frame_numbers = frame_numbers
        lives = info["lives"].astype(np.int64)
        life_lost = lives < self._lives
        # A termination without fewer lives is a game over: the new game has already started (SameStep).
        game_over = truncated | (terminated & ~life_lost)
        life_over = life_lost | game_over
        self._lives = lives
        episodes = self._episodes.step(reward, life_over, game_over)
        done = life_over if self.episodic_life else game_over
        return obs, reward, done, episodes

    def close(self) -> None:
        self.env.close()
        if self._screen_env is not None:
            self._screen_env.close()


class PaperGame:
    """One Atari game behind the paper's wrapper chain, on an `ALEInterface` (the "paper" protocol).

    The chain of the paper's code, inside out: gym's `<Game>NoFrameskip-v4` (one emulator frame per step, RGB
    screens, its TimeLimit of `max_episode_frames` frames since the game's reset), NoopResetEnv, MaxAndSkipEnv,
    EpisodicLifeEnv, FireResetEnv, WarpFrame and FrameStack of baselines' atari_wrappers. Their quirks are kept:
    the frame skip runs on through a lost life, its max-pool buffer keeps the previous step's screens when a game
    ends early in the skip, a game's first observation is the last no-op screen without a max-pool, and a new
    training episode's stack holds its first frame `frame_stack` times.

    Unlike the chain, the rewards of the reset's NOOP, FIRE and 2 steps are kept (`reset()` returns them) rather
    than dropped, so that a game's return holds every point scored.
    """

    def __init__(self, game: str, seed: int, *, sticky_actions: bool, noop_max: int, frameskip: int,
                 frame_stack: int, fire_reset: bool, episodic_life: bool, max_episode_frames: int):
        self.noop_max, self.skip, self.episodic_life = noop_max, frameskip, episodic_life
        self.max_episode_frames = max_episode_frames
        self.ale = ALEInterface()
        self.ale.setLoggerMode(LoggerMode.Error)
        self.ale.setFloat("repeat_action_probability", 0.25 if sticky_actions else 0.0)
        self.ale.setInt("max_num_frames_per_episode", 0)  # the TimeLimit below caps games, as gym's did
        self.ale.setInt("random_seed", seed)
        self.ale.loadROM(roms.get_rom_path(game))
        self.rng = np.random.default_rng(seed)  # no-op counts
        self.action_set = self.ale.getMinimalActionSet()
        # FireResetEnv wraps games whose action 1 is FIRE; it then presses actions 1 and 2.
        self.fire = fire_reset and len(self.action_set) >= 3 and self.action_set[1] == Action.FIRE
        self.pool = np.zeros((2, 210, 160, 3), np.uint8)  # MaxAndSkipEnv's buffer of the last two screens
        self.screen = np.zeros((210, 160, 3), np.uint8)  # the chain's current observation, before WarpFrame
        self.stack = np.zeros((frame_stack, 84, 84), np.uint8)
        self.frames = 0  # emulator frames played, all told
        self.game_frames = 0  # frames since the game's reset (gym's TimeLimit counts these)
        self.lives = 0
        self.real_done = True  # EpisodicLifeEnv.was_real_done: the next reset starts a new game

    def _emulate(self, action) -> tuple[float, bool]:
        """One emulator frame (gym's env under its TimeLimit): reward, game over or time up."""
        reward = self.ale.act(action)
        self.frames += 1
        self.game_frames += 1
        return reward, self.ale.game_over() or self.game_frames >= self.max_episode_frames

    def _skip(self, action_index: int) -> tuple[float, bool]:
        """MaxAndSkipEnv.step: the action for `skip` frames (fewer if the game ends), rewards summed, the
        observation the max of the last two frames' screens."""
        action, total, done = self.action_set[action_index], 0.0, False
        for k in range(self.skip):
            reward, done = self._emulate(action)
            total += reward
            if k >= self.skip - 2:
                self.ale.getScreenRGB(self.pool[k - self.skip + 2])
            if done:
                break
        np.maximum(self.pool[0], self.pool[1], out=self.screen)
        return total, done

    def _life_step(self, action_index: int) -> tuple[float, bool]:
        """EpisodicLifeEnv.step: reward and done, which a lost life (with lives left) also sets."""
        reward, done = self._skip(action_index)
        self.real_done = done
        lives = self.ale.lives()
        life_lost = 0 < lives < self.lives
        self.lives = lives
        return reward, done or (self.episodic_life and life_lost)

    def _new_game(self) -> None:
        """NoopResetEnv.reset: reset the game, then 1 to noop_max no-op frames."""
        self.ale.reset_game()
        self.game_frames = 0
        for _ in range(self.rng.integers(1, self.noop_max + 1) if self.noop_max > 0 else 0):
            _, done = self._emulate(self.action_set[0])
            if done:
                self.ale.reset_game()
                self.game_frames = 0
        self.ale.getScreenRGB(self.screen)

    def _life_reset(self) -> float:
        """EpisodicLifeEnv.reset: a new game after a real end, else one NOOP step; its reward."""
        reward = 0.0
        if self.real_done or not self.episodic_life:
            self._new_game()
        else:
            reward, _ = self._skip(0)
        self.lives = self.ale.lives()
        return reward

    def reset(self) -> float:
        """FireResetEnv.reset, then WarpFrame and a refilled FrameStack: a new training episode starts.

        Returns the reward scored by the reset's steps."""
        reward = self._life_reset()
        if self.fire:
            for action_index in (1, 2):
                r, done = self._life_step(action_index)
                reward += r
                if done:
                    reward += self._life_reset()
        self.stack[:] = self._warp()
        return reward

    def step(self, action_index: int) -> tuple[float, bool, bool]:
        """One agent step: reward, done (the training episode ended), and whether the game ended."""
        reward, done = self._life_step(action_index)
        self.stack[:-1] = self.stack[1:]
        self.stack[-1] = self._warp()
        return reward, done, self.real_done

    def _warp(self) -> np.ndarray:
        """WarpFrame: OpenCV grey, 84x84 by area interpolation."""
        grey = cv2.cvtColor(self.screen, cv2.COLOR_RGB2GRAY)
        return cv2.resize(grey, (84, 84), interpolation=cv2.INTER_AREA)


class PaperAtariVector:
    """N `PaperGame`s stepped in turn, observations [N, frame_stack, 84, 84] uint8: the "paper" protocol.

    After every training episode ends (a lost life with `episodic_life`, else a game over) the environment resets
    it at once, like the paper's env servers: the step that ended it returns the reset's first observation with
    done, and the reset's NOOP/FIRE/2 steps (or the no-op starts of a new game) are emulator frames of no agent
    step, whose rewards are added to the next step's reward.
    """

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
        max_episode_frames: int = 0,
        num_threads: int = 1,
        record_screen: bool = False,
    ):
        del num_threads  # the games run in this process, one after another
        self.game, self.num_envs, self.seed, self.frameskip = game, num_envs, seed, frameskip
        self.episodic_life, self.record_screen = episodic_life, record_screen
        self.options = dict(sticky_actions=sticky_actions, noop_max=noop_max, frameskip=frameskip,
                            frame_stack=frame_stack, fire_reset=fire_reset, episodic_life=episodic_life,
                            max_episode_frames=max_episode_frames or gym_time_limit(game))
        self.games = [PaperGame(game, seed + i, **self.options) for i in range(num_envs)]
        self.num_actions = len(self.games[0].action_set)
        self.observation_shape = (frame_stack, 84, 84)
        self.screens: np.ndarray | None = None  # with `record_screen`: [N, 210, 160, 3] uint8, the latest screens
        self._frames_before = 0  # frames of games replaced by reset()
        self._pending_reward = np.zeros(num_envs, np.float32)
        self._episodes = EpisodeTracker(num_envs)

    @property
    def frames(self) -> int:
        """Emulator frames played since construction, resets and no-op starts included."""
        return self._frames_before + sum(g.frames for g in self.games)

    def _observe(self) -> np.ndarray:
        if self.record_screen:
            self.screens = np.stack([g.ale.getScreenRGB() for g in self.games])
        return np.stack([g.stack for g in self.games])

    def reset(self) -> np.ndarray:
        """Start new games in every environment (seeded `seed`, `seed + 1`, ...); obs [N, *obs_shape]."""
        self._frames_before = self.frames
        self.games = [PaperGame(self.game, self.seed + i, **self.options) for i in range(self.num_envs)]
        self._pending_reward = np.array([g.reset() for g in self.games], np.float32)
        self._episodes.reset()
        return self._observe()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Episode]]:
        """actions [N] int -> obs [N, *obs_shape] uint8, reward [N] float32, done [N] bool, ended episodes."""
        reward = self._pending_reward.copy()
        done, game_over = np.zeros(self.num_envs, bool), np.zeros(self.num_envs, bool)
        lives = np.array([g.lives for g in self.games])
        for i, (g, action) in enumerate(zip(self.games, np.asarray(actions, np.int64))):
            r, done[i], game_over[i] = g.step(int(action))
            reward[i] += r
        life_lost = np.array([g.lives for g in self.games]) < lives
        for i in np.flatnonzero(done):
            self._pending_reward[i] = self.games[i].reset()
        self._pending_reward[~done] = 0.0
        episodes = self._episodes.step(reward, life_lost, game_over)
        return self._observe(), reward, done, episodes

    def close(self) -> None:
        self.games = []


def saved_env_options(options: dict) -> dict:
    """Environment options saved by a run or recording, completed for those older than `atari_protocol`, which
    played ale-py's protocol."""
    return {"atari_protocol": "ale", **options}


def make_vector_env(game: str, num_envs: int, seed: int, atari_protocol: str = "paper", **options) -> VectorEnv:
    """A vectorised environment for `game` (any name `resolve_game` accepts) with `num_envs` copies.

    `atari_protocol` picks the Atari environment: "paper" (`PaperAtariVector`) or "ale" (`AtariVector`).
    `options` are their protocol switches (sticky_actions, noop_max, frameskip, frame_stack, fire_reset,
    episodic_life, max_episode_frames (0: the protocol's own cap), num_threads, record_screen); toy environments
    and POPGym tasks ignore them.
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be at least 1, got {num_envs}")
    game = resolve_game(game)
    if game in TOY_ENVS:
        return TOY_ENVS[game](num_envs, seed)
    if is_popgym_name(game):
        return PopgymVector(game, num_envs, seed)
    if atari_protocol == "paper":
        return PaperAtariVector(game, num_envs, seed, **options)
    if atari_protocol == "ale":
        if not options.get("max_episode_frames"):
            options["max_episode_frames"] = ALE_FRAME_CAP
        return AtariVector(game, num_envs, seed, **options)
    raise ValueError(f"unknown atari_protocol {atari_protocol!r}: use one of {', '.join(ATARI_PROTOCOLS)}")


ENV_OPTION_KEYS = ("atari_protocol", "sticky_actions", "noop_max", "frameskip", "frame_stack", "fire_reset",
                   "episodic_life", "max_episode_frames")


def env_options(config: dict) -> dict:
    """The environment protocol switches (keyword arguments of `make_vector_env`) that a run config sets; the
    same for training, evaluation and replay of that run (configs older than `atari_protocol` played "ale")."""
    return {key: saved_env_options(config)[key] for key in ENV_OPTION_KEYS}


def env_spaces(game: str, **options) -> tuple[tuple[int, ...], int]:
    """(observation_shape, num_actions) of `game` under `options`, read from a throw-away one-env instance."""
    env = make_vector_env(game, 1, seed=0, **options)
    try:
        return env.observation_shape, env.num_actions
    finally:
        env.close()
