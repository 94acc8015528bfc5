"""The tool-use demo (docs/tools.md): does the demo model learn to use a calculator?

Held-out task accuracy on `asset:grpo_demo/test.jsonl` (64 arithmetic and word problems, greedy):

1. the demo model, single-turn (as `jaxrlhf eval`) and with the calculator offered;
2. after the SFT warm start on the shipped tool-use traces (`configs/sft_tools_demo.yaml`), with the
   calculator;
3. after GRPO with the calculator (`configs/grpo_tools_demo.yaml`, episodes of up to two turns), with
   the calculator.

With the calculator: episodes of up to two turns of at most 48 tokens each (a call alone is ~32
tokens of SmolLM2's vocabulary), the last message judged; also the share of
episodes with a tool call, turns per episode, and the first replies of each family.

    python bench/tools_demo.py                    # all stages (runs/sft_tools_demo, runs/grpo_tools_demo)
    python bench/tools_demo.py --skip-training    # evaluate the runs already there
    python bench/tools_demo.py --json bench/results/tools_demo.json

Not part of the test suite (minutes of training).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")


def evaluate(path: str, tokenizer_path: str | None = None) -> dict:
    from jaxrlhf.evaluation import evaluate_tasks, load_task_prompts
    from jaxrlhf.evaluation.tool_tasks import evaluate_with_tools
    from jaxrlhf.models import from_pretrained, load_tokenizer
    from jaxrlhf.tools import ToolEnvironment, calculator
    from jaxrlhf.train.pipeline import resolve_data_path

    tokenizer = load_tokenizer(tokenizer_path or path)
    model = from_pretrained(path)
    prompts = load_task_prompts([resolve_data_path("asset:grpo_demo/test.jsonl")], tokenizer)
    eos = [tokenizer.eos_token_id]
    single = evaluate_tasks(model, tokenizer, prompts, max_new_tokens=32, batch_size=32)
    tools = evaluate_with_tools(model, tokenizer, prompts, functools.partial(ToolEnvironment, [calculator]),
                                eos_ids=eos, pad_id=tokenizer.pad_token_id, max_turns=2, turn_tokens=48,
                                max_tokens=96, batch_size=32)  # fmt: skip
    return {"single_turn_accuracy": single.accuracy, **{k: v for k, v in tools.items() if k != "episodes"},
            "first_episodes": tools["episodes"][:2] + tools["episodes"][32:34]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-sft", action="store_true", help="reuse runs/sft_tools_demo/export")
    ap.add_argument("--json")
    args = ap.parse_args()
    os.chdir(ROOT)
    from jaxrlhf.models.demo import demo_model_path
    from jaxrlhf.train import load_config, train

    out: dict = {"base": evaluate(demo_model_path())}
    print("base", json.dumps({k: v for k, v in out["base"].items() if k != "first_episodes"}), flush=True)
    for stage, config in (("sft", "configs/sft_tools_demo.yaml"), ("grpo", "configs/grpo_tools_demo.yaml")):
        cfg = load_config(config, ["train.resume=false"])
        if not args.skip_training and not (stage == "sft" and args.skip_sft):
            start = time.perf_counter()
            train(cfg)
            out[f"{stage}_train_seconds"] = time.perf_counter() - start
        out[stage] = evaluate(os.path.join(cfg.train.output_dir, "export"))
        print(stage, json.dumps({k: v for k, v in out[stage].items() if k != "first_episodes"}), flush=True)
    print("| model | single-turn accuracy | with the calculator | episodes with a call | turns / episode |")
    print("|---|---|---|---|---|")
    for stage in ("base", "sft", "grpo"):
        r = out[stage]
        print(f"| {stage} | {r['single_turn_accuracy']:.3f} | {r['accuracy']:.3f} | "
              f"{r['tools/episodes_with_calls']:.2f} | {r['tools/turns_per_episode']:.2f} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
