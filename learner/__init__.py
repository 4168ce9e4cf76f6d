"""Learner side of IMPALA: V-trace, losses and the update loop."""
