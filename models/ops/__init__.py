"""Fast-weight update rules with one signature and several backends.

A layer holds `Rules(backend)` and calls its rules (`rules.delta_rule(q, k, v, beta, W0, reset)`); the rules,
their shapes and what their kernels keep are declared once in `rules.py`. Backends: `"reference"`, the plain
PyTorch step loops of `reference.py` (any dtype, the test oracle); `"cpu"` and `"cuda"`, the fused kernels of
`cuda_ext/`; `"auto"` (the default), the fastest of these that can run on the tensors' device (see
`cuda_ext.auto_backend`). The environment variable `RFWP_BACKEND` replaces `"auto"` for the whole process (an
explicit backend still wins). A `Rules` decides what its backend means on a device type at its first call there,
keeps that choice for every later call and records it in `Rules.ran`; `backends_ran(model)` collects what a
model's layers ran. An explicit backend that cannot run raises `cuda_ext.BackendUnavailable` saying why.
"""
from __future__ import annotations

import os
from typing import Callable

from torch import Tensor, nn

from models.ops import reference
from models.ops.rules import RULE_NAMES, RULES, Rule

__all__ = ["BACKEND_NAMES", "RULE_NAMES", "Rules", "backend_label", "backends_ran", "check_backend", "resolve_backend"]

BACKEND_NAMES = ("auto", "reference", "cpu", "cuda")
_LABELS = {"reference": "reference loops", "cpu": "cpu kernels", "cuda": "cuda kernels"}

Runner = Callable[[Rule, tuple[Tensor, ...], "Tensor | None"], tuple[Tensor, ...]]


def check_backend(backend: str) -> None:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKEND_NAMES)}")


def resolve_backend(backend: str, device_type: str) -> str:
    """Name of the backend ("reference", "cpu" or "cuda") that runs the rules on `device_type` ("cpu"/"cuda")
    when `backend` is asked for. Resolving "auto" on CPU tensors does not build the C++ kernels (call
    `cuda_ext.ensure_built` first for that)."""
    if backend == "auto":
        backend = os.environ.get("RFWP_BACKEND", "auto")
    check_backend(backend)
    if backend == "auto":
        import cuda_ext

        return cuda_ext.auto_backend(device_type)
    return backend


def backend_label(name: str) -> str:
    """How a start line names a resolved backend: "cpu kernels", "cuda kernels" or "reference loops"."""
    return _LABELS[name]


def _run_reference(rule: Rule, inputs: tuple[Tensor, ...], reset: Tensor | None) -> tuple[Tensor, ...]:
    return getattr(reference, rule.name)(*inputs, reset)


class Rules:
    """The update rules of one layer on one backend. Signatures, shapes and returns are those of `reference`
    (`rules.RULES` declares them); the shapes are checked once per call, here."""

    def __init__(self, backend: str = "auto") -> None:
        check_backend(backend)
        self.backend = backend
        self.ran: dict[str, str] = {}  # device type -> the backend that runs there (recorded at its first call)
        self._runners: dict[str, Runner] = {}

    def __repr__(self) -> str:
        return f"Rules({self.backend!r}, ran={self.ran})"

    # A copy (deepcopy, pickle) chooses again where it runs: the kernels' extension modules cannot be copied.
    def __getstate__(self) -> dict:
        return {"backend": self.backend}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["backend"])

    def _runner(self, device_type: str) -> Runner:
        name = resolve_backend(self.backend, device_type)
        if name == "reference":
            runner = _run_reference
        else:
            import cuda_ext

            runner = cuda_ext.load_backend(name).run
        self.ran[device_type] = name
        return runner

    def run(self, rule: str, *inputs: Tensor, reset: Tensor | None = None) -> tuple[Tensor, ...]:
        """Rule `rule` (a name of `RULE_NAMES`) on `inputs` in its argument order."""
        spec = RULES[rule]
        spec.check_shapes(inputs, reset)
        device_type = inputs[0].device.type
        runner = self._runners.get(device_type)
        if runner is None:
            runner = self._runners[device_type] = self._runner(device_type)
        return runner(spec, inputs, reset)

    def sum_rule(self, q: Tensor, k: Tensor, v: Tensor, W0: Tensor, reset: Tensor | None = None):
        """y, W; see reference.sum_rule."""
        return self.run("sum_rule", q, k, v, W0, reset=reset)

    def delta_rule(self, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, W0: Tensor, reset: Tensor | None = None):
        """y, W; see reference.delta_rule."""
        return self.run("delta_rule", q, k, v, beta, W0, reset=reset)

    def rdn_rule(
        self, qx: Tensor, kx: Tensor, vx: Tensor, bx: Tensor, Rq: Tensor, Rk: Tensor, Rv: Tensor, rb: Tensor,
        W0: Tensor, h0: Tensor, reset: Tensor | None = None,
    ):
        """y, W, h; see reference.rdn_rule."""
        return self.run("rdn_rule", qx, kx, vx, bx, Rq, Rk, Rv, rb, W0, h0, reset=reset)

    def delta_rnn_rule(
        self, z: Tensor, kr: Tensor, vr: Tensor, br: Tensor, R0: Tensor, h0: Tensor, reset: Tensor | None = None
    ):
        """y, R, h; see reference.delta_rnn_rule."""
        return self.run("delta_rnn_rule", z, kr, vr, br, R0, h0, reset=reset)

    def delta_lstm_rule(
        self, z: Tensor, kr: Tensor, vr: Tensor, br: Tensor, R0: Tensor, h0: Tensor, c0: Tensor,
        reset: Tensor | None = None,
    ):
        """y, R, h, c; see reference.delta_lstm_rule."""
        return self.run("delta_lstm_rule", z, kr, vr, br, R0, h0, c0, reset=reset)


def backends_ran(model: nn.Module) -> set[str]:
    """The backends that have run the update rules of `model`'s layers (empty before its first forward, and for
    models without fast-weight layers)."""
    return {name for m in model.modules() for r in vars(m).values() if isinstance(r, Rules) for name in r.ran.values()}
