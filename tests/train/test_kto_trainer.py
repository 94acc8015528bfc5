"""KTO (`kind: kto`): rows unpaired and paired with their mismatched KL completions as TRL does
(checked against tests/helpers/kto_reference.py, written from TRL's code alone), the objective
against the numpy loss, a task whose answer is known, bad rows named, and exact resume."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from helpers.kto_reference import kl_mismatch_indices, kto_loss_reference, make_unpaired_from_pairs
from helpers.runs import crash_and_resume, logged_losses, overrides, run_cli, train_losses

from jaxrlhf.data import DataError, collate_pairs, load_rows
from jaxrlhf.data.tokenize import TokenizedPair
from jaxrlhf.models import from_pretrained, load_tokenizer
from jaxrlhf.train.algorithms.kto import KTOConfig, KTOObjective, kto_examples, parse_kto_rows
from jaxrlhf.train.objectives import add_targets, pair_logps


def _parse(path, tokenizer, **kw):
    return parse_kto_rows(load_rows(str(path)), tokenizer, skip_invalid=False, drop_degenerate=False,
                          source=str(path), **kw)  # fmt: skip


def test_paired_rows_are_unpaired_and_mismatched_as_trl_does(tmp_path, tiny_dir):
    tok = load_tokenizer(tiny_dir)
    rows = [{"prompt": f"Q{i}?", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(5)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, counts = _parse(path, tok)
    want = make_unpaired_from_pairs([r["prompt"] for r in rows], [r["chosen"] for r in rows],
                                    [r["rejected"] for r in rows])  # fmt: skip
    assert [(e.prompt, e.chosen, bool(e.margin)) for e in examples] == [
        (w["prompt"], w["completion"], w["label"]) for w in want
    ]
    assert counts["unpaired_pairs"] == 5
    mismatched = kto_examples(examples)
    for i, j in enumerate(kl_mismatch_indices(len(examples))):  # row i's prompt with row j's completion
        assert (mismatched[i].prompt, mismatched[i].chosen, mismatched[i].rejected) == (
            examples[i].prompt, examples[i].chosen, examples[j].chosen)


@pytest.mark.parametrize(
    ("row", "field", "says"),
    [
        ({"prompt": "Q", "completion": "A", "label": "yes"}, "label", "true (desirable) or false"),
        ({"prompt": "Q", "label": True}, "completion", "missing column 'completion'"),
        ({"completion": "A", "label": False}, "prompt", "missing column 'prompt'"),
        ({"prompt": "Q", "answer": "A"}, "completion", "expected `completion` and `label`"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, tiny_dir, row, field, says):
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "ok", "completion": " fine", "label": True}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        _parse(path, load_tokenizer(tiny_dir))
    assert e.value.row == 2 and e.value.field == field and says in str(e.value), str(e.value)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_objective_equals_the_numpy_loss(tiny_llama, loss_type):
    """The objective's loss on packed `[prompt][completion][KL completion]` rows, against the policy
    and a perturbed reference, equals the numpy reference on the separately computed log-probs."""
    model = from_pretrained(tiny_llama)
    graphdef, state = nnx.split(from_pretrained(tiny_llama))
    leaves, treedef = jax.tree.flatten(state)  # the reference: a perturbed copy
    noise = [0.05 * jax.random.normal(jax.random.key(i), x.shape, x.dtype) for i, x in enumerate(leaves)]
    perturbed = [x + n for x, n in zip(leaves, noise, strict=True)]
    ref_model = nnx.merge(graphdef, jax.tree.unflatten(treedef, perturbed))
    rng = np.random.default_rng(0)
    pairs = [TokenizedPair(rng.integers(3, 96, 4 + i % 3), rng.integers(3, 96, 2 + i % 4),
                           rng.integers(3, 96, 3 + i % 2), float(i % 3 != 0)) for i in range(6)]  # fmt: skip
    batch = add_targets(collate_pairs(pairs, pad_id=0, batch_size=8))  # two padding rows
    batch["label"] = np.asarray([p.margin for p in pairs] + [0.0, 0.0], np.float32)
    k = KTOConfig(beta=0.3, desirable_weight=1.5, undesirable_weight=0.7, loss_type=loss_type)
    total, count, metrics = KTOObjective(k)(model, batch, ref_model)
    got, ref = (jax.tree.map(np.asarray, pair_logps(m, batch)) for m in (model, ref_model))
    want, want_m = kto_loss_reference(
        got["chosen"][:6], ref["chosen"][:6], batch["label"][:6] > 0, got["rejected"][:6],
        ref["rejected"][:6], beta=0.3, desirable_weight=1.5, undesirable_weight=0.7, loss_type=loss_type,
    )  # fmt: skip
    assert float(count) == 6
    assert float(total) / 6 == pytest.approx(want, rel=1e-5, abs=1e-6)
    if loss_type == "kto":
        assert want_m["kl"] > 0 and float(metrics["kl"]) == pytest.approx(want_m["kl"], rel=1e-4, abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "logps/chosen"):
        assert float(metrics[name]) == pytest.approx(want_m[name], rel=1e-4, abs=1e-5), name


def test_kto_learns_which_completions_are_desirable(tiny_dir, tmp_path):
    """A task with a known answer: for every prompt ' yes' is desirable and ' no' is not (unpaired
    rows). After training, the held-out implied rewards are positive for ' yes' and negative for
    ' no' on every example (rewards/accuracy 1), and the loss falls."""
    rows = []
    for i in range(24):
        rows.append({"prompt": f"Question {i}: answer yes or no.", "completion": " yes", "label": True})
        rows.append({"prompt": f"Question {i}: answer yes or no.", "completion": " no", "label": False})
    train, eval_ = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    eval_.write_text("".join(json.dumps(r) + "\n" for r in rows[40:]))
    extra = {"train.max_steps": 8, "train.batch_size": 8, "optim.learning_rate": 1e-2}
    losses, result = train_losses("kto", tiny_dir, (str(train), str(eval_)), str(tmp_path / "run"), **extra)
    assert result.eval_before["rewards/accuracy"] == 0.5  # the policy is the reference: no reward yet
    after = result.eval_after
    assert after["rewards/accuracy"] == 1.0 and after["rewards/chosen"] > 0 > after["rewards/rejected"], after
    assert after["loss"] < result.eval_before["loss"] - 0.05
    assert losses[-1] < losses[0]


def test_kto_resumes_exactly_after_a_crash(tiny_dir, data_files, tmp_path):
    """Preference pairs (unpaired on the fly), a run killed right after its step-2 checkpoint and
    resumed: the same losses as the run that went straight through; precomputed reference too."""
    extra = {"kto.desirable_weight": 1.2}
    want, got, _ = crash_and_resume(tiny_dir, data_files, tmp_path, extra, kind="kto")
    assert sorted(got) == [1, 2, 3, 4] and all(abs(got[s] - want[s]) <= 1e-5 for s in got), (want, got)
    extra.update({"train.max_steps": 4, "train.save_every": 2})
    pre = str(tmp_path / "precomputed")
    extra["kto.precompute_ref_log_probs"] = True
    proc = run_cli(["kto", *overrides(tiny_dir, data_files, pre, **extra)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = logged_losses(pre)  # the same reference, computed once before training
    assert all(abs(got[s] - want[s]) <= 1e-4 for s in got), (want, got)
