"""Fast-weight layers: a bias-free slow projection programs a fast network through an update rule.

Each layer maps `a [T, B, D]` (the block's normalised input) to `[T, B, D]`: the slow projection produces the
per-head programming signals (head-major split, in the order each layer's docstring lists), the update rule of
`models.ops` runs over the whole unroll, and a bias-free output projection mixes the heads. States are tuples
of tensors, batch dimension first; all start at zero.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import ops

SUMNORM_EPS = 1e-5  # the RL code's eps; it keeps sum normalisation finite when every elu1 feature is ~0


def elu1(x: Tensor) -> Tensor:
    """ELU(x) + 1: a strictly positive feature map."""
    return F.elu(x) + 1.0


def sum_normalise(x: Tensor) -> Tensor:
    """x / (Σ x + eps) over the last dim: with non-negative x, ‖x‖₂ ≤ 1, which keeps the delta rule stable."""
    return x / (x.sum(-1, keepdim=True) + SUMNORM_EPS)


def elu1_sumnorm(x: Tensor) -> Tensor:
    return sum_normalise(elu1(x))


class FastWeightLayer(nn.Module):
    """Base: `slow` projects D -> H * per_head features (no bias), `out` projects H * d -> D (no bias)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, per_head: int, backend: str):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.rules = ops.Rules(backend)
        self.slow = nn.Linear(hidden_size, num_heads * per_head, bias=False)
        self.out = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(self, a: Tensor, state: tuple[Tensor, ...], reset: Tensor | None) -> tuple[Tensor, tuple]:
        """a [T, B, D] -> y [T, B, D], new state."""
        T, B, _ = a.shape
        p = self.slow(a).view(T, B, self.num_heads, -1)
        y, state = self.program(p, state, reset)
        return self.out(y.reshape(T, B, -1)), state

    def initial_state(self, batch_size: int, device: torch.device | str | None, dtype: torch.dtype) -> tuple:
        """Zero state: one tensor [batch_size, *shape] per entry of `state_shapes()`."""
        return tuple(torch.zeros(batch_size, *shape, device=device, dtype=dtype) for shape in self.state_shapes())

    def state_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the state tensors without the batch dimension."""
        raise NotImplementedError

    def program(self, p: Tensor, state: tuple, reset: Tensor | None) -> tuple[Tensor, tuple]:
        """p [T, B, H, per_head] -> y [T, B, H, d], new state."""
        raise NotImplementedError


class LinearTransformerLayer(FastWeightLayer):
    """Sum rule; split [q | k | v], q and k through elu1 + sum normalisation."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, backend: str = "auto"):
        super().__init__(hidden_size, num_heads, head_dim, 3 * head_dim, backend)

    def state_shapes(self):
        return [(self.num_heads, self.head_dim, self.head_dim)]

    def program(self, p, state, reset):
        q, k, v = p.split(self.head_dim, dim=-1)
        y, W = self.rules.sum_rule(elu1_sumnorm(q), elu1_sumnorm(k), v, state[0], reset)
        return y, (W,)


class DeltaNetLayer(FastWeightLayer):
    """Delta rule; split [q | k | v | β], q and k through elu1 + sum normalisation, β = σ(·)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, backend: str = "auto"):
        super().__init__(hidden_size, num_heads, head_dim, 3 * head_dim + 1, backend)

    def state_shapes(self):
        return [(self.num_heads, self.head_dim, self.head_dim)]

    def program(self, p, state, reset):
        d = self.head_dim
        q, k, v, b = p.split([d, d, d, 1], dim=-1)
        y, W = self.rules.delta_rule(elu1_sumnorm(q), elu1_sumnorm(k), v, torch.sigmoid(b), state[0], reset)
        return y, (W,)


class RecurrentDeltaNetLayer(FastWeightLayer):
    """Recurrent Delta Net: split [qx | kx | vx | bx] (pre-activations; the rule applies softmax/σ after adding
    the recurrent terms from tanh(y_{t-1}) through the slow matrices R_q, R_k, R_v and the vector r_b)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, backend: str = "auto"):
        super().__init__(hidden_size, num_heads, head_dim, 3 * head_dim + 1, backend)
        H, d = num_heads, head_dim
        self.Rq, self.Rk, self.Rv = (nn.Parameter(torch.empty(H, d, d)) for _ in range(3))
        self.rb = nn.Parameter(torch.empty(H, d))
        std = 1.0 / math.sqrt(d)  # the reference initialisation of the recurrent slow weights
        for param in (self.Rq, self.Rk, self.Rv, self.rb):
            nn.init.normal_(param, std=std)

    def state_shapes(self):
        H, d = self.num_heads, self.head_dim
        return [(H, d, d), (H, d)]

    def program(self, p, state, reset):
        d = self.head_dim
        qx, kx, vx, bx = p.split([d, d, d, 1], dim=-1)
        W0, h0 = state
        y, W, h = self.rules.rdn_rule(qx, kx, vx, bx, self.Rq, self.Rk, self.Rv, self.rb, W0, h0, reset)
        return y, (W, h)


class DeltaRNNLayer(FastWeightLayer):
    """Delta RNN (v2): split [q | k | v | k_r | v_r | β | β_r]; a delta-rule feed-forward part z_t = W_t^T q_t
    (q, k softmaxed as in the RL code) and a fast recurrent matrix: y_t = R_t^T softmax(y_{t-1}) + z_t."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, backend: str = "auto"):
        super().__init__(hidden_size, num_heads, head_dim, 5 * head_dim + 2, backend)

    def state_shapes(self):
        H, d = self.num_heads, self.head_dim
        return [(H, d, d), (H, d, d), (H, d)]

    def program(self, p, state, reset):
        d = self.head_dim
        q, k, v, kr, vr, b, br = p.split([d, d, d, d, d, 1, 1], dim=-1)
        W0, R0, h0 = state
        z, W = self.rules.delta_rule(q.softmax(-1), k.softmax(-1), v, torch.sigmoid(b), W0, reset)
        y, R, h = self.rules.delta_rnn_rule(z, kr.softmax(-1), vr, torch.sigmoid(br), R0, h0, reset)
        return y, (W, R, h)


class DeltaLSTMLayer(FastWeightLayer):
    """Delta LSTM (v4): three gates g ∈ (i, u, o), each with a delta-rule feed-forward part W^g and a fast
    recurrent matrix R^g. Split per head [q,k,v,k_r,v_r] for i, u, o, then [β, β_r] for i, u, o (15d + 6).
    Feed-forward q, k: elu1 + sum normalisation; recurrent keys: softmax; all β: σ."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, backend: str = "auto"):
        super().__init__(hidden_size, num_heads, head_dim, 15 * head_dim + 6, backend)

    def state_shapes(self):
        H, d = self.num_heads, self.head_dim
        return [(H, 3, d, d), (H, 3, d, d), (H, d), (H, d)]

    def program(self, p, state, reset):
        T, B, H, _ = p.shape
        d = self.head_dim
        vectors, betas = p.split([15 * d, 6], dim=-1)
        q, k, v, kr, vr = vectors.view(T, B, H, 3, 5, d).unbind(dim=4)  # [T, B, H, 3, d] each
        b, br = betas.view(T, B, H, 3, 2, 1).unbind(dim=4)  # [T, B, H, 3, 1] each
        W0, R0, h0, c0 = state
        # The three gates' feed-forward parts are independent delta rules: run them as 3H heads in one call.
        z, W = self.rules.delta_rule(
            elu1_sumnorm(q).reshape(T, B, 3 * H, d),
            elu1_sumnorm(k).reshape(T, B, 3 * H, d),
            v.reshape(T, B, 3 * H, d),
            torch.sigmoid(b).reshape(T, B, 3 * H, 1),
            W0.reshape(B, 3 * H, d, d),
            reset,
        )
        y, R, h, c = self.rules.delta_lstm_rule(
            z.view(T, B, H, 3, d), kr.softmax(-1), vr, torch.sigmoid(br), R0, h0, c0, reset
        )
        return y, (W.view(B, H, 3, d, d), R, h, c)


class DeltaMLPLayer(FastWeightLayer):
    """Delta MLP: a deep feed-forward fast net, `depth` blocks of two delta-rule fast layers (d -> f -> d,
    f = 4d) with a residual, each block's query normalised by its own LayerNorm. Split per head: [q] then per
    block [k1 (d) | v1 (f) | k2 (f) | v2 (d) | β1 | β2]. Unlike the reference code, the slow projection only
    produces the features the fast net consumes (the reference projects twice as many and never uses half)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, depth: int = 1, backend: str = "auto"):
        if depth < 1:
            raise ValueError(f"delta_mlp depth must be at least 1, got {depth}")
        d, f = head_dim, 4 * head_dim
        super().__init__(hidden_size, num_heads, head_dim, d + depth * (2 * d + 2 * f + 2), backend)
        self.depth, self.fast_hidden = depth, f
        self.query_norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(depth))

    def state_shapes(self):
        H, d, f = self.num_heads, self.head_dim, self.fast_hidden
        return [shape for _ in range(self.depth) for shape in ((H, d, f), (H, f, d))]

    def program(self, p, state, reset):
        d, f = self.head_dim, self.fast_hidden
        x, *blocks = p.split([d] + [2 * d + 2 * f + 2] * self.depth, dim=-1)
        new_state = []
        for norm, signals, W1, W2 in zip(self.query_norms, blocks, state[0::2], state[1::2]):
            k1, v1, k2, v2, b1, b2 = signals.split([d, f, f, d, 1, 1], dim=-1)
            h1, W1 = self.rules.delta_rule(elu1_sumnorm(norm(x)), elu1_sumnorm(k1), v1, torch.sigmoid(b1), W1, reset)
            h2, W2 = self.rules.delta_rule(elu1_sumnorm(h1), elu1_sumnorm(k2), v2, torch.sigmoid(b2), W2, reset)
            x = x + h2
            new_state += [W1, W2]
        return x, tuple(new_state)
