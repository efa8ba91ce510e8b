"""eblvm: learning energy-based latent variable models with bi-level score matching and its baselines."""

from eblvm.errors import ConfigError, DivergenceError

__all__ = ["ConfigError", "DivergenceError"]
__version__ = "0.1.0"
