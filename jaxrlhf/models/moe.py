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

Each layer returns its per-expert sums; `CausalLM.hidden_states` adds them up over layers and sows
them, with the row count, as a `RouterStats` value (an `nnx.Intermediate`) of the model -- only under
`nnx.capture(fn, RouterStats)`, which returns them beside `fn`'s result; a plain forward pass stores
nothing. The trainers capture the policy's passes inside the traced loss and add
`router_aux_loss_coef * aux` with `add_router_aux`:

    (loss, metrics), aux = nnx.capture(objective, RouterStats)(model, batch, ref_model)
    loss = add_router_aux(model, loss, aux, metrics)

Only the model `fn` is called with (its first argument) is captured: a reference model's passes
inside `fn` are not counted.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf.models.layers import ACTIVATIONS, Linear

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
        gate_ExDxF, up_ExDxF, down_ExFxD = self._kernels()
        n, e = x_NxD.shape[0], gate_ExDxF.shape[0]
        gates_NxE = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], experts_Nxk].set(weights_Nxk)
        h_NxExF = ACTIVATIONS[self.act](jnp.einsum("nd,edf->nef", x_NxD, gate_ExDxF))
        h_NxExF = h_NxExF * jnp.einsum("nd,edf->nef", x_NxD, up_ExDxF)
        y_NxExD = jnp.einsum("nef,efd->ned", h_NxExF, down_ExFxD)
        return jnp.einsum("ned,ne->nd", y_NxExD.astype(jnp.float32), gates_NxE)


class RouterStats(nnx.Intermediate):
    """The router statistics of one forward pass of an MoE model: `(counts_E, probs_E, rows)`, the
    per-expert sums of `router_sums` over its MoE layers and the rows they cover (MoE layers x real
    tokens). Sown by `CausalLM.hidden_states` under `nnx.capture(fn, RouterStats)`, one tuple per pass
    (`Module.sow`'s default: a tuple of the values)."""


def capturing(module: nnx.Module) -> bool:
    """Is `module` inside an `nnx.capture` (which marks each module it collects from with
    `__captures__`)? Outside one, `Module.sow` would store the value on the module itself (deprecated
    in flax 0.12, and a leaked tracer when the module outlives the trace), so the model sows only here."""
    return hasattr(module, "__captures__")


def sow_router_stats(model: nnx.Module, counts_E: Array, probs_E: Array, rows: Array) -> None:
    """Record one forward pass's router statistics as `model`'s `RouterStats` when it is captured."""
    if capturing(model):
        model.sow(RouterStats, "router_stats", (counts_E, probs_E, rows))


def router_aux_loss(captured: nnx.State | None) -> Array:
    """The load-balancing loss of every forward pass `nnx.capture(..., RouterStats)` recorded: the
    per-expert sums and row counts added over the passes, then `load_balancing_loss` (0 if none)."""
    passes = []
    if captured is not None:
        for _, variable in nnx.to_flat_state(nnx.state(captured, RouterStats)):
            passes.extend(variable.get_value())
    if not passes:
        return jnp.float32(0.0)
    counts_E, probs_E, rows = passes[0]
    for c, p, r in passes[1:]:
        counts_E, probs_E, rows = counts_E + c, probs_E + p, rows + r
    return load_balancing_loss(counts_E, probs_E, rows)


def add_router_aux(
    model: Any, loss: Array, aux: nnx.State | None, metrics: dict[str, Array], *, weight: Any = 1.0
) -> Array:
    """`loss + router_aux_loss_coef * router_aux_loss(aux) * weight` for an MoE model, with the metric
    `router_aux_loss`; `loss` unchanged for a dense one. `aux`: the `RouterStats` state that
    `nnx.capture(fn, RouterStats)` returned for `model`'s passes. `weight`: what `loss` is later
    divided by (a summed loss's token count), so the coefficient applies to the mean."""
    cfg = model.config
    if not cfg.num_experts:
        return loss
    value = router_aux_loss(aux)
    metrics["router_aux_loss"] = jax.lax.stop_gradient(value)
    if not cfg.router_aux_loss_coef:
        return loss
    return loss + cfg.router_aux_loss_coef * value * jax.lax.stop_gradient(weight)
