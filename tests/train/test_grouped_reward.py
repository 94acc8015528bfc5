"""Grouped reward modelling (`reward.group_by_prompt`): each completion scored once for all its pairs.

The scores are checked against transformers on each unpacked sequence, and the loss and its
gradients against the pair-by-pair objective on the same pairs."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers.pairs import random_pairs
from helpers.runs import overrides
from helpers.tiny_hf import make_hf_model

from jaxrlhf.data import TokenizedPair, collate_pairs
from jaxrlhf.data.groups import collate_groups, group_pairs
from jaxrlhf.models import from_pretrained
from jaxrlhf.train import load_config, train
from jaxrlhf.train.objectives import GroupedRewardObjective, RewardObjective, add_targets, group_scores


def _shared_prompt_pairs() -> list[TokenizedPair]:
    """3 prompts; the first has 4 completions in 5 pairs (one pair repeated), the others 1 and 2."""
    r = random_pairs(12, seed=7)
    c = [p.chosen_ids for p in r]
    prompts = [r[0].prompt_ids, r[1].prompt_ids, r[2].prompt_ids]
    spec = [(0, 0, 1), (0, 2, 1), (1, 3, 4), (0, 0, 3), (2, 5, 6), (0, 2, 1), (2, 7, 5), (0, 3, 1)]
    return [TokenizedPair(prompts[g], c[w], c[lose], float(m))
            for m, (g, w, lose) in enumerate(spec)]  # fmt: skip


@pytest.fixture(scope="module")
def score_llama(tmp_path_factory):
    hf = make_hf_model("llama", head="score")
    path = str(tmp_path_factory.mktemp("rm"))
    hf.save_pretrained(path)
    return hf, path


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_group_scores_are_each_completion_scored_alone(score_llama, pooling):
    hf, path = score_llama
    model = from_pretrained(path, head="score")
    model.config = model.config.replace(score_pooling=pooling)
    groups = group_pairs(_shared_prompt_pairs())
    batch = collate_groups(groups, pad_id=0, batch_size=4, completions=5, comparisons=8)
    scores = np.asarray(group_scores(model, {k: jnp.asarray(v) for k, v in batch.items()}))
    for b, group in enumerate(groups):
        for k, comp in enumerate(group.completions):
            ids = torch.tensor(np.concatenate([group.prompt_ids, comp])[None], dtype=torch.long)
            with torch.no_grad():
                if pooling == "last":
                    want = float(hf(input_ids=ids).logits[0, 0])
                else:
                    per_token = hf.score(hf.model(input_ids=ids).last_hidden_state)[0, :, 0].numpy()
                    want = per_token[len(group.prompt_ids) :].mean()
            np.testing.assert_allclose(scores[b, k], want, atol=1e-4)
        assert not scores[b, len(group.completions) :].any()  # empty slots


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_grouped_loss_and_gradients_equal_the_pairwise_ones(score_llama, pooling):
    """The same pairs, pair by pair (`RewardObjective`, one row each) and grouped by prompt: the
    loss (margin and centring on), its metrics and every gradient agree."""
    _, path = score_llama
    model = from_pretrained(path, head="score", init_score_head=True)
    model.config = model.config.replace(score_pooling=pooling)
    graphdef, params = nnx.split(model)
    pairs = _shared_prompt_pairs()
    plain = {k: jnp.asarray(v) for k, v in add_targets(collate_pairs(pairs, pad_id=0)).items()}
    grouped = {k: jnp.asarray(v) for k, v in
               collate_groups(group_pairs(pairs), pad_id=0, batch_size=4, comparisons=8).items()}  # fmt: skip

    def loss_of(objective, batch):
        def f(p):
            num, den, metrics = objective(nnx.merge(graphdef, p), batch)
            return num / den, metrics

        return jax.value_and_grad(f, has_aux=True)(params)

    kw = {"center_rewards_coefficient": 0.1, "use_margin": True}
    (want, want_m), want_g = loss_of(RewardObjective(**kw), plain)
    (got, got_m), got_g = loss_of(GroupedRewardObjective(**kw), grouped)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert float(got_m["comparisons"]) == len(pairs)
    for key in ("accuracy", "margin", "rewards/chosen", "rewards/rejected"):
        np.testing.assert_allclose(float(got_m[key]), float(want_m[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want_g))
    for p, g in jax.tree_util.tree_leaves_with_path(got_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat_want[p]), rtol=2e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(p))  # fmt: skip
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(got_g))


def test_ranked_rows_train_a_reward_model_grouped(tiny_dir, tmp_path):
    """`jaxrlhf train reward` on ranked rows with `reward.group_by_prompt`: one row per prompt, the
    step's loss a mean over comparisons, held-out accuracy pair by pair, and the fit improves."""
    rng = np.random.default_rng(0)
    words = ["good", "great", "fine", "bad", "awful", "dull", "grand", "poor"]
    rows = []
    for i in range(8):
        texts = [" " + " ".join(rng.choice(words, 3)) for _ in range(4)]
        scores = [sum((w in ("good", "great", "fine", "grand")) - (w in ("bad", "awful", "dull", "poor"))
                      for w in t.split()) for t in texts]  # fmt: skip
        rows.append({"prompt": f"Review {i}:", "completions": texts, "scores": scores})
    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "rm")
    args = overrides(tiny_dir, (str(ranked), str(ranked)), out, **{
        "reward.group_by_prompt": True, "reward.pooling": "mean", "train.batch_size": 2,
        "train.grad_accum_steps": 1, "train.max_steps": 8, "train.save_every": 0, "train.resume": False,
        "optim.learning_rate": 3e-3, "task_eval.enabled": False, "data.append_eos": False})  # fmt: skip
    result = train(load_config(None, args, kind="reward"))
    with open(os.path.join(out, "summary.json")) as f:
        data = json.load(f)["data"]
    pairs = sum(len([1 for a in r["scores"] for b in r["scores"] if a > b]) for r in rows)
    with_pairs = sum(len(set(r["scores"])) > 1 for r in rows)  # a row of equal scores makes no pair
    assert 0 < with_pairs == data["train/groups"] and data["train/examples"] == data["eval/examples"] == pairs
    assert all(m["comparisons"] > 0 for m in result.train_metrics)
    assert result.eval_after["loss"] < result.eval_before["loss"] - 1e-3
    assert result.eval_after["accuracy"] > result.eval_before["accuracy"]
