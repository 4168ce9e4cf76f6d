"""The IMPALA update: batch unrolls, rerun the model from the carried core states, V-trace, losses, RMSProp.

RMSProp with the learning rate decayed linearly to 0 over the run's frames, a global gradient-norm clip, rewards
clipped to [-reward_clip, reward_clip], the discount set to 0 across a `done`, losses summed over [T, B]. The
values (the paper's) come from configs/atari.yaml, the one source of defaults.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from actors.unroll import STEP_ARRAYS, Unroll
from learner import losses, vtrace
from models import PolicyNet


@dataclass(frozen=True)
class Hyperparameters:
    total_frames: int
    learning_rate: float
    rmsprop_alpha: float
    rmsprop_eps: float
    rmsprop_momentum: float
    discount: float
    baseline_cost: float
    entropy_cost: float
    grad_norm_clip: float  # global gradient-norm bound; 0 = no clipping
    reward_clip: float

    @classmethod
    def from_config(cls, config: dict) -> Hyperparameters:
        """The fields of `config` (a flat dict, e.g. the resolved run config) that name hyperparameters."""
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls)})


@dataclass
class LearnerState:
    """Everything the learner changes: the model, its optimiser and the counters. `updates` is also the version
    of the policy the learner publishes."""

    model: PolicyNet
    optimizer: torch.optim.Optimizer
    frames: int = 0
    updates: int = 0

    @classmethod
    def create(cls, model: PolicyNet, hp: Hyperparameters) -> LearnerState:
        optimizer = torch.optim.RMSprop(
            model.parameters(),
            lr=hp.learning_rate,
            alpha=hp.rmsprop_alpha,
            eps=hp.rmsprop_eps,
            momentum=hp.rmsprop_momentum,
        )
        return cls(model, optimizer)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "frames": self.frames,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.frames, self.updates = int(state["frames"]), int(state["updates"])

    def weights(self) -> dict[str, Tensor]:
        """A CPU copy of the model's state dict, for the actors."""
        return {key: value.detach().to("cpu", copy=True) for key, value in self.model.state_dict().items()}


def batch_unrolls(unrolls: list[Unroll]) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
    """Concatenate unrolls along the environment axis, decoding stacked frames, into (pinnable) CPU tensors.

    Returns:
        (batch, core_state): batch tensors [T+1, B, ...] (`obs` and the arrays of `actors.unroll.STEP_ARRAYS`)
        with B = sum of the unrolls' N, and the core state, tensors [B, ...].
    """
    batch = {"obs": torch.from_numpy(np.concatenate([u.observations() for u in unrolls], axis=1))}
    for key in STEP_ARRAYS:
        batch[key] = torch.from_numpy(np.concatenate([getattr(u, key) for u in unrolls], axis=1))
    core_state = tuple(torch.from_numpy(np.concatenate(parts, axis=0)) for parts in zip(*(u.core_state for u in unrolls)))
    return batch, core_state


def compute_loss(
    model: PolicyNet, batch: dict[str, Tensor], core_state: tuple[Tensor, ...], hp: Hyperparameters
) -> tuple[Tensor, dict[str, Tensor]]:
    """Rerun the model over the whole [T+1, B] batch and compute the IMPALA loss.

    The model starts from the carried `core_state` and resets where `done`, exactly as the actor did, and the
    gradient flows through every step of the unroll. Step t's output goes with the action taken at step t and
    the reward and `done` of step t+1; step T only provides the bootstrap value.

    Returns:
        (total loss, stats): stats are detached tensors: the three losses, `log_rhos` [T, B] (log of the
        importance weights target / behaviour) and `values` [T, B].
    """
    out, _ = model(batch["obs"], batch["reward"], batch["last_action"], batch["done"], core_state)
    target_logits = out["policy_logits"][:-1]
    values = out["baseline"][:-1]
    rewards = batch["reward"][1:].clamp(-hp.reward_clip, hp.reward_clip)
    discounts = (~batch["done"][1:]).float() * hp.discount
    returns = vtrace.from_logits(
        behavior_policy_logits=batch["policy_logits"][:-1],
        target_policy_logits=target_logits,
        actions=batch["action"][:-1],
        discounts=discounts,
        rewards=rewards,
        values=values,
        bootstrap_value=out["baseline"][-1],
    )
    pg_loss = losses.policy_gradient_loss(target_logits, batch["action"][:-1], returns.pg_advantages)
    baseline_loss = hp.baseline_cost * losses.baseline_loss(returns.vs - values)
    entropy_loss = hp.entropy_cost * losses.entropy_loss(target_logits)
    total = pg_loss + baseline_loss + entropy_loss
    stats = {
        "pg_loss": pg_loss.detach(),
        "baseline_loss": baseline_loss.detach(),
        "entropy_loss": entropy_loss.detach(),
        "log_rhos": returns.log_rhos.detach(),
        "values": values.detach(),
    }
    return total, stats


def learning_rate(hp: Hyperparameters, frames: int) -> float:
    """Linear decay from `hp.learning_rate` at frame 0 to 0 at `hp.total_frames`."""
    return hp.learning_rate * (1.0 - min(frames, hp.total_frames) / hp.total_frames)


def update(
    state: LearnerState,
    batch: dict[str, Tensor],
    core_state: tuple[Tensor, ...],
    hp: Hyperparameters,
    frames: int,
) -> dict[str, float]:
    """One RMSProp step on a batch covering `frames` environment frames; advances the counters.

    Returns:
        Scalar statistics of the step: losses, learning rate, gradient norm (before clipping), mean importance
        weight and mean value.
    """
    lr = learning_rate(hp, state.frames)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.model.train()
    loss, stats = compute_loss(state.model, batch, core_state, hp)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), hp.grad_norm_clip or float("inf"))
    state.optimizer.step()
    state.frames += frames
    state.updates += 1
    return {
        "total_loss": loss.item(),
        "pg_loss": stats["pg_loss"].item(),
        "baseline_loss": stats["baseline_loss"].item(),
        "entropy_loss": stats["entropy_loss"].item(),
        "learning_rate": lr,
        "grad_norm": grad_norm.item(),
        "mean_rho": stats["log_rhos"].exp().mean().item(),
        "mean_value": stats["values"].mean().item(),
    }
