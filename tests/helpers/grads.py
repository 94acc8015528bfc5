"""A next-token loss of a model and its gradients by parameter path, scanned layers unstacked."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def mean_nll(model, ids, mask, pos):
    """A scalar that depends on every logit: the mean log-likelihood of the next real token."""
    logp = jax.nn.log_softmax(model(ids, mask, pos)[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])


def grads_by_path(model, ids, mask, pos, jit=False):
    """Gradients of `mean_nll` by parameter path; `jit`: the model is merged inside a jitted function,
    as the train step does."""
    graphdef, params = nnx.split(model, nnx.Param)
    grad_fn = jax.grad(lambda p: mean_nll(nnx.merge(graphdef, p), ids, mask, pos))
    grads = (jax.jit(grad_fn) if jit else grad_fn)(params)
    return {tuple(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(grads)}


def unstack_layers(grads):
    """Stacked `layers/<name>` gradients `[L, ...]` as unrolled `layers/<i>/<name>` entries."""
    out = {}
    for k, v in grads.items():
        if k[0] == "layers" and not k[1].isdigit():
            out.update({("layers", str(i), *k[1:]): v[i] for i in range(v.shape[0])})
        else:
            out[k] = v
    return out
