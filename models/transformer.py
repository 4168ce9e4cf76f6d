"""Causal softmax Transformer baseline with the core contract (supervised tasks only).

Blocks from `nn.TransformerEncoderLayer`, post-LN by default (the algorithmic tasks' reference Transformer) or
pre-LN, with a final LayerNorm, and sinusoidal positional encoding counted from the start of each sequence (a
reset starts a new sequence) unless the caller adds its own. Attention sees only the steps of the current call:
the model keeps no state, so it cannot carry context across segments.
"""
from __future__ import annotations

import torch
from torch import nn

from models.cores import Core


def sinusoidal_encoding(positions: torch.Tensor, size: int) -> torch.Tensor:
    """Sinusoidal position features: positions [...] -> [..., size], sin(p·f_i) then cos(p·f_i) for the
    frequencies f_i = 10000^(−2i / size), i < size / 2 (Vaswani et al.; Transformer-XL's layout)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, size, 2, dtype=torch.float64, device=positions.device) / size))
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TransformerCore(Core):
    """Causal Transformer stack over time-major inputs.

    Args:
        input_size: size D_in of the inputs, linearly projected to `hidden_size` (as the registry's cores do).
        hidden_size: model width D (even, divisible by `num_heads`).
        num_layers: number of blocks.
        num_heads: attention heads per block.
        ff_size: inner size of the feed-forward sub-layers.
        dropout: dropout on the embedded input, attention weights and sub-layer outputs.
        pre_norm: LayerNorm before each sub-layer instead of after its residual sum.
        positional_encoding: add sinusoidal encoding of the position in the sequence (False when the caller
            encodes positions itself).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        ff_size: int,
        dropout: float = 0.0,
        pre_norm: bool = False,
        positional_encoding: bool = True,
    ) -> None:
        super().__init__()
        if hidden_size % 2 or hidden_size % num_heads:
            raise ValueError(
                f"hidden_size {hidden_size} must be even and divisible by num_heads {num_heads} "
                "(sinusoidal encoding pairs sin/cos features; heads split the width evenly)"
            )
        self.num_heads, self.positional_encoding = num_heads, positional_encoding
        self.input_size, self.output_size = input_size, hidden_size
        self.input_proj = nn.Linear(input_size, hidden_size)
        layer = nn.TransformerEncoderLayer(
            hidden_size, num_heads, ff_size, dropout, activation="relu", norm_first=pre_norm
        )
        # Pre-LN leaves the residual stream unnormalised, hence the final LayerNorm (the reference has it too).
        self.encoder = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(hidden_size), enable_nested_tensor=False
        )
        self.dropout = nn.Dropout(dropout)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> tuple:
        """The Transformer keeps no state between calls: always `()`."""
        return ()

    def forward(
        self, x: torch.Tensor, state: tuple = (), reset: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple]:
        """Causal self-attention over the steps of this call (shapes checked by `Core.forward`).

        Args:
            x: [T, B, input_size] inputs.
            state: must be `()`; the Transformer cannot continue from an earlier call.
            reset: [T, B] bool or None; step t of sample b starts a new sequence (attention does not reach
                back past it and positions restart at 0).

        Returns:
            y [T, B, hidden_size] and the empty state `()`.
        """
        if len(state):
            raise ValueError(
                "TransformerCore cannot carry state across calls: it attends only within one call. "
                "Pass state=() (or core.initial_state(...)); to carry context across segments use a "
                "fast-weight core such as delta_net, rec_delta or delta_rnn."
            )
        return super().forward(x, state, reset)

    def step(self, x: torch.Tensor, state: tuple, reset: torch.Tensor | None) -> tuple[torch.Tensor, tuple]:
        steps, batch = x.shape[:2]
        time = torch.arange(steps, device=x.device)
        if reset is None or not bool(reset.any()):
            positions = time[:, None].expand(steps, batch)
            mask = nn.Transformer.generate_square_subsequent_mask(steps, device=x.device, dtype=x.dtype)
            is_causal = True
        else:
            # Index of the latest sequence start at or before each step: positions count from there.
            starts = torch.where(reset, time[:, None], torch.zeros_like(time)[:, None]).cummax(0).values
            positions = time[:, None] - starts
            segment = reset.long().cumsum(0).t()  # [B, T]
            allowed = (segment[:, :, None] == segment[:, None, :]) & torch.ones(
                steps, steps, dtype=torch.bool, device=x.device
            ).tril()
            # [B * H, T, T], True = may not attend; every row keeps its own step, so none is fully masked.
            mask = (~allowed).repeat_interleave(self.num_heads, dim=0)
            is_causal = False
        h = self.input_proj(x)
        if self.positional_encoding:
            h = h + sinusoidal_encoding(positions, self.output_size).to(x.dtype)
        h = self.dropout(h)
        return self.encoder(h, mask=mask, is_causal=is_causal), ()


__all__ = ["TransformerCore", "sinusoidal_encoding"]
