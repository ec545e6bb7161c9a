"""Evaluation: probe metrics, likelihood metrics, lm-eval bridge, RWKU, callbacks and reports."""
