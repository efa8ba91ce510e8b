"""The bi-level training step: functional unroll and the Lightning module."""
