"""Recorded episodes: play one full game with a policy, write it down, and replay it in the emulator.

An episode is played on a one-environment copy of the training environment (`actors.envs.make_vector_env` with
the run's protocol options), with the policy fed exactly as in training: the core state is carried from step to
step and reset where `done` says a new training episode (a life, by default) starts. The episode is one full
game: it ends at game over (or the ALE's frame limit), or after `max_steps` agent steps.

On disk an episode is three files with a common stem (`episode_0000`):

- `.json`: how to reproduce it (game, environment options, env seed) and what came of it (return, per-life
  returns, steps, how it ended, the policy that played it);
- `.npz` (no pickles): per step `t` of `T`: `actions` [T] int64, `rewards` [T] float32 (unclipped, received for
  the action), `done` [T] bool (the core was reset before step t), `probs` [T, A] float32 (the policy's action
  probabilities), `values` [T] float32 (its baseline), and `obs_crc` [T + 1] uint32, the CRC-32 of the
  observation seen at each step and of the one after the last action;
- `.mp4` (H.264): the emulator's colour screen the agent acted on at each step, one frame per step.

The emulator's no-op starts and sticky actions draw from a generator seeded by the env seed alone, so the seed
and the actions determine the whole game: `replay` re-runs it, checks rewards, `done` flags and observations
step by step, and reports how another policy's greedy actions and values compare with what was recorded.
"""
from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
import torch.nn.functional as F

from actors.envs import make_vector_env, saved_env_options
from actors.policy_step import PolicyStepper
from models import PolicyNet
from runio.files import atomic_path, write_json

TRAJECTORY_FORMAT = 1
ATARI_HZ = 60  # emulator frames per second: videos play in real time at 60 / frameskip agent steps per second
STEP_ARRAYS = {"actions": np.int64, "rewards": np.float32, "done": np.bool_, "probs": np.float32,
               "values": np.float32, "obs_crc": np.uint32}


class TrajectoryError(ValueError):
    """A recorded episode cannot be read or does not fit the policy it is compared with."""


@dataclass
class Trajectory:
    """One recorded episode: `meta` (the JSON side) and the per-step arrays of the module docstring."""

    meta: dict
    actions: np.ndarray
    rewards: np.ndarray
    done: np.ndarray
    probs: np.ndarray
    values: np.ndarray
    obs_crc: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {key: getattr(self, key) for key in STEP_ARRAYS}


def observation_crc(obs: np.ndarray) -> int:
    """CRC-32 of one environment's observation: detects any pixel that differs on replay."""
    return zlib.crc32(np.ascontiguousarray(obs).tobytes())


def _step_one(stepper: PolicyStepper, obs: np.ndarray, reward: float, done: bool, last_action: int
              ) -> tuple[torch.Tensor, float]:
    """One environment's step (obs [1, *obs_shape]) -> its policy logits [A] and baseline value."""
    logits, baseline = stepper(obs, np.array([reward], np.float32), np.array([done]), np.array([last_action]))
    return logits[0], float(baseline[0])


def play_episode(
    net: PolicyNet,
    game: str,
    env_options: dict,
    seed: int,
    *,
    greedy: bool = True,
    max_steps: int | None = None,
    device: torch.device | str = "cpu",
    video_path: str | Path | None = None,
    meta: dict | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Trajectory:
    """Play one game of `game` (an ALE ROM id or toy env name) from env seed `seed`.

    Args:
        env_options: the run's protocol switches (`actors.envs.env_options` of its config).
        greedy: argmax actions (the paper's test protocol); otherwise actions are sampled from the policy with a
            generator seeded by `seed`.
        max_steps: stop after this many agent steps even if the game goes on (None: the ALE's frame limit).
        video_path: write the colour screen of every step there (an `.mp4`); environments without a screen (the
            toy ones) raise TrajectoryError.
        meta: extra JSON fields for the trajectory (e.g. the checkpoint that played).
        on_step: called with the number of steps played after each step (progress display).
    """
    env = make_vector_env(game, 1, seed=seed, **env_options, record_screen=video_path is not None)
    generator = torch.Generator().manual_seed(seed)
    stepper = PolicyStepper(net, 1, device)
    steps: dict[str, list] = {key: [] for key in STEP_ARRAYS}
    life_returns: list[float] = []
    life_return, life_open, ended = 0.0, False, "max_steps"
    try:
        obs = env.reset()
        if video_path is not None and getattr(env, "screens", None) is None:
            raise TrajectoryError(f"{game} has no screen to record: evaluate it without --record")
        with video_writer(video_path, fps=ATARI_HZ / env.frameskip) as video:
            reward, done, last_action = 0.0, True, 0
            steps["obs_crc"].append(observation_crc(obs[0]))
            while max_steps is None or len(steps["actions"]) < max_steps:
                if video is not None:
                    video.write(env.screens[0])
                logits, value = _step_one(stepper, obs, reward, done, last_action)
                probs = F.softmax(logits, dim=-1)
                action = int(logits.argmax()) if greedy else int(torch.multinomial(probs, 1, generator=generator))
                for key, item in (("done", done), ("actions", action), ("probs", probs.numpy()), ("values", value)):
                    steps[key].append(item)
                obs, rewards, dones, episodes = env.step(np.array([action], np.int64))
                reward, done, last_action = float(rewards[0]), bool(dones[0]), action
                steps["rewards"].append(reward)
                steps["obs_crc"].append(observation_crc(obs[0]))
                life_return, life_open = life_return + reward, True
                if on_step is not None:
                    on_step(len(steps["actions"]))
                for episode in episodes:
                    if episode.kind == "life":
                        life_returns.append(episode.episode_return)
                        life_return, life_open = 0.0, False
                if any(episode.kind == "game" for episode in episodes):
                    ended = "game_over"
                    break
        if ended == "max_steps" and life_open:
            life_returns.append(life_return)  # the life that max_steps cut short
    finally:
        env.close()
    arrays = {key: np.asarray(values, STEP_ARRAYS[key]) for key, values in steps.items()}
    arrays["probs"] = arrays["probs"].reshape(len(arrays["actions"]), net.num_actions)
    return Trajectory(
        meta={
            "format": TRAJECTORY_FORMAT,
            "game": game,
            "env_options": env_options,
            "seed": seed,
            "policy": "greedy" if greedy else "sampled",
            "num_actions": net.num_actions,
            "steps": len(arrays["actions"]),
            "return": float(arrays["rewards"].sum(dtype=np.float64)),
            "life_returns": life_returns,
            "ended": ended,
            "video": Path(video_path).name if video_path is not None else None,
            **(meta or {}),
        },
        **arrays,
    )


class VideoWriter:
    """Writes RGB frames [210, 160, 3] uint8 to an H.264 mp4 (yuv420p, index at the front), which browsers and
    every ordinary player play; the encoder is the ffmpeg with libx264 that imageio-ffmpeg bundles (OpenCV's
    wheels have no H.264 encoder)."""

    def __init__(self, path: Path, fps: float):
        self._frames = imageio_ffmpeg.write_frames(
            str(path), (160, 210), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=8,
            macro_block_size=1,  # 160x210 is even, which is all yuv420p needs: no rescaling to a multiple of 16
            output_params=["-movflags", "+faststart"], ffmpeg_log_level="error",
        )
        self._frames.send(None)  # starts ffmpeg

    def write(self, frame: np.ndarray) -> None:
        self._frames.send(np.ascontiguousarray(frame))

    def close(self) -> None:
        self._frames.close()  # waits for ffmpeg to finish the file


@contextlib.contextmanager
def video_writer(path: str | Path | None, fps: float) -> Iterator[VideoWriter | None]:
    """An H.264 mp4 of 160x210 colour frames, written atomically; None when `path` is None."""
    if path is None:
        yield None
        return
    with atomic_path(path) as tmp:
        writer = VideoWriter(tmp, fps)
        try:
            yield writer
        finally:
            writer.close()


def save_trajectory(trajectory: Trajectory, directory: str | Path, stem: str) -> None:
    """Write `stem.npz` then `stem.json` in `directory` (each atomically; the JSON last, so that a listed
    episode always has its arrays)."""
    directory = Path(directory)
    with atomic_path(directory / f"{stem}.npz") as tmp:
        np.savez_compressed(tmp, **trajectory.arrays())
    write_json(trajectory.meta, directory / f"{stem}.json")


def load_trajectory(json_path: str | Path) -> Trajectory:
    """Read the episode whose JSON side is `json_path` (arrays from the `.npz` beside it, pickles refused)."""
    json_path = Path(json_path)
    npz_path = json_path.with_suffix(".npz")
    try:
        meta = json.loads(json_path.read_text())
        with np.load(npz_path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in STEP_ARRAYS}
    except FileNotFoundError as e:
        raise TrajectoryError(f"recorded episode incomplete: {e.filename} is missing") from None
    except (ValueError, KeyError, OSError) as e:
        raise TrajectoryError(f"recorded episode {json_path} (or its .npz) is corrupt: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != TRAJECTORY_FORMAT:
        raise TrajectoryError(
            f"{json_path} is not a trajectory of format {TRAJECTORY_FORMAT}, the one this rfwp reads"
        )
    missing = [key for key in ("game", "env_options", "seed", "num_actions", "steps") if key not in meta]
    if missing:
        raise TrajectoryError(f"{json_path} is corrupt: it lacks {', '.join(missing)}")
    steps = len(arrays["actions"])
    shapes_ok = all(len(arrays[key]) == steps for key in ("rewards", "done", "probs", "values"))
    if not shapes_ok or len(arrays["obs_crc"]) != steps + 1 or meta.get("steps") != steps:
        raise TrajectoryError(f"{npz_path} is corrupt: its arrays do not have the lengths its JSON side implies")
    return Trajectory(meta=meta, **arrays)


def load_trajectories(directory: str | Path) -> dict[str, Trajectory]:
    """Every recorded episode in `directory` (`episode_*.json`) by file stem, in order; TrajectoryError if there
    are none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TrajectoryError(f"{directory} is not a directory of recorded episodes (made with --record)")
    paths = sorted(directory.glob("episode_*.json"))
    if not paths:
        raise TrajectoryError(f"{directory} holds no recorded episodes (episode_*.json): record some with --record")
    return {path.stem: load_trajectory(path) for path in paths}


def discounted_returns(rewards: np.ndarray, done: np.ndarray, discount: float, reward_clip: float) -> np.ndarray:
    """The value targets of training: clipped rewards discounted to the end of each training episode.

    rewards [T], done [T] (a new training episode starts at step t) -> returns [T] float64. Nothing is
    bootstrapped after the last step, so returns near the end of an episode cut by --max-steps are too low.
    """
    clipped = np.clip(rewards.astype(np.float64), -reward_clip, reward_clip)
    returns = np.zeros(len(rewards))
    following = 0.0
    for t in reversed(range(len(rewards))):
        if t + 1 < len(rewards) and done[t + 1]:
            following = 0.0
        following = clipped[t] + discount * following
        returns[t] = following
    return returns


@dataclass
class ReplayResult:
    """What replaying one recorded episode with a policy showed.

    `mismatch` describes the first step whose outcome differs from the recording (None: reproduced exactly);
    `compared` is the number of steps on which the policy saw the recorded situation (all steps when
    reproduced); `greedy_actions` [compared] and `values` [compared] are the policy's on those steps.
    """

    trajectory: Trajectory
    mismatch: str | None
    greedy_actions: np.ndarray
    values: np.ndarray

    @property
    def reproduced(self) -> bool:
        return self.mismatch is None

    @property
    def compared(self) -> int:
        return len(self.greedy_actions)


def replay(net: PolicyNet, trajectory: Trajectory, device: torch.device | str = "cpu") -> ReplayResult:
    """Re-run `trajectory` in a fresh emulator from its seed and actions, feeding what it shows to `net`.

    Stops at the first step whose reward, `done` flag or resulting observation differs from the recording (a
    changed action, seed, ROM or emulator).
    """
    meta = trajectory.meta
    env = make_vector_env(meta["game"], 1, seed=meta["seed"], **saved_env_options(meta["env_options"]))
    if tuple(env.observation_shape) != tuple(net.observation_shape) or meta["num_actions"] != net.num_actions:
        env.close()
        raise TrajectoryError(
            f"the recorded {meta['game']} episodes show observations {tuple(env.observation_shape)} with "
            f"{meta['num_actions']} actions, but the policy takes {tuple(net.observation_shape)} with "
            f"{net.num_actions}: compare checkpoints trained with the same environment options"
        )
    stepper = PolicyStepper(net, 1, device)
    greedy_actions: list[int] = []
    values: list[float] = []
    mismatch = None
    try:
        obs = env.reset()
        if observation_crc(obs[0]) != trajectory.obs_crc[0]:
            mismatch = "the first observation differs (another seed, ROM or emulator version)"
        reward, done, last_action = 0.0, True, 0
        for t in range(len(trajectory.actions) if mismatch is None else 0):
            logits, value = _step_one(stepper, obs, reward, done, last_action)
            greedy_actions.append(int(logits.argmax()))
            values.append(value)
            last_action = int(trajectory.actions[t])
            obs, rewards, dones, _ = env.step(np.array([last_action], np.int64))
            reward, done = float(rewards[0]), bool(dones[0])
            if np.float32(reward) != trajectory.rewards[t]:
                mismatch = f"step {t}: reward {reward:g}, recorded {float(trajectory.rewards[t]):g}"
            elif observation_crc(obs[0]) != trajectory.obs_crc[t + 1]:
                mismatch = f"step {t}: the observation after the action differs from the recorded one"
            elif t + 1 < len(trajectory.actions) and done != trajectory.done[t + 1]:
                mismatch = f"step {t}: done is {done}, recorded {bool(trajectory.done[t + 1])}"
            if mismatch is not None:
                break
    finally:
        env.close()
    return ReplayResult(trajectory, mismatch, np.asarray(greedy_actions, np.int64), np.asarray(values))
