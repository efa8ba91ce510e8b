"""eblvm: learning energy-based latent variable models with bi-level score matching and its baselines."""

from eblvm import config  # noqa: F401,E402  (registers the train.yaml schema with Hydra)
from eblvm.errors import ConfigError, DivergenceError

__all__ = ["ConfigError", "DivergenceError"]
__version__ = "0.1.0"
