"""The reference update rules: hand-worked cases, float64 gradcheck (including the initial state), resets and
the shape checks of the dispatch layer."""
import copy
import math

import pytest
import torch

from models import ops
from models.ops.rules import RULES, example_inputs

REFERENCE = ops.Rules("reference")


def rule_inputs(rule: str, T=4, seed=0):
    """Inputs shaped as the models produce them (normalised keys, β in (0, 1)) and a non-zero initial state."""
    return example_inputs(rule, T, 2, 2, 3, seed=seed)


def run(rule, inputs, reset=None):
    return getattr(REFERENCE, rule)(*inputs, reset)


@pytest.mark.parametrize("rule", ops.RULE_NAMES)
@pytest.mark.parametrize("with_reset", [False, True])
def test_gradcheck_every_input_and_initial_state(rule, with_reset):
    inputs = [x.requires_grad_() for x in rule_inputs(rule)]
    reset = torch.tensor([[False, False], [False, True], [True, False], [False, False]]) if with_reset else None

    def f(*xs):
        outs = run(rule, xs, reset)
        return tuple(outs)  # outputs and every part of the final state

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)


def test_sum_rule_by_hand():
    # One head, E = M = 2, W0 = 0. Writes k1=e0 -> v1=(1,2), then k2=e1 -> v2=(3,4); reading with q = e0 then
    # q = (1, 1) gives v1 and then v1 + v2.
    q = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).view(2, 1, 1, 2)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 1, 1, 2)
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(2, 1, 1, 2)
    y, W = run("sum_rule", [q, k, v, torch.zeros(1, 1, 2, 2)])
    assert torch.equal(y.view(2, 2), torch.tensor([[1.0, 2.0], [4.0, 6.0]]))
    assert torch.equal(W.view(2, 2), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_delta_rule_retrieves_last_value_with_unit_learning_rate():
    # With β = 1 and a one-hot key, the write replaces what was stored under that key: reading it back gives
    # the last value written, not the sum (which the sum rule would return).
    e0 = torch.tensor([1.0, 0.0, 0.0])
    k = e0.expand(3, 3).reshape(3, 1, 1, 3)
    v = torch.tensor([[1.0, 2.0], [5.0, -1.0], [7.0, 3.0]]).view(3, 1, 1, 2)
    beta = torch.ones(3, 1, 1, 1)
    y, W = run("delta_rule", [k, k, v, beta, torch.zeros(1, 1, 3, 2)])
    assert torch.equal(y.view(3, 2), v.view(3, 2))
    assert torch.equal(W[0, 0, 0], torch.tensor([7.0, 3.0]))
    assert torch.equal(W[0, 0, 1:], torch.zeros(2, 2))


def test_delta_rule_partial_learning_rate_by_hand():
    # β = 0.5, key e1, stored value (2, 0): v̄ = (2, 0); u = 0.5 ((4, 2) − (2, 0)) = (1, 1); new row = (3, 1).
    W0 = torch.tensor([[0.0, 0.0], [2.0, 0.0]]).view(1, 1, 2, 2)
    k = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    q = torch.tensor([0.5, 0.5]).view(1, 1, 1, 2)
    y, W = run("delta_rule", [q, k, torch.tensor([4.0, 2.0]).view(1, 1, 1, 2), torch.full((1, 1, 1, 1), 0.5), W0])
    assert torch.equal(W.view(2, 2), torch.tensor([[0.0, 0.0], [3.0, 1.0]]))
    assert torch.equal(y.view(2), torch.tensor([1.5, 0.5]))


@pytest.mark.parametrize("rule", ops.RULE_NAMES)
def test_reset_equals_fresh_run_and_blocks_gradient(rule):
    T, t_reset = 6, 3
    inputs = [x.requires_grad_() for x in rule_inputs(rule, T=T)]
    reset = torch.zeros(T, 2, dtype=torch.bool)
    reset[t_reset, 0] = True
    outs = run(rule, inputs, reset)
    # A fresh run on the tail from the zero state gives sample 0's outputs after the reset.
    n_seq, states = RULES[rule].n_per_step, RULES[rule].state_inputs
    tail = [x[t_reset:] if i < n_seq else torch.zeros_like(x) if i in states else x for i, x in enumerate(inputs)]
    fresh = run(rule, tail)
    torch.testing.assert_close(outs[0][t_reset:, 0], fresh[0][:, 0], rtol=0, atol=1e-12)
    # No gradient from an output after the reset into any per-step input before it, or into the initial state.
    grads = torch.autograd.grad(outs[0][t_reset:, 0].sum(), inputs, allow_unused=True, retain_graph=True)
    for i, (x, g) in enumerate(zip(inputs, grads)):
        if i in states:
            assert g is None or torch.count_nonzero(g[0]) == 0
        elif i < n_seq:
            assert g is None or torch.count_nonzero(g[:t_reset, 0]) == 0
    # ... while the other sample, which did not reset, does depend on its early inputs.
    grads = torch.autograd.grad(outs[0][-1, 1].sum(), inputs[1])
    assert torch.count_nonzero(grads[0][0, 1]) > 0


def test_inputs_are_not_modified():
    inputs = rule_inputs("delta_rule")
    copies = [x.clone() for x in inputs]
    run("delta_rule", inputs)
    assert all(torch.equal(a, b) for a, b in zip(inputs, copies))


def test_shape_errors_name_the_argument():
    q, k, v, beta, W0 = rule_inputs("delta_rule")
    with pytest.raises(ValueError, match=r"beta has shape \[4, 2, 2, 3\]; expected \[4, 2, 2, 1\]"):
        REFERENCE.delta_rule(q, k, v, v, W0)
    with pytest.raises(ValueError, match=r"W0 has shape \[1, 2, 3, 3\]; expected \[2, 2, 3, 3\]"):
        REFERENCE.delta_rule(q, k, v, beta, W0[:1])
    with pytest.raises(ValueError, match=r"reset has shape \[3, 2\]; expected \[4, 2\]"):
        REFERENCE.delta_rule(q, k, v, beta, W0, torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"q has shape \[4, 2, 6\]; expected \[T, B, H, E\]"):
        REFERENCE.delta_rule(q.flatten(2), k, v, beta, W0)
    z, kr, vr, br, R0, h0, c0 = rule_inputs("delta_lstm_rule")
    with pytest.raises(ValueError, match=r"R0 has shape \[2, 2, 2, 3, 3\]; expected \[2, 2, 3, 3, 3\]"):
        REFERENCE.delta_lstm_rule(z, kr, vr, br, R0[:, :, :2], h0, c0)
    with pytest.raises(ValueError, match="at least one time step"):
        REFERENCE.delta_rule(q[:0], k[:0], v[:0], beta[:0], W0)


@pytest.mark.parametrize("rule", ops.RULE_NAMES)
def test_reference_returns_what_the_declaration_says(rule):
    # y of the declared shape, then one final state per initial state, each shaped like it; a wrong entry in
    # rules.RULES (which the kernels' autograd glue and the dispatch read) fails here.
    spec = RULES[rule]
    inputs = example_inputs(rule, 5, 3, 2, 4, value_size=6 if rule in ("sum_rule", "delta_rule") else None)
    sizes = spec.check_shapes(tuple(inputs), None)
    outs = run(rule, inputs)
    assert len(outs) == len(spec.outputs) == 1 + len(spec.states)
    assert list(outs[0].shape) == [sizes[dim] if isinstance(dim, str) else dim for dim in spec.y]
    for out, i in zip(outs[1:], spec.state_inputs):
        assert out.shape == inputs[i].shape
    assert set(spec.kernel_saves) <= set(spec.input_names) | set(spec.kernel_results)
    assert spec.kernel_results[: len(spec.outputs)] == spec.outputs


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'gpu'.*reference"):
        ops.Rules("gpu")


def test_a_layer_chooses_its_backend_once_per_device_and_records_it(monkeypatch):
    rules = ops.Rules("auto")
    inputs = rule_inputs("sum_rule")
    monkeypatch.setenv("RFWP_BACKEND", "reference")
    expected = rules.sum_rule(*inputs)
    assert rules.ran == {"cpu": "reference"}
    # Chosen at the first call: a later change of the environment does not reach this layer ...
    monkeypatch.setenv("RFWP_BACKEND", "no-such-backend")
    assert all(torch.equal(a, e) for a, e in zip(rules.sum_rule(*inputs), expected))
    assert rules.ran == {"cpu": "reference"}
    # ... and a copy chooses again.
    with pytest.raises(ValueError, match="unknown backend 'no-such-backend'"):
        copy.deepcopy(rules).sum_rule(*inputs)


# --- One forward step of the recurrent rules, worked out by hand ------------------------------------------------
# Shared numbers: s (or q) = softmax((ln 3, 0)) = (3/4, 1/4); key (1/4, 3/4); value (2, 1); β = 3/4;
# W0 = [[1, 0], [0, 2]] (key-major: row e is what key e_e retrieves).
# Delta write: v̄ = W0ᵀk = 1/4 (1, 0) + 3/4 (0, 2) = (1/4, 3/2); u = 3/4 ((2, 1) − v̄) = (21/16, −3/8);
# W1 = W0 + k uᵀ = [[1 + 21/64, −3/32], [63/64, 2 − 9/32]] = [[85/64, −3/32], [63/64, 55/32]].
# Read with (3/4, 1/4): W1ᵀ(3/4, 1/4) = (3/4·85/64 + 1/4·63/64, −3/4·3/32 + 1/4·55/32) = (159/128, 23/64).
LN3 = math.log(3.0)
W1_BY_HAND = [[85 / 64, -3 / 32], [63 / 64, 55 / 32]]
READ_BY_HAND = [159 / 128, 23 / 64]


def t(values, *shape):
    return torch.tensor(values, dtype=torch.float64).view(*shape)


def test_rdn_step_by_hand():
    # a = tanh(h0) = (1/2, 0), so a R = R[0] / 2 (R stored [in][out]) and a·r_b = r_b[0] / 2.
    # q = softmax((0, 0) + (ln 3, 0)) = (3/4, 1/4); k = softmax((0, 0) + (0, ln 3)) = (1/4, 3/4);
    # v = (1, 2) + (1, −1) = (2, 1); β = σ(0 + ln 3) = 3/4: the shared numbers above.
    h0 = t([math.atanh(0.5), 0.0], 1, 1, 2)
    Rq, Rk, Rv = t([[2 * LN3, 0.0], [9.0, 9.0]], 1, 2, 2), t([[0.0, 2 * LN3], [9.0, 9.0]], 1, 2, 2), \
        t([[2.0, -2.0], [9.0, 9.0]], 1, 2, 2)  # row 1 meets a[1] = 0: it must not matter
    rb = t([2 * LN3, 9.0], 1, 2)
    qx, kx, vx = t([0.0, 0.0], 1, 1, 1, 2), t([0.0, 0.0], 1, 1, 1, 2), t([1.0, 2.0], 1, 1, 1, 2)
    bx = t([0.0], 1, 1, 1, 1)
    y, W, h = run("rdn_rule", [qx, kx, vx, bx, Rq, Rk, Rv, rb, t([[1.0, 0.0], [0.0, 2.0]], 1, 1, 2, 2), h0])
    torch.testing.assert_close(W.view(2, 2), t(W1_BY_HAND, 2, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y.view(2), t(READ_BY_HAND, 2), rtol=1e-12, atol=1e-12)
    assert torch.equal(h, y[-1])


def test_delta_rnn_step_by_hand():
    # s = softmax(h0) = (3/4, 1/4); R gets the shared write, then y = R1ᵀs + z = (159/128, 23/64) + (1, −1).
    z = t([1.0, -1.0], 1, 1, 1, 2)
    kr, vr, br = t([0.25, 0.75], 1, 1, 1, 2), t([2.0, 1.0], 1, 1, 1, 2), t([0.75], 1, 1, 1, 1)
    y, R, h = run("delta_rnn_rule", [z, kr, vr, br, t([[1.0, 0.0], [0.0, 2.0]], 1, 1, 2, 2), t([LN3, 0.0], 1, 1, 2)])
    torch.testing.assert_close(R.view(2, 2), t(W1_BY_HAND, 2, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y.view(2), t([159 / 128 + 1, 23 / 64 - 1], 2), rtol=1e-12, atol=1e-12)


def test_delta_lstm_step_by_hand():
    # s = softmax(h0) = (3/4, 1/4); every gate's key is (1/4, 3/4), so k·s = 3/8.
    # i: R0 = 0, β = 1, value (0, 0) -> R1 = 0; pre = z_i = (0, ln 3) -> i = (1/2, 3/4).
    # u: the shared write (R0 = [[1, 0], [0, 2]], value (2, 1), β = 3/4) -> R1ᵀs = (159/128, 23/64);
    #    z_u = (4 − 159/128, −1 − 23/64) -> u = (4, −1) (no squashing in version 4).
    # o: R0 = 0, β = 1, value (8/3 ln 3, 0) -> R1 = k vᵀ, R1ᵀs = 3/8 v = (ln 3, 0); z_o = 0 -> o = (3/4, 1/2).
    # c = i u + (1 − i) c0 with c0 = (2, 4): (2 + 1, −3/4 + 1) = (3, 1/4); y = o c = (9/4, 1/8).
    z = t([[0.0, LN3], [4 - 159 / 128, -1 - 23 / 64], [0.0, 0.0]], 1, 1, 1, 3, 2)
    kr = t([[0.25, 0.75]] * 3, 1, 1, 1, 3, 2)
    vr = t([[0.0, 0.0], [2.0, 1.0], [8 / 3 * LN3, 0.0]], 1, 1, 1, 3, 2)
    br = t([1.0, 0.75, 1.0], 1, 1, 1, 3, 1)
    R0 = t([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]]], 1, 1, 3, 2, 2)
    y, R, h, c = run("delta_lstm_rule", [z, kr, vr, br, R0, t([LN3, 0.0], 1, 1, 2), t([2.0, 4.0], 1, 1, 2)])
    torch.testing.assert_close(R[0, 0, 1], t(W1_BY_HAND, 2, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c.view(2), t([3.0, 0.25], 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y.view(2), t([9 / 4, 1 / 8], 2), rtol=1e-12, atol=1e-12)
