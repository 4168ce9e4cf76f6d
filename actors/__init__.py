"""Environments (ale-py vector envs with the paper's preprocessing, toy tasks), the rollout loop and its Ray actors."""
