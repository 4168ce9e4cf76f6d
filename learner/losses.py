"""IMPALA losses as in TorchBeast and the RFWP RL code: summed over [T, B], not averaged.

The caller scales them: total = pg_loss + baseline_cost * baseline_loss + entropy_cost * entropy_loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from learner.vtrace import action_log_probs


def policy_gradient_loss(
    logits: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor
) -> torch.Tensor:
    """Sum over T x B of cross-entropy(actions) x advantages.

    Args:
        logits: [T, B, A] learner policy logits.
        actions: [T, B] integer actions taken.
        advantages: [T, B] V-trace policy-gradient advantages; detached here, so only `logits` get gradient.

    Returns:
        Scalar loss.
    """
    if advantages.shape != actions.shape:
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}, expected {tuple(actions.shape)} "
            "(to match actions [T, B])"
        )
    cross_entropy = -action_log_probs(logits, actions)
    return torch.sum(cross_entropy * advantages.detach())


def baseline_loss(advantages: torch.Tensor) -> torch.Tensor:
    """0.5 * sum of squared value errors (the caller multiplies by baseline_cost).

    Args:
        advantages: [T, B] vs - V(x); gradient flows through it into the baseline.

    Returns:
        Scalar loss.
    """
    if advantages.dim() != 2:
        raise ValueError(f"advantages must be [T, B], got shape {tuple(advantages.shape)}")
    return 0.5 * torch.sum(advantages**2)


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Negative entropy, sum over T x B of sum_a p log p (the caller multiplies by entropy_cost).

    Args:
        logits: [T, B, A] learner policy logits.

    Returns:
        Scalar loss; minimising it raises the policy's entropy.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [T, B, A], got shape {tuple(logits.shape)}")
    log_policy = F.log_softmax(logits, dim=-1)
    return torch.sum(log_policy.exp() * log_policy)
