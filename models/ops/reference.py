"""Reference backend of the fast-weight update rules: plain PyTorch step loops that follow the equations.

These loops are the oracle for every kernel: they work in any dtype (float64 for tests) on any device, and
autograd differentiates them, so gradients reach every input including the initial state. Layouts follow
`docs/api.md`: inputs are time-major per head `[T, B, H, d]`, fast weights are key-major `W[b, h, e, m]`
(retrieval is `W^T k`), and `reset [T, B]` replaces the whole state by zeros before step `t`.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _zero_where_reset(state: Tensor, reset_t: Tensor | None) -> Tensor:
    """Replace `state[b]` by zeros where `reset_t[b]`; `torch.where` (not a multiply) so that the gradient into
    the old state is exactly zero and a non-finite old state cannot leak through."""
    if reset_t is None:
        return state
    mask = reset_t.view(-1, *([1] * (state.dim() - 1)))
    return torch.where(mask, torch.zeros((), dtype=state.dtype, device=state.device), state)


def _reset_at(reset: Tensor | None, t: int) -> Tensor | None:
    return None if reset is None else reset[t]


def _delta_update(W: Tensor, k: Tensor, v: Tensor, beta: Tensor) -> Tensor:
    """One delta-rule write. W [..., E, M]; k [..., E]; v [..., M]; beta [..., 1]. Returns the new W."""
    v_old = torch.einsum("...e,...em->...m", k, W)
    u = beta * (v - v_old)
    return W + k.unsqueeze(-1) * u.unsqueeze(-2)


def _read(W: Tensor, q: Tensor) -> Tensor:
    """y = W^T q. W [..., E, M]; q [..., E] -> [..., M]."""
    return torch.einsum("...e,...em->...m", q, W)


def sum_rule(q: Tensor, k: Tensor, v: Tensor, W0: Tensor, reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sum rule (linear transformer): W_t = W_{t-1} + k_t v_t^T ; y_t = W_t^T q_t.

    q, k [T, B, H, E]; v [T, B, H, M]; W0 [B, H, E, M]; reset [T, B] or None.
    Returns y [T, B, H, M] and the final W [B, H, E, M].
    """
    W, ys = W0, []
    for t in range(q.shape[0]):
        W = _zero_where_reset(W, _reset_at(reset, t))
        W = W + k[t].unsqueeze(-1) * v[t].unsqueeze(-2)
        ys.append(_read(W, q[t]))
    return torch.stack(ys), W


def delta_rule(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, W0: Tensor, reset: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Delta rule (DeltaNet), write then read:
    v̄_t = W_{t-1}^T k_t ; u_t = β_t (v_t − v̄_t) ; W_t = W_{t-1} + k_t u_t^T ; y_t = W_t^T q_t.

    q, k [T, B, H, E]; v [T, B, H, M]; beta [T, B, H, 1] (after the sigmoid); W0 [B, H, E, M].
    Returns y [T, B, H, M] and the final W [B, H, E, M].
    """
    W, ys = W0, []
    for t in range(q.shape[0]):
        W = _zero_where_reset(W, _reset_at(reset, t))
        W = _delta_update(W, k[t], v[t], beta[t])
        ys.append(_read(W, q[t]))
    return torch.stack(ys), W


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
) -> tuple[Tensor, Tensor, Tensor]:
    """Recurrent Delta Net: the slow net also sees tanh of the layer's previous output.

    a = tanh(y_{t-1}); q = softmax(qx + a R_q); k = softmax(kx + a R_k); v = vx + a R_v;
    β = σ(bx + a·r_b); delta-rule write of (k, v, β) into W; y_t = W_t^T q.

    qx, kx, vx [T, B, H, d] and bx [T, B, H, 1] are pre-activations; Rq, Rk, Rv [H, d, d] stored R[in][out];
    rb [H, d]; W0 [B, H, d, d]; h0 [B, H, d] (the raw previous output). Returns y [T, B, H, d], the final W and
    the final h = y_T.
    """
    W, h, ys = W0, h0, []
    for t in range(qx.shape[0]):
        r_t = _reset_at(reset, t)
        W, h = _zero_where_reset(W, r_t), _zero_where_reset(h, r_t)
        a = torch.tanh(h)
        q = torch.softmax(qx[t] + torch.einsum("bhe,hem->bhm", a, Rq), dim=-1)
        k = torch.softmax(kx[t] + torch.einsum("bhe,hem->bhm", a, Rk), dim=-1)
        v = vx[t] + torch.einsum("bhe,hem->bhm", a, Rv)
        beta = torch.sigmoid(bx[t] + (a * rb).sum(-1, keepdim=True))
        W = _delta_update(W, k, v, beta)
        h = _read(W, q)
        ys.append(h)
    return torch.stack(ys), W, h


def delta_rnn_rule(
    z: Tensor, kr: Tensor, vr: Tensor, br: Tensor, R0: Tensor, h0: Tensor, reset: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Recurrent part of the Delta RNN (v2): a fast recurrent matrix R, itself written by the delta rule.

    s = softmax(y_{t-1}); R_t = delta-rule write of (kr, vr, br) into R_{t-1}; y_t = R_t^T s + z_t.

    z [T, B, H, d] (the feed-forward part, `delta_rule`'s output); kr [T, B, H, d] (already softmaxed);
    vr [T, B, H, d]; br [T, B, H, 1] (after the sigmoid); R0 [B, H, d, d]; h0 [B, H, d].
    Returns y [T, B, H, d], the final R and the final h = y_T. The reference CUDA code adds 1e-6 to the softmax
    denominator; this rule uses the exact softmax (the difference is ~1e-6 relative).
    """
    R, h, ys = R0, h0, []
    for t in range(z.shape[0]):
        r_t = _reset_at(reset, t)
        R, h = _zero_where_reset(R, r_t), _zero_where_reset(h, r_t)
        s = torch.softmax(h, dim=-1)
        R = _delta_update(R, kr[t], vr[t], br[t])
        h = _read(R, s) + z[t]
        ys.append(h)
    return torch.stack(ys), R, h


def delta_lstm_rule(
    z: Tensor,
    kr: Tensor,
    vr: Tensor,
    br: Tensor,
    R0: Tensor,
    h0: Tensor,
    c0: Tensor,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Recurrent part of the Delta LSTM (version 4, the paper's main one). Gates g = (i, u, o) on dim 3.

    s = softmax(y_{t-1}); each R_g gets a delta-rule write of (kr_g, vr_g, br_g) before use;
    i = σ(R_iᵀ s + z_i); u = R_uᵀ s + z_u (no squashing in v4); o = σ(R_oᵀ s + z_o);
    c_t = i ⊙ u + (1 − i) ⊙ c_{t-1} (coupled input/forget gate); y_t = o ⊙ c_t.

    z, kr, vr [T, B, H, 3, d] (kr already softmaxed); br [T, B, H, 3, 1] (after the sigmoid);
    R0 [B, H, 3, d, d]; h0, c0 [B, H, d]. Returns y [T, B, H, d], the final R, h = y_T and c.
    """
    R, h, c, ys = R0, h0, c0, []
    for t in range(z.shape[0]):
        r_t = _reset_at(reset, t)
        R, h, c = _zero_where_reset(R, r_t), _zero_where_reset(h, r_t), _zero_where_reset(c, r_t)
        s = torch.softmax(h, dim=-1)
        R = _delta_update(R, kr[t], vr[t], br[t])
        pre = torch.einsum("bhe,bhgem->bhgm", s, R) + z[t]
        i, u, o = torch.sigmoid(pre[:, :, 0]), pre[:, :, 1], torch.sigmoid(pre[:, :, 2])
        c = i * u + (1 - i) * c
        h = o * c
        ys.append(h)
    return torch.stack(ys), R, h, c
