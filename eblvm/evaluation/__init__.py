"""Metrics and figures: likelihoods, posterior diagnostics, image metrics (FID, KID, linear probe), plots."""
