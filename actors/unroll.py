"""The unit of experience that actors send to the learner: `Unroll`, a typed record of T + 1 steps of N
environments, and its wire format for stacked Atari frames.

Layout (TorchBeast's): arrays are time-major `[T + 1, N, ...]`. Step `t` holds what the agent saw (`obs`,
`reward` received on arriving there, `done` = a new episode starts there, `last_action` that led there) and what
it did (`action`, `policy_logits`, `baseline`). Step 0 repeats the last step of the previous unroll, so the
learner can bootstrap from step T and the next unroll starts where this one ended. `core_state` is the policy's
core state before step 0 was fed, which lets the learner rerun the model from exactly the state the actor had.

Wire format: a stacked observation `[S, H, W]` shares S - 1 frames with the one before it, so an unroll carries
each new frame once (`StackedFrames`) instead of T + 1 full stacks: 4x fewer bytes with the paper's stack of 4.
Where a stack is not the previous one shifted by a new frame (a new episode, a refilled stack), the whole stack
travels, so decoding reproduces the actor's observations bit for bit whatever the environment did.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from actors.interface import Episode

# Per-step arrays of an unroll other than `obs`: name -> (trailing shape, dtype); "A" is the number of actions.
STEP_ARRAYS = {
    "reward": ((), np.float32),
    "done": ((), np.bool_),
    "last_action": ((), np.int64),
    "action": ((), np.int64),
    "policy_logits": (("A",), np.float32),
    "baseline": ((), np.float32),
}


@dataclass
class StackedFrames:
    """Stacked observations `[T + 1, N, S, H, W]` sent as the first stack and one new frame per step.

    Attributes:
        first: [N, S, H, W], the observations of step 0.
        frames: [T, N, H, W], the newest frame of steps 1..T.
        restack_index: [K, 2] int64 (t, n) of the steps whose stack is not the previous one shifted by one frame.
        restack_obs: [K, S, H, W], the whole observations of those steps.
    """

    first: np.ndarray
    frames: np.ndarray
    restack_index: np.ndarray
    restack_obs: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.first, self.frames, self.restack_index, self.restack_obs))

    @classmethod
    def encode(cls, obs: np.ndarray) -> StackedFrames:
        """`obs` [T + 1, N, S, H, W] -> its wire format."""
        T, N = len(obs) - 1, obs.shape[1]
        shifted = (obs[1:, :, :-1] == obs[:-1, :, 1:]).reshape(T, N, -1).all(-1)
        t, n = np.nonzero(~shifted)
        return cls(obs[0].copy(), obs[1:, :, -1].copy(), np.stack([t + 1, n], 1).astype(np.int64), obs[t + 1, n])

    def decode(self) -> np.ndarray:
        """The observations [T + 1, N, S, H, W], bit for bit those that were encoded."""
        T, (N, S, H, W) = len(self.frames), self.first.shape
        # Laid out as one frame sequence per env ([N, S - 1 + T + 1, H, W]), every stack is a window of S frames.
        sequence = np.empty((N, S + T, H, W), self.first.dtype)
        sequence[:, :S] = self.first
        sequence[:, S:] = self.frames.transpose(1, 0, 2, 3)
        windows = np.lib.stride_tricks.sliding_window_view(sequence, S, axis=1)  # [N, T + 1, H, W, S]
        obs = np.ascontiguousarray(windows.transpose(1, 0, 4, 2, 3))
        # After a restacked step the following steps share its frames, not the windows': rebuild those envs.
        restacks = {(int(t), int(n)): i for i, (t, n) in enumerate(self.restack_index)}
        for n in {n for _, n in restacks}:
            for t in range(1, T + 1):
                if (t, n) in restacks:
                    obs[t, n] = self.restack_obs[restacks[t, n]]
                else:
                    obs[t, n, :-1] = obs[t - 1, n, 1:]
        return obs


@dataclass
class Unroll:
    """T + 1 steps of N environments from one actor (module docstring for the layout).

    Attributes:
        obs: [T + 1, N, *obs_shape] array, or `StackedFrames` for stacked frames on the wire.
        reward: [T + 1, N] float32, unclipped. done: [T + 1, N] bool. last_action, action: [T + 1, N] int64.
        policy_logits: [T + 1, N, A] float32. baseline: [T + 1, N] float32.
        core_state: arrays [N, ...], the core state before step 0 was fed.
        version: the policy version that chose the actions of steps 1..T (step 0's came with the previous unroll
            and may be one version older: V-trace uses the recorded logits either way).
        actor: the actor's slot; incarnation: tells the learner when a slot's process was replaced; node: the Ray
            node it ran on.
        episodes: episodes that ended during the unroll. frames: emulator frames of its T new steps.
    """

    obs: np.ndarray | StackedFrames
    reward: np.ndarray
    done: np.ndarray
    last_action: np.ndarray
    action: np.ndarray
    policy_logits: np.ndarray
    baseline: np.ndarray
    core_state: list[np.ndarray]
    version: int
    actor: int
    incarnation: str
    node: str
    episodes: list[Episode]
    frames: int

    @property
    def num_envs(self) -> int:
        return self.reward.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of array data the unroll carries (what crosses the wire, near enough)."""
        arrays = [getattr(self, name) for name in STEP_ARRAYS] + list(self.core_state)
        return self.obs.nbytes + sum(a.nbytes for a in arrays)

    def observations(self) -> np.ndarray:
        """`obs` as [T + 1, N, *obs_shape], decoded from the wire format if needed."""
        return self.obs.decode() if isinstance(self.obs, StackedFrames) else self.obs

    def check(self, unroll_length: int, num_actions: int) -> None:
        """ValueError unless every array has the shape and dtype of the layout."""
        T1, N = unroll_length + 1, self.num_envs
        for name, (trailing, dtype) in STEP_ARRAYS.items():
            array = getattr(self, name)
            shape = (T1, N, *(num_actions if d == "A" else d for d in trailing))
            if array.shape != shape or array.dtype != dtype:
                raise ValueError(f"unroll {name} is {array.dtype}{list(array.shape)}, expected "
                                 f"{np.dtype(dtype)}{list(shape)}")
