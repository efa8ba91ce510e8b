"""Metrics and figures: likelihoods, score-matching objectives, plots."""
