"""The accelerator recipe: bfloat16 compute, float32 master parameters and Adam state, float32
log-softmax and losses, and a bfloat16 frozen reference (`model.frozen_dtype`). A few DPO steps
of the recipe track the float32 run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from helpers.runs import overrides

from jaxrlhf.train import load_config, train

# Measured on the tiny SmolLM-vocabulary model (lr 1e-2, 6 steps): the bf16 losses stay within
# 1.7e-3 of fp32 while the run moves the loss by 0.065; bf16 has 8 mantissa bits (~4e-3 relative
# per rounding), so 5e-3 is the tolerance.
LOSS_TOL = 5e-3


def _run(tiny_dir, data_files, out, **extra):
    common = {"train.max_steps": 6, "train.save_every": 0, "train.grad_accum_steps": 1,
              "optim.learning_rate": 1e-2, "optim.warmup_steps": 0, "dpo.reference": "same_step",
              "task_eval.enabled": False, **extra}  # fmt: skip
    return train(load_config(None, overrides(tiny_dir, data_files, out, **common), kind="dpo"))


def test_bf16_compute_tracks_fp32(tiny_dir, data_files, tmp_path):
    fp32 = _run(tiny_dir, data_files, str(tmp_path / "fp32"))
    mixed = _run(tiny_dir, data_files, str(tmp_path / "bf16"), **{
        "model.dtype": "bfloat16", "model.param_dtype": "float32", "model.frozen_dtype": "bfloat16",
    })  # fmt: skip
    a = np.array([m["loss"] for m in fp32.train_metrics])
    b = np.array([m["loss"] for m in mixed.train_metrics])
    assert len(a) == len(b) == 6
    assert np.abs(a - a[0]).max() > 5 * LOSS_TOL  # the run moves much more than the tolerance
    np.testing.assert_allclose(b, a, atol=LOSS_TOL)
    assert not np.array_equal(a, b)  # bf16 really ran


def test_frozen_reference_is_stored_in_bf16(tiny_dir):
    from jaxrlhf.models import from_pretrained
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.train.step import create_state, make_optimizer, make_schedule

    model = from_pretrained(tiny_dir, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    opt = make_optimizer(make_schedule(1e-3, 4))
    mesh = make_mesh(devices=jax.devices()[:1])
    _, state = create_state(model, opt, mesh, with_reference=True, reference_dtype="bfloat16")
    dtypes = lambda tree: {x.dtype for x in jax.tree.leaves(tree) if x.ndim >= 1}  # noqa: E731
    assert dtypes(state.params) == {jnp.dtype(jnp.float32)}  # master weights
    assert dtypes(state.opt_state) == {jnp.dtype(jnp.float32)}  # Adam moments
    assert dtypes(state.ref_params) == {jnp.dtype(jnp.bfloat16)}
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    assert nbytes(state.ref_params) * 2 == nbytes(state.params)


def test_ppo_reference_in_bf16_scores_like_fp32(tiny_dir):
    """PPO's frozen reference stored in bfloat16 (`frozen_dtype`): half the bytes, and its per-token
    log-probs on the first rollout (policy == reference) match the float32 policy's to bf16 rounding."""
    from jaxrlhf.models import from_pretrained
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.train.config import PPOConfig
    from jaxrlhf.train.ppo import PPOEngine
    from jaxrlhf.train.step import make_optimizer, make_schedule

    mesh = make_mesh(devices=jax.devices()[:1])
    policy = from_pretrained(tiny_dir, mesh=mesh)
    critic = from_pretrained(tiny_dir, head="score", init_score_head=True, mesh=mesh)
    opt = make_optimizer(make_schedule(1e-5, 4))
    engine = PPOEngine(policy, critic, None, PPOConfig(response_length=6), opt, mesh, eos_token_ids=[2],
                       pad_token_id=0, frozen_dtype="bfloat16")  # fmt: skip
    assert {x.dtype for x in jax.tree.leaves(engine.ref_params)} == {jnp.dtype(jnp.bfloat16)}
    ids = np.random.default_rng(0).integers(3, 1000, (4, 5)).astype(np.int32)
    engine.step(ids, np.ones_like(ids), lambda ids, mask: np.zeros(len(ids)))
    r = jax.tree.map(np.asarray, engine.last_rollout)
    m = r.response_mask.astype(bool)
    diff = np.abs(r.ref_logprobs - r.logprobs)[m]
    assert 0 < diff.max() < 0.1, diff.max()  # bf16 weights: close, but not the fp32 numbers
