"""Supervised sequence models over any core of the registry or the `transformer` baseline.

    tagger = SequenceTagger(25, 26, "delta_rnn", hidden_size=256, num_layers=4, num_heads=16, ff_size=1024,
                            dropout=0.1)
    logits = tagger(tokens)                          # tokens [T, B] -> logits [T, B, num_classes]

    lm = LanguageModel(267_735, "delta_net", hidden_size=128, num_layers=16, num_heads=8, ff_size=2048,
                       dropout=0.1, tie_weights=True, positional_encoding=True, pre_norm=True)
    nll, state = lm(inputs, targets, state)          # inputs, targets [T, B] -> per-token nll [T, B]

Sizes have no defaults here: the paper's settings are in configs/*.yaml (docs/protocol.md §1.3, §3.2), which
`agent.supervised` reads and passes in.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.cores import CORE_NAMES, Core, State, check_core_name, make_core
from models.transformer import TransformerCore, sinusoidal_encoding

SUPERVISED_CORE_NAMES: tuple[str, ...] = (*CORE_NAMES, "transformer")
# WikiText-103's adaptive softmax (docs/protocol.md §3.1): cutoffs for its 267,735-word vocabulary.
WT103_VOCAB_SIZE = 267_735
WT103_CUTOFFS = (20_000, 40_000, 200_000)


def build_core(
    name: str,
    input_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    ff_size: int,
    dropout: float,
    backend: str = "auto",
    pre_norm: bool = True,
    positional_encoding: bool = True,
) -> Core:
    """A registry core (`make_core`, head_dim = hidden_size // num_heads) or the causal Transformer baseline.

    `pre_norm` picks pre- or post-LayerNorm blocks; `positional_encoding` is the Transformer's own (the
    registry's cores have none)."""
    if name == "transformer":
        return TransformerCore(input_size, hidden_size, num_layers, num_heads, ff_size, dropout, pre_norm,
                               positional_encoding)
    try:
        check_core_name(name)
    except ValueError as error:
        raise ValueError(f"{error}, transformer (supervised tasks only)") from None
    return make_core(
        name, input_size=input_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        ff_size=ff_size, dropout=dropout, backend=backend, pre_norm=pre_norm,
    )


class SequenceTagger(nn.Module):
    """A prediction at every position: embedding -> core (its input projection first) -> linear head.

    Code execution scores every position; ListOps only the last one (the targets mark which). As in the
    algorithmic tasks' reference code, fast-weight cores have pre-LN blocks and no positional encoding; the
    Transformer baseline has post-LN blocks and sinusoidal encoding.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        core: str,
        *,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        ff_size: int,
        dropout: float,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.core = build_core(core, hidden_size, hidden_size, num_layers, num_heads, ff_size, dropout, backend,
                               pre_norm=core != "transformer")
        self.head = nn.Linear(self.core.output_size, num_classes)

    def forward(self, tokens: Tensor, reset: Tensor | None = None) -> Tensor:
        """tokens [T, B] int64 (a whole sequence per column, zero initial state) -> logits [T, B, num_classes]."""
        y, _ = self.core(self.embedding(tokens), self.core.initial_state(tokens.shape[1], tokens.device), reset)
        return self.head(y)


def scaled_cutoffs(vocab_size: int) -> list[int]:
    """WikiText-103's cutoffs scaled to `vocab_size` (the same split of frequent and rare words).

    Exactly [20000, 40000, 200000] for the full 267,735-word vocabulary; clamped into [1, vocab_size - 1] and
    de-duplicated for small vocabularies (the bundled sample's).
    """
    if vocab_size < 2:
        raise ValueError(f"an adaptive softmax needs at least 2 words, got vocab_size {vocab_size}")
    return sorted({min(max(round(c * vocab_size / WT103_VOCAB_SIZE), 1), vocab_size - 1) for c in WT103_CUTOFFS})


class LanguageModel(nn.Module):
    """Word-level LM: Dropout(√D · embedding + positional encoding) -> core -> Dropout -> adaptive softmax.

    The positional encoding (`positional_encoding`) is Transformer-XL's sinusoidal one at descending positions:
    the last token of a segment is at position 0, the first at T − 1. The core's blocks are pre-LN or post-LN
    (`pre_norm`). The paper's truncated-context models use both the encoding and pre-LN blocks; its
    full-context models, which carry their state across segments, use neither.

    The adaptive softmax is `nn.AdaptiveLogSoftmaxWithLoss` with div_value 1 (every cluster has full width D).
    With `tie_weights` the input embedding *is* the softmax's word vectors (head shortlist rows followed by
    each tail cluster's output rows), as in the paper. PyTorch's tail clusters also have a D x D projection
    that Transformer-XL lacks at div_val 1; it starts as the identity, so the initial model matches the
    paper's. Initialisation follows Transformer-XL's LM: Linear and attention weights and word vectors
    N(0, 0.02), biases zero (the RDN's recurrent matrices keep their own initialisation). `cutoffs=None`
    scales WikiText-103's cutoffs to `vocab_size` (`scaled_cutoffs`).
    """

    def __init__(
        self,
        vocab_size: int,
        core: str,
        *,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        ff_size: int,
        dropout: float,
        tie_weights: bool,
        positional_encoding: bool,
        pre_norm: bool,
        cutoffs: list[int] | None = None,
        backend: str = "auto",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.hidden_size, self.positional_encoding = hidden_size, positional_encoding
        self.core = build_core(core, hidden_size, hidden_size, num_layers, num_heads, ff_size, dropout, backend,
                               pre_norm=pre_norm, positional_encoding=False)
        self.dropout = nn.Dropout(dropout)
        self.softmax = nn.AdaptiveLogSoftmaxWithLoss(
            self.core.output_size, vocab_size, cutoffs or scaled_cutoffs(vocab_size), div_value=1.0, head_bias=True
        )
        self.embedding = None if tie_weights else nn.Embedding(vocab_size, hidden_size)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):
                nn.init.normal_(module.in_proj_weight, 0.0, init_std)
                nn.init.zeros_(module.in_proj_bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, init_std)
        for projection, _ in self.softmax.tail:
            nn.init.eye_(projection.weight)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """The core's zero state for `batch_size` parallel streams."""
        return self.core.initial_state(batch_size, device)

    def word_vectors(self) -> Tensor:
        """The input embedding [V, D]; with tied weights, the softmax's output word vectors in id order."""
        if self.embedding is not None:
            return self.embedding.weight
        head_words = self.softmax.head.weight[: self.softmax.shortlist_size]
        return torch.cat([head_words, *(words.weight for _, words in self.softmax.tail)])

    def hidden(self, inputs: Tensor, state: State | None = None, reset: Tensor | None = None) -> tuple[Tensor, State]:
        """inputs [T, B] int64 -> final hidden states [T, B, D] (after dropout) and the core's new state.

        `state` None starts from the zero state.
        """
        if state is None:
            state = self.initial_state(inputs.shape[1], inputs.device)
        x = F.embedding(inputs, self.word_vectors()) * math.sqrt(self.hidden_size)
        if self.positional_encoding:
            positions = torch.arange(inputs.shape[0] - 1, -1, -1, device=inputs.device)
            x = x + sinusoidal_encoding(positions, self.hidden_size).to(x.dtype)[:, None]
        h, state = self.core(self.dropout(x), state, reset)
        return self.dropout(h), state

    def target_log_probs(self, h: Tensor, targets: Tensor) -> Tensor:
        """log p(target | h): h [N, D], targets [N] int64 -> [N]."""
        return self.softmax(h, targets).output

    def log_probs(self, h: Tensor) -> Tensor:
        """Log-probabilities of the whole vocabulary: h [N, D] -> [N, V]."""
        return self.softmax.log_prob(h)

    def forward(
        self, inputs: Tensor, targets: Tensor, state: State | None = None, reset: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """Per-token negative log-likelihood [T, B] of targets [T, B] given inputs [T, B], and the new state."""
        h, state = self.hidden(inputs, state, reset)
        return -self.target_log_probs(h.flatten(0, 1), targets.flatten()).view_as(targets), state


__all__ = [
    "SUPERVISED_CORE_NAMES", "WT103_CUTOFFS", "WT103_VOCAB_SIZE", "build_core", "scaled_cutoffs",
    "SequenceTagger", "LanguageModel",
]
