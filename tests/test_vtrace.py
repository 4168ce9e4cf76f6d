"""V-trace against a direct implementation of its definition, plus the IMPALA losses."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from learner import losses, vtrace


def reference_vtrace(
    log_rhos: np.ndarray,
    discounts: np.ndarray,
    rewards: np.ndarray,
    values: np.ndarray,
    bootstrap_value: np.ndarray,
    clip_rho: float | None,
    clip_pg_rho: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """IMPALA eq. 1 as an explicit double sum (no recursion), float64; per-step discounts gamma_i.

    v_s = V_s + sum_{t=s}^{T-1} (prod_{i=s}^{t-1} gamma_i c_i) delta_t,
    delta_t = rho_t (r_t + gamma_t V_{t+1} - V_t), with V_T = bootstrap_value.
    """
    T, B = log_rhos.shape
    rhos = np.exp(log_rhos)
    cs = np.minimum(rhos, 1.0)
    clipped = rhos if clip_rho is None else np.minimum(rhos, clip_rho)
    values_ext = np.concatenate([values, bootstrap_value[None]], axis=0)  # [T+1, B]
    vs = np.zeros((T, B))
    for b in range(B):
        for s in range(T):
            total = values[s, b]
            for t in range(s, T):
                weight = 1.0
                for i in range(s, t):
                    weight *= discounts[i, b] * cs[i, b]
                delta = clipped[t, b] * (
                    rewards[t, b] + discounts[t, b] * values_ext[t + 1, b] - values[t, b]
                )
                total += weight * delta
            vs[s, b] = total
    vs_ext = np.concatenate([vs, bootstrap_value[None]], axis=0)
    pg_rhos = rhos if clip_pg_rho is None else np.minimum(rhos, clip_pg_rho)
    pg_adv = pg_rhos * (rewards + discounts * vs_ext[1:] - values)
    return vs, pg_adv


def random_inputs(T: int, B: int, seed: int, log_rho_scale: float = 3.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Roughly one step in five ends an episode, giving gamma = 0 there.
    discounts = 0.99 * (rng.random((T, B)) > 0.2)
    return dict(
        log_rhos=log_rho_scale * rng.standard_normal((T, B)),
        discounts=discounts,
        rewards=rng.standard_normal((T, B)),
        values=rng.standard_normal((T, B)),
        bootstrap_value=rng.standard_normal(B),
    )


THRESHOLDS = [(1.0, 1.0), (None, None), (0.5, 2.0), (3.0, 0.7), (None, 1.0), (1.0, None)]


@pytest.mark.parametrize("T,B", [(1, 1), (2, 3), (7, 4), (20, 5)])
@pytest.mark.parametrize("clip_rho,clip_pg_rho", THRESHOLDS)
def test_from_importance_weights_matches_definition(T, B, clip_rho, clip_pg_rho):
    inputs = random_inputs(T, B, seed=T * 100 + B)
    rhos = np.exp(inputs["log_rhos"])
    # The draw must exercise both sides of every clip.
    if T * B >= 12:
        assert (rhos > 3.0).any() and (rhos < 0.5).any()
        assert (inputs["discounts"] == 0).any()
    expected_vs, expected_pg = reference_vtrace(**inputs, clip_rho=clip_rho, clip_pg_rho=clip_pg_rho)
    out = vtrace.from_importance_weights(
        **{k: torch.from_numpy(v) for k, v in inputs.items()},
        clip_rho_threshold=clip_rho,
        clip_pg_rho_threshold=clip_pg_rho,
    )
    assert isinstance(out, vtrace.VTraceReturns)
    assert out.vs.shape == (T, B) and out.pg_advantages.shape == (T, B)
    np.testing.assert_allclose(out.vs.numpy(), expected_vs, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out.pg_advantages.numpy(), expected_pg, rtol=1e-10, atol=1e-10)


def test_float32_matches_definition():
    inputs = random_inputs(16, 8, seed=7)
    expected_vs, expected_pg = reference_vtrace(**inputs, clip_rho=1.0, clip_pg_rho=1.0)
    out = vtrace.from_importance_weights(**{k: torch.from_numpy(v).float() for k, v in inputs.items()})
    assert out.vs.dtype == torch.float32
    np.testing.assert_allclose(out.vs.numpy(), expected_vs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.pg_advantages.numpy(), expected_pg, rtol=1e-5, atol=1e-5)


def test_clipping_changes_the_result():
    # Guards against a reference and implementation that both ignore the thresholds.
    inputs = {k: torch.from_numpy(v) for k, v in random_inputs(10, 4, seed=3).items()}
    clipped = vtrace.from_importance_weights(**inputs)
    unclipped = vtrace.from_importance_weights(**inputs, clip_rho_threshold=None, clip_pg_rho_threshold=None)
    assert not torch.allclose(clipped.vs, unclipped.vs)
    assert not torch.allclose(clipped.pg_advantages, unclipped.pg_advantages)


def test_on_policy_zero_discount_is_one_step_target():
    # With rho = 1 and no discounting, vs_t = r_t and the advantage is r_t - V_t.
    T, B = 5, 3
    rewards = torch.randn(T, B, dtype=torch.float64)
    values = torch.randn(T, B, dtype=torch.float64)
    out = vtrace.from_importance_weights(
        torch.zeros(T, B, dtype=torch.float64), torch.zeros(T, B, dtype=torch.float64),
        rewards, values, torch.randn(B, dtype=torch.float64),
    )
    torch.testing.assert_close(out.vs, rewards)
    torch.testing.assert_close(out.pg_advantages, rewards - values)


def test_outputs_carry_no_gradient():
    T, B = 4, 2
    values = torch.randn(T, B, requires_grad=True)
    rewards = torch.randn(T, B, requires_grad=True)
    bootstrap = torch.randn(B, requires_grad=True)
    out = vtrace.from_importance_weights(torch.randn(T, B), torch.full((T, B), 0.9), rewards, values, bootstrap)
    assert not out.vs.requires_grad and not out.pg_advantages.requires_grad


def test_from_logits_equals_from_importance_weights():
    T, B, A = 6, 4, 5
    g = torch.Generator().manual_seed(0)
    behavior = 2.0 * torch.randn(T, B, A, generator=g, dtype=torch.float64)
    target = (2.0 * torch.randn(T, B, A, generator=g, dtype=torch.float64)).requires_grad_()
    actions = torch.randint(0, A, (T, B), generator=g)
    discounts = 0.99 * (torch.rand(T, B, generator=g) > 0.2).double()
    rewards = torch.randn(T, B, generator=g, dtype=torch.float64)
    values = torch.randn(T, B, generator=g, dtype=torch.float64)
    bootstrap = torch.randn(B, generator=g, dtype=torch.float64)

    out = vtrace.from_logits(behavior, target, actions, discounts, rewards, values, bootstrap,
                             clip_rho_threshold=1.5, clip_pg_rho_threshold=0.8)
    assert isinstance(out, vtrace.VTraceFromLogitsReturns)

    # Log-probs computed independently of vtrace.action_log_probs.
    target_lp = torch.log(torch.softmax(target.detach(), -1)).gather(-1, actions[..., None])[..., 0]
    behavior_lp = torch.log(torch.softmax(behavior, -1)).gather(-1, actions[..., None])[..., 0]
    torch.testing.assert_close(out.target_action_log_probs.detach(), target_lp)
    torch.testing.assert_close(out.behavior_action_log_probs, behavior_lp)
    torch.testing.assert_close(out.log_rhos.detach(), target_lp - behavior_lp)

    expected = vtrace.from_importance_weights(target_lp - behavior_lp, discounts, rewards, values, bootstrap,
                                              clip_rho_threshold=1.5, clip_pg_rho_threshold=0.8)
    torch.testing.assert_close(out.vs, expected.vs)
    torch.testing.assert_close(out.pg_advantages, expected.pg_advantages)
    # The target log-probs stay differentiable for use in the policy loss.
    assert out.target_action_log_probs.requires_grad


def test_from_logits_on_policy_rhos_are_exactly_one():
    T, B, A = 8, 3, 6
    logits = 5.0 * torch.randn(T, B, A)
    actions = torch.randint(0, A, (T, B))
    out = vtrace.from_logits(logits, logits.clone(), actions, torch.full((T, B), 0.99), torch.randn(T, B),
                             torch.randn(T, B), torch.randn(B))
    assert torch.equal(torch.exp(out.log_rhos), torch.ones(T, B))


def test_action_log_probs_values():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p = (1/4, 3/4)
    torch.testing.assert_close(vtrace.action_log_probs(logits, torch.tensor([[1]])),
                               torch.tensor([[math.log(0.75)]]))
    torch.testing.assert_close(vtrace.action_log_probs(logits, torch.tensor([[0]])),
                               torch.tensor([[math.log(0.25)]]))


# ---- shape and argument errors ----

def _good(T: int = 4, B: int = 3) -> dict[str, torch.Tensor]:
    return dict(log_rhos=torch.zeros(T, B), discounts=torch.ones(T, B), rewards=torch.zeros(T, B),
                values=torch.zeros(T, B), bootstrap_value=torch.zeros(B))


@pytest.mark.parametrize("name,bad", [
    ("discounts", torch.ones(4, 2)),
    ("rewards", torch.zeros(3, 3)),
    ("values", torch.zeros(4, 3, 1)),
    ("bootstrap_value", torch.zeros(4)),
    ("bootstrap_value", torch.zeros(1, 3)),
    ("log_rhos", torch.zeros(4, 3, 2)),
])
def test_from_importance_weights_shape_errors(name, bad):
    args = _good()
    args[name] = bad
    with pytest.raises(ValueError, match=name):
        vtrace.from_importance_weights(**args)


@pytest.mark.parametrize("threshold", [0.0, -1.0])
def test_bad_threshold(threshold):
    with pytest.raises(ValueError, match="clip_rho_threshold"):
        vtrace.from_importance_weights(**_good(), clip_rho_threshold=threshold)
    with pytest.raises(ValueError, match="clip_pg_rho_threshold"):
        vtrace.from_importance_weights(**_good(), clip_pg_rho_threshold=threshold)


def test_from_logits_shape_errors():
    T, B, A = 4, 3, 5
    rest = dict(discounts=torch.ones(T, B), rewards=torch.zeros(T, B), values=torch.zeros(T, B),
                bootstrap_value=torch.zeros(B))
    logits = torch.zeros(T, B, A)
    actions = torch.zeros(T, B, dtype=torch.long)
    with pytest.raises(ValueError, match=r"behavior_policy_logits.*\(4, 3, 6\)"):
        vtrace.from_logits(torch.zeros(T, B, A + 1), logits, actions, **rest)
    with pytest.raises(ValueError, match="target_policy_logits"):
        vtrace.from_logits(logits, torch.zeros(T, B), actions, **rest)
    with pytest.raises(ValueError, match=r"actions.*\(4, 2\)"):
        vtrace.from_logits(logits, logits, torch.zeros(T, B - 1, dtype=torch.long), **rest)
    with pytest.raises(ValueError, match="rewards"):
        vtrace.from_logits(logits, logits, actions, **{**rest, "rewards": torch.zeros(T + 1, B)})
    with pytest.raises(ValueError, match="dtype"):
        vtrace.action_log_probs(logits, actions.float())


# ---- losses ----

def test_policy_gradient_loss_value_and_gradient():
    T, B, A = 2, 2, 4
    logits = torch.zeros(T, B, A, requires_grad=True)  # uniform: cross-entropy = log 4 everywhere
    actions = torch.tensor([[0, 1], [2, 3]])
    advantages = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    loss = losses.policy_gradient_loss(logits, actions, advantages)
    torch.testing.assert_close(loss, torch.tensor(math.log(4.0) * 2.5))
    loss.backward()
    # d CE / d logits = softmax - onehot, scaled by the advantage.
    expected = (torch.full((T, B, A), 0.25) - torch.nn.functional.one_hot(actions, A)) * advantages.detach()[..., None]
    torch.testing.assert_close(logits.grad, expected)
    assert advantages.grad is None  # advantages are treated as constants


def test_baseline_loss_value_and_gradient():
    advantages = torch.tensor([[1.0, 2.0], [3.0, -4.0]], requires_grad=True)
    loss = losses.baseline_loss(advantages)
    torch.testing.assert_close(loss, torch.tensor(15.0))
    loss.backward()
    torch.testing.assert_close(advantages.grad, advantages.detach())


def test_entropy_loss_value_and_gradient():
    T, B, A = 3, 2, 5
    uniform = torch.zeros(T, B, A, requires_grad=True)
    loss = losses.entropy_loss(uniform)
    torch.testing.assert_close(loss, torch.tensor(-T * B * math.log(A)))
    loss.backward()
    torch.testing.assert_close(uniform.grad, torch.zeros(T, B, A))  # entropy is maximal at uniform

    # Two actions with p = (1/4, 3/4): sum p log p = 1/4 log 1/4 + 3/4 log 3/4.
    logits = torch.tensor([[[0.0, math.log(3.0)]]], requires_grad=True)
    loss = losses.entropy_loss(logits)
    torch.testing.assert_close(loss, torch.tensor(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    loss.backward()
    # Descending the loss raises entropy, moving the larger logit down toward the smaller.
    assert logits.grad[0, 0, 1] > 0 > logits.grad[0, 0, 0]


def test_loss_shape_errors():
    with pytest.raises(ValueError, match="advantages"):
        losses.policy_gradient_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="actions"):
        losses.policy_gradient_loss(torch.zeros(2, 3, 4), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="advantages"):
        losses.baseline_loss(torch.zeros(6))
    with pytest.raises(ValueError, match="logits"):
        losses.entropy_loss(torch.zeros(2, 3))
