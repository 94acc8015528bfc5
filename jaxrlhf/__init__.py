"""jaxrlhf: align language models with human preferences in JAX (SFT, reward models, DPO, PPO).

Subpackages: `models` (Flax NNX decoders, Hugging Face checkpoints in and out), `losses` (pure JAX
losses), `data` (preference / SFT data to fixed-shape batches), `parallel` (meshes, partition rules),
`generation` (the KV-cache sampler) and `train` (configs, trainers, checkpoints; imported on use).
"""

from jaxrlhf import data, generation, losses, models, parallel

__version__ = "0.1.0"

__all__ = ["__version__", "data", "generation", "losses", "models", "parallel"]
