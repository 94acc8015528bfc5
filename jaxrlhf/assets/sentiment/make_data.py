"""Generate the controlled-sentiment task (docs/sentiment.md): ``jaxrlhf/assets/sentiment/*.jsonl``.

The task of Rafailov et al. 2023 (DPO, arXiv:2305.18290, section 6.1) at the demo model's scale:
prompts are openings of movie reviews, a policy continues them, and VADER's compound sentiment
(`jaxrlhf.rewards:vader_sentiment`, a lexicon and rules, no weights) is the ground-truth reward.

1. Prompts: an opener (``I watched "{title}" last night, and``; some lean positive, some negative,
   most neither) around an invented film title. Train and held-out prompts use disjoint titles.
2. Samples: `SAMPLES` continuations of every prompt from the reference model (SmolLM2-135M-Instruct,
   the demo model), plain text without a chat template, temperature 1.0, at most `MAX_NEW_TOKENS`
   tokens -- exactly what the policy samples in training, so the data is on-policy for the reference.
3. Pairs: every two samples of a prompt whose VADER scores differ by at least `MIN_MARGIN`, the
   higher one chosen (samples that close are a coin flip to any judge).
4. The larger pair set for the reward model: `LARGE_SAMPLES` more samples of every training prompt,
   ranked by score and matched rank i with rank i + `LARGE_SAMPLES` / 2, so every text is in at most
   one pair (a reward model learns from distinct texts, not from the same text paired again).
5. The ranked rows for the reward model: those `LARGE_SAMPLES` samples and `EXTRA_SAMPLES` more
   (seed + 2) of every training prompt, each with its score; read as ranked rows, every two with
   different scores are a pair (InstructGPT's K-wise comparisons, `reward.group_by_prompt`).

Files (one JSON object per line):

* ``prompts_train.jsonl`` / ``prompts_test.jsonl``: ``{"prompt", "title"}`` -- for PPO / GRPO and
  the held-out evaluation;
* ``pairs_train.jsonl`` / ``pairs_test.jsonl``: ``{"prompt", "chosen", "rejected", "score_chosen",
  "score_rejected"}`` -- for the reward model and DPO; the held-out pairs give the reward model's
  accuracy against the ground truth;
* ``pairs_train_large.jsonl``: the same columns, from step 4;
* ``ranked_train.jsonl``: ``{"prompt", "completions", "scores"}``, from step 5 -- for the reward
  model of the RLHF demo;
* ``preferred_train.jsonl``: ``{"prompt", "completion", "score"}``, the best sample of each
  training prompt -- for SFT on preferred samples ("Preferred-FT" in the paper).

    python jaxrlhf/assets/sentiment/make_data.py                       # rewrite the shipped files
    python jaxrlhf/assets/sentiment/make_data.py --out DIR --model PATH --train-prompts 8 --test-prompts 4

Deterministic: prompts come from one seeded ``random.Random``, samples from fixed JAX keys and fixed
batch shapes, so a rerun on the same software writes byte-identical files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
from collections.abc import Sequence

SEED = 20261206
TRAIN_PROMPTS = 384
TEST_PROMPTS = 64
SAMPLES = 4
LARGE_SAMPLES = 16
EXTRA_SAMPLES = 16
MAX_NEW_TOKENS = 24
MIN_MARGIN = 0.1
BATCH = 64
OUT_DIR = os.path.dirname(os.path.abspath(__file__))

_FIRST = ["Silent", "Crimson", "Last", "Broken", "Golden", "Hidden", "Midnight", "Distant", "Paper",
          "Iron", "Burning", "Frozen", "Velvet", "Hollow", "Electric", "Wandering", "Quiet", "Savage",
          "Glass", "Lonely", "Secret", "Scarlet", "Endless", "Northern"]  # fmt: skip
_SECOND = ["Harbor", "Orchard", "Summer", "Kingdom", "Highway", "Garden", "Letters", "Horizon", "River",
           "Empire", "Station", "Promise", "Mirror", "Valley", "Season", "Frontier", "Lantern", "Carnival",
           "Winter", "Island"]  # fmt: skip
OPENERS = [
    'I watched "{t}" last night, and',
    '"{t}" is a film that',
    'My honest opinion of "{t}":',
    'After seeing "{t}", I',
    'The acting in "{t}" was',
    'I went to see "{t}" with my family and',
    'From the first scene of "{t}", it was clear that',
    'Two hours of "{t}", and',
    'The story of "{t}" follows',
    'The ending of "{t}"',
    'I had high hopes for "{t}", and',  # leans positive
    'Everyone told me "{t}" was great, and',
    'I almost walked out of "{t}" because',  # leans negative
    'I was skeptical about "{t}", but',
    'The director of "{t}" clearly',
    'If you are thinking of watching "{t}",',
]


def make_prompts(rng: random.Random, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """Distinct (opener, title) prompts; the held-out ones use titles no training prompt has."""
    titles = [f"The {a} {b}" for a, b in itertools.product(_FIRST, _SECOND)]
    rng.shuffle(titles)
    test_titles, train_titles = titles[:48], titles[48:]

    def draw(pool: list[str], n: int) -> list[dict]:
        combos = [(o, t) for t in pool for o in OPENERS]
        if n > len(combos):
            raise ValueError(f"{n} prompts asked, {len(combos)} possible")
        return [{"prompt": o.format(t=t), "title": t} for o, t in rng.sample(combos, n)]

    return draw(train_titles, n_train), draw(test_titles, n_test)


def sample(model_dir: str, prompts: Sequence[str], samples: int, seed: int) -> list[list[str]]:
    """`samples` continuations of each prompt (temperature 1.0, `MAX_NEW_TOKENS`), fixed batches."""
    import jax
    import numpy as np

    from jaxrlhf.data import left_pad
    from jaxrlhf.generation import generate
    from jaxrlhf.models import from_pretrained, load_tokenizer

    tok, model = load_tokenizer(model_dir), from_pretrained(model_dir)
    ids = [np.asarray(tok(p, add_special_tokens=False)["input_ids"], np.int32) for p in prompts]
    width = -(-max(len(x) for x in ids) // 16) * 16
    order = [i for i in range(len(prompts)) for _ in range(samples)]
    out: list[list[str]] = [[] for _ in prompts]
    for b, start in enumerate(range(0, len(order), BATCH)):
        index = order[start : start + BATCH]
        batch, mask = left_pad([ids[i] for i in index], tok.pad_token_id, width=width, batch_size=BATCH)
        gen = generate(model, batch, mask, max_new_tokens=MAX_NEW_TOKENS, eos_token_ids=[tok.eos_token_id],
                       pad_token_id=tok.pad_token_id, temperature=1.0,
                       rng=jax.random.fold_in(jax.random.key(seed), b))  # fmt: skip
        tokens, done = np.asarray(gen.tokens), np.asarray(gen.completion_mask)
        for k, i in enumerate(index):
            out[i].append(tok.decode(tokens[k][done[k] == 1], skip_special_tokens=True))
        print(f"sampled {min(start + BATCH, len(order))}/{len(order)}", file=sys.stderr, flush=True)
    return out


def make_pairs(prompt: str, completions: Sequence[str], scores: Sequence[float]) -> list[dict]:
    """Every two samples at least `MIN_MARGIN` apart in score, the higher one chosen (a sample
    that is blank after stripping never enters a pair)."""
    pairs = []
    for i, j in itertools.combinations(range(len(completions)), 2):
        if (
            not completions[i].strip()
            or not completions[j].strip()
            or abs(scores[i] - scores[j]) < MIN_MARGIN
        ):
            continue
        hi, lo = (i, j) if scores[i] > scores[j] else (j, i)
        pairs.append({"prompt": prompt, "chosen": completions[hi], "rejected": completions[lo],
                      "score_chosen": round(scores[hi], 4),
                      "score_rejected": round(scores[lo], 4)})  # fmt: skip
    return pairs


def make_matched_pairs(prompt: str, completions: Sequence[str], scores: Sequence[float]) -> list[dict]:
    """Samples ranked by score, rank i matched with rank i + n / 2 (n: the non-blank samples, rounded
    down to even); each pair kept when at least `MIN_MARGIN` apart, the higher one chosen."""
    order = sorted((k for k in range(len(completions)) if completions[k].strip()), key=lambda k: -scores[k])
    half = len(order) // 2
    pairs = []
    for hi, lo in zip(order[:half], order[half : 2 * half], strict=True):
        if scores[hi] - scores[lo] >= MIN_MARGIN:
            pair = {"prompt": prompt, "chosen": completions[hi], "rejected": completions[lo]}
            pairs.append(
                {**pair, "score_chosen": round(scores[hi], 4), "score_rejected": round(scores[lo], 4)}
            )
    return pairs


def make_ranked(prompt: str, completions: Sequence[str], scores: Sequence[float]) -> dict:
    """One ranked row: every non-blank sample with its score (a reward model compares all of them,
    `reward.group_by_prompt`)."""
    keep = [k for k in range(len(completions)) if completions[k].strip()]
    return {"prompt": prompt, "completions": [completions[k] for k in keep],
            "scores": [round(scores[k], 4) for k in keep]}  # fmt: skip


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=OUT_DIR)
    ap.add_argument("--model", default="demo", help="the reference model: 'demo' or a local checkpoint")
    ap.add_argument("--train-prompts", type=int, default=TRAIN_PROMPTS)
    ap.add_argument("--test-prompts", type=int, default=TEST_PROMPTS)
    ap.add_argument(
        "--large-samples",
        type=int,
        default=LARGE_SAMPLES,
        help="samples per training prompt for pairs_train_large.jsonl (0: skip it and ranked_train)",
    )
    ap.add_argument(
        "--extra-samples",
        type=int,
        default=EXTRA_SAMPLES,
        help="more samples per training prompt, for ranked_train.jsonl only (seed + 2)",
    )
    args = ap.parse_args(argv)
    from jaxrlhf.models.demo import demo_model_path
    from jaxrlhf.rewards import vader_sentiment

    model_dir = demo_model_path() if args.model == "demo" else args.model
    rng = random.Random(SEED)
    train, test = make_prompts(rng, args.train_prompts, args.test_prompts)
    os.makedirs(args.out, exist_ok=True)
    for split, rows, seed in (("train", train, SEED), ("test", test, SEED + 1)):
        texts = sample(model_dir, [r["prompt"] for r in rows], SAMPLES, seed)
        pairs, preferred = [], []
        for row, completions in zip(rows, texts, strict=True):
            scores = vader_sentiment([row["prompt"]] * len(completions), completions)
            pairs += make_pairs(row["prompt"], completions, scores)
            best = max(range(len(completions)), key=lambda k: (bool(completions[k].strip()), scores[k]))
            preferred.append({"prompt": row["prompt"], "completion": completions[best],
                              "score": round(scores[best], 4)})  # fmt: skip
        write_jsonl(os.path.join(args.out, f"prompts_{split}.jsonl"), rows)
        write_jsonl(os.path.join(args.out, f"pairs_{split}.jsonl"), pairs)
        if split == "train":
            write_jsonl(os.path.join(args.out, "preferred_train.jsonl"), preferred)
        print(f"{split}: {len(rows)} prompts, {len(pairs)} pairs", flush=True)
    if args.large_samples:
        prompts = [r["prompt"] for r in train]
        texts = sample(model_dir, prompts, args.large_samples, SEED)
        more = sample(model_dir, prompts, args.extra_samples, SEED + 2) if args.extra_samples else None
        large, ranked = [], []
        for i, (row, completions) in enumerate(zip(train, texts, strict=True)):
            scores = vader_sentiment([row["prompt"]] * len(completions), completions)
            large += make_matched_pairs(row["prompt"], completions, scores)
            everything = completions + (more[i] if more else [])
            all_scores = scores + (vader_sentiment([row["prompt"]] * len(more[i]), more[i]) if more else [])
            ranked.append(make_ranked(row["prompt"], everything, all_scores))
        write_jsonl(os.path.join(args.out, "pairs_train_large.jsonl"), large)
        write_jsonl(os.path.join(args.out, "ranked_train.jsonl"), ranked)
        print(
            f"train (large): {len(train)} prompts x {args.large_samples} samples, {len(large)} pairs; "
            f"ranked: {args.large_samples + args.extra_samples} samples a prompt",
            flush=True,
        )


if __name__ == "__main__":
    main()
