"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE) and the router's load-balancing loss.

Routing (per token): `p = softmax(x W_r)` in float32, the top-k experts by `p`, their weights `p_topk`
renormalised to sum to 1 (Mixtral always; Qwen3-MoE when `norm_topk_prob`). The output is
`sum_k w_k * down_k(act(gate_k(x)) * up_k(x))`.

Experts run without a Python loop over experts, and no token is ever dropped (the numbers equal
transformers'), by one of two dispatches (`ModelConfig.moe_dispatch`):

* `ragged`: the `N k` (token, expert) assignments are sorted by expert and each expert's matmuls
  run on its contiguous group with `jax.lax.ragged_dot` -- a grouped GEMM on TPU and GPU, `N k` rows
  of work in all whatever the routing.
* `dense`: every expert on every token, weighted by the (mostly zero) gates: `E / k` times the
  useful work, but plain einsums.

`auto` (the default) is `ragged` on TPU/GPU and `dense` on CPU, where jax lowers `ragged_dot` to a
masked dense product over all groups (k times the dense dispatch's work): measured with
`bench/bench_moe.py` in docs/models.md, with GShard's capacity-based dispatch (which drops the
tokens past an expert's capacity) for comparison.

Load balancing (Switch Transformer, arXiv:2101.03961, eqs. 4-6, as transformers'
`load_balancing_loss_func`): over the MoE layers and the real tokens,

    f_e = (# top-k assignments to expert e) / (L N),  P_e = (sum of p_e) / (L N),
    aux = E * sum_e f_e P_e     (= k when routing is uniform).

Each layer returns its per-expert sums; `CausalLM.hidden_states` adds them up over layers and hands
them to any `collect_router_aux(model)` context open around the forward pass, which is how every
trainer adds `router_aux_loss_coef * aux` to its loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def route(logits_NxE: Array, k: int, *, normalize: bool) -> tuple[Array, Array, Array]:
    """(softmax probabilities `[N, E]` f32, top-k weights `[N, k]` f32, top-k expert ids `[N, k]`)."""
    probs_NxE = jax.nn.softmax(logits_NxE.astype(jnp.float32), axis=-1)
    weights_Nxk, experts_Nxk = jax.lax.top_k(probs_NxE, k)
    if normalize:
        weights_Nxk = weights_Nxk / jnp.sum(weights_Nxk, axis=-1, keepdims=True)
    return probs_NxE, weights_Nxk, experts_Nxk


def router_sums(probs_NxE: Array, experts_Nxk: Array, valid_N: Array) -> tuple[Array, Array]:
    """Per expert, over the valid tokens: (# top-k assignments `[E]`, sum of probabilities `[E]`)."""
    e = probs_NxE.shape[-1]
    valid = valid_N.astype(jnp.float32)
    per_slot_Nxk = jnp.broadcast_to(valid[:, None], experts_Nxk.shape)
    counts_E = jnp.zeros((e,), jnp.float32).at[experts_Nxk].add(per_slot_Nxk)
    probs_E = jnp.sum(probs_NxE * valid[:, None], axis=0)
    return counts_E, probs_E


def load_balancing_loss(counts_E: Array, probs_E: Array, rows: Array) -> Array:
    """`E * sum_e (counts_e / rows) (probs_e / rows)`, with `rows` = layers x valid tokens."""
    rows = jnp.maximum(rows, 1.0)
    return counts_E.shape[-1] * jnp.sum((counts_E / rows) * (probs_E / rows))


def load_balancing_loss_from_logits(
    router_logits_LxNxE: Array, k: int, valid_N: Array | None = None
) -> Array:
    """The load-balancing loss from each MoE layer's router logits (transformers' signature)."""
    layers, n, _ = router_logits_LxNxE.shape
    valid = jnp.ones((n,), jnp.float32) if valid_N is None else valid_N.astype(jnp.float32)
    counts, probs = 0.0, 0.0
    for logits in router_logits_LxNxE:
        p, _, experts = route(logits, k, normalize=False)
        c, s = router_sums(p, experts, valid)
        counts, probs = counts + c, probs + s
    return load_balancing_loss(counts, probs, layers * jnp.sum(valid))


class ExpertKernel(nnx.Module):
    """One projection of every expert: `kernel` `[E, in, out]` (HF: `experts.<e>.<name>.weight`)."""

    def __init__(self, experts: int, d_in: int, d_out: int, *, param_dtype: Any, rngs: nnx.Rngs):
        init = 0.02 * jax.random.normal(rngs.params(), (experts, d_in, d_out), jnp.float32)
        self.kernel = nnx.Param(init.astype(param_dtype))


class Experts(nnx.Module):
    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = ExpertKernel(e, d, f, param_dtype=cfg.param_dtype, rngs=rngs)
        self.up_proj = ExpertKernel(e, d, f, param_dtype=cfg.param_dtype, rngs=rngs)
        self.down_proj = ExpertKernel(e, f, d, param_dtype=cfg.param_dtype, rngs=rngs)


class MoE(nnx.Module):
    """Router (`router.kernel` `[D, E]`) and experts; `__call__` returns the output and the layer's
    `router_sums` over the tokens `valid_BxT` marks."""

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        from jaxrlhf.models.decoder import Linear  # the decoder imports this module

        self.router = Linear(cfg.hidden_size, cfg.num_experts, bias=False, cfg=cfg, rngs=rngs)
        self.experts = Experts(cfg, rngs=rngs)
        self.k, self.normalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.act, self.dtype = cfg.activation, cfg.dtype
        self.dispatch = cfg.effective_moe_dispatch

    def __call__(self, x_BxTxD: Array, valid_BxT: Array) -> tuple[Array, tuple[Array, Array]]:
        b, t, d = x_BxTxD.shape
        x_NxD = x_BxTxD.reshape(b * t, d).astype(self.dtype)
        probs_NxE, weights_Nxk, experts_Nxk = route(self.router(x_NxD), self.k, normalize=self.normalize)
        experts = self._ragged if self.dispatch == "ragged" else self._dense
        out_NxD = experts(x_NxD, weights_Nxk, experts_Nxk)
        sums = router_sums(probs_NxE, experts_Nxk, valid_BxT.reshape(-1))
        return out_NxD.astype(self.dtype).reshape(b, t, d), sums

    def _kernels(self) -> tuple[Array, Array, Array]:
        e = self.experts
        return tuple(p.kernel[...].astype(self.dtype) for p in (e.gate_proj, e.up_proj, e.down_proj))

    def _ragged(self, x_NxD: Array, weights_Nxk: Array, experts_Nxk: Array) -> Array:
        from jaxrlhf.models.decoder import ACTIVATIONS

        (n, d), k = x_NxD.shape, self.k
        gate_ExDxF, up_ExDxF, down_ExFxD = self._kernels()
        # Sort the N k assignments by expert: each expert's rows are contiguous for ragged_dot.
        flat_M = experts_Nxk.reshape(-1)
        order_M = jnp.argsort(flat_M, stable=True)
        x_MxD = jnp.take(x_NxD, order_M // k, axis=0)
        sizes_E = jnp.bincount(flat_M, length=gate_ExDxF.shape[0]).astype(jnp.int32)
        h_MxF = ACTIVATIONS[self.act](jax.lax.ragged_dot(x_MxD, gate_ExDxF, sizes_E))
        h_MxF = h_MxF * jax.lax.ragged_dot(x_MxD, up_ExDxF, sizes_E)
        y_MxD = jax.lax.ragged_dot(h_MxF, down_ExFxD, sizes_E)
        inverse_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(order_M.shape[0]))
        y_NxkxD = jnp.take(y_MxD, inverse_M, axis=0).reshape(n, k, d)
        return jnp.einsum("nkd,nk->nd", y_NxkxD.astype(jnp.float32), weights_Nxk)

    def _dense(self, x_NxD: Array, weights_Nxk: Array, experts_Nxk: Array) -> Array:
        from jaxrlhf.models.decoder import ACTIVATIONS

        gate_ExDxF, up_ExDxF, down_ExFxD = self._kernels()
        n, e = x_NxD.shape[0], gate_ExDxF.shape[0]
        gates_NxE = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], experts_Nxk].set(weights_Nxk)
        h_NxExF = ACTIVATIONS[self.act](jnp.einsum("nd,edf->nef", x_NxD, gate_ExDxF))
        h_NxExF = h_NxExF * jnp.einsum("nd,edf->nef", x_NxD, up_ExDxF)
        y_NxExD = jnp.einsum("nef,efd->ned", h_NxExF, down_ExFxD)
        return jnp.einsum("ned,ne->nd", y_NxExD.astype(jnp.float32), gates_NxE)


@dataclasses.dataclass
class RouterAux:
    """What `collect_router_aux` gathered for one model: per-expert sums and the row count."""

    model: Any
    counts_E: Array | None = None
    probs_E: Array | None = None
    rows: Array | None = None

    def add(self, counts_E: Array, probs_E: Array, rows: Array) -> None:
        if self.counts_E is None:
            self.counts_E, self.probs_E, self.rows = counts_E, probs_E, rows
        else:
            self.counts_E, self.probs_E = self.counts_E + counts_E, self.probs_E + probs_E
            self.rows = self.rows + rows

    def loss(self) -> Array:
        """The load-balancing loss of every forward pass of `model` in the context (0 if none)."""
        if self.counts_E is None:
            return jnp.float32(0.0)
        return load_balancing_loss(self.counts_E, self.probs_E, self.rows)


_ACTIVE: list[RouterAux] = []


@contextlib.contextmanager
def collect_router_aux(model: Any) -> Iterator[RouterAux]:
    """Gather the router statistics of `model`'s forward passes inside the block (other models, such
    as a reference, are not counted). Use inside the traced loss function."""
    aux = RouterAux(model)
    _ACTIVE.append(aux)
    try:
        yield aux
    finally:
        _ACTIVE.remove(aux)


def record(model: Any, counts_E: Array, probs_E: Array, rows: Array) -> None:
    for aux in _ACTIVE:
        if aux.model is model:
            aux.add(counts_E, probs_E, rows)


def add_router_aux(
    model: Any, loss: Array, aux: RouterAux, metrics: dict[str, Array], *, weight: Any = 1.0
) -> Array:
    """`loss + router_aux_loss_coef * aux * weight` for an MoE model, with the metric
    `router_aux_loss`; `loss` unchanged for a dense one. `weight`: what `loss` is later divided by
    (a summed loss's token count), so the coefficient applies to the mean."""
    cfg = model.config
    if not cfg.num_experts:
        return loss
    value = aux.loss()
    metrics["router_aux_loss"] = jax.lax.stop_gradient(value)
    if not cfg.router_aux_loss_coef:
        return loss
    return loss + cfg.router_aux_loss_coef * value * jax.lax.stop_gradient(weight)
