"""Packed-pair objectives against transformers run on the unpacked sequences."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers.pairs import random_pairs
from helpers.tiny_hf import make_hf_model

from jaxrlhf.data import collate_pairs
from jaxrlhf.models import from_pretrained
from jaxrlhf.parallel import make_mesh
from jaxrlhf.train.objectives import (
    DPOObjective,
    RewardObjective,
    add_targets,
    pair_logps,
    pair_scores,
)
from jaxrlhf.train.step import create_state, make_optimizer, make_schedule, make_train_step, state_shardings


def _batch(pairs):
    return {k: jnp.asarray(v) for k, v in add_targets(collate_pairs(pairs, pad_id=0)).items()}


def _torch_logps(hf, prompt, completion) -> float:
    ids = torch.tensor(np.concatenate([prompt, completion])[None], dtype=torch.long)
    with torch.no_grad():
        logits = hf(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    p = len(prompt)
    return float(sum(logp[p - 1 + i, int(t)] for i, t in enumerate(completion)))


@pytest.mark.parametrize(
    "kind", ["smollm2", "gpt2", "mistral", "gemma", "gemma2", "gemma3", "mixtral", "qwen3_moe"]
)
def test_packed_logps_match_separate_sequences(kind, tmp_path):
    hf = make_hf_model(kind)
    hf.save_pretrained(str(tmp_path))
    model = from_pretrained(str(tmp_path))
    pairs = random_pairs(5, seed=1)
    got = pair_logps(model, _batch(pairs), chunk_size=16)
    for i, pair in enumerate(pairs):
        ref_c = _torch_logps(hf, pair.prompt_ids, pair.chosen_ids)
        ref_r = _torch_logps(hf, pair.prompt_ids, pair.rejected_ids)
        np.testing.assert_allclose(float(got["chosen"][i]), ref_c, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(float(got["rejected"][i]), ref_r, rtol=1e-5, atol=1e-4)
        assert float(got["chosen_len"][i]) == len(pair.chosen_ids)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_reward_scores_pooled_as_configured(tmp_path, pooling):
    """The score of each completion of a packed pair: transformers' `*ForSequenceClassification`
    logit of the unpacked sequence (its last token), or with `score_pooling="mean"` the mean of the
    head's per-token scores `score(hidden)` over the completion's positions."""
    hf = make_hf_model("llama", head="score")
    hf.save_pretrained(str(tmp_path))
    model = from_pretrained(str(tmp_path), head="score")
    model.config = model.config.replace(score_pooling=pooling)
    pairs = random_pairs(4, seed=2)
    chosen, rejected = pair_scores(model, _batch(pairs))
    for i, pair in enumerate(pairs):
        for comp, got in ((pair.chosen_ids, chosen[i]), (pair.rejected_ids, rejected[i])):
            ids = torch.tensor(np.concatenate([pair.prompt_ids, comp])[None], dtype=torch.long)
            with torch.no_grad():
                if pooling == "last":
                    want = float(hf(input_ids=ids).logits[0, 0])
                else:
                    per_token = hf.score(hf.model(input_ids=ids).last_hidden_state)[0, :, 0].numpy()
                    want = per_token[len(pair.prompt_ids) :].mean()
            np.testing.assert_allclose(float(got), want, atol=1e-4)


def test_score_pooling_is_exported_and_loaded(tmp_path):
    """A mean-pooled reward model's config.json says so (`jaxrlhf_score_pooling`) and loads back with
    it; the default ("last", transformers' own) is not written."""
    from jaxrlhf.models import save_pretrained

    make_hf_model("llama", head="score").save_pretrained(str(tmp_path / "rm"))
    model = from_pretrained(str(tmp_path / "rm"), head="score")
    for pooling in ("mean", "last"):
        model.config = model.config.replace(score_pooling=pooling)
        save_pretrained(model, str(tmp_path / pooling))
        with open(tmp_path / pooling / "config.json") as f:
            assert json.load(f).get("jaxrlhf_score_pooling") == (None if pooling == "last" else "mean")
        assert from_pretrained(str(tmp_path / pooling), head="score").config.score_pooling == pooling


def test_first_dpo_loss_is_ln2_and_training_improves(tmp_path):
    make_hf_model("smollm2").save_pretrained(str(tmp_path))
    mesh = make_mesh(devices=jax.devices()[:1])
    model = from_pretrained(str(tmp_path), mesh=mesh)
    schedule = make_schedule(1e-3, 10, kind="constant")
    opt = make_optimizer(schedule)
    graphdef, state = create_state(model, opt, mesh, with_reference=True)
    step = make_train_step(graphdef, DPOObjective(beta=0.1), opt, schedule, state_shardings(state), mesh)
    batch = {k: v.reshape(2, 4, *v.shape[1:]) for k, v in _batch(random_pairs(8, seed=3)).items()}
    state, first = step(state, batch)
    assert abs(float(first["loss"]) - math.log(2)) < 1e-6
    for _ in range(3):
        state, last = step(state, batch)
    assert float(last["loss"]) < 0.5 and float(last["rewards/accuracies"]) == 1.0
    assert step.num_compilations() == 1


def test_reward_objective_trains(tmp_path):
    make_hf_model("llama").save_pretrained(str(tmp_path))
    mesh = make_mesh(devices=jax.devices()[:1])
    model = from_pretrained(str(tmp_path), head="score", init_score_head=True, mesh=mesh)
    schedule = make_schedule(3e-3, 10, kind="constant")
    opt = make_optimizer(schedule)
    graphdef, state = create_state(model, opt, mesh)
    step = make_train_step(graphdef, RewardObjective(), opt, schedule, state_shardings(state), mesh)
    batch = {k: v[None] for k, v in _batch(random_pairs(8, seed=4)).items()}
    losses = []
    for _ in range(6):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] and float(m["accuracy"]) >= 0.75


def test_rpo_adds_the_token_mean_nll_of_chosen(tmp_path):
    """RPO = DPO + alpha * NLL(chosen), the NLL a token mean over the batch (TRL's rpo_alpha), checked
    against transformers' log-probs of the unpacked chosen sequences."""
    hf = make_hf_model("smollm2")
    hf.save_pretrained(str(tmp_path))
    model = from_pretrained(str(tmp_path))
    pairs = random_pairs(4, seed=5)
    batch = _batch(pairs)
    ref = {"chosen": jnp.zeros(4) - 3.0, "rejected": jnp.zeros(4) - 2.0}
    plain, _ = DPOObjective(beta=0.1).loss(pair_logps(model, batch), ref)
    rpo, metrics = DPOObjective(beta=0.1, rpo_alpha=0.5).loss(pair_logps(model, batch), ref)
    total = sum(_torch_logps(hf, p.prompt_ids, p.chosen_ids) for p in pairs)
    nll = -total / sum(len(p.chosen_ids) for p in pairs)
    np.testing.assert_allclose(float(metrics["nll_loss"]), nll, rtol=1e-5)
    np.testing.assert_allclose(float(rpo), float(plain) + 0.5 * nll, rtol=1e-5)


def test_head_learning_rate_scales_only_the_score_head(tmp_path):
    make_hf_model("llama").save_pretrained(str(tmp_path))
    mesh = make_mesh(devices=jax.devices()[:1])
    batch = {k: v[None] for k, v in _batch(random_pairs(8, seed=4)).items()}
    moved = {}
    for scale in (1.0, 10.0):
        model = from_pretrained(str(tmp_path), head="score", init_score_head=True, mesh=mesh)
        schedule = make_schedule(1e-3, 10, kind="constant")
        opt = make_optimizer(schedule, head_lr_scale=scale)
        graphdef, state = create_state(model, opt, mesh)
        before = jax.tree.map(np.asarray, state.params)
        step = make_train_step(graphdef, RewardObjective(), opt, schedule, state_shardings(state), mesh)
        state, _ = step(state, batch)
        moved[scale] = jax.tree.map(lambda a, b: np.asarray(b) - a, before, state.params)
    head = lambda d: np.asarray(d["score"]["kernel"].get_value())  # noqa: E731
    np.testing.assert_allclose(head(moved[10.0]), 10.0 * head(moved[1.0]), rtol=1e-5, atol=1e-9)
    assert np.abs(head(moved[1.0])).max() > 0
    body = lambda d: np.asarray(d["norm"]["scale"].get_value())  # noqa: E731
    np.testing.assert_array_equal(body(moved[10.0]), body(moved[1.0]))


def test_frozen_layers_train_only_the_top(tmp_path):
    """With `frozen_layers=1` (of 2) the embeddings and layer 0 never move and hold no Adam moments;
    every other parameter takes exactly the update of an unfrozen run (no clipping, so Adam is
    per-coordinate): stopping the backward pass below changes no gradient above it."""
    from jaxrlhf.train.step import frozen_params

    make_hf_model("llama").save_pretrained(str(tmp_path))
    mesh = make_mesh(devices=jax.devices()[:1])
    batch = {k: v[None] for k, v in _batch(random_pairs(8, seed=6)).items()}
    runs = {}
    for n in (0, 1):
        model = from_pretrained(str(tmp_path), head="score", init_score_head=True, mesh=mesh, frozen_layers=n)
        schedule = make_schedule(1e-3, 10, kind="constant")
        opt = make_optimizer(schedule, max_grad_norm=None, frozen=frozen_params(n) if n else None)
        graphdef, state = create_state(model, opt, mesh)
        before = jax.tree.map(np.asarray, state.params)
        step = make_train_step(graphdef, RewardObjective(), opt, schedule, state_shardings(state), mesh)
        state, metrics = step(state, batch)
        delta = jax.tree.map(lambda a, b: np.asarray(b) - a, before, state.params)
        runs[n] = (delta, state.opt_state, float(metrics["loss"]))
    assert runs[0][2] == pytest.approx(runs[1][2], rel=1e-6)  # the same forward
    flat0 = dict(jax.tree_util.tree_leaves_with_path(runs[0][0]))
    frozen = frozen_params(1)(runs[1][0])
    for (path, d1), is_frozen in zip(jax.tree_util.tree_leaves_with_path(runs[1][0]),
                                     jax.tree.leaves(frozen), strict=True):  # fmt: skip
        name = jax.tree_util.keystr(path)
        if is_frozen:
            assert not np.any(d1), name
        else:
            np.testing.assert_allclose(d1, flat0[path], rtol=1e-4, atol=1e-7, err_msg=name)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(frozen)]
    expect = [n.startswith("['embed_tokens']") or n.startswith("['layers'][0]") for n in names]
    assert jax.tree.leaves(frozen) == expect and any(expect) and not all(expect)
    n_moments = lambda opt_state: sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim >= 1)  # noqa: E731
    sizes = [x.size for x in jax.tree.leaves(runs[1][0])]
    n_frozen = sum(n for n, f in zip(sizes, jax.tree.leaves(frozen), strict=True) if f)
    assert n_moments(runs[0][1]) - n_moments(runs[1][1]) == 2 * n_frozen  # no mu / nu for frozen ones
