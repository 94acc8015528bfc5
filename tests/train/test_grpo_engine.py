"""GRPO / RLOO engine on a tiny model: a controlled task with a closed-form reward, and one rollout's
rewards, advantages and loss recomputed in numpy (grpo_reference.py) from what the engine logged."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from helpers.grpo_reference import np_group_advantages, np_grpo_loss
from helpers.ppo import EOS, PAD, low_token_fraction, random_prompts

from jaxrlhf.models import from_pretrained
from jaxrlhf.parallel import make_mesh
from jaxrlhf.train.config import GRPOConfig
from jaxrlhf.train.grpo import GRPOEngine
from jaxrlhf.train.rollout import response_logprobs
from jaxrlhf.train.step import make_optimizer, make_schedule


def _engine(path, cfg, *, lr, estimator="grpo", weights=None, funcs=1, seed=0):
    mesh = make_mesh(devices=jax.devices()[:1])
    optimizer = make_optimizer(make_schedule(lr, 100, kind="constant"))
    return GRPOEngine(
        from_pretrained(path, mesh=mesh), cfg, optimizer, mesh, eos_token_ids=[EOS], pad_token_id=PAD,
        estimator=estimator, reward_weights=weights, num_reward_funcs=funcs, seed=seed,
    )  # fmt: skip


def low_tokens(ids, mask):  # one reward column
    return low_token_fraction(ids, mask)[:, None]


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_grpo_and_rloo_raise_a_closed_form_reward(tiny_llama, estimator):
    """Stated: 8 prompts x 4 samples, 8-token completions, lr 1e-3: within 25 iterations the mean
    reward of the last 5 is >= 0.15 above the first 5 (measured, GRPO: 0.56 -> 0.94)."""
    cfg = GRPOConfig(num_generations=4, max_completion_length=8, num_iterations=2, num_mini_batches=2,
                     scale_rewards="group" if estimator == "grpo" else "none")  # fmt: skip
    engine = _engine(tiny_llama, cfg, lr=1e-3, estimator=estimator)
    prompts, mask = random_prompts(n=8)
    history = [engine.step(prompts, mask, low_tokens, ["low"]) for _ in range(25)]
    rewards = [m["reward"] for m in history]
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last >= first + 0.15, (first, last)
    assert all(np.isfinite(m["loss"]) for m in history)
    assert history[0]["rewards/low/mean"] == pytest.approx(history[0]["reward"], abs=1e-6)


def test_one_rollout_recomputed_in_numpy(tiny_llama):
    """With a zero learning rate the update computes the loss of the sampling policy itself: its
    logged loss and KL equal numpy's from the rollout's tokens, rewards and log-probs. The reference
    is a perturbed copy of the policy, so the KL term is not zero. (With lr 0 the ratios are 1, so
    the clip ratios would compare 0 with 0: they are checked against numpy, with ratios on both
    sides of the clip range, by tests/losses/test_grpo.py::test_grpo_loss_against_numpy.)"""
    cfg = GRPOConfig(num_generations=4, max_completion_length=6, temperature=0.9, beta=0.05,
                     epsilon_high=0.28, loss_type="grpo", mask_truncated_completions=True,
                     rescore_policy=False)  # fmt: skip

    def two_rewards(ids, mask):  # a None (NaN) in the second reward for some rows
        second = np.where(np.arange(len(ids)) % 3 == 0, np.nan, mask.sum(1) / mask.shape[1])
        return np.stack([low_token_fraction(ids, mask), second], axis=1)

    engine = _engine(tiny_llama, cfg, lr=0.0, weights=[1.0, 0.5], funcs=2)
    leaves, treedef = jax.tree.flatten(engine.ref_params)  # the reference: a perturbed copy
    noise = [0.02 * jax.random.normal(jax.random.key(i), x.shape, x.dtype) for i, x in enumerate(leaves)]
    engine.ref_params = jax.tree.unflatten(treedef, [x + n for x, n in zip(leaves, noise, strict=True)])
    prompts, mask = random_prompts(n=4, seed=3)
    metrics = engine.step(prompts, mask, two_rewards, ["low", "len"])
    r = {k: None if v is None else np.asarray(v) for k, v in engine.last_rollout.flat().items()}
    ids, rmask, completion = r["ids"], r["loss_mask"], r["completion_mask"]
    raw = two_rewards(ids, completion)
    want_rewards = np.nansum(raw * np.array([1.0, 0.5]), axis=1)  # None is left out of the sum
    np.testing.assert_allclose(r["rewards"], want_rewards, rtol=1e-6)
    np.testing.assert_allclose(r["advantages"], np_group_advantages(want_rewards, 4), rtol=1e-4, atol=1e-5)
    has_eos = ((ids[:, prompts.shape[1]:] == EOS) & (completion == 1)).any(1)
    np.testing.assert_array_equal(rmask, completion * has_eos[:, None])  # truncated ones masked out
    p = prompts.shape[1]
    logps = response_logprobs(engine.policy_model(), r["ids"], r["mask"], r["positions"], p, cfg.temperature)
    old, adv, ref = r["old_logprobs"], r["advantages"], r["ref_logprobs"]
    ref_model = nnx.merge(engine.policy_def, engine.ref_params)  # the rollout's: the perturbed copy
    want_ref = response_logprobs(ref_model, r["ids"], r["mask"], r["positions"], p, cfg.temperature)
    want_ref = np.asarray(want_ref)
    np.testing.assert_allclose(ref[completion == 1], want_ref[completion == 1], atol=2e-5)
    want, want_m = np_grpo_loss(np.asarray(logps), old, adv, rmask, ref_logps=ref, loss_type="grpo",
                                epsilon_high=0.28, beta=0.05)  # fmt: skip
    assert rmask.sum() > 0 and want_m["kl"] > 1e-3, want_m  # policy != reference: the KL term counts
    assert metrics["loss"] == pytest.approx(want, abs=2e-5)
    assert metrics["kl"] == pytest.approx(want_m["kl"], abs=2e-5, rel=1e-4)
    assert metrics["rewards/low/mean"] == pytest.approx(raw[:, 0].mean(), abs=1e-6)
    assert metrics["rewards/len/mean"] == pytest.approx(np.nanmean(raw[:, 1]), abs=1e-6)
    assert metrics["completions/clipped_ratio"] == pytest.approx(1 - has_eos.mean(), abs=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_packed_groups_give_the_unpacked_logprobs(tiny_llama, scan):
    """One packed row per prompt (the prompt once, then its G completions) gives every completion
    token the log-prob of its own unpacked row, with left-padded prompts and padded completions."""
    from jaxrlhf.train.grpo import group_logprobs

    model = from_pretrained(tiny_llama, scan_layers=scan)
    rng = np.random.default_rng(0)
    p, g, n = 3, 4, 5
    prompt_ids = rng.integers(3, 96, (p, 6)).astype(np.int32)
    prompt_mask = np.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0  # left padding
    prompt_mask[2, :1] = 0
    tokens = rng.integers(3, 96, (p, g, n)).astype(np.int32)
    lengths = rng.integers(1, n + 1, (p, g))
    completion_mask = (np.arange(n) < lengths[..., None]).astype(np.int32)
    packed = group_logprobs(model, prompt_ids, prompt_mask, tokens, completion_mask, 0.7, pack=True)
    rows = group_logprobs(model, prompt_ids, prompt_mask, tokens, completion_mask, 0.7, pack=False)
    m = completion_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(packed)[m], np.asarray(rows)[m], atol=2e-5)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_lora_policy_and_a_reward_model(tiny_llama, pooling):
    """With LoRA only the adapters train and, with beta > 0, the reference is the base (its
    log-probs equal a separately loaded base model's); a reward model is one more reward column,
    its per-token scores read at each completion's last real token, or averaged over the
    completion's tokens when the reward model was trained with `score_pooling="mean"`."""
    from flax import nnx

    from jaxrlhf.models.lora import LoRASpec

    mesh = make_mesh(devices=jax.devices()[:1])
    spec = LoRASpec.build(rank=4, alpha=16.0, target_modules=["q_proj", "v_proj"])
    policy = from_pretrained(tiny_llama, mesh=mesh, lora=spec)
    rm = from_pretrained(tiny_llama, head="score", init_score_head=True, mesh=mesh, seed=3)
    rm.config = rm.config.replace(score_pooling=pooling)
    cfg = GRPOConfig(num_generations=4, max_completion_length=6, beta=0.1)
    optimizer = make_optimizer(make_schedule(1e-2, 100, kind="constant"))
    engine = GRPOEngine(policy, cfg, optimizer, mesh, eos_token_ids=[EOS], pad_token_id=PAD, reward_model=rm,
                        num_reward_funcs=1, reward_weights=[1.0, 0.5])  # fmt: skip
    assert engine.ref_params is None
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(engine.state.params["policy"])}
    assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
    prompts, mask = random_prompts(n=4, seed=5)
    for _ in range(2):
        metrics = engine.step(prompts, mask, low_tokens, ["low"])
    assert "rewards/reward_model/mean" in metrics and metrics["kl"] > 0
    r = {k: None if v is None else np.asarray(v) for k, v in engine.last_rollout.flat().items()}
    p = prompts.shape[1]
    base = from_pretrained(tiny_llama, mesh=mesh)
    want_ref = np.asarray(response_logprobs(base, r["ids"], r["mask"], r["positions"], p, cfg.temperature))
    m = r["completion_mask"].astype(bool)
    np.testing.assert_allclose(r["ref_logprobs"][m], want_ref[m], atol=2e-5)
    per_token = np.asarray(rm(r["ids"], r["mask"], r["positions"]))  # [B, P + N]
    real = r["mask"] != 0
    if pooling == "last":
        last = np.array([np.nonzero(row)[0][-1] for row in real])
        scores = per_token[np.arange(len(last)), last]
    else:
        response = real[:, p:]
        scores = (per_token[:, p:] * response).sum(1) / response.sum(1)
    want = low_token_fraction(r["ids"], r["completion_mask"]) + 0.5 * scores
    np.testing.assert_allclose(r["rewards"], want, rtol=1e-5, atol=1e-5)


def test_moe_policy_adds_the_router_loss(tmp_path):
    """A mixture-of-experts policy: the minibatch loss carries the router's load-balancing loss
    (logged as router_aux_loss, between 0 and the expert count) with its coefficient set."""
    from helpers.tiny_hf import make_hf_model

    path = str(tmp_path / "moe")
    make_hf_model("qwen3_moe").save_pretrained(path)  # 5 experts, top-3
    mesh = make_mesh(devices=jax.devices()[:1])
    cfg = GRPOConfig(num_generations=4, max_completion_length=6, num_iterations=1, num_mini_batches=1)
    policy = from_pretrained(path, mesh=mesh, router_aux_loss_coef=0.5)
    engine = GRPOEngine(policy, cfg, make_optimizer(make_schedule(1e-3, 10, kind="constant")), mesh,
                        eos_token_ids=[EOS], pad_token_id=PAD)  # fmt: skip
    prompts, mask = random_prompts(n=2)
    metrics = engine.step(prompts, mask, low_tokens, ["low"])
    assert 0.0 < metrics["router_aux_loss"] <= 5.0, metrics
    assert np.isfinite(metrics["loss"])


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "unpacked"])
def test_a_frozen_trunk_computed_once_gives_the_same_iterations(tiny_llama, pack):
    """A policy trained above a frozen layer shares its trunk with its reference: computed once per
    rollout (`group_trunk`) and kept for the updates. Three iterations give the rollouts, losses and
    parameters of the engine that runs every pass whole."""
    from jaxrlhf.train.step import frozen_params

    mesh = make_mesh(devices=jax.devices()[:1])
    prompts, mask = random_prompts(n=4, seed=5)
    cfg = GRPOConfig(num_generations=4, max_completion_length=6, temperature=1.0, beta=0.1, num_iterations=2,
                     num_mini_batches=2, pack_groups=pack)  # fmt: skip
    runs = {}
    for share in (True, False):
        optimizer = make_optimizer(make_schedule(3e-3, 100, kind="constant"), frozen=frozen_params(1))
        engine = GRPOEngine(from_pretrained(tiny_llama, mesh=mesh, frozen_layers=1), cfg, optimizer, mesh,
                            eos_token_ids=[EOS], pad_token_id=PAD, seed=2)  # fmt: skip
        assert engine.trunk
        engine.trunk = share
        metrics = [engine.step(prompts, mask, low_tokens, ["low"]) for _ in range(3)]
        runs[share] = metrics, jax.tree.map(np.asarray, engine.last_rollout), engine.state.params
    (m1, r1, p1), (m0, r0, p0) = runs[True], runs[False]
    assert r1.trunk is not None and r0.trunk is None
    np.testing.assert_array_equal(r1.tokens, r0.tokens)
    for name in ("old_logprobs", "ref_logprobs", "advantages"):
        np.testing.assert_allclose(getattr(r1, name), getattr(r0, name), atol=2e-5, err_msg=name)
    assert np.abs(r0.ref_logprobs - r0.old_logprobs).max() > 1e-3  # the policy has moved
    for a, b in zip(m1, m0, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], atol=2e-5, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p0), strict=True):  # see the PPO test's bound
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
