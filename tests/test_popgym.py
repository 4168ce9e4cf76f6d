"""POPGym tasks behind the VectorEnv interface, through the same actor and learner path as Atari and the toy task."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from actors.envs import env_spaces, make_vector_env, resolve_game
from actors.popgym_envs import _make, observation_encoder
from agent.config import ConfigError, resolve_config
from learner.impala import batch_unrolls
from models import PolicyNet
from tests.test_actor_learner import SMALL_CORES, collect, make_actors, max_abs_log_rho
from tests.test_learning import train

REPEAT_PREVIOUS = "popgym-RepeatPreviousEasy-v0"  # 4 suits shown one a step; episodes of 51 steps


def encode(space: gym.Space, value) -> np.ndarray:
    size, write = observation_encoder(space)
    row = np.zeros(size, np.float32)
    write(row, value)
    return row


def test_observation_encodings_by_hand():
    assert encode(spaces.Discrete(4), 2).tolist() == [0, 0, 1, 0]
    assert encode(spaces.Discrete(3, start=-1), -1).tolist() == [1, 0, 0]
    assert encode(spaces.MultiDiscrete([2, 3]), np.array([1, 2])).tolist() == [0, 1, 0, 0, 1]
    box = spaces.Box(-1, 1, (2,), np.float32)
    assert encode(box, np.array([0.5, -0.25])).tolist() == [0.5, -0.25]
    nested = spaces.Tuple((spaces.Discrete(2), spaces.MultiDiscrete([2, 2]), box))
    assert encode(nested, (1, np.array([0, 1]), np.array([0.5, 0.0]))).tolist() == [0, 1, 1, 0, 0, 1, 0.5, 0]


@pytest.mark.parametrize("env_id", ["popgym-AutoencodeEasy-v0", "popgym-CountRecallEasy-v0", REPEAT_PREVIOUS])
def test_vector_env_steps_like_the_bare_environments(env_id):
    """Same seeds and actions: the same encoded observations, rewards and episode ends as POPGym's own envs,
    with the next episode's first observation on the step that ended one."""
    num_envs, steps = 3, 240  # every task ends an episode within 104 steps
    vector = make_vector_env(env_id, num_envs, seed=7)
    bare = [_make(env_id) for _ in range(num_envs)]
    space = bare[0].observation_space
    expected_obs = np.stack([encode(space, env.reset(seed=7 + i)[0]) for i, env in enumerate(bare)])
    assert np.array_equal(vector.reset(), expected_obs)
    rng = np.random.default_rng(0)
    returns, lengths, games = np.zeros(num_envs), np.zeros(num_envs, int), 0
    for _ in range(steps):
        actions = rng.integers(0, vector.num_actions, num_envs)
        obs, reward, done, episodes = vector.step(actions)
        expected_episodes = []
        for i, env in enumerate(bare):
            value, r, terminated, truncated, _ = env.step(int(actions[i]))
            returns[i] += r
            lengths[i] += 1
            assert done[i] == (terminated or truncated) and reward[i] == np.float32(r)
            if done[i]:
                expected_episodes += [(kind, i, returns[i], lengths[i]) for kind in ("life", "game")]
                returns[i], lengths[i] = 0, 0
                value, _ = env.reset()
            assert np.array_equal(obs[i], encode(space, value))
        assert [(e.kind, e.env_index, e.episode_return, e.length) for e in episodes] == expected_episodes
        games += len(expected_episodes) // 2
    assert games >= 2 * num_envs


def test_refuses_multidiscrete_and_continuous_actions_before_anything_starts():
    for env_id, space in (("popgym-BattleshipEasy-v0", "MultiDiscrete"), ("popgym-MineSweeperEasy-v0", "MultiDiscrete"),
                          ("popgym-PositionOnlyPendulumEasy-v0", "Box")):
        with pytest.raises(ConfigError, match=f"{env_id} has a {space}.*one categorical head") as error:
            resolve_config(overrides={"env": env_id, "core": "lstm"})
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="Close matches: popgym-RepeatPreviousEasy-v0"):
        resolve_game("popgym-RepeatPreviusEasy-v0")
    assert resolve_game("POPGYM-repeatpreviouseasy-v0") == REPEAT_PREVIOUS
    assert env_spaces(REPEAT_PREVIOUS) == ((4,), 4)
    assert env_spaces("popgym-AutoencodeEasy-v0") == ((2 + 4,), 4)  # Tuple(Discrete(2), Discrete(4))


@pytest.mark.parametrize("core", ["lstm", "delta_net"])
def test_actor_and_learner_on_popgym(core):
    """Unrolls of T = 30 cross the 51-step episodes; the learner's rerun from the carried state gives rho == 1."""
    torch.manual_seed(0)
    spec = dict(observation_shape=(4,), num_actions=4, core=core, core_kwargs=SMALL_CORES[core],
                use_last_action=True)
    net = PolicyNet(**spec)
    actors = make_actors(REPEAT_PREVIOUS, spec, num_actors=2, num_envs=3, T=30)
    rounds = collect(actors, net.state_dict(), rounds=4)  # 120 steps: two episode ends per environment
    done = np.concatenate([u.done[1:] for unrolls in rounds for u in unrolls[:1]])  # actor 0, steps 1..120
    for env in range(3):
        assert np.flatnonzero(done[:, env]).tolist() == [50, 101], "a new episode every 51 steps"
    episodes = [e for unrolls in rounds for e in unrolls[0].episodes if e.kind == "game"]
    assert len(episodes) == 6 and {e.length for e in episodes} == {51}
    # A random policy names the suit of 4 cards ago a quarter of the time: return 2 * 0.25 - 1 on average.
    assert abs(np.mean([e.episode_return for e in episodes]) + 0.5) < 0.25
    for unrolls in rounds:
        assert max_abs_log_rho(net, unrolls) < 1e-5
    late = rounds[-1]
    zeros = tuple(torch.zeros_like(s) for s in batch_unrolls(late)[1])
    assert max_abs_log_rho(net, late, core_state=zeros) > 1e-3


@pytest.mark.slow
def test_recurrent_fast_weights_beat_no_memory_on_repeat_previous():
    """RepeatPrevious asks for the suit of the card 4 steps back: without memory an agent can only guess
    (return 2 * 1/4 - 1 = -0.5; over 500 games of 47 rewarded steps the standard error of the mean return is
    about 0.006). A small Delta RNN learns to recall it within 2000 updates (about two CPU minutes)."""
    spec = dict(observation_shape=(4,), num_actions=4)
    small = dict(hidden_size=32, num_layers=1, num_heads=2, head_dim=16, ff_size=64)
    memory = train(REPEAT_PREVIOUS, {**spec, "core": "delta_rnn", "core_kwargs": small}, updates=2000)
    no_memory = train(REPEAT_PREVIOUS, {**spec, "core": "none", "core_kwargs": {}}, updates=2000)
    assert abs(np.mean(no_memory[-500:]) + 0.5) < 0.03
    assert np.mean(memory[-500:]) - np.mean(no_memory[-500:]) > 0.1  # > 15 standard errors
