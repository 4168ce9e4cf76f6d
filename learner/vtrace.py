"""V-trace off-policy actor-critic targets (Espeholt et al. 2018, "IMPALA", section 4).

Time-major throughout: every per-step tensor is `[T, B]`, logits are `[T, B, A]` and the bootstrap
value is `[B]`. The API mirrors the familiar `from_importance_weights` / `from_logits` pair of the
TensorFlow reference and TorchBeast, with c̄ = 1 and λ = 1.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class VTraceReturns(NamedTuple):
    """V-trace targets `vs` [T, B] and policy-gradient advantages `pg_advantages` [T, B]."""

    vs: torch.Tensor
    pg_advantages: torch.Tensor


class VTraceFromLogitsReturns(NamedTuple):
    """`VTraceReturns` plus the log importance weights and both policies' action log-probs, all [T, B]."""

    vs: torch.Tensor
    pg_advantages: torch.Tensor
    log_rhos: torch.Tensor
    behavior_action_log_probs: torch.Tensor
    target_action_log_probs: torch.Tensor


def _require_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], ref: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)} (to match {ref})"
        )


def _check_threshold(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be positive or None, got {value}")


def _check_policy(name: str, logits: torch.Tensor, actions: torch.Tensor) -> None:
    """`logits` (called `name` in errors) must be [T, B, A] and `actions` an integer [T, B]."""
    if logits.dim() != 3:
        raise ValueError(f"{name} must be [T, B, A], got shape {tuple(logits.shape)}")
    _require_shape("actions", actions, tuple(logits.shape[:2]), f"{name} [T, B, :]")
    if actions.dtype.is_floating_point or actions.dtype == torch.bool:
        raise ValueError(f"actions must be an integer tensor, got dtype {actions.dtype}")


def action_log_probs(policy_logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Log-probability of the taken actions under a categorical policy.

    Args:
        policy_logits: [T, B, A] unnormalised log-probabilities.
        actions: [T, B] integer action indices in [0, A).

    Returns:
        [T, B] log pi(a_t | x_t); differentiable with respect to `policy_logits`.
    """
    _check_policy("policy_logits", policy_logits, actions)
    log_probs = F.log_softmax(policy_logits, dim=-1)
    return log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


def from_importance_weights(
    log_rhos: torch.Tensor,
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    clip_rho_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
) -> VTraceReturns:
    """V-trace targets from log importance weights log(pi(a_t|x_t) / mu(a_t|x_t)).

    Args:
        log_rhos: [T, B] log importance weights.
        discounts: [T, B] per-step discount gamma_t, zero where the episode ended at step t.
        rewards: [T, B] rewards r_t.
        values: [T, B] value estimates V(x_t).
        bootstrap_value: [B] value estimate V(x_T) for the state after the last step.
        clip_rho_threshold: rho-bar for the value targets; None disables clipping.
        clip_pg_rho_threshold: rho-bar for the policy-gradient advantages; None disables clipping.

    Returns:
        VTraceReturns with `vs` [T, B] and `pg_advantages` [T, B], both detached (no gradient).
    """
    if log_rhos.dim() != 2:
        raise ValueError(f"log_rhos must be [T, B], got shape {tuple(log_rhos.shape)}")
    shape = tuple(log_rhos.shape)
    _require_shape("discounts", discounts, shape, "log_rhos [T, B]")
    _require_shape("rewards", rewards, shape, "log_rhos [T, B]")
    _require_shape("values", values, shape, "log_rhos [T, B]")
    _require_shape("bootstrap_value", bootstrap_value, shape[1:], "log_rhos [T, B] -> [B]")
    _check_threshold("clip_rho_threshold", clip_rho_threshold)
    _check_threshold("clip_pg_rho_threshold", clip_pg_rho_threshold)

    # Targets are constants for the losses: no gradient may flow back through them.
    with torch.no_grad():
        rhos = torch.exp(log_rhos)
        clipped_rhos = rhos if clip_rho_threshold is None else rhos.clamp(max=clip_rho_threshold)
        cs = rhos.clamp(max=1.0)  # c-bar = 1, lambda = 1

        values_t_plus_1 = torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)
        deltas = clipped_rhos * (rewards + discounts * values_t_plus_1 - values)

        # vs_t - V_t = delta_t + gamma_t c_t (vs_{t+1} - V_{t+1}), with vs_T - V_T = 0.
        vs_minus_v = torch.empty_like(deltas)
        acc = torch.zeros_like(bootstrap_value, dtype=deltas.dtype)
        for t in range(shape[0] - 1, -1, -1):
            acc = deltas[t] + discounts[t] * cs[t] * acc
            vs_minus_v[t] = acc
        vs = vs_minus_v + values

        # Advantages use the V-trace target of the next step (IMPALA appendix E.3).
        vs_t_plus_1 = torch.cat([vs[1:], bootstrap_value.unsqueeze(0)], dim=0)
        pg_rhos = rhos if clip_pg_rho_threshold is None else rhos.clamp(max=clip_pg_rho_threshold)
        pg_advantages = pg_rhos * (rewards + discounts * vs_t_plus_1 - values)

    return VTraceReturns(vs=vs, pg_advantages=pg_advantages)


def from_logits(
    behavior_policy_logits: torch.Tensor,
    target_policy_logits: torch.Tensor,
    actions: torch.Tensor,
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    clip_rho_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
) -> VTraceFromLogitsReturns:
    """V-trace targets from the behaviour (actor) and target (learner) policy logits.

    Args:
        behavior_policy_logits: [T, B, A] logits of the policy that acted (mu).
        target_policy_logits: [T, B, A] logits of the policy being learned (pi).
        actions: [T, B] integer actions taken.
        discounts, rewards, values: [T, B], as in `from_importance_weights`.
        bootstrap_value: [B].
        clip_rho_threshold, clip_pg_rho_threshold: as in `from_importance_weights`.

    Returns:
        VTraceFromLogitsReturns: `vs`, `pg_advantages` (detached), `log_rhos` = target - behaviour
        action log-probs, and both action log-probs; all [T, B]. The log-prob fields keep their autograd
        history, so `target_action_log_probs` is differentiable in `target_policy_logits`.
    """
    _check_policy("target_policy_logits", target_policy_logits, actions)
    _require_shape(
        "behavior_policy_logits",
        behavior_policy_logits,
        tuple(target_policy_logits.shape),
        "target_policy_logits [T, B, A]",
    )
    target_action_log_probs = action_log_probs(target_policy_logits, actions)
    behavior_action_log_probs = action_log_probs(behavior_policy_logits, actions)
    log_rhos = target_action_log_probs - behavior_action_log_probs
    returns = from_importance_weights(
        log_rhos=log_rhos,
        discounts=discounts,
        rewards=rewards,
        values=values,
        bootstrap_value=bootstrap_value,
        clip_rho_threshold=clip_rho_threshold,
        clip_pg_rho_threshold=clip_pg_rho_threshold,
    )
    return VTraceFromLogitsReturns(
        vs=returns.vs,
        pg_advantages=returns.pg_advantages,
        log_rhos=log_rhos,
        behavior_action_log_probs=behavior_action_log_probs,
        target_action_log_probs=target_action_log_probs,
    )
