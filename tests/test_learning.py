"""Learning: the actor and the IMPALA update, in-process and seeded, solve a task that needs memory.

In MemoryEnv a cue shows at the first step and the reward comes 6 steps later for naming it: a recurrent core
reaches the best return (1), a feed-forward agent stays at chance (2 / 4 cues - 1 = -0.5).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.actor import Actor
from learner.impala import LearnerState, batch_unrolls, update
from models import PolicyNet
from support import paper_hyperparameters

NUM_ENVS, UNROLL_LENGTH, UPDATES = 16, 20, 500
CHANCE = -0.5


def train(game: str, spec: dict, updates: int, seed: int = 0) -> list[float]:
    """Returns of the games played while training on `game` with `PolicyNet(**spec)`, in order (on-policy: one
    actor, an update per unroll)."""
    torch.manual_seed(seed)
    # A higher learning rate than Atari's 6e-4: the tasks are tiny and the budget a few thousand updates.
    hp = paper_hyperparameters(total_frames=updates * NUM_ENVS * UNROLL_LENGTH, learning_rate=2e-3)
    learner = LearnerState.create(PolicyNet(**spec), hp)
    actor = Actor(game, {}, NUM_ENVS, spec, UNROLL_LENGTH, seed=seed)
    returns = []
    for _ in range(updates):
        unroll = actor.unroll(learner.updates, learner.weights())
        returns += [e.episode_return for e in unroll.episodes if e.kind == "game"]
        update(learner, *batch_unrolls([unroll]), hp, frames=NUM_ENVS * UNROLL_LENGTH)
    return returns


def train_on_memory_task(core: str, core_kwargs: dict, seed: int = 0, torso_precision: str = "float32"
                         ) -> list[float]:
    spec = dict(observation_shape=(5,), num_actions=4, core=core, core_kwargs=core_kwargs,
                torso_precision=torso_precision)
    return train("memory", spec, UPDATES, seed)


@pytest.mark.slow
@pytest.mark.parametrize(
    "core, core_kwargs, torso_precision",
    [
        ("lstm", dict(hidden_size=64), "float32"),
        ("delta_net", dict(hidden_size=32, num_layers=1, num_heads=2, head_dim=16, ff_size=64), "float32"),
        # The bfloat16 torso (the default where the CPU computes bfloat16 natively) learns as well.
        ("delta_net", dict(hidden_size=32, num_layers=1, num_heads=2, head_dim=16, ff_size=64), "bfloat16"),
    ],
)
def test_recurrent_core_remembers_the_cue(core, core_kwargs, torso_precision):
    returns = train_on_memory_task(core, core_kwargs, torso_precision=torso_precision)
    assert np.mean(returns[:300]) < CHANCE + 0.2  # it starts at chance...
    assert np.mean(returns[-500:]) > 0.8  # ...and ends naming the cue more than 90% of the time


@pytest.mark.slow
def test_feedforward_agent_stays_at_chance():
    returns = train_on_memory_task("none", {})
    assert abs(np.mean(returns[-2000:]) - CHANCE) < 0.15  # 2000 games: the standard error is 0.02
