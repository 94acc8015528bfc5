"""Mixture of experts (Mixtral, Qwen3-MoE) against transformers: routing, expert outputs, the
load-balancing loss, checkpoints with dense and sparse layers, and sharding over the expert axis."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx
from helpers.tiny_hf import hf_logits, make_hf_model, padded_batch, run_with_cpu_devices
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from jaxrlhf.models import from_pretrained, save_pretrained
from jaxrlhf.models.config import UnsupportedModelError
from jaxrlhf.models.moe import RouterStats, load_balancing_loss_from_logits, route, router_aux_loss

KINDS = ("mixtral", "qwen3_moe")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=KINDS)
def pair(request, hf_checkpoint):
    """(kind, transformers model, its checkpoint dir, our model loaded from it)."""
    hf, path = hf_checkpoint(request.param)
    return request.param, hf, path, from_pretrained(path)


def test_routing_and_expert_outputs_equal_transformers(pair):
    """Each MoE block fed transformers' own input: same top-k experts for every token, same
    weights, same block output."""
    kind, hf, _, ours = pair
    seen: dict[int, dict] = {}
    hooks = []
    for i, layer in enumerate(hf.model.layers):
        rec = seen.setdefault(i, {})
        hooks.append(layer.mlp.register_forward_hook(
            lambda m, args, out, rec=rec: rec.update(x=args[0].detach().numpy(), y=out.detach().numpy())))
        hooks.append(layer.mlp.gate.register_forward_hook(
            lambda m, args, out, rec=rec: rec.update(scores=out[1].detach().numpy(), ids=out[2].numpy())))
    ids, mask, pos = padded_batch("left", seed=5)
    hf_logits(hf, ids, mask, pos)
    for h in hooks:
        h.remove()
    k = ours.config.num_experts_per_tok
    for i, rec in seen.items():
        block = ours.layers[i].mlp
        x = jnp.asarray(rec["x"])
        _, weights, experts = route(block.router(x.reshape(-1, x.shape[-1])), k, normalize=block.normalize)
        np.testing.assert_array_equal(np.asarray(experts), rec["ids"], err_msg=f"{kind} layer {i}")
        np.testing.assert_allclose(np.asarray(weights), rec["scores"], atol=1e-6)
        y, _ = block(x, jnp.ones(x.shape[:2], bool))
        np.testing.assert_allclose(np.asarray(y), rec["y"], atol=1e-5)
        assert len(np.unique(rec["ids"])) == ours.config.num_experts  # every expert is used


def test_ragged_and_dense_dispatch_agree(pair):
    """The two expert dispatches (grouped `ragged_dot` over sorted tokens; every expert on every
    token) give the same logits and gradients; only their cost differs (docs/models.md)."""
    kind, _, path, _ = pair
    ids, mask, pos = (jnp.asarray(a) for a in padded_batch("left", seed=2))
    out = {}
    for dispatch in ("ragged", "dense"):
        model = from_pretrained(path, moe_dispatch=dispatch)
        assert model.layers[0].mlp.dispatch == dispatch
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p, graphdef=graphdef):
            logits = nnx.merge(graphdef, p)(ids, mask, pos)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 7] * mask), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        flat = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(grads)}
        out[dispatch] = np.asarray(logits), flat
    np.testing.assert_allclose(out["ragged"][0], out["dense"][0], atol=1e-5, err_msg=kind)
    for name, g in out["dense"][1].items():
        # float32 sums in another order: ~1e-6 apart on gradients of ~1e-2
        np.testing.assert_allclose(out["ragged"][1][name], g, atol=1e-5, rtol=1e-4, err_msg=str(name))


def test_load_balancing_loss_function_equals_transformers():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 40, 6)).astype(np.float32) * 2
    mask = (rng.random((4, 10)) > 0.3).astype(np.int64)
    for m in (None, mask):
        want = load_balancing_loss_func(
            tuple(torch.tensor(x) for x in logits), 6, 2, None if m is None else torch.tensor(m)
        )
        valid = None if m is None else jnp.asarray(m.reshape(-1))
        got = load_balancing_loss_from_logits(jnp.asarray(logits), 2, valid)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_model_aux_loss_equals_transformers(pair, side):
    """The loss of the router statistics our forward pass sows (`nnx.capture(..., RouterStats)`)
    equals transformers' `aux_loss` on the same padded batch (padding excluded by the attention
    mask); it has a gradient on the routers."""
    kind, hf, _, ours = pair
    ids, mask, pos = padded_batch(side, seed=6)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos, dtype=torch.long), output_router_logits=True)  # fmt: skip
    _, aux = nnx.capture(ours, RouterStats)(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos))
    np.testing.assert_allclose(float(router_aux_loss(aux)), float(out.aux_loss), rtol=1e-5, err_msg=kind)

    graphdef, params = nnx.split(ours, nnx.Param)

    def loss(p):
        model = nnx.merge(graphdef, p)
        _, a = nnx.capture(model, RouterStats)(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos))
        return router_aux_loss(a)

    grads = jax.jit(jax.grad(loss))(params)
    router = np.asarray(grads["layers"][0]["mlp"]["router"]["kernel"].get_value())
    assert np.isfinite(router).all() and np.abs(router).max() > 1e-4


def test_other_models_are_not_collected(pair):
    _, _, path, ours = pair
    other = from_pretrained(path)
    ids, mask, pos = padded_batch("right", seed=6)
    _, aux = nnx.capture(lambda model: other(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)),
                         RouterStats)(ours)  # fmt: skip
    assert float(router_aux_loss(aux)) == 0.0


def _numpy_router_aux(passes, k: int) -> float:
    """The load-balancing loss in plain numpy (float64) from transformers' router logits: per pass
    the per-layer router logits `[B T, E]` and the attention mask `[B, T]`; softmax, top-k, then
    `E * sum_e f_e P_e` over every layer and real token of every pass."""
    counts, probs, rows = 0.0, 0.0, 0
    for layer_logits, mask in passes:
        valid = np.asarray(mask).reshape(-1).astype(bool)
        for logits in layer_logits:
            z = np.asarray(logits, np.float64)
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            top = np.argsort(-p, axis=1, kind="stable")[:, :k]
            c = np.zeros(p.shape[1])
            np.add.at(c, top[valid].ravel(), 1.0)
            counts, probs, rows = counts + c, probs + p[valid].sum(axis=0), rows + int(valid.sum())
    return float(len(counts) * np.sum((counts / rows) * (probs / rows)))


def test_captured_router_aux_equals_numpy(pair):
    """Two forward passes of the model (left- and right-padded batches) and one of another model
    inside one `nnx.capture`: the loss of the captured `RouterStats` equals a numpy recomputation
    over both passes of the model (not the other's), from transformers' router logits."""
    kind, hf, path, ours = pair
    other = from_pretrained(path)
    batches = [padded_batch("left", seed=8), padded_batch("right", seed=9, lengths=(12, 5, 9))]
    passes = []
    for ids, mask, pos in batches:
        with torch.no_grad():
            out = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos, dtype=torch.long), output_router_logits=True)  # fmt: skip
        passes.append(([x.float().numpy() for x in out.router_logits], mask))

    def forward(model):
        for ids, mask, pos in batches:
            model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos))
            other(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos))

    _, aux = nnx.capture(forward, RouterStats)(ours)
    stats = [v.get_value() for _, v in nnx.to_flat_state(aux)]
    assert len(stats) == 1 and len(stats[0]) == 2  # one value per forward pass of `ours`
    want = _numpy_router_aux(passes, ours.config.num_experts_per_tok)
    np.testing.assert_allclose(float(router_aux_loss(aux)), want, rtol=1e-5, err_msg=kind)
    layers = sum(ours.config.layer_is_moe(i) for i in range(ours.config.num_layers))
    rows = sum(float(r) for _, _, r in stats[0])
    assert rows == layers * sum(int(m.sum()) for _, m, _ in batches)


def test_plain_forward_records_nothing(pair):
    """Outside `nnx.capture` the forward pass stores no router statistics on the model (no state
    added, no deprecated `sow`), so it splits as before; `router_aux_loss` of nothing is 0."""
    _, _, path, _ = pair
    model = from_pretrained(path)
    ids, mask, pos = (jnp.asarray(a) for a in padded_batch("right", seed=6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(ids, mask, pos)
        model.hidden_states(ids, mask, pos)
    assert not [w for w in caught if "sow" in str(w.message)]
    assert not nnx.to_flat_state(nnx.state(model, nnx.Intermediate))
    nnx.split(model, nnx.Param)  # nothing left over for an exhaustive split
    assert float(router_aux_loss(None)) == 0.0


def test_dense_and_sparse_layers_load_and_save(tmp_path):
    """Qwen3-MoE with `mlp_only_layers`: a dense MLP between sparse ones, exact and saved back in the
    per-expert layout transformers reads; scan_layers is refused with a reason."""
    hf = make_hf_model("qwen3_moe_mixed")
    src = str(tmp_path / "src")
    hf.save_pretrained(src)
    ours = from_pretrained(src)
    assert ours.config.moe_layers == (True, False, True)
    ids, mask, pos = padded_batch("right", seed=3)
    ref = hf_logits(hf, ids, mask, pos)
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)))
    real = mask.astype(bool)
    assert np.abs(got - ref)[real].max() <= 1e-4
    out = str(tmp_path / "out")
    save_pretrained(ours, out)
    again = tf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert np.abs(hf_logits(again, ids, mask, pos) - ref)[real].max() <= 1e-4
    with pytest.raises(UnsupportedModelError, match="scan_layers"):
        from_pretrained(src, scan_layers=True)


def test_expert_axis_mesh_invariance(tmp_path):
    """8 CPU devices, experts split 4 ways (batch over data x expert): the expert kernels are
    sharded on E, and logits, aux loss and gradients equal one device's."""
    path = str(tmp_path / "moe")
    make_hf_model("mixtral").save_pretrained(path)  # 4 experts: one per expert-axis device
    script = f"""
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from helpers.tiny_hf import padded_batch
from jaxrlhf.models import from_pretrained
from jaxrlhf.models.moe import RouterStats, router_aux_loss
from jaxrlhf.parallel import make_mesh

rows = padded_batch("left", seed=1, lengths=(11, 7, 3, 9))
ids, mask, pos = (jnp.asarray(np.concatenate([a, a[::-1]])) for a in rows)

def run(model):
    graphdef, params = nnx.split(model, nnx.Param)
    def loss(p):
        m = nnx.merge(graphdef, p)
        logits, stats = nnx.capture(m, RouterStats)(ids, mask, pos)
        aux = router_aux_loss(stats)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 5]) + 0.1 * aux, (logits, aux)
    (l, (logits, aux)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), float(aux), {{k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(g)}}

one = run(from_pretrained({path!r}))
mesh = make_mesh(data=2, expert=4)
for dispatch in ("dense", "ragged"):
    model = from_pretrained({path!r}, mesh=mesh, moe_dispatch=dispatch)
    spec = model.layers[0].mlp.experts.gate_proj.kernel[...].sharding.spec
    assert spec[0] == "expert", spec
    many = run(model)
    assert np.abs(one[0] - many[0]).max() < 1e-5
    assert abs(one[1] - many[1]) < 1e-6
    for k in one[2]:
        np.testing.assert_allclose(one[2][k], many[2][k], atol=1e-6, rtol=1e-4, err_msg=str(k))
print("OK")
"""
    run_with_cpu_devices(script)
