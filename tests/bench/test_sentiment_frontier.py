"""The controlled-sentiment task end to end on a tiny random model: the data script is deterministic
and its files keep their invariants; the sweep script trains every line, evaluates each on the same
held-out prompts, resumes without retraining and draws the plot (docs/sentiment.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
MAKE_DATA = os.path.join(ROOT, "jaxrlhf", "assets", "sentiment", "make_data.py")
SWEEP = os.path.join(ROOT, "bench", "sentiment_frontier.py")


def _module(path: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, mini_dir):
    """The task's files made by the data script with the tiny model (8 train, 4 held-out prompts)."""
    out = tmp_path_factory.mktemp("sentiment")
    args = ["--model", mini_dir, "--train-prompts", "8", "--test-prompts", "4"]
    for name in ("a", "b"):
        proc = subprocess.run([sys.executable, MAKE_DATA, "--out", str(out / name), *args],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_data_script_is_deterministic_and_keeps_its_invariants(tiny_data):
    from jaxrlhf.rewards import vader_sentiment

    make = _module(MAKE_DATA)
    names = sorted(os.listdir(tiny_data / "a"))
    assert names == ["pairs_test.jsonl", "pairs_train.jsonl", "pairs_train_large.jsonl",
                     "preferred_train.jsonl", "prompts_test.jsonl", "prompts_train.jsonl",
                     "ranked_train.jsonl"]  # fmt: skip
    for name in names:  # byte-identical reruns
        assert (tiny_data / "a" / name).read_bytes() == (tiny_data / "b" / name).read_bytes(), name
    d = tiny_data / "a"
    train, test = _read(d / "prompts_train.jsonl"), _read(d / "prompts_test.jsonl")
    assert (len(train), len(test)) == (8, 4)
    assert not {r["title"] for r in train} & {r["title"] for r in test}  # held-out titles are unseen
    assert len({r["prompt"] for r in train}) == 8
    for split, file in (("train", "pairs_train"), ("test", "pairs_test"), ("train", "pairs_train_large")):
        prompts = {r["prompt"] for r in _read(d / f"prompts_{split}.jsonl")}
        for pair in _read(d / f"{file}.jsonl"):
            assert pair["prompt"] in prompts
            chosen, rejected = vader_sentiment(["", ""], [pair["chosen"], pair["rejected"]])
            assert (pair["score_chosen"], pair["score_rejected"]) == (round(chosen, 4), round(rejected, 4))
            assert chosen - rejected >= make.MIN_MARGIN - 1e-9
    large = _read(d / "pairs_train_large.jsonl")
    assert 0 < len(large) <= 8 * make.LARGE_SAMPLES // 2
    for prompt in {p["prompt"] for p in large}:  # each sample in one pair at most
        assert sum(p["prompt"] == prompt for p in large) <= make.LARGE_SAMPLES // 2
    ranked = _read(d / "ranked_train.jsonl")  # every non-blank sample of the large set and the extra ones
    assert [r["prompt"] for r in ranked] == [r["prompt"] for r in train]
    assert max(len(r["completions"]) for r in ranked) > make.LARGE_SAMPLES  # the extra samples are there
    for row in ranked:
        assert 2 <= len(row["completions"]) == len(row["scores"]) <= make.LARGE_SAMPLES + make.EXTRA_SAMPLES
        scores = vader_sentiment([""] * len(row["scores"]), row["completions"])
        assert row["scores"] == [round(s, 4) for s in scores]
        texts = set(row["completions"])  # the matched pairs are pairs of these samples
        assert all({p["chosen"], p["rejected"]} <= texts for p in large if p["prompt"] == row["prompt"])
    preferred = _read(d / "preferred_train.jsonl")
    assert [r["prompt"] for r in preferred] == [r["prompt"] for r in train]
    for row in preferred:  # the best sample of its prompt: no pair of that prompt has a better one
        better = [p for p in _read(d / "pairs_train.jsonl") if p["prompt"] == row["prompt"]]
        assert all(p["score_chosen"] <= row["score"] + 1e-9 for p in better)
        assert row["score"] == round(vader_sentiment([""], [row["completion"]])[0], 4)


def test_make_pairs_rule():
    make = _module(MAKE_DATA)
    pairs = make.make_pairs("p", ["good", "bad", "okay", "  "], [0.5, -0.5, 0.45, 0.9])
    got = {(p["chosen"], p["rejected"]) for p in pairs}
    # 0.5 vs 0.45 is closer than MIN_MARGIN; the blank sample never enters a pair
    assert got == {("good", "bad"), ("okay", "bad")}


def test_ranked_rule():
    make = _module(MAKE_DATA)
    row = make.make_ranked("p", ["a", " ", "b"], [0.12345, 1.0, -0.5])
    assert row == {"prompt": "p", "completions": ["a", "b"], "scores": [0.1235, -0.5]}


def test_matched_pairs_rule():
    """Ranked by score, rank i against rank i + n/2: each sample in one pair at most, pairs closer
    than MIN_MARGIN dropped, blank samples left out."""
    make = _module(MAKE_DATA)
    texts = ["a", "b", "c", "d", "e", " ", "f"]
    scores = [0.9, 0.5, 0.45, -0.2, 0.0, 1.0, 0.42]
    pairs = make.make_matched_pairs("p", texts, scores)
    # ranked: a .9, b .5, c .45, f .42, e 0, d -.2 -> (a, f), (b, e), (c, d)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "f"), ("b", "e"), ("c", "d")]
    close = make.make_matched_pairs("p", ["x", "y"], [0.30, 0.25])
    assert close == []


def test_sweep_end_to_end_on_a_tiny_model(tiny_data, mini_dir, tmp_path):
    out = tmp_path / "sweep"
    args = [sys.executable, SWEEP, "--out", str(out), "--model", mini_dir, "--data", str(tiny_data / "a"),
            "--kl-coefs", "0.05", "--betas", "0.1", "--no-grpo", "--set", "train.max_steps=2",
            "train.eval_every=1", "train.batch_size=4", "reward_eval.batch_size=8",
            "ppo.num_mini_batches=1", "model.frozen_layers=0"]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((out / "frontier.json").read_text())
    runs = result["runs"]
    assert set(runs) == {"rm", "ppo_kl0.05", "ppo_gt", "dpo_b0.1", "preferred_ft"}
    assert [a["step"] for a in runs["rm"]["accuracy"]] == [0, 1, 2]
    first = None
    for name in ("ppo_kl0.05", "ppo_gt", "dpo_b0.1", "preferred_ft"):
        points = runs[name]["points"]
        assert [p["step"] for p in points] == [0, 1, 2], name  # before, every step, after
        assert abs(points[0]["kl"]) < 1e-6  # the untrained policy is the reference
        # the same model, prompts and sampling seed before training: the same reward in every run
        first = points[0]["reward"] if first is None else first
        assert points[0]["reward"] == pytest.approx(first, abs=1e-9), name
        after = json.loads((out / name / "reward_eval" / "after.json").read_text())
        assert after["schema"] == "jaxrlhf.reward_eval/1" and after["prompts"] == 4
        assert len(after["rows"]) == 4 * 2  # samples_per_prompt: 2
        assert after["reward_eval/reward"] == pytest.approx(points[-1]["reward"])
    assert (out / "frontier.png").stat().st_size > 10_000
    # resumable: a second call trains nothing and redraws the same table
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before") == 5
    assert json.loads((out / "frontier.json").read_text())["runs"]["dpo_b0.1"] == runs["dpo_b0.1"]
    # recorded runs join the table and the plot (a name taken gets the file's name)
    recorded = os.path.join(ROOT, "bench", "results", "sentiment_grpo.json")
    png = tmp_path / "with_recorded.png"
    plot = [*args, "--plot-only", "--png", str(png), "--include", recorded, str(out / "frontier.json")]
    drawn = subprocess.run(plot, capture_output=True, text=True, timeout=300)
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    lines = {line.split()[0] for line in drawn.stdout.splitlines()[1:] if line.strip()}
    assert {"grpo", "dpo_b0.1", "rm"} <= lines and drawn.stdout.count("dpo_b0.1") == 2
    assert "done before" not in drawn.stdout and png.stat().st_size > 10_000
