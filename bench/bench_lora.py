"""LoRA / QLoRA on the demo model (CPU): the quantized base's logit error against the float base.

    python bench/bench_lora.py --quant-error     # int8 and nf4 against float32, 8 demo chat prompts

The step-time, memory and TRL + peft comparison is `python bench/bench_dpo_vs_trl.py --benchmarks
lora`. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_FILE = os.path.join(HERE, "..", "jaxrlhf", "assets", "dpo_demo", "test.jsonl")


def quant_error() -> list[dict]:
    from jaxrlhf.data import load_rows
    from jaxrlhf.models import LoRASpec, from_pretrained, load_tokenizer
    from jaxrlhf.models.demo import demo_model_path

    path = demo_model_path()
    tok = load_tokenizer(path)
    all_rows = load_rows(DATA_FILE)
    rows = [all_rows[i] for i in range(8)]
    texts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    enc = tok(texts, padding=True, return_tensors="np", add_special_tokens=False)
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    real = mask.astype(bool)
    want = np.asarray(from_pretrained(path)(ids, mask))
    out = []
    for kind in ("int8", "nf4"):
        model = from_pretrained(path, lora=LoRASpec.build(16, 32.0), quantize_base=kind)  # fresh: B = 0
        got = np.asarray(model(ids, mask))
        err = np.abs(got - want)[real]
        row = {
            "base": kind,
            "max_abs_error_over_max_abs_logit": float(err.max() / np.abs(want[real]).max()),
            "mean_abs_error": float(err.mean()),
            "mean_abs_logit": float(np.abs(want[real]).mean()),
            "greedy_agreement": float(np.mean(got.argmax(-1)[real] == want.argmax(-1)[real])),
        }
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant-error", action="store_true", help="the quantized base's logit error")
    args = p.parse_args()
    if args.quant_error:
        quant_error()


if __name__ == "__main__":
    main()
