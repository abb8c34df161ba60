"""Evaluation: batched rollouts of a policy, per-episode metrics, aggregation into tables and figures."""
