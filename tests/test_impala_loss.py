"""The IMPALA loss against numbers worked out by hand, and the direction of one update on a real policy."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from learner.impala import LearnerState, compute_loss, update
from models import PolicyNet
from support import paper_hyperparameters

LN3, LN4 = math.log(3.0), math.log(4.0)


class FixedOutputs(nn.Module):
    """A policy whose outputs are its parameters (logits [T+1, B, A], values [T+1, B]), so that the loss can be
    worked out by hand; it checks that it is fed the batch's own inputs."""

    def __init__(self, logits: list, values: list, batch: dict):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float64))
        self.values = nn.Parameter(torch.tensor(values, dtype=torch.float64))
        self.batch = batch

    def forward(self, obs, last_reward, last_action, done, state):
        for name, given in (("obs", obs), ("reward", last_reward), ("last_action", last_action), ("done", done)):
            assert given is self.batch[name], name
        return {"policy_logits": self.logits, "baseline": self.values}, state


def tiny_batch() -> tuple[dict, FixedOutputs]:
    """T = 3, B = 2, two actions. Environment 0's episode ends on arriving at step 2; rewards beyond +-1 get
    clipped. The behaviour policy equals the learner's except at (t=1, b=1), where it gave the action taken a
    lower probability (1/2 against 3/4): the importance weight 1.5 is clipped to 1."""
    batch = {
        "obs": torch.zeros(4, 2, 1),
        "reward": torch.tensor([[0.0, 5.0], [1.0, 0.5], [3.0, 0.0], [-0.5, 2.0]]),
        "done": torch.tensor([[False, True], [False, False], [True, False], [False, False]]),
        "last_action": torch.zeros(4, 2, dtype=torch.int64),
        "action": torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]]),
    }
    # Learner logits: [0, ln 3] -> probabilities (1/4, 3/4); [0, 0] -> (1/2, 1/2); [ln 4, 0] -> (4/5, 1/5).
    logits = [[[0.0, LN3], [LN4, 0.0]],
              [[0.0, 0.0], [0.0, LN3]],
              [[LN4, 0.0], [0.0, LN3]],
              [[0.0, 0.0], [0.0, 0.0]]]
    behaviour = [[row[:] for row in step] for step in logits]
    behaviour[1][1] = [0.0, 0.0]
    batch["policy_logits"] = torch.tensor(behaviour, dtype=torch.float64)
    values = [[0.5, 0.1], [-0.2, 0.4], [0.3, -0.6], [0.8, 1.5]]
    return batch, FixedOutputs(logits, values, batch)


def test_loss_on_a_tiny_batch_equals_the_hand_computation():
    batch, model = tiny_batch()
    hp = paper_hyperparameters(total_frames=1, discount=0.9, baseline_cost=0.5, entropy_cost=0.01, reward_clip=1.0)
    total, stats = compute_loss(model, batch, (), hp)

    # Per environment, step t: reward r_t of step t+1 (clipped), discount 0.9 unless step t+1 starts an episode,
    # value V_t; the bootstrap is V_3. With importance weights clipped to 1, V-trace targets are n-step returns,
    # vs_t = r_t + discount_t * vs_{t+1} with vs_3 = V_3, and the policy-gradient advantage is vs_t - V_t.
    # Environment 0: r = (1, 1 [3 clipped], -0.5), discounts (0.9, 0 [episode end], 0.9), V = (0.5, -0.2, 0.3; 0.8)
    vs0_2 = -0.5 + 0.9 * 0.8  # 0.22
    vs0_1 = 1.0 + 0.0 * vs0_2  # 1.0
    vs0_0 = 1.0 + 0.9 * vs0_1  # 1.9
    # Environment 1: r = (0.5, 0, 1 [2 clipped]), discounts 0.9 throughout, V = (0.1, 0.4, -0.6; 1.5)
    vs1_2 = 1.0 + 0.9 * 1.5  # 2.35
    vs1_1 = 0.0 + 0.9 * vs1_2  # 2.115
    vs1_0 = 0.5 + 0.9 * vs1_1  # 2.4035
    advantages = [vs0_0 - 0.5, vs0_1 + 0.2, vs0_2 - 0.3, vs1_0 - 0.1, vs1_1 - 0.4, vs1_2 + 0.6]
    assert advantages == pytest.approx([1.4, 1.2, -0.08, 2.3035, 1.715, 2.95])
    # log pi(a_t) of the actions taken, env 0 then env 1: a = (1, 0, 1) and (0, 1, 1).
    log_pi = [math.log(3 / 4), math.log(1 / 2), math.log(1 / 5), math.log(4 / 5), math.log(3 / 4), math.log(3 / 4)]
    pg_loss = -sum(lp * a for lp, a in zip(log_pi, advantages))
    baseline_loss = 0.5 * 0.5 * sum(a * a for a in advantages)  # baseline cost x half the squared errors
    neg_entropy = {  # sum_a p log p for each policy used at t = 0..2
        "1/4,3/4": 0.25 * math.log(0.25) + 0.75 * math.log(0.75),
        "1/2,1/2": math.log(0.5),
        "4/5,1/5": 0.8 * math.log(0.8) + 0.2 * math.log(0.2),
    }
    entropy_loss = 0.01 * (neg_entropy["1/4,3/4"] + neg_entropy["4/5,1/5"]  # t = 0
                           + neg_entropy["1/2,1/2"] + neg_entropy["1/4,3/4"]  # t = 1
                           + neg_entropy["4/5,1/5"] + neg_entropy["1/4,3/4"])  # t = 2

    assert stats["pg_loss"].item() == pytest.approx(pg_loss, rel=1e-6)
    assert stats["baseline_loss"].item() == pytest.approx(baseline_loss, rel=1e-6)
    assert stats["entropy_loss"].item() == pytest.approx(entropy_loss, rel=1e-6)
    assert total.item() == pytest.approx(pg_loss + baseline_loss + entropy_loss, rel=1e-6)
    log_rhos = torch.zeros(3, 2, dtype=torch.float64)
    log_rhos[1, 1] = math.log(1.5)
    assert torch.allclose(stats["log_rhos"], log_rhos, atol=1e-6)
    # The gradient reaches the values at t < T through the baseline and the bootstrap value through the targets.
    total.backward()
    value_grads = [0.5 * -(advantages[0]), 0.5 * -(advantages[3])]  # d/dV_0 of 0.25 (vs_0 - V_0)^2, vs detached
    assert model.values.grad[0].tolist() == pytest.approx(value_grads, rel=1e-6)


# --- One update of a real policy --------------------------------------------------------------------------------


def one_step_policy(action: int, seed: int = 0) -> tuple[PolicyNet, dict]:
    """A feed-forward policy on 3-d observations with its value head zeroed (value 0), and a batch of T = 1,
    B = 1 in which `action` is taken and the episode ends (so the target is the step's reward alone);
    behaviour = learner."""
    torch.manual_seed(seed)
    net = PolicyNet(observation_shape=(3,), num_actions=3, core="none")
    with torch.no_grad():
        net.baseline.weight.zero_()
        net.baseline.bias.zero_()
    batch = {
        "obs": torch.randn(2, 1, 3),
        "reward": torch.zeros(2, 1),
        "done": torch.ones(2, 1, dtype=torch.bool),
        "last_action": torch.zeros(2, 1, dtype=torch.int64),
        "action": torch.tensor([[action], [0]]),
    }
    with torch.no_grad():
        out, _ = net(batch["obs"], batch["reward"], batch["last_action"], batch["done"], ())
    batch["policy_logits"] = out["policy_logits"]
    return net, batch


def outputs(net: PolicyNet, batch: dict) -> tuple[float, float, float]:
    """log pi(a_0), the entropy of pi(. | x_0) and V(x_0)."""
    with torch.no_grad():
        out, _ = net(batch["obs"], batch["reward"], batch["last_action"], batch["done"], ())
    log_policy = F.log_softmax(out["policy_logits"][0, 0], dim=-1)
    entropy = -(log_policy.exp() * log_policy).sum()
    return log_policy[batch["action"][0, 0]].item(), entropy.item(), out["baseline"][0, 0].item()


def after_one_update(action: int, reward: float, **costs) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`outputs` before and after one update on the batch of `one_step_policy` with this reward."""
    net, batch = one_step_policy(action, seed=action)
    batch["reward"][1] = reward
    before = outputs(net, batch)
    hp = paper_hyperparameters(total_frames=10**9, learning_rate=1e-4, **costs)
    update(LearnerState.create(net, hp), batch, (), hp, frames=4)
    return before, outputs(net, batch)


@pytest.mark.parametrize("action", [0, 1, 2])
def test_the_sign_of_the_advantage_moves_the_log_probability_of_the_action(action):
    before, after = after_one_update(action, reward=1.0, baseline_cost=0.0, entropy_cost=0.0)  # advantage +1
    assert after[0] > before[0]
    before, after = after_one_update(action, reward=-1.0, baseline_cost=0.0, entropy_cost=0.0)  # advantage -1
    assert after[0] < before[0]


@pytest.mark.parametrize("action", [0, 1, 2])
def test_entropy_term_alone_raises_the_entropy(action):
    before, after = after_one_update(action, reward=0.0, entropy_cost=0.01)  # no advantage, no value error
    assert after[1] > before[1]


@pytest.mark.parametrize("target", [1.0, -0.5])
def test_value_moves_toward_its_target(target):
    before, after = after_one_update(1, reward=target, entropy_cost=0.0)
    assert before[2] == 0.0 and abs(after[2] - target) < abs(target)
