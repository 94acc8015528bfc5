"""LoRA test set-up: adapters with non-zero `B`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models.lora import LoRAParam


def randomize_b(model, seed=0):
    """Give every `lora_b` random values (fresh ones are zero, which would hide bugs)."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        if path[-1] == "lora_b":
            var.set_value(jnp.asarray(rng.normal(0, 0.05, var.get_value().shape), jnp.float32))
    return model
