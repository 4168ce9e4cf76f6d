"""Sequential ListOps (RFWP's variant of Nangia & Bowman 2018; docs/protocol.md §2): the value at the last token.

An expression is a prefix tree without parentheses, e.g. `[MAX 3 [MIN 5 2 ] 8 ]` (value 8). The root
(depth 1) is an operator; below it a node is a digit leaf with probability 0.75 and otherwise an operator
over 2..5 arguments, uniform over MIN, MAX, FIRST; at depth 20 it is always a leaf. The reference generator
draws such trees and keeps those whose deepest leaf lies at exactly `depth + 1` ("depth 10" = 10 nested
operator levels = leaf depth 11). No length filter, no de-duplication. The label (0..9) is the target of
the last token only.

Rejection keeps about 1 tree in 70 (depth 10) or 160 (depth 15), which makes 12,000 examples take ~15-40 s
in Python. `_ExactDepthSampler` instead draws each node from its distribution conditioned on the tree's
depth (probabilities from the subtree-height distribution, computed once): the kept trees have exactly the
distribution of the rejection procedure (tests/test_tasks.py compares the two), at the cost of the kept
trees only.
"""
from __future__ import annotations

import bisect
import random

import torch

from tasks.data import PAD, IGNORE_INDEX, check_predictions, accuracies

PARAMS = {"depth": 10}
MAX_TREE_DEPTH = 20  # nodes at this depth are leaves
OPERATOR_PROBABILITY = 0.25  # below the root
ARITIES = (2, 3, 4, 5)  # uniform
OPERATORS = ("[MIN", "[MAX", "[FIRST")
CLOSE = "]"
INPUT_SYMBOLS = (PAD, *map(str, range(10)), *OPERATORS, CLOSE)
_DIGIT = [INPUT_SYMBOLS.index(str(d)) for d in range(10)]
_OPERATOR = [INPUT_SYMBOLS.index(op) for op in OPERATORS]
_CLOSE = INPUT_SYMBOLS.index(CLOSE)
_APPLY = (min, max, lambda args: args[0])  # in the order of OPERATORS


def check_params(params: dict[str, int]) -> None:
    if not 1 <= params["depth"] < MAX_TREE_DEPTH:
        raise ValueError(f"depth must be in 1..{MAX_TREE_DEPTH - 1} (paper: 10 or 15), got {params['depth']}")


def vocabularies(params: dict[str, int]) -> tuple[list[str], list[str]]:
    """Input: PAD + 14 symbols (digits, three operators, `]`). Output: the digits 0..9."""
    return list(INPUT_SYMBOLS), [str(d) for d in range(10)]


def _powers(x: float) -> list[float]:
    """[x^0, ..., x^max(ARITIES)] by multiplication (exact IEEE arithmetic: the same on every machine)."""
    out = [1.0]
    for _ in range(max(ARITIES)):
        out.append(out[-1] * x)
    return out


def _cumulative(weights: list[float]) -> list[float]:
    """Normalised cumulative weights, last entry exactly 1, for `bisect_right(cum, rng.random())`."""
    total = sum(weights)
    out = []
    acc = 0.0
    for w in weights:
        acc += w
        out.append(acc / total)
    out[-1] = 1.0
    return out


class _ExactDepthSampler:
    """Trees of the generator's distribution conditioned on their deepest leaf lying at `leaf_depth` (L).

    With H the depth of a subtree's deepest leaf and G(d, h) = P(H <= h) for a non-root node at depth d,
    G(d, h) = p_leaf + (1 - p_leaf) * mean_k G(d + 1, h)^k for d <= h, else 0. A node constrained to H <= h
    is a leaf with probability p_leaf / G(d, h), otherwise an operator whose k children are all constrained
    to H <= h. A node constrained to H = L (every ancestor of the deepest leaves, and the root) is an
    operator with k drawn in proportion to a^k - b^k (a = G(d + 1, L), b = G(d + 1, L - 1)); while none of
    its children has reached L, child i of r remaining does so with probability (a - b) a^(r-1) / (a^r - b^r),
    and is otherwise constrained to H <= L - 1; once one has, the rest are constrained to H <= L.
    """

    def __init__(self, leaf_depth: int) -> None:
        self.leaf_depth = leaf_depth
        cdf: dict[tuple[int, int], float] = {}  # G(d, h) for 2 <= d <= MAX_TREE_DEPTH, h <= leaf_depth
        for d in range(MAX_TREE_DEPTH, 1, -1):
            for h in range(leaf_depth + 1):
                if d > h:
                    cdf[d, h] = 0.0
                elif d == MAX_TREE_DEPTH:
                    cdf[d, h] = 1.0
                else:
                    child = _powers(cdf[d + 1, h])
                    mean = sum(child[k] for k in ARITIES) / len(ARITIES)
                    cdf[d, h] = (1 - OPERATOR_PROBABILITY) + OPERATOR_PROBABILITY * mean
        # Bounded nodes: outcome 0 = leaf, outcome i >= 1 = operator with ARITIES[i - 1] children.
        self._bounded: dict[tuple[int, int], list[float]] = {}
        for h in (leaf_depth - 1, leaf_depth):
            for d in range(2, h + 1):
                if d == MAX_TREE_DEPTH:
                    self._bounded[d, h] = [1.0]
                    continue
                child = _powers(cdf[d + 1, h])
                operator = OPERATOR_PROBABILITY / len(ARITIES)
                leaf = 1 - OPERATOR_PROBABILITY
                self._bounded[d, h] = _cumulative([leaf] + [operator * child[k] for k in ARITIES])
        # Nodes with H = L above depth L: arity, and the chance that the next child is the first to reach L.
        self._exact_arity: dict[int, list[float]] = {}
        self._first_exact: dict[int, list[float]] = {}  # indexed by the number of children remaining
        for d in range(1, leaf_depth):
            a = _powers(cdf[d + 1, leaf_depth])
            b = _powers(cdf[d + 1, leaf_depth - 1])
            self._exact_arity[d] = _cumulative([a[k] - b[k] for k in ARITIES])
            self._first_exact[d] = [0.0] + [
                (a[1] - b[1]) * a[r - 1] / (a[r] - b[r]) for r in range(1, max(ARITIES) + 1)
            ]

    def tree(self, rng: random.Random) -> tuple[list[int], int]:
        """One tree: its input ids and its value."""
        tokens: list[int] = []
        return tokens, self._exact(rng, 1, tokens)

    def _exact(self, rng: random.Random, depth: int, tokens: list[int]) -> int:
        if depth == self.leaf_depth:
            return self._leaf(rng, tokens)
        arity = ARITIES[bisect.bisect_right(self._exact_arity[depth], rng.random())]
        slot = self._open(tokens)
        values = []
        reached = False
        for i in range(arity):
            if not reached and rng.random() < self._first_exact[depth][arity - i]:
                values.append(self._exact(rng, depth + 1, tokens))
                reached = True
            else:
                bound = self.leaf_depth if reached else self.leaf_depth - 1
                values.append(self._bounded_node(rng, depth + 1, bound, tokens))
        return self._close(rng, slot, values, tokens)

    def _bounded_node(self, rng: random.Random, depth: int, bound: int, tokens: list[int]) -> int:
        outcome = bisect.bisect_right(self._bounded[depth, bound], rng.random())
        if outcome == 0:
            return self._leaf(rng, tokens)
        slot = self._open(tokens)
        values = [self._bounded_node(rng, depth + 1, bound, tokens) for _ in range(ARITIES[outcome - 1])]
        return self._close(rng, slot, values, tokens)

    @staticmethod
    def _leaf(rng: random.Random, tokens: list[int]) -> int:
        digit = rng.randrange(10)
        tokens.append(_DIGIT[digit])
        return digit

    @staticmethod
    def _open(tokens: list[int]) -> int:
        """Reserve the operator's position: like the reference, it is drawn after its arguments."""
        tokens.append(_CLOSE)
        return len(tokens) - 1

    @staticmethod
    def _close(rng: random.Random, slot: int, values: list[int], tokens: list[int]) -> int:
        op = rng.randrange(len(OPERATORS))
        tokens[slot] = _OPERATOR[op]
        tokens.append(_CLOSE)
        return _APPLY[op](values)


def generate_split(
    params: dict[str, int], rng: random.Random, size: int
) -> tuple[list[int], list[int], list[int]]:
    """`size` expressions of exact depth: (input ids, targets with the label at each last token), lengths."""
    sampler = _ExactDepthSampler(params["depth"] + 1)
    tokens: list[int] = []
    targets: list[int] = []
    lengths = []
    for _ in range(size):
        tree, label = sampler.tree(rng)
        tokens += tree
        targets += [IGNORE_INDEX] * (len(tree) - 1) + [label]
        lengths.append(len(tree))
    return tokens, targets, lengths


def metric_counts(pred: torch.Tensor, targets: torch.Tensor) -> dict[str, int]:
    """Correct labels among the scored (non-IGNORE_INDEX) positions; pred, targets [L, B] output ids."""
    check_predictions(pred, targets)
    scored = targets != IGNORE_INDEX
    return {"label_correct": int((scored & (pred == targets)).sum()), "label_total": int(scored.sum())}


def accuracy(pred: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of sequences whose label (at the last token) is predicted right; pred, targets [L, B]."""
    return accuracies(metric_counts(pred, targets))["label_accuracy"]
