"""Helpers shared by the tests (not part of the product)."""
from __future__ import annotations

from agent.config import load_defaults
from bench.loopback import LoopbackCluster  # noqa: F401  (the tests' multi-node cluster)
from learner.impala import Hyperparameters


def paper_hyperparameters(**changes) -> Hyperparameters:
    """The IMPALA hyperparameters of configs/atari.yaml, with `changes`."""
    return Hyperparameters.from_config({**load_defaults("atari.yaml"), **changes})
