"""Supervised tasks: generated data sets (code execution, sequential ListOps), their caching and metrics."""
