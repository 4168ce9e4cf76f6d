"""Recurrent cores behind one contract, and their registry.

    core = make_core("delta_lstm", input_size=257, hidden_size=128, num_layers=2, num_heads=4, head_dim=32)
    state = core.initial_state(batch_size, device)   # tuple of tensors, batch dimension first
    y, state = core(x, state, reset)                 # x [T, B, input_size], reset [T, B] bool or None

`reset[t, b]` replaces sample b's state by the initial (zero) state before step t. Gradients flow through every
step and into the state passed in.
"""
from __future__ import annotations

import difflib
from typing import Callable

import torch
from torch import Tensor, nn

from models.layers import (
    DeltaLSTMLayer,
    DeltaMLPLayer,
    DeltaNetLayer,
    DeltaRNNLayer,
    FastWeightLayer,
    LinearTransformerLayer,
    RecurrentDeltaNetLayer,
)

State = tuple[Tensor, ...]


class Core(nn.Module):
    """Base class: checks the contract's shapes, so every core reports bad input the same way."""

    input_size: int
    output_size: int

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        raise NotImplementedError

    def forward(self, x: Tensor, state: State, reset: Tensor | None = None) -> tuple[Tensor, State]:
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(
                f"core input has shape {list(x.shape)}; expected [T, B, {self.input_size}] (time-major, "
                f"last dim = input_size)"
            )
        T, B, _ = x.shape
        if reset is not None and (reset.shape != (T, B) or reset.dtype != torch.bool):
            raise ValueError(f"reset must be a bool tensor of shape [T, B] = [{T}, {B}], got "
                             f"{reset.dtype} {list(reset.shape)}")
        expected = self.initial_state(B, "meta")
        if len(state) != len(expected) or any(s.shape != e.shape for s, e in zip(state, expected)):
            raise ValueError(
                f"state shapes {[list(s.shape) for s in state]} do not match this core's "
                f"{[list(e.shape) for e in expected]} for batch size {B}; start from core.initial_state(B)"
            )
        return self.step(x, state, reset)

    def step(self, x: Tensor, state: State, reset: Tensor | None) -> tuple[Tensor, State]:
        raise NotImplementedError


class NoCore(Core):
    """Feed-forward agent: no memory, the input passes through unchanged."""

    def __init__(self, input_size: int):
        super().__init__()
        self.input_size = self.output_size = input_size

    def initial_state(self, batch_size, device=None):
        return ()

    def step(self, x, state, reset):
        return x, ()


class LSTMCore(Core):
    """`nn.LSTM` stepped over segments between resets (cuDNN on a GPU), with full backpropagation through time.
    State: (h, c), each [B, num_layers, hidden_size]."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1):
        super().__init__()
        self.input_size, self.output_size = input_size, hidden_size
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers)

    def initial_state(self, batch_size, device=None):
        shape = (batch_size, self.lstm.num_layers, self.lstm.hidden_size)
        dtype = self.lstm.weight_ih_l0.dtype
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def step(self, x, state, reset):
        h, c = (s.transpose(0, 1) for s in state)  # nn.LSTM keeps layers first: [num_layers, B, hidden]
        # Only the steps where some sample resets split the unroll; between them one fused nn.LSTM call runs.
        starts = [0] if reset is None else sorted({0, *reset.any(dim=1).nonzero().flatten().tolist()})
        outputs = []
        for start, end in zip(starts, starts[1:] + [x.shape[0]]):
            if reset is not None:
                keep = (~reset[start]).to(h.dtype).view(1, -1, 1)
                h, c = h * keep, c * keep
            y, (h, c) = self.lstm(x[start:end], (h, c))
            outputs.append(y)
        return torch.cat(outputs), (h.transpose(0, 1), c.transpose(0, 1))


class FastWeightCore(Core):
    """Input projection, then `num_layers` blocks, pre-LayerNorm by default (the RL and algorithmic code, and the
    paper's truncated-context language models):
    x' = x + out(FastWeight(slow(LN(x)))), x'' = x' + FF(LN(x')); or post-LayerNorm (`pre_norm=False`, the
    full-context language models): x' = LN(x + out(FastWeight(slow(x)))), x'' = LN(x' + FF(x')).
    FF = Linear -> ReLU -> Dropout -> Linear -> Dropout. No final LayerNorm (as in the reference code). State: the
    layers' states, concatenated."""

    def __init__(
        self,
        make_layer: Callable[[], FastWeightLayer],
        input_size: int,
        hidden_size: int,
        num_layers: int,
        ff_size: int,
        dropout: float,
        pre_norm: bool = True,
    ):
        super().__init__()
        self.input_size, self.output_size, self.pre_norm = input_size, hidden_size, pre_norm
        self.input_proj = nn.Linear(input_size, hidden_size)
        self.fw_norms = nn.ModuleList(nn.LayerNorm(hidden_size) for _ in range(num_layers))
        self.fw_layers = nn.ModuleList(make_layer() for _ in range(num_layers))
        self.ff_norms = nn.ModuleList(nn.LayerNorm(hidden_size) for _ in range(num_layers))
        self.ffs = nn.ModuleList(
            nn.Sequential(
                nn.Linear(hidden_size, ff_size), nn.ReLU(), nn.Dropout(dropout),
                nn.Linear(ff_size, hidden_size), nn.Dropout(dropout),
            )
            for _ in range(num_layers)
        )
        self.dropout = nn.Dropout(dropout)
        self._state_counts = [len(layer.state_shapes()) for layer in self.fw_layers]

    def initial_state(self, batch_size, device=None):
        dtype = self.input_proj.weight.dtype
        return tuple(s for layer in self.fw_layers for s in layer.initial_state(batch_size, device, dtype))

    def step(self, x, state, reset):
        x = self.input_proj(x)
        new_state, offset = [], 0
        for fw_norm, layer, ff_norm, ff, count in zip(
            self.fw_norms, self.fw_layers, self.ff_norms, self.ffs, self._state_counts
        ):
            if self.pre_norm:
                y, layer_state = layer(fw_norm(x), state[offset : offset + count], reset)
                x = x + self.dropout(y)
                x = x + ff(ff_norm(x))
            else:
                y, layer_state = layer(x, state[offset : offset + count], reset)
                x = fw_norm(x + self.dropout(y))
                x = ff_norm(x + ff(x))
            new_state += layer_state
            offset += count
        return x, tuple(new_state)


FAST_WEIGHT_LAYERS: dict[str, type[FastWeightLayer]] = {
    "linear_transformer": LinearTransformerLayer,
    "delta_net": DeltaNetLayer,
    "rec_delta": RecurrentDeltaNetLayer,
    "delta_rnn": DeltaRNNLayer,
    "delta_lstm": DeltaLSTMLayer,
    "delta_mlp": DeltaMLPLayer,
}
CORE_NAMES: tuple[str, ...] = ("none", "lstm", *FAST_WEIGHT_LAYERS)


def check_core_name(name: str) -> None:
    """Raise a ValueError listing the valid cores (closest first) when `name` is not one of them."""
    if name not in CORE_NAMES:
        close = difflib.get_close_matches(name, CORE_NAMES, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown core {name!r}.{hint} Valid cores: {', '.join(CORE_NAMES)}")


def make_core(
    name: str,
    input_size: int,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    head_dim: int | None = None,
    ff_size: int = 512,
    dropout: float = 0.0,
    depth: int = 1,
    backend: str = "auto",
    pre_norm: bool = True,
) -> Core:
    """Build a core by name. `head_dim` defaults to hidden_size // num_heads and must satisfy
    num_heads * head_dim == hidden_size for the fast-weight cores. `depth` is the Delta MLP's fast-net depth;
    `pre_norm` picks the fast-weight blocks' LayerNorm position (see `FastWeightCore`).
    Arguments a core does not use are ignored (e.g. num_heads for "lstm")."""
    check_core_name(name)
    if name == "none":
        return NoCore(input_size)
    if name == "lstm":
        return LSTMCore(input_size, hidden_size, num_layers)
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        head_dim = hidden_size // num_heads
    if num_heads * head_dim != hidden_size:
        raise ValueError(
            f"num_heads * head_dim = {num_heads} * {head_dim} = {num_heads * head_dim} must equal hidden_size "
            f"{hidden_size}; change one of them (head_dim defaults to hidden_size // num_heads)"
        )
    layer_cls = FAST_WEIGHT_LAYERS[name]
    extra = {"depth": depth} if name == "delta_mlp" else {}

    def make_layer() -> FastWeightLayer:
        return layer_cls(hidden_size, num_heads, head_dim, backend=backend, **extra)

    return FastWeightCore(make_layer, input_size, hidden_size, num_layers, ff_size, dropout, pre_norm)
