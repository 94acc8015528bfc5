"""jaxrlhf: align language models with human preferences in JAX (SFT, reward models, PPO, DPO)."""

from jaxrlhf import losses, models

__version__ = "0.1.0"

__all__ = ["losses", "models", "__version__"]
