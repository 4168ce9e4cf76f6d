"""Autograd functions of the fused kernels, shared by the "cpu" and "cuda" extensions (and the emulated one).

Both extensions export, per rule, `<rule>_forward(*inputs, reset, poison, stream)`, which returns the rule's
outputs (as `models.ops.reference` returns them) followed by the per-step tensors its backward needs, and
`<rule>_backward(*saved_inputs, reset, *saved_results, *output_grads, poison, stream)`, which returns the
gradient of every input (csrc/binding.h; the stream is 0 for CPU tensors). The backward is one pass in reverse
time that starts from the final state and its gradient (docs/kernels.md §3) and returns gradients for every input,
including the initial state. Without autograd (the actors' single steps) the forward is called directly.
"""
from __future__ import annotations

import contextlib
import functools
from types import ModuleType
from typing import ClassVar, Iterator, Protocol, Sequence

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


class Rule(Protocol):
    """What the autograd glue reads of a rule's declaration (`models.ops.rules.Rule`, passed in by the caller:
    this package never imports the models): the extension functions are `<name>_forward` and `<name>_backward`,
    the rule returns the first `len(outputs)` results of the forward, and the backward reads the inputs
    `saved_inputs` and the results `saved_results` (indices)."""

    name: str
    outputs: tuple[str, ...]
    saved_inputs: tuple[int, ...]
    saved_results: tuple[int, ...]


class _Rule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: KernelBackend, rule: Rule, reset: Tensor | None, *inputs: Tensor):
        results = backend.launch(f"{rule.name}_forward", *inputs, reset)
        ctx.backend, ctx.rule = backend, rule
        ctx.save_for_backward(
            reset, *[inputs[i] for i in rule.saved_inputs], *[results[i] for i in rule.saved_results]
        )
        return tuple(results[: len(rule.outputs)])

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs: Tensor):
        reset, *saved = ctx.saved_tensors
        n_in = len(ctx.rule.saved_inputs)
        grads = ctx.backend.launch(
            f"{ctx.rule.name}_backward", *saved[:n_in], reset, *saved[n_in:], *[g.contiguous() for g in grad_outputs]
        )
        return (None, None, None, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[3:])))


class KernelBackend:
    """The update rules computed by one compiled extension: `run(rule, inputs, reset)` returns what the
    reference loop of `rule` returns (outputs and gradients). Inputs may be non-contiguous; they are never
    modified. The caller has checked the shapes (`models.ops`); the extension checks again only what keeps a
    wrong call from reading or writing out of bounds (element counts, dtypes, devices)."""

    DTYPES: ClassVar[dict[str, tuple[torch.dtype, ...]]] = {
        "cpu": (torch.float32, torch.float64),
        "cuda": (torch.float32,),
        "emulated": (torch.float32,),
    }
    _instances: ClassVar[dict[str, KernelBackend]] = {}

    def __init__(self, name: str, extension: ModuleType) -> None:
        self.name, self.extension = name, extension
        self.dtypes = self.DTYPES[name]

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

    def run(self, rule: Rule, inputs: Sequence[Tensor], reset: Tensor | None) -> tuple[Tensor, ...]:
        """Inputs of one promoted dtype are computed in it if the backend supports it; float16/bfloat16 (e.g.
        under autocast) are computed in float32 (the state and accumulation are float32 anyway) and the results
        cast back, as the reference would return them."""
        # One pass over the inputs: single-step inference spends more time here than in the kernel.
        first = inputs[0]
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
            outputs = self.launch(f"{rule.name}_forward", *inputs, reset)[: len(rule.outputs)]
        return tuple(outputs) if compute == dtype else tuple(o.to(dtype) for o in outputs)
