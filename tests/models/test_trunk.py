"""The frozen trunk computed once (`CausalLM.trunk_states`, `hidden_states(trunk=...)`): going on
from the trunk's output gives the whole pass's logits and the same gradients, for every dense
family, unrolled and scanned; models with the same frozen weights share one trunk."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.grads import grads_by_path, unstack_layers
from helpers.tiny_hf import MIXED_TYPES, MODEL_TYPES, padded_batch

from jaxrlhf.models import from_pretrained

DENSE = tuple(k for k in MODEL_TYPES + MIXED_TYPES if k not in ("mixtral", "qwen3_moe"))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("kind", DENSE)
def test_pass_from_the_trunk_equals_the_whole_pass(kind, scan, hf_checkpoint):
    _, path = hf_checkpoint(kind)
    model = from_pretrained(path, scan_layers=scan, frozen_layers=1)
    ids, mask, pos = padded_batch("left", seed=2)
    whole = np.asarray(model(ids, mask, pos))
    trunk = model.trunk_states(ids, mask, pos)
    assert trunk.shape == (*ids.shape, model.config.hidden_size)
    from_trunk = np.asarray(model(ids, mask, pos, trunk=trunk))
    real = mask.astype(bool)
    assert np.abs(whole[real]).max() > 0.1
    np.testing.assert_allclose(from_trunk[real], whole[real], atol=2e-6, rtol=1e-5, err_msg=kind)

    # the same gradients as the whole pass (which stops at the frozen top): the trained layers
    # get theirs, the frozen ones none
    want = grads_by_path(model, ids, mask, pos)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        logp = jax.nn.log_softmax(nnx.merge(graphdef, p)(ids, mask, pos, trunk=trunk)[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])

    grads = jax.grad(loss)(params)
    got = {tuple(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(grads)}
    if scan:
        want, got = unstack_layers(want), unstack_layers(got)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=1e-4, err_msg=f"{kind} {k}")
    trained = [k for k in got if k[:2] not in (("layers", "0"),) and not k[0].startswith("embed")]
    assert max(np.abs(got[k]).max() for k in trained) > 1e-4

def test_models_with_the_same_frozen_weights_share_one_trunk(hf_checkpoint):
    """A score-head model on the same base (a critic, a reward model) goes on from the policy's
    trunk and gives its own whole-pass scores."""
    _, path = hf_checkpoint("llama")
    policy = from_pretrained(path, frozen_layers=1)
    critic = from_pretrained(path, frozen_layers=1, head="score", init_score_head=True)
    ids, mask, pos = padded_batch("right", seed=3)
    trunk = policy.trunk_states(ids, mask, pos)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(critic(ids, mask, pos, trunk=trunk))[real],
                               np.asarray(critic(ids, mask, pos))[real], atol=2e-6, rtol=1e-5)  # fmt: skip


def test_a_trunk_needs_frozen_dense_layers(hf_checkpoint):
    ids, mask, pos = padded_batch("right", seed=3)
    plain = from_pretrained(hf_checkpoint("llama")[1])
    with pytest.raises(ValueError, match="frozen_layers"):
        plain.trunk_states(ids, mask, pos)
    moe = from_pretrained(hf_checkpoint("mixtral")[1], frozen_layers=1)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        moe.trunk_states(ids, mask, pos)
