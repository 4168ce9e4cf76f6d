"""Command-line entrypoints (train, evaluate, supervised), configuration, checkpoints and run logs."""
