"""jaxrlhf: align language models with human preferences in JAX (SFT, reward models, DPO, PPO).

Subpackages: `models` (Flax NNX decoders, Hugging Face checkpoints in and out), `losses` (pure JAX
losses), `data` (preference / SFT data to fixed-shape batches), `parallel` (meshes, partition rules),
`generation` (the KV-cache sampler), `tools` (tools and environments of multi-turn RL), and,
imported on use, `train` (configs, trainers, checkpoints) and `plan` (steps compiled for TPU
slices without a TPU: `jaxrlhf plan`).
"""

import glob
import os
import sys

# With libtpu or XLA's CUDA plugin installed (the `plan` and `test` extras: the compilers of
# `jaxrlhf plan`) on a machine without that accelerator, every jax start would try to bring it up
# and log its failure. On Linux, where accelerators are device files (TPU /dev/accel* or /dev/vfio/*,
# NVIDIA /dev/nvidia*, AMD /dev/kfd), a machine with none of them runs on the CPU: say so up front.
# JAX_PLATFORMS set by the user always wins.
_ACCELERATORS = ("/dev/accel*", "/dev/vfio/*", "/dev/nvidia*", "/dev/kfd")
if sys.platform == "linux" and "JAX_PLATFORMS" not in os.environ and not any(map(glob.glob, _ACCELERATORS)):
    os.environ["JAX_PLATFORMS"] = "cpu"

from jaxrlhf import data, generation, losses, models, parallel, tools  # noqa: E402

__version__ = "0.1.0"

__all__ = ["__version__", "data", "generation", "losses", "models", "parallel", "tools"]
