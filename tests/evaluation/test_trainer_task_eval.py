"""The trainers measure task accuracy before and after training with the same code as `jaxrlhf eval`,
when the eval data has family / answer columns: DPO (and SFT) and PPO."""

from __future__ import annotations

import json
import os

import pytest

from jaxrlhf.evaluation import SCHEMA, evaluate_tasks, load_task_prompts
from jaxrlhf.models import from_pretrained, load_tokenizer
from jaxrlhf.train import load_config, train

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "jaxrlhf", "assets", "dpo_demo")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    for split, n in (("train", 16), ("test", 8)):
        with open(os.path.join(ASSETS, f"{split}.jsonl")) as f:
            (d / f"{split}.jsonl").write_text("".join(f.readlines()[:n]))
    return str(d / "train.jsonl"), str(d / "test.jsonl")


def _cfg(kind, tiny_dir, data, out, **extra):
    o = {
        "model.path": tiny_dir, "data.train_files": data[0], "data.eval_files": data[1],
        "data.max_length": 96, "data.max_prompt_length": 64, "optim.learning_rate": 1e-3,
        "train.batch_size": 4, "train.max_steps": 2, "train.log_every": 1, "train.output_dir": out,
        "train.tensorboard": False, "train.export": True, "task_eval.max_new_tokens": 8,
    }  # fmt: skip
    o.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in o.items()], kind=kind)


def _eval_rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "eval"]


def test_dpo_measures_task_accuracy_before_and_after(tiny_dir, data, tmp_path):
    out = str(tmp_path / "dpo")
    result = train(_cfg("dpo", tiny_dir, data, out))
    before, after = result.task_before, result.task_after
    assert before is not None and after is not None and before.total == after.total == 8
    for name, r in (("before", before), ("after", after)):
        with open(os.path.join(out, "task_eval", f"{name}.json")) as f:
            report = json.load(f)
        assert report["schema"] == SCHEMA and report["stage"] == name
        assert [x["reply"] for x in report["rows"]] == [x["reply"] for x in r.rows]
    rows = _eval_rows(out)
    assert [r["step"] for r in rows] == [0, 2]
    assert rows[0]["task/accuracy"] == before.accuracy and rows[1]["task/accuracy"] == after.accuracy
    assert "preference_accuracy" in rows[1]  # next to the preference metrics
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["eval_after"]["task/accuracy"] == after.accuracy
    # The trainer's "after" is what `jaxrlhf eval` sees on the export (greedy: the same replies).
    tok = load_tokenizer(result.export_dir)
    again = evaluate_tasks(from_pretrained(result.export_dir), tok, load_task_prompts([data[1]], tok),
                           max_new_tokens=8)  # fmt: skip
    assert [x["reply"] for x in again.rows] == [x["reply"] for x in after.rows]
    # The base model's replies before training are the "before".
    base = evaluate_tasks(from_pretrained(tiny_dir), tok, load_task_prompts([data[1]], tok), max_new_tokens=8)
    assert [x["reply"] for x in base.rows] == [x["reply"] for x in before.rows]


def test_task_eval_can_be_turned_off(tiny_dir, data, tmp_path):
    out = str(tmp_path / "off")
    result = train(_cfg("sft", tiny_dir, data, out, **{"task_eval.enabled": False, "train.export": False}))
    assert result.task_before is None and result.task_after is None
    assert not os.path.exists(os.path.join(out, "task_eval"))
    assert "task/accuracy" not in result.eval_after


def test_ppo_measures_task_accuracy_with_the_greedy_policy(tiny_dir, data, tmp_path):
    out = str(tmp_path / "ppo")
    cfg = _cfg("ppo", tiny_dir, data, out, **{
        "ppo.reward_fn": "helpers.ppo_rewards:digit_fraction", "ppo.response_length": 6,
        "ppo.num_ppo_epochs": 1, "ppo.num_mini_batches": 1, "data.buckets": "[64]", "train.export": False,
    })  # fmt: skip
    result = train(cfg)
    assert result.task_before.total == 8 and result.task_after.total == 8
    assert result.eval_before["task/accuracy"] == result.task_before.accuracy
    assert "objective/scores" in result.eval_after and "task/accuracy" in result.eval_after
    assert os.path.exists(os.path.join(out, "task_eval", "after.json"))
