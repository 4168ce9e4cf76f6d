"""Feeding a policy one step at a time, the one path by which actors and evaluation run a `PolicyNet`: the same
inputs give bit-identical outputs in training, play and replay."""
from __future__ import annotations

import numpy as np
import torch

from models import PolicyNet
from models.cores import State


class PolicyStepper:
    """Feeds N environments' steps to `net`, carrying its core state from call to call.

    Attributes:
        state: the core state after the latest step (the initial state before the first).
        state_before: the core state before the latest step.
    """

    def __init__(self, net: PolicyNet, num_envs: int, device: torch.device | str = "cpu"):
        self.net, self.device = net, torch.device(device)
        self.state: State = net.initial_state(num_envs, self.device)
        self.state_before: State = self.state

    def __call__(
        self, obs: np.ndarray, reward: np.ndarray, done: np.ndarray, last_action: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """obs [N, *obs_shape], reward [N] float32, done [N] bool, last_action [N] int64 -> policy logits
        [N, A] and baseline [N], float32 on the CPU."""
        logits, baseline, state = self.net.act(
            *(torch.from_numpy(np.asarray(x)).to(self.device) for x in (obs, reward, last_action, done)),
            self.state,
        )
        self.state_before, self.state = self.state, state
        return logits.float().cpu(), baseline.float().cpu()
