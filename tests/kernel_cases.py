"""Helpers of the kernel tests (CPU and GPU): run a rule forward and backward, compare a backend with the float64
reference, run a small core. The random inputs themselves are drawn from the rules' declaration
(`models.ops.rules.example_inputs`)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

import cuda_ext
from cuda_ext.functions import poisoned
from models import make_core
from models.ops import reference
from models.ops.rules import RULES, example_reset

FAST_WEIGHT_CORES = ("linear_transformer", "delta_net", "rec_delta", "delta_rnn", "delta_lstm", "delta_mlp")


class KernelRules:
    """The rules of compiled backend `name` called straight on its kernels (no shape check of `models.ops`):
    for the emulated CUDA kernels, which `models.ops` does not offer, and to test what the kernels refuse.
    `getattr(KernelRules(name), rule)(*inputs, reset=None)` as `models.ops.Rules`."""

    def __init__(self, name: str) -> None:
        self.kernels = cuda_ext.load_backend(name)

    def __getattr__(self, rule: str) -> Callable[..., tuple[Tensor, ...]]:
        if rule not in RULES:
            raise AttributeError(rule)
        spec, n = RULES[rule], len(RULES[rule].inputs)
        return lambda *args: self.kernels.run(spec, args[:n], args[n] if len(args) > n else None)


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
    with poisoned():
        outs, grads = forward_backward(getattr(backend, rule), inputs, reset, seed=seed)
    ref_outs, ref_grads = forward_backward(getattr(reference, rule), [x.double() for x in inputs], reset, seed=seed)
    for i, (a, e) in enumerate(zip(outs + grads, ref_outs + ref_grads)):
        what = f"output {i}" if i < len(outs) else f"gradient of input {i - len(outs)}"
        assert a.dtype == inputs[0].dtype and a.shape == e.shape, f"{rule}: {what} has the wrong dtype or shape"
        err = relative_error(a, e)
        assert err <= rtol, f"{rule}: {what} differs from the reference by {err:.3g} (relative)"


def core_forward_backward(
    core_name: str, backend: str, *, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu",
    T: int = 6, B: int = 3, seed: int = 0,
) -> list[Tensor]:
    """A small two-layer core (models.make_core) run over T steps from a random state with resets: its output,
    final state, and the gradients of a loss on both into the input, the initial state and every parameter.
    The same seed gives the same parameters and data whatever the backend, dtype or device."""
    torch.manual_seed(seed)
    core = make_core(core_name, input_size=7, hidden_size=8, num_layers=2, num_heads=2, ff_size=16, backend=backend)
    core = core.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, 7, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    state = [torch.randn(s.shape, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
             for s in core.initial_state(B, torch.device(device))]
    y, new_state = core(x, tuple(state), example_reset(T, B, seed=seed, device=device))
    weights = torch.linspace(-1, 1, y.numel(), dtype=dtype, device=device).view_as(y)
    loss = (y * weights).sum() + sum((s * s).sum() for s in new_state)
    return [y, *new_state, *torch.autograd.grad(loss, [x, *state, *core.parameters()])]


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| (computed in float64; NaN if anything is not finite)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
