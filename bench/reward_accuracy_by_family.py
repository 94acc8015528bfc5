"""Held-out pairwise accuracy of a reward model, overall and by task family.

    python bench/reward_accuracy_by_family.py runs/reward_demo/export [asset:dpo_demo/test.jsonl]

A pair counts as right when the model scores the chosen completion above the rejected one (read at
each completion's last token, as the reward trainer does).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.data import collate_pairs, load_rows, parse_preferences, tokenize_pairs
from jaxrlhf.models import from_pretrained, load_tokenizer
from jaxrlhf.train.objectives import pair_scores
from jaxrlhf.train.pipeline import resolve_data_path


def main(argv: list[str]) -> int:
    path = argv[0]
    data = resolve_data_path(argv[1] if len(argv) > 1 else "asset:dpo_demo/test.jsonl")
    tok, model = load_tokenizer(path), from_pretrained(path, head="score")
    rows = load_rows(data)
    examples, stats = parse_preferences(rows, tok)
    pairs, tstats = tokenize_pairs(examples, tok, max_length=128, max_prompt_length=64)
    if stats.kept != len(rows) or len(pairs) != len(rows):
        raise SystemExit(f"{data}: rows were skipped or dropped; families would not line up")
    families = np.asarray([rows[i].get("family") for i in range(len(rows))])
    score = jax.jit(lambda batch: pair_scores(model, batch))
    right: list[bool] = []
    for start in range(0, len(pairs), 16):
        chunk = pairs[start : start + 16]
        batch = collate_pairs(chunk, pad_id=tok.pad_token_id, batch_size=16, buckets=[104, 192])
        chosen, rejected = score({k: jnp.asarray(v) for k, v in batch.items()})
        right += list(np.asarray(chosen)[: len(chunk)] > np.asarray(rejected)[: len(chunk)])
    ok = np.asarray(right)
    print(f"{'overall':<14} {ok.mean():.3f} ({ok.sum()}/{len(ok)})")
    for family in sorted(set(families.tolist())):
        mine = ok[families == family]
        print(f"{family:<14} {mine.mean():.3f} ({mine.sum()}/{len(mine)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
