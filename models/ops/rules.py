"""The one declaration of every fast-weight update rule: its inputs (name, shape, how example values are drawn),
which of them are states, its outputs, and what its fused kernels return and keep for the backward.

Everything else reads this table: the dispatch and the shape check of `models.ops`, the autograd glue of the
fused kernels (`cuda_ext.functions` receives a `Rule`), the example inputs of the tests and of
`bench/kernels.py`. Adding a rule means its reference loop (`reference.py`), its kernels (`cuda_ext/csrc`) and an
entry in `RULES`. Nothing here imports `cuda_ext`: the kernels sit below the models and are handed a `Rule`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

# A size: a letter bound by the call (T steps, B samples, H heads, E key size, M value size, d head size of the
# recurrent rules, where E = M = d) or a fixed number.
Dim = Union[str, int]

# How `example_inputs` draws an input, as the models produce it: "normal" (pre-activations, values), "simplex"
# (positive, summing to 1 over the last dim: keys and queries after elu1 + sum normalisation or a softmax),
# "unit" (uniform in (0, 1): learning rates after the sigmoid), "fast" (0.3 x normal: a fast-weight matrix that
# earlier steps have written), "slow" (d^-1/2 x normal: slow weights at the models' initialisation).
EXAMPLES = ("normal", "simplex", "unit", "fast", "slow")


@dataclass(frozen=True)
class Arg:
    name: str
    shape: tuple[Dim, ...]
    example: str = "normal"

    def __post_init__(self) -> None:
        assert self.example in EXAMPLES, f"{self.name}: example must be one of {EXAMPLES}"


@dataclass(frozen=True)
class Rule:
    """An update rule `outputs = name(*inputs, reset)`, `reset [T, B]` bool or None after the inputs.

    `states` pairs each initial-state input with the output that carries its final value; `y` is the shape of
    the first output. `kernel_results` names what the fused forward returns (the outputs, then the per-step
    tensors its backward reads) and `kernel_saves` what the fused backward reads, inputs then results, in the
    argument order of `cuda_ext/csrc/binding.h`.
    """

    name: str
    inputs: tuple[Arg, ...]
    y: tuple[Dim, ...]
    states: tuple[tuple[str, str], ...]
    kernel_results: tuple[str, ...]
    kernel_saves: tuple[str, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.inputs)

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("y", *(out for _, out in self.states))

    @property
    def n_per_step(self) -> int:
        """How many leading inputs are per-step [T, B, ...] (they come first, then slow weights and states)."""
        return sum(a.shape[0] == "T" for a in self.inputs)

    @property
    def state_inputs(self) -> tuple[int, ...]:
        """Indices of the initial-state inputs; the final states are outputs 1, 2, ... in the same order."""
        return tuple(self.input_names.index(name) for name, _ in self.states)

    @property
    def saved_inputs(self) -> tuple[int, ...]:
        return tuple(i for i, name in enumerate(self.input_names) if name in self.kernel_saves)

    @property
    def saved_results(self) -> tuple[int, ...]:
        return tuple(i for i, name in enumerate(self.kernel_results) if name in self.kernel_saves)

    def check_shapes(self, inputs: tuple[Tensor, ...], reset: Tensor | None) -> dict[str, int]:
        """Check every input (and reset [T, B]) against the declared shapes, binding each letter at its first
        use; returns the sizes. Raises ValueError naming the first argument that does not fit."""
        sizes: dict[str, int] = {}
        for arg, t in zip(self.inputs, inputs):
            _bind(arg.name, t, arg.shape, sizes)
        if sizes["T"] == 0:
            raise ValueError(f"{self.name}: at least one time step is needed (got T = 0)")
        if reset is not None:
            _bind("reset", reset, ("T", "B"), sizes)
        return sizes


def _bind(name: str, t: Tensor, shape: tuple[Dim, ...], sizes: dict[str, int]) -> None:
    fits = t.dim() == len(shape)
    if fits:
        for dim, n in zip(shape, t.shape):
            want = sizes.setdefault(dim, n) if isinstance(dim, str) else dim
            fits &= want == n
    if not fits:
        want = ", ".join(str(sizes.get(dim, dim)) for dim in shape)
        raise ValueError(f"{name} has shape {list(t.shape)}; expected [{want}]")


_STEP = ("T", "B", "H")
_LINEAR = (
    Arg("q", (*_STEP, "E"), "simplex"),
    Arg("k", (*_STEP, "E"), "simplex"),
    Arg("v", (*_STEP, "M")),
)
_RECURRENT = (
    Arg("z", (*_STEP, "d")),
    Arg("kr", (*_STEP, "d"), "simplex"),
    Arg("vr", (*_STEP, "d")),
    Arg("br", (*_STEP, 1), "unit"),
    Arg("R0", ("B", "H", "d", "d"), "fast"),
    Arg("h0", ("B", "H", "d")),
)

RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule(
            "sum_rule",
            inputs=(*_LINEAR, Arg("W0", ("B", "H", "E", "M"), "fast")),
            y=(*_STEP, "M"),
            states=(("W0", "W"),),
            kernel_results=("y", "W"),
            kernel_saves=("q", "k", "v", "W0", "W"),
        ),
        Rule(
            "delta_rule",
            inputs=(*_LINEAR, Arg("beta", (*_STEP, 1), "unit"), Arg("W0", ("B", "H", "E", "M"), "fast")),
            y=(*_STEP, "M"),
            states=(("W0", "W"),),
            kernel_results=("y", "W", "vbar"),
            kernel_saves=("q", "k", "v", "beta", "W0", "W", "vbar"),
        ),
        Rule(
            "rdn_rule",
            inputs=(
                Arg("qx", (*_STEP, "d")),
                Arg("kx", (*_STEP, "d")),
                Arg("vx", (*_STEP, "d")),
                Arg("bx", (*_STEP, 1)),
                Arg("Rq", ("H", "d", "d"), "slow"),
                Arg("Rk", ("H", "d", "d"), "slow"),
                Arg("Rv", ("H", "d", "d"), "slow"),
                Arg("rb", ("H", "d"), "slow"),
                Arg("W0", ("B", "H", "d", "d"), "fast"),
                Arg("h0", ("B", "H", "d")),
            ),
            y=(*_STEP, "d"),
            states=(("W0", "W"), ("h0", "h")),
            # q, k, v, beta after their activations
            kernel_results=("y", "W", "h", "q", "k", "v", "vbar", "beta"),
            kernel_saves=("Rq", "Rk", "Rv", "rb", "W0", "h0", "y", "W", "q", "k", "v", "vbar", "beta"),
        ),
        Rule(
            "delta_rnn_rule",
            inputs=_RECURRENT,
            y=(*_STEP, "d"),
            states=(("R0", "R"), ("h0", "h")),
            kernel_results=("y", "R", "h", "vbar"),
            kernel_saves=("kr", "vr", "br", "R0", "h0", "y", "R", "vbar"),
        ),
        Rule(
            "delta_lstm_rule",
            # gates g = (i, u, o) on dim 3
            inputs=(
                Arg("z", (*_STEP, 3, "d")),
                Arg("kr", (*_STEP, 3, "d"), "simplex"),
                Arg("vr", (*_STEP, 3, "d")),
                Arg("br", (*_STEP, 3, 1), "unit"),
                Arg("R0", ("B", "H", 3, "d", "d"), "fast"),
                Arg("h0", ("B", "H", "d")),
                Arg("c0", ("B", "H", "d")),
            ),
            y=(*_STEP, "d"),
            states=(("R0", "R"), ("h0", "h"), ("c0", "c")),
            # vbar of each gate, the gates (i, u, o) and the cell states of every step
            kernel_results=("y", "R", "h", "c", "vbar", "gates", "cs"),
            kernel_saves=("kr", "vr", "br", "R0", "h0", "c0", "y", "R", "vbar", "gates", "cs"),
        ),
    )
}
RULE_NAMES = tuple(RULES)


def example_inputs(
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
    """Random inputs of `rule` (in its argument order, without `reset`) for T steps, B samples, H heads and head
    size d, drawn as `EXAMPLES` describes (in float64, then cast); `value_size` sets M != d for the sum and
    delta rules (as in the Delta MLP)."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; valid: {', '.join(RULE_NAMES)}")
    g = torch.Generator().manual_seed(seed)
    sizes = {"T": T, "B": B, "H": H, "E": d, "M": value_size or d, "d": d}
    xs = []
    for arg in RULES[rule].inputs:
        shape = [sizes[dim] if isinstance(dim, str) else dim for dim in arg.shape]
        if arg.example in ("unit", "simplex"):
            x = torch.rand(shape, generator=g, dtype=torch.float64)
            if arg.example == "simplex":
                x = (x + 0.1) / (x + 0.1).sum(-1, keepdim=True)
        else:
            x = torch.randn(shape, generator=g, dtype=torch.float64)
            x = x * {"normal": 1.0, "fast": 0.3, "slow": d**-0.5}[arg.example]
        xs.append(x.to(device=device, dtype=dtype))
    return xs


def example_reset(T: int, B: int, p: float = 0.25, *, seed: int = 0, device: str | torch.device = "cpu") -> Tensor:
    """A [T, B] bool mask with each step reset with probability p (sample 0 always resets at step 0 when T > 1,
    so that the first-segment and mid-unroll cases both occur)."""
    g = torch.Generator().manual_seed(seed)
    reset = torch.rand(T, B, generator=g) < p
    if T > 1:
        reset[0, 0] = True
    return reset.to(device)
