"""Actor and learner in-process: the unroll layout, the carried core state, the update and the checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.actor import Actor
from actors.unroll import StackedFrames, Unroll
from learner.impala import LearnerState, batch_unrolls, compute_loss, learning_rate, update
from learner.rl import policy_from_checkpoint, run_identity
from models import PolicyNet
from runio.checkpoint import CheckpointMismatchError, check_identity, load_checkpoint, save_checkpoint
from support import paper_hyperparameters

SMALL_CORES = {
    "lstm": dict(hidden_size=32, num_layers=1),
    "delta_net": dict(hidden_size=32, num_layers=2, num_heads=2, head_dim=16, ff_size=64),
}
MEMORY_SPEC = dict(observation_shape=(5,), num_actions=4)  # MemoryEnv with its default 4 cues


def make_actors(game: str, spec: dict, num_actors: int, num_envs: int, T: int) -> list[Actor]:
    return [Actor(game, {}, num_envs, spec, T, seed=3, index=i) for i in range(num_actors)]


def collect(actors: list[Actor], weights: dict, rounds: int) -> list[list[Unroll]]:
    """`rounds` consecutive unrolls from every actor, all acting with `weights` (version 0)."""
    return [[actor.unroll(0, weights) for actor in actors] for _ in range(rounds)]


def max_abs_log_rho(net: PolicyNet, unrolls: list[Unroll], **changes) -> float:
    batch, core_state = batch_unrolls(unrolls)
    batch.update(changes.pop("batch", {}))
    core_state = changes.pop("core_state", core_state)
    with torch.no_grad():
        _, stats = compute_loss(net, batch, core_state, paper_hyperparameters(total_frames=1))
    return stats["log_rhos"].abs().max().item()


@pytest.mark.parametrize("core", ["lstm", "delta_net"])
def test_learner_rerun_reproduces_behaviour_policy(core):
    """With unchanged weights, every importance weight is 1: the carried state and the resets line up."""
    torch.manual_seed(0)
    spec = {**MEMORY_SPEC, "core": core, "core_kwargs": SMALL_CORES[core]}
    net = PolicyNet(**spec)
    actors = make_actors("memory", spec, num_actors=2, num_envs=3, T=10)  # episodes last 7 steps: they cross
    rounds = collect(actors, net.state_dict(), rounds=4)
    for unrolls in rounds:
        batch, _ = batch_unrolls(unrolls)
        assert batch["done"][1:].any(), "episode boundaries inside the unroll"
        assert max_abs_log_rho(net, unrolls) < 1e-5
    # The check has teeth: a wrong carried state, or ignoring the resets, breaks it.
    late = rounds[-1]
    zeros = tuple(torch.zeros_like(s) for s in batch_unrolls(late)[1])
    assert max_abs_log_rho(net, late, core_state=zeros) > 1e-3
    no_resets = torch.zeros_like(batch_unrolls(late)[0]["done"])
    assert max_abs_log_rho(net, late, batch={"done": no_resets}) > 1e-3


@pytest.mark.parametrize("torso_precision", ["float32", "bfloat16"])
def test_learner_rerun_on_atari_across_lost_lives(torso_precision):
    """Also with the torso in bfloat16: actors (N=2 per call) and learner (T x B at once) compute the same policy."""
    torch.manual_seed(0)
    spec = dict(observation_shape=(4, 84, 84), num_actions=4, core="lstm", core_kwargs=dict(hidden_size=32),
                torso_precision=torso_precision)
    net = PolicyNet(**spec)
    [actor] = make_actors("Breakout", spec, num_actors=1, num_envs=2, T=40)
    unrolls = [u for [u] in collect([actor], net.state_dict(), rounds=3)]
    dones = sum(int(u.done[1:].sum()) for u in unrolls)
    assert dones > 0, "a random Breakout agent loses lives within 120 steps"
    for unroll in unrolls:
        assert max_abs_log_rho(net, [unroll]) < 1e-5


def test_unroll_layout():
    spec = {**MEMORY_SPEC, "core": "lstm", "core_kwargs": SMALL_CORES["lstm"]}
    weights = PolicyNet(**spec).state_dict()
    [actor] = make_actors("memory", spec, num_actors=1, num_envs=3, T=5)
    with pytest.raises(RuntimeError, match="no policy weights"):
        actor.unroll()
    first = actor.unroll(7, weights)
    second = actor.unroll()
    assert first.version == second.version == 7 and first.actor == 0
    assert first.done[0].all() and not first.core_state[0].any()  # a fresh actor starts episodes
    shapes = {"obs": (6, 3, 5), "reward": (6, 3), "done": (6, 3), "action": (6, 3), "last_action": (6, 3),
              "policy_logits": (6, 3, 4), "baseline": (6, 3)}
    for key, shape in shapes.items():
        assert getattr(first, key).shape == shape, key
        assert np.array_equal(getattr(second, key)[0], getattr(first, key)[-1]), f"step 0 repeats the last {key}"
    assert np.array_equal(first.last_action[1:], first.action[:-1])
    assert [s.shape for s in first.core_state] == [(3, 1, 32), (3, 1, 32)]
    assert any(s.any() for s in second.core_state)  # carried over, not reset
    first.check(unroll_length=5, num_actions=4)
    first.reward = first.reward.astype(np.float64)
    with pytest.raises(ValueError, match="reward is float64"):
        first.check(unroll_length=5, num_actions=4)


def test_batch_unrolls_concatenates_along_the_env_axis():
    spec = {**MEMORY_SPEC, "core": "delta_net", "core_kwargs": SMALL_CORES["delta_net"]}
    weights = PolicyNet(**spec).state_dict()
    [unrolls] = collect(make_actors("memory", spec, num_actors=2, num_envs=3, T=4), weights, rounds=1)
    batch, core_state = batch_unrolls(unrolls)
    assert batch["obs"].shape == (5, 6, 5) and batch["policy_logits"].shape == (5, 6, 4)
    assert torch.equal(batch["action"][:, 3:], torch.from_numpy(unrolls[1].action))
    assert [tuple(s.shape) for s in core_state] == [(6, 2, 16, 16)] * 2  # W of each layer


def test_update_schedule_clipping_and_gradient_through_the_unroll():
    torch.manual_seed(0)
    spec = {**MEMORY_SPEC, "core": "lstm", "core_kwargs": SMALL_CORES["lstm"]}
    net = PolicyNet(**spec)
    _, unrolls = collect(make_actors("memory", spec, num_actors=1, num_envs=4, T=12), net.state_dict(), rounds=2)
    batch, core_state = batch_unrolls(unrolls)  # the second unroll: its carried state is not reset at step 0
    assert not batch["done"][0].any()
    hp = paper_hyperparameters(total_frames=1000)

    assert learning_rate(hp, 0) == pytest.approx(6e-4)
    assert learning_rate(hp, 250) == pytest.approx(4.5e-4)
    assert learning_rate(hp, 5000) == 0.0

    # Rewards are clipped to [-1, 1]: scaling them beyond that changes nothing.
    loss, _ = compute_loss(net, batch, core_state, hp)
    scaled, _ = compute_loss(net, {**batch, "reward": batch["reward"] * 50}, core_state, hp)
    assert torch.allclose(loss, scaled)

    # The gradient reaches the state carried into the unroll (no truncation inside the unroll).
    carried = tuple(s.clone().requires_grad_() for s in core_state)
    compute_loss(net, batch, carried, hp)[0].backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in carried)

    state = LearnerState.create(net, hp)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    stats = update(state, batch, core_state, hp, frames=250)
    assert (state.frames, state.updates) == (250, 1)
    assert stats["learning_rate"] == pytest.approx(6e-4) and stats["mean_rho"] == pytest.approx(1.0, abs=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    update(state, batch, core_state, hp, frames=250)
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(4.5e-4)


def test_checkpoint_roundtrip_and_refusal(tmp_path):
    torch.manual_seed(0)
    spec = {**MEMORY_SPEC, "core": "lstm", "core_kwargs": SMALL_CORES["lstm"]}
    hp = paper_hyperparameters(total_frames=1000)
    state = LearnerState.create(PolicyNet(**spec), hp)
    [unrolls] = collect(make_actors("memory", spec, 1, 2, 6), state.model.state_dict(), rounds=1)
    update(state, *batch_unrolls(unrolls), hp, frames=12)  # gives the optimiser some state
    config = {"core": "lstm", "core_kwargs": SMALL_CORES["lstm"], "use_last_action": False, "frame_stack": 4,
              "frameskip": 4}
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"learner": state.state_dict(), "config": config, "game": "memory",
                     "model_spec": {**spec, "observation_shape": [5]}, "rng": {"torch": torch.get_rng_state()}}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # the temporary file was renamed away

    restored = LearnerState.create(PolicyNet(**spec), hp)
    restored.load_state_dict(load_checkpoint(path)["learner"])
    assert (restored.frames, restored.updates) == (12, 1)
    restored_weights, weights = restored.model.state_dict(), state.model.state_dict()
    assert all(torch.equal(restored_weights[key], weights[key]) for key in weights)
    assert restored.optimizer.state_dict()["state"].keys() == state.optimizer.state_dict()["state"].keys()
    checkpoint = load_checkpoint(path)
    net = policy_from_checkpoint(checkpoint)
    assert not net.training and checkpoint["game"] == "memory"

    saved = run_identity(checkpoint["game"], checkpoint["config"])
    check_identity(saved, run_identity("memory", config), path)
    with pytest.raises(CheckpointMismatchError, match="core: checkpoint 'lstm', requested 'delta_net'"):
        check_identity(saved, run_identity("memory", {**config, "core": "delta_net"}), path)
    with pytest.raises(CheckpointMismatchError, match="game: checkpoint 'memory', requested 'breakout'.*--name"):
        check_identity(saved, run_identity("breakout", config), path)


def test_stacked_frames_wire_format_is_bit_exact_across_episode_ends():
    """Two identically seeded Breakout actors, one sending full stacks and one each new frame once: the learner
    decodes the same observations, bit for bit, through lost lives and new games, for a quarter of the bytes."""
    spec = dict(observation_shape=(4, 84, 84), num_actions=4, core="none")
    weights = PolicyNet(**spec).state_dict()
    plain, wired = (Actor("Breakout", {}, 2, spec, 60, seed=5, stack_frames=s) for s in (False, True))
    restacked = 0
    for _ in range(3):
        a, b = plain.unroll(0, weights), wired.unroll(0, weights)
        assert isinstance(b.obs, StackedFrames) and isinstance(a.obs, np.ndarray)
        assert np.array_equal(a.action, b.action)
        assert np.array_equal(b.observations(), a.obs)
        restacked += len(b.obs.restack_index)
        assert b.obs.nbytes < 0.3 * a.obs.nbytes
    assert restacked > 0, "some episode ended inside the unrolls: the test crosses episode ends"


def test_stacked_frames_restack_rebuilds_the_following_steps():
    """A stack that is not a shift of the previous one (here: a refilled stack mid-unroll) travels whole, and the
    steps after it are rebuilt from it, not from the frame sequence."""
    rng = np.random.default_rng(0)
    T, N, S = 6, 2, 4
    frames = rng.integers(0, 255, (N, S + T, 3, 3), dtype=np.uint8)
    obs = np.stack([frames[:, t:t + S] for t in range(T + 1)])  # [T+1, N, S, 3, 3] sliding stacks
    obs[3, 1] = obs[3, 1, -1]  # env 1 refills its stack with its newest frame at step 3
    for t in range(4, T + 1):
        obs[t, 1, :-1] = obs[t - 1, 1, 1:]
    wire = StackedFrames.encode(obs)
    assert wire.restack_index.tolist() == [[3, 1]]
    assert np.array_equal(wire.decode(), obs)
