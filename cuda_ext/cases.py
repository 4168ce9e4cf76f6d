"""Random inputs for the update rules, shaped and distributed as the models produce them (normalised keys and
queries, β in (0, 1), non-zero initial states), and a helper that runs a rule forward and backward. Used by the
kernel tests (CPU and GPU) and by `bench/kernels.py`."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

RULE_NAMES = ("sum_rule", "delta_rule", "rdn_rule", "delta_rnn_rule", "delta_lstm_rule")
# Per rule: how many leading inputs are per-step [T, B, ...]; the indices of the initial states.
SEQUENCE_INPUTS = {"sum_rule": 3, "delta_rule": 4, "rdn_rule": 4, "delta_rnn_rule": 4, "delta_lstm_rule": 4}
STATE_INPUTS = {
    "sum_rule": (3,),
    "delta_rule": (4,),
    "rdn_rule": (8, 9),
    "delta_rnn_rule": (4, 5),
    "delta_lstm_rule": (4, 5, 6),
}
# Per rule: the indices of the returned final states (the first return is always y [T, B, H, d]).
STATE_OUTPUTS = {"sum_rule": (1,), "delta_rule": (1,), "rdn_rule": (1, 2), "delta_rnn_rule": (1, 2),
                 "delta_lstm_rule": (1, 2, 3)}


def rule_inputs(
    rule: str,
    T: int,
    B: int,
    H: int,
    d: int,
    *,
    value_size: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> list[Tensor]:
    """The inputs of `rule` (in its argument order, without `reset`) for T steps, B samples, H heads and head
    size d; `value_size` sets M != d for the sum and delta rules (as in the Delta MLP)."""
    g = torch.Generator().manual_seed(seed)
    M = value_size or d

    def n(*shape: int, scale: float = 1.0) -> Tensor:
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    def u(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    def normalised(*shape: int) -> Tensor:  # like elu1 + sum normalisation, or a softmax: positive, sums to 1
        x = u(*shape) + 0.1
        return x / x.sum(-1, keepdim=True)

    if rule == "sum_rule":
        xs = [normalised(T, B, H, d), normalised(T, B, H, d), n(T, B, H, M), n(B, H, d, M, scale=0.3)]
    elif rule == "delta_rule":
        xs = [normalised(T, B, H, d), normalised(T, B, H, d), n(T, B, H, M), u(T, B, H, 1), n(B, H, d, M, scale=0.3)]
    elif rule == "rdn_rule":
        r = d**-0.5  # the models' init of the slow recurrent weights
        xs = [n(T, B, H, d), n(T, B, H, d), n(T, B, H, d), n(T, B, H, 1), n(H, d, d, scale=r), n(H, d, d, scale=r),
              n(H, d, d, scale=r), n(H, d, scale=r), n(B, H, d, d, scale=0.3), n(B, H, d)]
    elif rule == "delta_rnn_rule":
        xs = [n(T, B, H, d), normalised(T, B, H, d), n(T, B, H, d), u(T, B, H, 1), n(B, H, d, d, scale=0.3),
              n(B, H, d)]
    elif rule == "delta_lstm_rule":
        xs = [n(T, B, H, 3, d), normalised(T, B, H, 3, d), n(T, B, H, 3, d), u(T, B, H, 3, 1),
              n(B, H, 3, d, d, scale=0.3), n(B, H, d), n(B, H, d)]
    else:
        raise ValueError(f"unknown rule {rule!r}; valid: {', '.join(RULE_NAMES)}")
    return [x.to(device=device, dtype=dtype) for x in xs]


def random_reset(T: int, B: int, p: float = 0.25, *, seed: int = 0, device: str | torch.device = "cpu") -> Tensor:
    """A [T, B] bool mask with each step reset with probability p (sample 0 always resets at step 0 when T > 1,
    so that the first-segment and mid-unroll cases both occur)."""
    g = torch.Generator().manual_seed(seed)
    reset = torch.rand(T, B, generator=g) < p
    if T > 1:
        reset[0, 0] = True
    return reset.to(device)


def forward_backward(
    fn: Callable[..., Sequence[Tensor]], inputs: Sequence[Tensor], reset: Tensor | None, *, seed: int = 0
) -> tuple[list[Tensor], list[Tensor]]:
    """Run `fn(*inputs, reset)` and backpropagate a random gradient into every output (the final states included).
    Returns the outputs and the gradients of every input. The random gradients depend only on `seed` and the
    output shapes, so two backends see the same ones."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    outs = fn(*xs, reset)
    g = torch.Generator().manual_seed(seed + 1)
    seeds = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outs]
    grads = torch.autograd.grad(outs, xs, seeds)
    return [o.detach() for o in outs], list(grads)


def check_against_reference(
    backend, rule: str, inputs: Sequence[Tensor], reset: Tensor | None, rtol: float, *, seed: int = 0
) -> None:
    """Assert that `backend` (an object with the rule functions) gives the float64 reference's outputs, final
    states and gradients of every input (initial states included) to `rtol` (relative to each tensor's largest
    entry), with every buffer its kernels write poisoned with NaN before the call."""
    from cuda_ext.functions import poisoned
    from models.ops import reference

    with poisoned():
        outs, grads = forward_backward(getattr(backend, rule), inputs, reset, seed=seed)
    ref_outs, ref_grads = forward_backward(getattr(reference, rule), [x.double() for x in inputs], reset, seed=seed)
    for i, (a, e) in enumerate(zip(outs + grads, ref_outs + ref_grads)):
        what = f"output {i}" if i < len(outs) else f"gradient of input {i - len(outs)}"
        assert a.dtype == inputs[0].dtype and a.shape == e.shape, f"{rule}: {what} has the wrong dtype or shape"
        err = relative_error(a, e)
        assert err <= rtol, f"{rule}: {what} differs from the reference by {err:.3g} (relative)"


FAST_WEIGHT_CORES = ("linear_transformer", "delta_net", "rec_delta", "delta_rnn", "delta_lstm", "delta_mlp")


def core_forward_backward(
    core_name: str, backend: str, *, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu",
    T: int = 6, B: int = 3, seed: int = 0,
) -> list[Tensor]:
    """A small two-layer core (models.make_core) run over T steps from a random state with resets: its output,
    final state, and the gradients of a loss on both into the input, the initial state and every parameter.
    The same seed gives the same parameters and data whatever the backend, dtype or device."""
    from models import make_core

    torch.manual_seed(seed)
    core = make_core(core_name, input_size=7, hidden_size=8, num_layers=2, num_heads=2, ff_size=16, backend=backend)
    core = core.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, 7, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    state = [torch.randn(s.shape, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
             for s in core.initial_state(B, torch.device(device))]
    y, new_state = core(x, tuple(state), random_reset(T, B, seed=seed, device=device))
    weights = torch.linspace(-1, 1, y.numel(), dtype=dtype, device=device).view_as(y)
    loss = (y * weights).sum() + sum((s * s).sum() for s in new_state)
    return [y, *new_state, *torch.autograd.grad(loss, [x, *state, *core.parameters()])]


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| (computed in float64; NaN if anything is not finite)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
