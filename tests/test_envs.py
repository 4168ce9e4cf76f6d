"""Environment construction on real ale-py: names, the paper's preprocessing and the life-loss protocol."""
from __future__ import annotations

import collections

import cv2
import gymnasium as gym
import numpy as np
import pytest
from ale_py.env import AtariEnv

from actors.envs import gym_time_limit, make_vector_env, resolve_game
from actors.toy_envs import MemoryEnv


@pytest.mark.parametrize(
    "name, rom",
    [
        ("Breakout", "breakout"),
        ("breakout", "breakout"),
        ("ALE/Breakout-v5", "breakout"),
        ("BreakoutNoFrameskip-v4", "breakout"),
        ("SpaceInvaders", "space_invaders"),
        ("space_invaders", "space_invaders"),
        ("MsPacman", "ms_pacman"),
        ("UpNDown", "up_n_down"),
        ("memory", "memory"),
    ],
)
def test_resolve_game_accepts_names_as_users_type_them(name, rom):
    assert resolve_game(name) == rom


def test_unknown_game_lists_close_matches():
    with pytest.raises(ValueError, match="unknown game 'Breakot'.*Close matches: Breakout"):
        resolve_game("Breakot")
    with pytest.raises(ValueError, match="memory"):  # the toy environment is listed among the choices
        resolve_game("no_such_game")


def play(env, steps: int, seed: int = 0):
    """Random play; returns stacked obs [steps, N, ...], rewards and dones [steps, N] and the episodes."""
    rng = np.random.default_rng(seed)
    observations, rewards, dones, episodes = [], [], [], []
    for _ in range(steps):
        obs, reward, done, ended = env.step(rng.integers(0, env.num_actions, env.num_envs))
        observations.append(obs.copy())
        rewards.append(reward)
        dones.append(done)
        episodes += ended
    return np.stack(observations), np.stack(rewards), np.stack(dones), episodes


def test_atari_preprocessing_and_seeding():
    env = make_vector_env("Breakout", 2, seed=7)
    assert (env.observation_shape, env.observation_dtype, env.num_actions) == ((4, 84, 84), np.uint8, 4)
    assert env.frameskip == 4
    first = env.reset()
    assert first.shape == (2, 4, 84, 84) and first.dtype == np.uint8
    obs_a, rewards_a, dones_a, _ = play(env, 200)
    again = make_vector_env("breakout", 2, seed=7)
    assert np.array_equal(again.reset(), first)
    obs_b, rewards_b, dones_b, _ = play(again, 200)
    assert np.array_equal(obs_a, obs_b) and np.array_equal(rewards_a, rewards_b) and np.array_equal(dones_a, dones_b)
    other = make_vector_env("breakout", 2, seed=8)
    other.reset()
    assert not np.array_equal(play(other, 200)[0], obs_a)
    # The frames of a stack are consecutive: frame k of step t is frame k + 1 of step t - 1 (no reset between).
    assert np.array_equal(obs_a[100, :, :3], obs_a[99, :, 1:]) or dones_a[100].any()


def test_life_loss_ends_training_episode_but_not_the_game():
    env = make_vector_env("Breakout", 2, seed=0)
    env.reset()
    _, rewards, dones, episodes = play(env, 1500)
    for i in range(2):
        lives = [e for e in episodes if e.env_index == i and e.kind == "life"]
        games = [e for e in episodes if e.env_index == i and e.kind == "game"]
        assert games, "a random agent loses a game of Breakout within 1500 steps"
        # Breakout has 5 lives: each game ends 5 training episodes, whose returns and lengths add up to the game's.
        assert len(lives) >= 5 * len(games)
        assert sum(e.episode_return for e in lives[:5]) == games[0].episode_return
        assert sum(e.length for e in lives[:5]) == games[0].length
        assert dones[:, i].sum() == len(lives)
        assert rewards[:, i].sum() >= sum(e.episode_return for e in lives)


def test_without_episodic_life_done_marks_game_over_only():
    env = make_vector_env("Breakout", 1, seed=0, episodic_life=False)
    env.reset()
    _, _, dones, episodes = play(env, 1500)
    games = [e for e in episodes if e.kind == "game"]
    assert games and dones.sum() == len(games)
    assert len([e for e in episodes if e.kind == "life"]) >= 5 * len(games)  # per-life returns still reported


def test_rewards_are_not_clipped():
    env = make_vector_env("SpaceInvaders", 2, seed=0)
    env.reset()
    _, rewards, _, _ = play(env, 300)
    assert rewards.dtype == np.float32 and rewards.max() > 1  # an invader is worth 5 to 30 points


def test_recorded_screens_follow_the_game():
    env = make_vector_env("Breakout", 2, seed=3, sticky_actions=True, record_screen=True)
    obs = env.reset()
    rng = np.random.default_rng(0)
    for _ in range(300):
        assert env.screens.shape == (2, 210, 160, 3) and env.screens.dtype == np.uint8
        grey = [cv2.resize(cv2.cvtColor(screen, cv2.COLOR_RGB2GRAY), (84, 84), interpolation=cv2.INTER_AREA)
                for screen in env.screens]
        # The agent's newest frame is the max-pool of the last two screens: apart from moving objects, the same.
        assert np.abs(np.stack(grey).astype(int) - obs[:, -1]).mean() < 1.0
        obs, _, _, _ = env.step(rng.integers(0, 4, 2))


def test_bad_num_envs():
    with pytest.raises(ValueError, match="num_envs must be at least 1"):
        make_vector_env("Breakout", 0, seed=0)


def test_memory_env_layout():
    env = MemoryEnv(num_envs=3, seed=0, num_cues=4, delay=2)
    obs = env.reset()
    assert obs.shape == (3, 5) and obs.dtype == np.float32
    cues = obs[:, :4].argmax(1)
    assert np.array_equal(obs[:, :4].sum(1), np.ones(3)) and not obs[:, 4].any()
    for t in range(1, 4):  # steps 1-2 are blank, step 3 raises the query flag; nothing is earned meanwhile
        obs, reward, done, episodes = env.step(np.zeros(3, np.int64))
        assert not obs[:, :4].any() and obs[:, 4].all() == (t == 3) and obs[:, 4].any() == (t == 3)
        assert not reward.any() and not done.any() and not episodes
    actions = np.array([cues[0], (cues[1] + 1) % 4, cues[2]])
    obs, reward, done, episodes = env.step(actions)
    assert np.array_equal(reward, [1.0, -1.0, 1.0]) and done.all()
    assert np.array_equal(obs[:, :4].sum(1), np.ones(3))  # the new episode's cue arrives on the same step
    assert sorted((e.kind, e.env_index, e.episode_return, e.length) for e in episodes) == sorted(
        [(k, i, r, 4) for i, r in enumerate([1.0, -1.0, 1.0]) for k in ("life", "game")]
    )


# --- The paper's protocol against its wrapper chain -------------------------------------------------------------
# OpenAI baselines' atari_wrappers (as the paper's code uses them), ported to gymnasium's step API, over ale-py's
# gym env with one frame per step and a TimeLimit: an implementation independent of `actors.envs`.


class NoopReset(gym.Wrapper):
    def __init__(self, env, noop_counts):
        super().__init__(env)
        self.noop_counts = noop_counts  # the counts the environment under test draws, in order

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        for _ in range(next(self.noop_counts)):
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                obs, info = self.env.reset(**kwargs)
        return obs, info


class MaxAndSkip(gym.Wrapper):
    def __init__(self, env, skip=4):
        super().__init__(env)
        self.buffer = np.zeros((2, *env.observation_space.shape), np.uint8)
        self.skip = skip

    def step(self, action):
        total = 0.0
        for i in range(self.skip):
            obs, reward, terminated, truncated, info = self.env.step(action)
            if i == self.skip - 2:
                self.buffer[0] = obs
            if i == self.skip - 1:
                self.buffer[1] = obs
            total += reward
            if terminated or truncated:
                break
        return self.buffer.max(axis=0), total, terminated, truncated, info


class EpisodicLife(gym.Wrapper):
    def __init__(self, env):
        super().__init__(env)
        self.lives, self.was_real_done = 0, True

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.was_real_done = terminated or truncated
        lives = self.env.unwrapped.ale.lives()
        if 0 < lives < self.lives:
            terminated = True
        self.lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, **kwargs):
        if self.was_real_done:
            obs, info = self.env.reset(**kwargs)
        else:
            obs, _, _, _, info = self.env.step(0)
        self.lives = self.env.unwrapped.ale.lives()
        return obs, info


class FireReset(gym.Wrapper):
    def reset(self, **kwargs):
        self.env.reset(**kwargs)
        for action in (1, 2):
            obs, _, terminated, truncated, info = self.env.step(action)
            if terminated or truncated:
                obs, info = self.env.reset(**kwargs)
        return obs, info


class WarpAndStack(gym.Wrapper):
    def __init__(self, env, k=4):
        super().__init__(env)
        self.frames = collections.deque(maxlen=k)

    @staticmethod
    def warp(frame):
        return cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), (84, 84), interpolation=cv2.INTER_AREA)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        for _ in range(self.frames.maxlen):
            self.frames.append(self.warp(obs))
        return np.stack(self.frames), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.frames.append(self.warp(obs))
        return np.stack(self.frames), reward, terminated, truncated, info


def paper_chain(rom: str, seed: int, max_frames: int):
    """The paper's environment for `rom`; its no-op counts are those `make_vector_env` draws for `seed`."""
    rng = np.random.default_rng(seed)
    noop_counts = iter(lambda: int(rng.integers(1, 31)), None)
    env = AtariEnv(game=rom, obs_type="rgb", frameskip=1, repeat_action_probability=0.0)
    env = gym.wrappers.TimeLimit(env, max_episode_steps=max_frames)
    return WarpAndStack(FireReset(EpisodicLife(MaxAndSkip(NoopReset(env, noop_counts)))))


@pytest.mark.parametrize("game, rom, policy", [("Breakout", "breakout", "noop"), ("BeamRider", "beam_rider", "noop"),
                                               ("Breakout", "breakout", "random")])
def test_paper_protocol_equals_the_wrapper_chain(game, rom, policy):
    """Observations, rewards and dones step by step, through lost lives, game overs and the time limit."""
    seed, max_frames, steps = 5, 2400, 1300
    env = make_vector_env(game, 1, seed=seed, max_episode_frames=max_frames)
    chain = paper_chain(rom, seed, max_frames)
    obs = env.reset()
    expected, _ = chain.reset()
    assert np.array_equal(obs[0], expected)
    rng = np.random.default_rng(0)
    ends = 0
    for t in range(steps):
        action = 0 if policy == "noop" else int(rng.integers(0, env.num_actions))
        obs, reward, done, _ = env.step(np.array([action]))
        expected, expected_reward, terminated, truncated, _ = chain.step(action)
        assert done[0] == (terminated or truncated), t
        # The chain drops the rewards of its reset steps, which score nothing in these games.
        assert reward[0] == expected_reward, t
        if terminated or truncated:
            ends += 1
            expected, _ = chain.reset()
            assert all(np.array_equal(frame, expected[-1]) for frame in expected)  # the refilled stack
        assert np.array_equal(obs[0], expected), t
    assert ends >= 3


def test_noop_policy_loses_every_life_in_fire_games_unless_modern():
    """The paper's protocol presses FIRE after every lost life: an agent that never fires loses the game quickly.
    ale-py's protocol presses it only at a new game, so the same agent idles until the episode cap."""
    for game in ("Breakout", "BeamRider"):
        paper = make_vector_env(game, 1, seed=0)
        modern = make_vector_env(game, 1, seed=0, atari_protocol="ale", max_episode_frames=20_000)
        for env, game_ends_before in ((paper, 5_000), (modern, None)):
            env.reset()
            episodes, steps = [], 0
            while not any(e.kind == "game" for e in episodes):
                episodes += env.step(np.zeros(1, np.int64))[3]
                steps += 1
            lives = [e for e in episodes if e.kind == "life"]
            if game_ends_before:
                assert steps < game_ends_before and len(lives) >= 3, game  # every life lost, far from the cap
                assert env.frames < 4 * game_ends_before
            else:
                assert steps * 4 >= 20_000 and len(lives) <= 2, game  # idles after its first lost life


def test_paper_time_limits_are_gyms():
    assert gym_time_limit("breakout") == 400_000 and gym_time_limit("space_invaders") == 300_000
    env = make_vector_env("Pong", 1, seed=0)
    assert env.games[0].max_episode_frames == 400_000


def test_unknown_protocol():
    with pytest.raises(ValueError, match="unknown atari_protocol 'modern'.*paper, ale"):
        make_vector_env("Breakout", 1, seed=0, atari_protocol="modern")
