"""Scanned layers (`scan_layers=True`: parameters stacked `[L, ...]`, one `lax.scan`) against the
unrolled model and against transformers, for every supported family, and every remat policy.

* logits equal the unrolled model's and transformers' (fp32), gradients equal the unrolled model's
  layer by layer, greedy KV-cache generation gives the same tokens;
* the export of a scanned model is per-layer Hugging Face tensors that transformers loads as is;
* `frozen_layers` with scanning: the first layers' gradients are zero and the optimizer leaves them;
* a scanned model sharded on 8 CPU devices gives the single-device logits and gradients.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import transformers as tf
from flax import nnx
from helpers.grads import grads_by_path, mean_nll, unstack_layers
from helpers.tiny_hf import (
    MIXED_TYPES,
    MODEL_TYPES,
    hf_logits,
    make_hf_model,
    padded_batch,
    run_with_cpu_devices,
)

from jaxrlhf.generation import generate
from jaxrlhf.models import from_pretrained, save_pretrained
from jaxrlhf.models.config import REMAT_POLICIES
from jaxrlhf.train.step import frozen_params, make_optimizer

TOL = 1e-4
KINDS = MODEL_TYPES + MIXED_TYPES


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=KINDS)
def saved(request, hf_checkpoint):
    """(kind, transformers model, checkpoint dir)."""
    hf, path = hf_checkpoint(request.param)
    return request.param, hf, path


def test_scanned_logits_match_unrolled_and_transformers(saved):
    kind, hf, path = saved
    ids, mask, pos = padded_batch("left", seed=1)
    ref = hf_logits(hf, ids, mask, pos)
    unrolled = np.asarray(from_pretrained(path)(ids, mask, pos))
    scanned_model = from_pretrained(path, scan_layers=True)
    assert scanned_model.layers.self_attn.q_proj.kernel.shape[0] == scanned_model.config.num_layers
    scanned = np.asarray(scanned_model(ids, mask, pos))
    real = mask.astype(bool)
    assert np.abs(ref[real]).max() > 0.5
    assert np.abs(scanned - ref)[real].max() <= TOL, kind
    assert np.abs(scanned - unrolled)[real].max() <= 1e-5, kind


# "auto" (the default) on every family; the other policies, "none" included, only change what the
# backward pass saves or recomputes, so two families (one with mixed layers).
REMAT_CASES = [
    (kind, remat)
    for kind in KINDS
    for remat in REMAT_POLICIES
    if remat == "auto" or kind in ("llama", "qwen2_mixed")
]
_UNROLLED: dict[str, dict] = {}  # kind -> the unrolled model's gradients: one reference for every policy


@pytest.mark.parametrize("kind, remat", REMAT_CASES)
def test_scanned_gradients_match_unrolled_for_every_remat_policy(hf_checkpoint, kind, remat):
    _, path = hf_checkpoint(kind)
    ids, mask, pos = padded_batch("right", seed=2)
    if kind not in _UNROLLED:
        _UNROLLED[kind] = grads_by_path(from_pretrained(path), ids, mask, pos)
    want = _UNROLLED[kind]
    scanned = from_pretrained(path, scan_layers=True, remat=remat)
    got = unstack_layers(grads_by_path(scanned, ids, mask, pos))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=1e-4, err_msg=f"{kind} {remat} {k}")
    if remat not in ("none", "auto"):  # the unrolled model under the same policy, merged in jit as a step is
        unrolled = grads_by_path(from_pretrained(path, remat=remat), ids, mask, pos, jit=True)
        for k in want:
            np.testing.assert_allclose(unrolled[k], want[k], atol=1e-6, rtol=1e-4, err_msg=f"{remat} {k}")
    assert max(np.abs(v).max() for v in want.values()) > 1e-3


def test_auto_remat_keeps_the_matmul_outputs_of_scanned_layers(tiny_llama):
    """remat "auto" is dots_saveable scanned and none unrolled: the compiled scanned gradient keeps
    less than with "none" (which stacks every elementwise intermediate) and more than "full".
    One family (llama): the policy does not depend on it."""
    path = tiny_llama
    ids, mask, pos = padded_batch("right", seed=4)

    def temp_bytes(model):
        graphdef, params = nnx.split(model, nnx.Param)
        grad_fn = jax.jit(jax.grad(lambda p: mean_nll(nnx.merge(graphdef, p), ids, mask, pos)))
        return grad_fn.lower(params).compile().memory_analysis().temp_size_in_bytes

    auto = from_pretrained(path, scan_layers=True)
    assert auto.config.remat == "auto" and auto.config.effective_remat == "dots_saveable"
    assert from_pretrained(path).config.effective_remat == "none"
    temp = {r: temp_bytes(from_pretrained(path, scan_layers=True, remat=r)) for r in ("none", "full")}
    assert temp["full"] < temp_bytes(auto) < temp["none"], temp


def test_scanned_greedy_generation_matches_unrolled(saved):
    kind, _, path = saved
    ids, mask, _ = padded_batch("left", seed=3, lengths=(9, 4, 1, 6), total=9)
    kw = dict(max_new_tokens=8, eos_token_ids=[1], pad_token_id=0, temperature=0.0)
    a = generate(from_pretrained(path), ids, mask, **kw)
    b = generate(from_pretrained(path, scan_layers=True), ids, mask, **kw)
    np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
    np.testing.assert_allclose(np.asarray(b.logprobs), np.asarray(a.logprobs), atol=1e-5)
    assert np.asarray(a.completion_mask).sum() > len(ids)  # more than one token per row was decoded


def test_scanned_export_is_per_layer_and_loads_in_transformers(saved, tmp_path):
    kind, hf, path = saved
    out = str(tmp_path / "export")
    save_pretrained(from_pretrained(path, scan_layers=True), out)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask, pos = padded_batch("right", seed=4)
    real = mask.astype(bool)
    ref = hf_logits(hf, ids, mask, pos)
    assert np.abs(hf_logits(reloaded, ids, mask, pos) - ref)[real].max() <= TOL, kind
    for name, tensor in hf.state_dict().items():  # bit-exact tensors, names included
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), tensor.numpy(), err_msg=name)


def test_frozen_layers_with_scanning(tmp_path):
    hf = make_hf_model("qwen2_mixed")
    path = str(tmp_path / "m")
    hf.save_pretrained(path)
    ids, mask, pos = padded_batch("right", seed=5)
    want = grads_by_path(from_pretrained(path, frozen_layers=2), ids, mask, pos)
    model = from_pretrained(path, scan_layers=True, frozen_layers=2)
    got = unstack_layers(grads_by_path(model, ids, mask, pos))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=1e-4, err_msg=str(k))
    assert np.abs(got[("layers", "2", "mlp", "up_proj", "kernel")]).max() > 0
    assert all(np.abs(got[k]).max() == 0 for k in got if k[:2] in (("layers", "0"), ("layers", "1")))
    # AdamW with weight decay: layers 0 and 1 stay exactly as loaded, layer 2 moves
    graphdef, params = nnx.split(model, nnx.Param)
    opt = make_optimizer(optax.constant_schedule(1e-2), weight_decay=0.1,
                         frozen=frozen_params(2, scan_layers=True))  # fmt: skip
    grads = jax.grad(lambda p: mean_nll(nnx.merge(graphdef, p), ids, mask, pos))(params)
    updates, _ = opt.update(grads, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    before = params["layers"]["mlp"]["up_proj"]["kernel"].get_value()
    after = new["layers"]["mlp"]["up_proj"]["kernel"].get_value()
    np.testing.assert_array_equal(np.asarray(after[:2]), np.asarray(before[:2]))
    assert np.abs(np.asarray(after[2] - before[2])).max() > 1e-4
    emb = params["embed_tokens"]["embedding"].get_value()
    np.testing.assert_array_equal(np.asarray(new["embed_tokens"]["embedding"].get_value()), np.asarray(emb))


def test_scanned_model_on_8_devices_matches_one(tmp_path):
    hf = make_hf_model("qwen2_mixed")
    path = str(tmp_path / "m")
    hf.save_pretrained(path)
    run_with_cpu_devices(
        f"""
import jax, numpy as np
from helpers.grads import grads_by_path
from helpers.tiny_hf import padded_batch
from jaxrlhf.models import from_pretrained
from jaxrlhf.parallel import make_mesh
assert jax.device_count() == 8
ids, mask, pos = padded_batch("right", seed=6)
one = from_pretrained({path!r}, scan_layers=True)
mesh = make_mesh(data=2, fsdp=2, tensor=2)
sharded = from_pretrained({path!r}, scan_layers=True, mesh=mesh)
kernel = sharded.layers.mlp.up_proj.kernel.get_value()
assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), kernel.sharding.spec
assert kernel.addressable_shards[0].data.shape == (3, 32, 48)
np.testing.assert_allclose(np.asarray(sharded(ids, mask, pos)), np.asarray(one(ids, mask, pos)), atol=1e-5)
want, got = grads_by_path(one, ids, mask, pos), grads_by_path(sharded, ids, mask, pos)
for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=1e-4, err_msg=str(k))
print("OK")
"""
    )
