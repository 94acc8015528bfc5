"""One frozen trunk for several models: a policy, its reference, a critic and a reward model
trained above the same frozen base (`model.frozen_layers`) compute the same embeddings and first
layers on the same rows. `shared_trunk` tells when they do (the same architecture and bit-identical
frozen weights); then `CausalLM.trunk_states` runs the trunk once and each model goes on from it
with `hidden_states(..., trunk=x)` -- exactly its whole pass, for a fraction of the work.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf.models.decoder import CausalLM

# Config fields that do not change what a model's frozen trunk computes.
_TRUNK_FREE_FIELDS = ("score_pooling", "tie_word_embeddings", "remat", "router_aux_loss_coef")


def trunk_arrays(model: CausalLM) -> dict[tuple[Any, ...], jax.Array]:
    """The weights of a model's frozen trunk by path: the embeddings and decoder layers
    `0 .. frozen_layers - 1` (with scanned layers, the first slices of the stacked arrays)."""
    n, scanned = model.config.frozen_layers, model.config.scan_layers
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        head = str(path[0])
        if head in ("embed_tokens", "embed_positions"):
            out[path] = var.get_value()
        elif head == "layers" and scanned:
            out[path] = var.get_value()[:n]
        elif head == "layers" and int(path[1]) < n:
            out[path] = var.get_value()
    return out


def _architecture(model: CausalLM) -> dict[str, Any]:
    fields = dataclasses.fields(model.config)
    return {f.name: getattr(model.config, f.name) for f in fields if f.name not in _TRUNK_FREE_FIELDS}


def shared_trunk(model: CausalLM, *others: CausalLM | None) -> bool:
    """Do `model` and `others` (None entries skipped) compute one frozen trunk: the same
    architecture and `frozen_layers > 0`, no adapters, no experts, and bit-identical trunk weights
    (models trained above the same frozen base). A policy's trunk is also its reference's: frozen
    layers never change."""
    c = model.config
    if c.frozen_layers == 0 or c.num_experts or c.lora is not None or c.quantize != "none":
        return False
    mine = trunk_arrays(model)
    for other in others:
        if other is None:
            continue
        if _architecture(other) != _architecture(model):
            return False
        theirs = trunk_arrays(other)
        if theirs.keys() != mine.keys():
            return False
        for k, a in mine.items():
            b = theirs[k]
            if a.shape != b.shape or a.dtype != b.dtype or not bool(jnp.array_equal(a, b)):
                return False
    return True
