"""Evaluation: metrics with paired bootstrap CIs, the classical baselines, few-shot sweeps, the record ceiling."""
