"""The core contract for every core: continuity across calls, resets, backpropagation through the unroll,
the RL configurations' parameter counts and clear errors."""
import math

import pytest
import torch

from models import CORE_NAMES, PolicyNet, make_core
from models.ops import backends_ran
from models.layers import DeltaNetLayer, LinearTransformerLayer

RECURRENT_CORES = [name for name in CORE_NAMES if name != "none"]
SMALL = dict(hidden_size=8, num_layers=2, num_heads=2, head_dim=4, ff_size=16, depth=2)
T, B, D_IN = 7, 3, 5


def small_core(name: str, seed: int = 0):
    """Pinned to the reference loops: what these tests exercise never depends on a kernel build in the cache
    (the kernels are checked against the same cores in test_kernels.py)."""
    torch.manual_seed(seed)
    return make_core(name, input_size=D_IN, backend="reference", **SMALL).double()


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, D_IN, generator=g, dtype=torch.float64)
    reset = torch.rand(T, B, generator=g) < 0.25
    return x, reset


def random_state(core, seed: int = 2):
    """A non-trivial carried state (as if earlier steps had run), so continuity tests cannot pass on zeros."""
    warmup_x, _ = inputs(seed)
    _, state = core(warmup_x, core.initial_state(B), None)
    return tuple(s.detach() for s in state)


def differentiable_inputs(core):
    """Inputs and a carried state that both require gradients, to check where gradients reach."""
    x, _ = inputs()
    return x.requires_grad_(), tuple(s.requires_grad_() for s in random_state(core))


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", CORE_NAMES)
def test_continuity_whole_split_and_single_steps(name):
    core = small_core(name)
    x, reset = inputs()
    state0 = random_state(core)
    y_all, s_all = core(x, state0, reset)

    y1, s1 = core(x[:3], state0, reset[:3])
    y2, s2 = core(x[3:], s1, reset[3:])
    assert_same(torch.cat([y1, y2]), y_all)
    for a, b in zip(s2, s_all):
        assert_same(a, b)

    state, ys = state0, []
    for t in range(T):
        y, state = core(x[t : t + 1], state, reset[t : t + 1])
        ys.append(y)
    assert_same(torch.cat(ys), y_all)
    for a, b in zip(state, s_all):
        assert_same(a, b)


@pytest.mark.parametrize("name", RECURRENT_CORES)
def test_reset_restarts_the_sample_and_cuts_the_gradient(name):
    core = small_core(name)
    x, state0 = differentiable_inputs(core)
    t0 = 4
    reset = torch.zeros(T, B, dtype=torch.bool)
    reset[t0, 1] = True
    y, _ = core(x, state0, reset)

    fresh, _ = core(x[t0:].detach(), core.initial_state(B), None)
    assert_same(y[t0:, 1], fresh[:, 1])

    grads = torch.autograd.grad(y[t0:, 1].sum(), (x, *state0), retain_graph=True, allow_unused=True)
    assert torch.count_nonzero(grads[0][:t0, 1]) == 0
    for g in grads[1:]:
        assert g is None or torch.count_nonzero(g[1]) == 0
    # Sample 0 did not reset: its late outputs still depend on its early inputs.
    (g0,) = torch.autograd.grad(y[-1, 0].sum(), x)
    assert torch.count_nonzero(g0[0, 0]) > 0


@pytest.mark.parametrize("name", RECURRENT_CORES)
def test_gradient_flows_through_the_whole_unroll_and_into_the_state(name):
    core = small_core(name)
    x, state0 = differentiable_inputs(core)
    y, _ = core(x, state0, None)
    grads = torch.autograd.grad(y[-1].sum(), (x, *state0))
    assert grads[0][0].abs().sum() > 0, "the last output must depend on the first input"
    assert all(g.abs().sum() > 0 for g in grads[1:]), "every part of the initial state must get a gradient"


@pytest.mark.parametrize("name", [n for n in RECURRENT_CORES if n != "lstm"])
def test_fast_weight_cores_run_the_backend_they_are_given(name, monkeypatch):
    monkeypatch.setenv("RFWP_BACKEND", "cpu")  # an explicit backend wins over the environment
    core = small_core(name)
    assert backends_ran(core) == set()
    core(inputs()[0], core.initial_state(B), None)
    assert backends_ran(core) == {"reference"}


def test_none_core_passes_input_through():
    core = make_core("none", input_size=D_IN)
    x, reset = inputs()
    y, state = core(x, (), reset)
    assert torch.equal(y, x) and state == ()


# Parameter counts of the RL configurations, docs/protocol.md §4.2.
RL_CORE_PARAMS = {
    "lstm": (dict(hidden_size=256, num_layers=1), 527_360),
    "linear_transformer": ({}, 428_544),
    "delta_net": ({}, 429_568),
    "rec_delta": ({}, 454_400),
    "delta_rnn": ({}, 496_128),
}
RL_FAST_WEIGHT = dict(hidden_size=128, num_layers=2, num_heads=4, head_dim=32, ff_size=512)


@pytest.mark.parametrize("name", sorted(RL_CORE_PARAMS))
def test_rl_core_parameter_counts(name):
    kwargs, expected = RL_CORE_PARAMS[name]
    core = make_core(name, input_size=257, **{**RL_FAST_WEIGHT, **kwargs})
    assert sum(p.numel() for p in core.parameters()) == expected


def test_atari_network_parameter_counts():
    net = PolicyNet((4, 84, 84), num_actions=18, core="delta_net", core_kwargs=RL_FAST_WEIGHT)
    assert sum(p.numel() for p in net.torso.parameters()) == 1_089_232
    heads = sum(p.numel() for m in (net.policy, net.baseline) for p in m.parameters())
    assert heads == (128 + 1) * 18 + (128 + 1)
    ff = PolicyNet((4, 84, 84), num_actions=6, core="none")
    assert ff.policy.in_features == 257  # the feed-forward agent's heads read [features, clipped reward]


def test_policy_net_forward_shapes_and_reward_clipping():
    torch.manual_seed(0)
    net = PolicyNet((4, 84, 84), num_actions=6, core="lstm", core_kwargs=dict(hidden_size=32, num_layers=1))
    obs = torch.randint(0, 256, (3, 2, 4, 84, 84), dtype=torch.uint8)
    done = torch.tensor([[True, False], [False, False], [False, True]])
    action = torch.zeros(3, 2, dtype=torch.long)
    out, state = net(obs, torch.full((3, 2), 5.0), action, done, net.initial_state(2))
    assert out["policy_logits"].shape == (3, 2, 6) and out["baseline"].shape == (3, 2)
    assert [tuple(s.shape) for s in state] == [(2, 1, 32), (2, 1, 32)]
    clipped, _ = net(obs, torch.full((3, 2), 1.0), action, done, net.initial_state(2))
    torch.testing.assert_close(out["baseline"], clipped["baseline"])


def test_unknown_core_lists_valid_names_and_close_matches():
    with pytest.raises(ValueError, match=r"unknown core 'delta_lstn'\. Did you mean 'delta_lstm'.*Valid cores: none, lstm"):
        make_core("delta_lstn", input_size=4)


def test_inconsistent_head_sizes_are_refused():
    with pytest.raises(ValueError, match=r"num_heads \* head_dim = 4 \* 16 = 64 must equal hidden_size 128"):
        make_core("delta_net", input_size=4, hidden_size=128, num_heads=4, head_dim=16)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        make_core("delta_net", input_size=4, hidden_size=130, num_heads=4)


def test_wrong_input_shapes_are_refused():
    core = small_core("delta_net")
    x, reset = inputs()
    with pytest.raises(ValueError, match=r"core input has shape \[7, 3, 6\]; expected \[T, B, 5\]"):
        core(torch.zeros(T, B, 6, dtype=torch.float64), core.initial_state(B), reset)
    with pytest.raises(ValueError, match="reset must be a bool tensor of shape"):
        core(x, core.initial_state(B), reset[:, :2])
    with pytest.raises(ValueError, match="state shapes .* do not match"):
        core(x, core.initial_state(B + 1), reset)
    with pytest.raises(ValueError, match="observation shape"):
        PolicyNet((84, 84), num_actions=4, core="none")


@pytest.mark.parametrize("layer_class, beta", [(LinearTransformerLayer, 1.0), (DeltaNetLayer, 0.5)])
def test_one_step_of_elu1_sum_normalised_layers_by_hand(layer_class, beta):
    """Identity slow projection, one head of size 2, zero fast weights: the input is the split [q | k | v (| β)].
    q = elu1(0, 0) = (1, 1) and k = elu1(1, −1) = (2, 1/e), each divided by its sum (+ 1e-5); one write of v
    (scaled by β = σ(0) = 1/2 in the Delta Net) read back with q gives y = (k·q) β v, about (1/2, −1) β."""
    per_head = 6 if layer_class is LinearTransformerLayer else 7
    layer = layer_class(hidden_size=per_head, num_heads=1, head_dim=2, backend="reference").double()
    with torch.no_grad():
        layer.slow.weight.copy_(torch.eye(per_head))
        layer.out.weight.zero_()
        layer.out.weight[:2] = torch.eye(2)
    a = torch.tensor([0.0, 0.0, 1.0, -1.0, 2.0, -4.0, 0.0][:per_head], dtype=torch.float64).view(1, 1, per_head)
    y, _ = layer(a, layer.initial_state(1, None, torch.float64), None)
    q = [1 / (2 + 1e-5), 1 / (2 + 1e-5)]
    k = [2 / (2 + math.exp(-1) + 1e-5), math.exp(-1) / (2 + math.exp(-1) + 1e-5)]
    kq = k[0] * q[0] + k[1] * q[1]
    expected = torch.tensor([kq * beta * 2.0, kq * beta * -4.0] + [0.0] * (per_head - 2), dtype=torch.float64)
    torch.testing.assert_close(y.view(-1), expected, rtol=1e-12, atol=1e-12)
