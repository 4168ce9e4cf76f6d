"""Fast-weight update rules with one signature and several backends.

`backend="reference"` is the plain PyTorch step loop (`reference.py`, any dtype, the test oracle);
`"cpu"` and `"cuda"` are the fused kernels of `cuda_ext/`; `"auto"` (the default) asks `cuda_ext` for the
fastest backend that can run on the tensors' device and falls back to the reference. The environment variable
`RFWP_BACKEND` replaces `"auto"` for the whole process (an explicit backend argument still wins). An explicit
backend that cannot run raises `BackendUnavailable` saying why.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Callable

from torch import Tensor

from models.ops import reference

BACKEND_NAMES = ("auto", "reference", "cpu", "cuda")
RULE_NAMES = ("sum_rule", "delta_rule", "rdn_rule", "delta_rnn_rule", "delta_lstm_rule")


def resolve_backend(backend: str, device_type: str) -> str:
    """Name of the backend that will run a rule on `device_type` ("cpu"/"cuda") when `backend` is asked for."""
    if backend == "auto":
        backend = os.environ.get("RFWP_BACKEND", "auto")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKEND_NAMES)}")
    if backend == "auto":
        import cuda_ext

        return cuda_ext.auto_backend(device_type)
    return backend


def _backend_module(backend: str, device_type: str) -> ModuleType:
    name = resolve_backend(backend, device_type)
    if name == "reference":
        return reference
    import cuda_ext

    return cuda_ext.load_backend(name)


def _check(name: str, t: Tensor, shape: tuple[int | None, ...]) -> None:
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} has shape {list(t.shape)}; expected {want}")


def _dims(name: str, t: Tensor, n: int) -> tuple[int, ...]:
    """The shape of `t`, which must have `n` dimensions (the tensor the other shapes are checked against)."""
    _check(name, t, (None,) * n)
    return tuple(t.shape)


def _check_shapes(reset: Tensor | None, T: int, B: int, **expected: tuple[Tensor, tuple[int, ...]]) -> None:
    """Check every `name=(tensor, shape)` of `expected`, and `reset` against [T, B]."""
    for name, (t, shape) in expected.items():
        _check(name, t, shape)
    if reset is not None:
        _check("reset", reset, (T, B))


def _dispatch(rule: str, backend: str, device_type: str) -> Callable:
    return getattr(_backend_module(backend, device_type), rule)


def sum_rule(
    q: Tensor, k: Tensor, v: Tensor, W0: Tensor, reset: Tensor | None = None, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """y, W = sum_rule(q [T,B,H,E], k [T,B,H,E], v [T,B,H,M], W0 [B,H,E,M], reset [T,B]); see reference.sum_rule."""
    T, B, H, E = _dims("q", q, 4)
    M = _dims("v", v, 4)[-1]
    _check_shapes(reset, T, B, k=(k, (T, B, H, E)), v=(v, (T, B, H, M)), W0=(W0, (B, H, E, M)))
    return _dispatch("sum_rule", backend, q.device.type)(q, k, v, W0, reset)


def delta_rule(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, W0: Tensor, reset: Tensor | None = None, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """y, W = delta_rule(q, k [T,B,H,E], v [T,B,H,M], beta [T,B,H,1], W0 [B,H,E,M], reset); see reference."""
    T, B, H, E = _dims("q", q, 4)
    M = _dims("v", v, 4)[-1]
    _check_shapes(
        reset, T, B, k=(k, (T, B, H, E)), v=(v, (T, B, H, M)), beta=(beta, (T, B, H, 1)), W0=(W0, (B, H, E, M))
    )
    return _dispatch("delta_rule", backend, q.device.type)(q, k, v, beta, W0, reset)


def rdn_rule(
    qx: Tensor,
    kx: Tensor,
    vx: Tensor,
    bx: Tensor,
    Rq: Tensor,
    Rk: Tensor,
    Rv: Tensor,
    rb: Tensor,
    W0: Tensor,
    h0: Tensor,
    reset: Tensor | None = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """y, W, h = rdn_rule(qx, kx, vx [T,B,H,d], bx [T,B,H,1], Rq, Rk, Rv [H,d,d], rb [H,d], W0 [B,H,d,d],
    h0 [B,H,d], reset); see reference.rdn_rule."""
    T, B, H, d = _dims("qx", qx, 4)
    _check_shapes(
        reset, T, B, kx=(kx, (T, B, H, d)), vx=(vx, (T, B, H, d)), bx=(bx, (T, B, H, 1)), Rq=(Rq, (H, d, d)),
        Rk=(Rk, (H, d, d)), Rv=(Rv, (H, d, d)), rb=(rb, (H, d)), W0=(W0, (B, H, d, d)), h0=(h0, (B, H, d)),
    )
    return _dispatch("rdn_rule", backend, qx.device.type)(qx, kx, vx, bx, Rq, Rk, Rv, rb, W0, h0, reset)


def delta_rnn_rule(
    z: Tensor,
    kr: Tensor,
    vr: Tensor,
    br: Tensor,
    R0: Tensor,
    h0: Tensor,
    reset: Tensor | None = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """y, R, h = delta_rnn_rule(z, kr, vr [T,B,H,d], br [T,B,H,1], R0 [B,H,d,d], h0 [B,H,d], reset); see
    reference.delta_rnn_rule."""
    T, B, H, d = _dims("z", z, 4)
    _check_shapes(
        reset, T, B, kr=(kr, (T, B, H, d)), vr=(vr, (T, B, H, d)), br=(br, (T, B, H, 1)), R0=(R0, (B, H, d, d)),
        h0=(h0, (B, H, d)),
    )
    return _dispatch("delta_rnn_rule", backend, z.device.type)(z, kr, vr, br, R0, h0, reset)


def delta_lstm_rule(
    z: Tensor,
    kr: Tensor,
    vr: Tensor,
    br: Tensor,
    R0: Tensor,
    h0: Tensor,
    c0: Tensor,
    reset: Tensor | None = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y, R, h, c = delta_lstm_rule(z, kr, vr [T,B,H,3,d], br [T,B,H,3,1], R0 [B,H,3,d,d], h0, c0 [B,H,d],
    reset); see reference.delta_lstm_rule."""
    T, B, H, _, d = _dims("z", z, 5)
    _check_shapes(
        reset, T, B, z=(z, (T, B, H, 3, d)), kr=(kr, (T, B, H, 3, d)), vr=(vr, (T, B, H, 3, d)),
        br=(br, (T, B, H, 3, 1)), R0=(R0, (B, H, 3, d, d)), h0=(h0, (B, H, d)), c0=(c0, (B, H, d)),
    )
    return _dispatch("delta_lstm_rule", backend, z.device.type)(z, kr, vr, br, R0, h0, c0, reset)
