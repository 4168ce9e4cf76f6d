"""Autograd functions of the fused kernels, shared by the "cpu" and "cuda" extensions (and the emulated one).

Both extensions export, per rule, `<rule>_forward(*inputs, reset, poison, stream)`, which returns the rule's
outputs (as `models.ops.reference` returns them) followed by the per-step tensors its backward needs, and
`<rule>_backward(*saved_inputs, reset, *saved_results, *output_grads, poison, stream)`, which returns the
gradient of every input (csrc/binding.h; the stream is 0 for CPU tensors). The backward is one pass in reverse
time that starts from the final state and its gradient (models.md §5) and returns gradients for every input,
including the initial state. Without autograd (the actors' single steps) the forward is called directly.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar, Iterator, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_poison = False


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Have the extensions fill every tensor they return (and their scratch) with NaN before the kernels run,
    so that a test sees any element a kernel leaves unwritten."""
    global _poison
    old, _poison = _poison, True
    try:
        yield
    finally:
        _poison = old


@dataclass(frozen=True)
class RuleSpec:
    """How many of a forward's results the rule returns, and which inputs and results its backward reads."""

    n_outputs: int
    saved_inputs: tuple[int, ...]
    saved_results: tuple[int, ...]


SPECS: dict[str, RuleSpec] = {
    # results: y, W
    "sum_rule": RuleSpec(2, saved_inputs=(0, 1, 2, 3), saved_results=(1,)),
    # results: y, W, vbar
    "delta_rule": RuleSpec(2, saved_inputs=(0, 1, 2, 3, 4), saved_results=(1, 2)),
    # results: y, W, h, q, k, v, vbar, beta (after the activations)
    "rdn_rule": RuleSpec(3, saved_inputs=(4, 5, 6, 7, 8, 9), saved_results=(0, 1, 3, 4, 5, 6, 7)),
    # results: y, R, h, vbar
    "delta_rnn_rule": RuleSpec(3, saved_inputs=(1, 2, 3, 4, 5), saved_results=(0, 1, 3)),
    # results: y, R, h, c, vbar (each gate), the gates (i, u, o), the cell states
    "delta_lstm_rule": RuleSpec(4, saved_inputs=(1, 2, 3, 4, 5, 6), saved_results=(0, 1, 4, 5, 6)),
}


class _Rule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: KernelBackend, rule: str, reset: Tensor | None, *inputs: Tensor):
        spec = SPECS[rule]
        results = backend.launch(f"{rule}_forward", *inputs, reset)
        ctx.backend, ctx.rule = backend, rule
        ctx.save_for_backward(
            reset, *[inputs[i] for i in spec.saved_inputs], *[results[i] for i in spec.saved_results]
        )
        return tuple(results[: spec.n_outputs])

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs: Tensor):
        reset, *saved = ctx.saved_tensors
        n_in = len(SPECS[ctx.rule].saved_inputs)
        grads = ctx.backend.launch(
            f"{ctx.rule}_backward", *saved[:n_in], reset, *saved[n_in:], *[g.contiguous() for g in grad_outputs]
        )
        return (None, None, None, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[3:])))


class KernelBackend:
    """The rule functions of `models.ops.reference` (same signatures, returns and gradients), computed by a
    compiled extension. Inputs may be non-contiguous; they are never modified."""

    DEVICE: ClassVar[dict[str, str]] = {"cpu": "cpu", "cuda": "cuda", "emulated": "cpu"}
    DTYPES: ClassVar[dict[str, tuple[torch.dtype, ...]]] = {
        "cpu": (torch.float32, torch.float64),
        "cuda": (torch.float32,),
        "emulated": (torch.float32,),
    }
    _instances: ClassVar[dict[str, KernelBackend]] = {}

    def __init__(self, name: str, extension: ModuleType) -> None:
        self.name, self.extension = name, extension
        self.device_type, self.dtypes = self.DEVICE[name], self.DTYPES[name]

    @classmethod
    def get(cls, name: str, extension: ModuleType) -> KernelBackend:
        if name not in cls._instances:
            cls._instances[name] = cls(name, extension)
        return cls._instances[name]

    def __repr__(self) -> str:
        return f"KernelBackend({self.name!r})"

    def launch(self, function: str, *args: Tensor | None) -> list[Tensor]:
        """Call an extension function; CUDA kernels run on the current stream of the tensors' device."""
        fn = getattr(self.extension, function)
        device = args[0].device
        if device.type != "cuda":
            return fn(*args, _poison, 0)
        with torch.cuda.device(device):
            return fn(*args, _poison, torch.cuda.current_stream(device).cuda_stream)

    def _run(self, rule: str, inputs: Sequence[Tensor], reset: Tensor | None) -> tuple[Tensor, ...]:
        """Inputs of one promoted dtype are computed in it if the backend supports it; float16/bfloat16 (e.g.
        under autocast) are computed in float32 (the state and accumulation are float32 anyway) and the results
        cast back, as the reference would return them. The extension checks that all tensors share a device."""
        first = inputs[0]
        if first.shape[0] == 0:
            raise ValueError(f"{rule}: at least one time step is needed (got T = 0)")
        if first.device.type != self.device_type:
            raise ValueError(
                f"the {self.name!r} backend runs on {self.device_type} tensors; got tensors on {first.device}"
            )
        # One pass over the inputs: single-step inference spends more time here than in the kernel.
        dtype, mixed, strided, needs_grad = first.dtype, False, False, False
        for x in inputs:
            mixed |= x.dtype != dtype
            strided |= not x.is_contiguous()
            needs_grad |= x.requires_grad
        if mixed:
            dtype = functools.reduce(torch.promote_types, (x.dtype for x in inputs))
        compute = dtype if dtype in self.dtypes else torch.float32 if dtype in _LOW_PRECISION else None
        if compute is None:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in (*self.dtypes, *_LOW_PRECISION))
            raise TypeError(
                f"the {self.name!r} backend takes {allowed} inputs; got {str(dtype).removeprefix('torch.')} "
                "(use backend='reference' for other dtypes)"
            )
        if mixed or strided or compute != dtype:
            inputs = [x.to(compute).contiguous() for x in inputs]
        if reset is not None:
            reset = (reset if reset.dtype == torch.bool else reset.bool()).contiguous()
        if needs_grad and torch.is_grad_enabled():
            outputs = _Rule.apply(self, rule, reset, *inputs)
        else:  # no graph to record: skip the autograd Function
            outputs = self.launch(f"{rule}_forward", *inputs, reset)[: SPECS[rule].n_outputs]
        return tuple(outputs) if compute == dtype else tuple(o.to(dtype) for o in outputs)

    # The rules: signatures, shapes and returns of models.ops.reference (see docs/api.md).
    def sum_rule(self, q: Tensor, k: Tensor, v: Tensor, W0: Tensor, reset: Tensor | None = None) -> tuple[Tensor, ...]:
        """y [T,B,H,M], W [B,H,E,M] = sum_rule(q, k [T,B,H,E], v [T,B,H,M], W0 [B,H,E,M], reset [T,B])."""
        return self._run("sum_rule", (q, k, v, W0), reset)

    def delta_rule(
        self, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, W0: Tensor, reset: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        """y, W = delta_rule(q, k [T,B,H,E], v [T,B,H,M], beta [T,B,H,1], W0 [B,H,E,M], reset [T,B])."""
        return self._run("delta_rule", (q, k, v, beta, W0), reset)

    def rdn_rule(
        self, qx: Tensor, kx: Tensor, vx: Tensor, bx: Tensor, Rq: Tensor, Rk: Tensor, Rv: Tensor, rb: Tensor,
        W0: Tensor, h0: Tensor, reset: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        """y, W, h = rdn_rule(qx, kx, vx [T,B,H,d], bx [T,B,H,1], Rq, Rk, Rv [H,d,d], rb [H,d], W0 [B,H,d,d],
        h0 [B,H,d], reset [T,B])."""
        return self._run("rdn_rule", (qx, kx, vx, bx, Rq, Rk, Rv, rb, W0, h0), reset)

    def delta_rnn_rule(
        self, z: Tensor, kr: Tensor, vr: Tensor, br: Tensor, R0: Tensor, h0: Tensor, reset: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        """y, R, h = delta_rnn_rule(z, kr, vr [T,B,H,d], br [T,B,H,1], R0 [B,H,d,d], h0 [B,H,d], reset [T,B])."""
        return self._run("delta_rnn_rule", (z, kr, vr, br, R0, h0), reset)

    def delta_lstm_rule(
        self, z: Tensor, kr: Tensor, vr: Tensor, br: Tensor, R0: Tensor, h0: Tensor, c0: Tensor,
        reset: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        """y, R, h, c = delta_lstm_rule(z, kr, vr [T,B,H,3,d], br [T,B,H,3,1], R0 [B,H,3,d,d], h0, c0 [B,H,d],
        reset [T,B])."""
        return self._run("delta_lstm_rule", (z, kr, vr, br, R0, h0, c0), reset)
