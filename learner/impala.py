"""The IMPALA update: batch unrolls, rerun the model from the carried core states, V-trace, losses, RMSProp.

Defaults are the paper's (experiments.md §5.3): RMSProp (lr 6e-4, alpha 0.99, eps 0.01, no momentum) with the
learning rate decayed linearly to 0 over the run's frames, global gradient-norm clip 40, rewards clipped to
[-1, 1], discount 0.99 (0 across a `done`), baseline cost 0.5, entropy cost 0.01, losses summed over [T, B].
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from learner import losses, vtrace
from models import PolicyNet

UNROLL_ARRAYS = ("obs", "reward", "done", "last_action", "action", "policy_logits", "baseline")


@dataclass(frozen=True)
class Hyperparameters:
    total_frames: int
    learning_rate: float = 6e-4
    rmsprop_alpha: float = 0.99
    rmsprop_eps: float = 0.01
    rmsprop_momentum: float = 0.0
    discount: float = 0.99
    baseline_cost: float = 0.5
    entropy_cost: float = 0.01
    grad_norm_clip: float = 40.0
    reward_clip: float = 1.0

    @classmethod
    def from_config(cls, config: dict) -> Hyperparameters:
        """The fields of `config` (a flat dict, e.g. the resolved run config) that name hyperparameters."""
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})


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


def batch_unrolls(unrolls: list[dict], device: torch.device | str) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
    """Concatenate unrolls along the environment axis and move them to `device`.

    Args:
        unrolls: unrolls from `actors.Actor.unroll`, arrays [T+1, N_i, ...] and `core_state` arrays [N_i, ...].

    Returns:
        (batch, core_state): batch arrays [T+1, B, ...] with B = sum N_i, and the core state, tensors [B, ...].
    """
    batch = {
        key: torch.from_numpy(np.concatenate([u[key] for u in unrolls], axis=1)).to(device, non_blocking=True)
        for key in UNROLL_ARRAYS
    }
    core_state = tuple(
        torch.from_numpy(np.concatenate(parts, axis=0)).to(device, non_blocking=True)
        for parts in zip(*(u["core_state"] for u in unrolls))
    )
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
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), hp.grad_norm_clip)
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
