"""The cost of multi-turn tool rollouts (docs/tools.md): the same greedy episodes sampled three ways,
against single-turn generation on the same prompts, and against transformers' `generate` called
once per turn on the whole context (what a TRL tool loop without vLLM does).

Model: the tool-use SFT export (`runs/sft_tools_demo/export`, made by `python bench/tools_demo.py
--skip-sft` or its SFT stage), which calls the calculator by itself; without it, the demo model
SmolLM2-135M-Instruct with `--every-turn`, an environment that answers every finished turn. float32.
Prompts: the 64 held-out `asset:grpo_demo/test.jsonl` problems, in batches of `--batch`; episodes of
up to `--max-turns` turns of at most `--turn-tokens` tokens and `--max-tokens` in all; the
calculator (`jaxrlhf.tools.calculator`) answers the calls.

Ways (jaxrlhf, one subprocess):
- `carry`: `jaxrlhf.generation.turns.TurnCache`, the KV cache carried across turns, each tool message
  prefilled as one segment;
- `reprefill`: every turn re-prefills each row's whole context (`multiturn.reprefill` of `generate`);
- `single-turn`: one `generate` call of `--max-tokens` new tokens (stopping at EOS), as a
  single-turn GRPO rollout of the same budget.
transformers (another subprocess, `--torch-threads` 1 and 2, the faster reported): the turn contexts
of jaxrlhf's episodes replayed, one `generate` per turn (greedy, the real EOS), plus the same
single-turn call. The greedy tokens are compared with jaxrlhf's.

Timing: a first pass (compilation), then the median of `--runs` passes over all batches; "policy
tokens" are the tokens the policy wrote (tool messages excluded), "prefilled" the context tokens
each way computed a forward over.

    python bench/bench_multiturn.py --json bench/results/multiturn.json     # ~6 min on 2 idle cores

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
SFT_EXPORT = os.path.join(ROOT, "runs", "sft_tools_demo", "export")


class EveryTurn:
    """Answers every turn that ends with EOS (for a model that never calls a tool by itself)."""

    tools = ()

    def reset(self, row):
        self.turn = 0

    def parse_calls(self, text):
        from jaxrlhf.tools import ToolCall

        return [ToolCall("echo")] if text.strip() else []

    def step(self, calls):
        self.turn += 1
        return [f"result {self.turn}: 42" for _ in calls]


def model_path(args) -> str:
    if args.model:
        return args.model
    if os.path.exists(SFT_EXPORT) and not args.every_turn:
        return SFT_EXPORT
    from jaxrlhf.models.demo import demo_model_path

    return demo_model_path()


def timed(fn, runs: int) -> dict:
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times), "out": out}


def batches(tok, size: int):
    from jaxrlhf.evaluation import load_task_prompts
    from jaxrlhf.train.pipeline import resolve_data_path

    prompts = load_task_prompts([resolve_data_path("asset:grpo_demo/test.jsonl")], tok)
    return [prompts[i : i + size] for i in range(0, len(prompts), size)]


def worker_jax(args) -> dict:
    import jax
    import numpy as np

    from jaxrlhf.data import bucket_length, left_pad
    from jaxrlhf.generation import generate
    from jaxrlhf.generation.turns import TurnCache
    from jaxrlhf.models import from_pretrained, load_tokenizer
    from jaxrlhf.tools import ToolEnvironment, calculator
    from jaxrlhf.train.multiturn import ToolTurnTemplate, reprefill, reset_environments, run_episodes

    path = model_path(args)
    tok, model = load_tokenizer(path), from_pretrained(path)
    eos, pad = [tok.eos_token_id], tok.pad_token_id
    template = ToolTurnTemplate.of(tok)
    factory = EveryTurn if args.every_turn else functools.partial(ToolEnvironment, [calculator])
    work = batches(tok, args.batch)
    kw = {"eos_ids": eos, "max_turns": args.max_turns, "max_tokens": args.max_tokens,
          "turn_tokens": args.turn_tokens, "template": template}  # fmt: skip
    caches: list = []

    def episodes(way: str):
        out = []
        for batch in work:
            ids = [p.ids.tolist() for p in batch]
            envs = reset_environments(factory, [{"answer": p.answer} for p in batch])
            if way == "carry":
                sample = TurnCache.of_model(model, len(ids), max(map(len, ids)), max_tokens=args.max_tokens,
                                            turn_tokens=args.turn_tokens, eos_ids=eos, pad_id=pad,
                                            temperature=0.0)  # fmt: skip
                caches.append(sample)
            else:

                def single(i, m, n):
                    caches.append(int(np.asarray(m).sum()))  # the re-prefilled context tokens
                    return generate(model, i, m, max_new_tokens=n, eos_token_ids=eos, pad_token_id=pad,
                                    temperature=0.0)  # fmt: skip

                sample = reprefill(single, pad)
            out += run_episodes(sample, tok, ids, envs, **kw)
        return [{"prompt": p.ids.tolist(), "tokens": e.tokens, "policy": e.policy, "turns": e.turns,
                 "calls": e.tool_calls, "messages": e.messages} for p, e in
                zip([p for b in work for p in b], out, strict=True)]  # fmt: skip

    def single_turn():
        total = 0
        for batch in work:
            rows = [p.ids.tolist() for p in batch]
            ids, mask = left_pad(rows, pad, width=bucket_length(max(map(len, rows))))
            gen = generate(model, ids, mask, max_new_tokens=args.max_tokens, eos_token_ids=eos,
                           pad_token_id=pad, temperature=0.0)  # fmt: skip
            total += int(np.asarray(gen.completion_mask).sum())
        return total

    results = {}
    for way in ("carry", "reprefill"):
        caches.clear()
        r = timed(lambda way=way: episodes(way), args.runs)
        per_pass = len(caches) // (args.runs + 1)
        if way == "carry":
            prefilled = sum(c.segment_tokens for c in caches[-per_pass:])
            r["rebuilds"] = sum(c.rebuilds for c in caches[-per_pass:])
        else:
            prefilled = sum(caches[-per_pass:])
        r["prefilled_tokens"] = prefilled
        results[way] = r
    results["single-turn"] = timed(single_turn, args.runs)
    carry, again = results["carry"]["out"], results["reprefill"]["out"]
    same = sum(a["tokens"] == b["tokens"] for a, b in zip(carry, again, strict=True)) / len(carry)
    return {"framework": "jaxrlhf", "jax": jax.__version__, "model": path, "results": results,
            "same_episodes_carry_vs_reprefill": same}  # fmt: skip


def worker_hf(args, episodes: list[dict]) -> dict:
    import torch
    import transformers as tf

    from jaxrlhf.models import load_tokenizer

    threads = args.torch_threads[0]
    torch.set_num_threads(threads)
    path = model_path(args)
    tok = load_tokenizer(path)
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    # each turn's context: the prompt and the episode up to the turn's first token
    turns: list[list[tuple[int, list[int], list[int]]]] = [[] for _ in range(args.max_turns)]
    for i, e in enumerate(episodes):
        starts = [t for t, p in enumerate(e["policy"]) if p and (t == 0 or not e["policy"][t - 1])]
        for k, s in enumerate(starts):
            end = next((t for t in range(s, len(e["policy"])) if not e["policy"][t]), len(e["policy"]))
            turns[k].append((i, e["prompt"] + e["tokens"][:s], e["tokens"][s:end]))

    def replay():
        matched, total, policy = 0, 0, 0
        for rows in turns:
            for start in range(0, len(rows), args.batch):
                chunk = rows[start : start + args.batch]
                width = max(len(c) for _, c, _ in chunk)
                ids = torch.tensor([[pad] * (width - len(c)) + c for _, c, _ in chunk])
                mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for _, c, _ in chunk])
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.turn_tokens,
                                         do_sample=False, eos_token_id=eos, pad_token_id=pad)  # fmt: skip
                for (_, _, want), got in zip(chunk, out[:, width:].tolist(), strict=True):
                    got = got[: got.index(eos) + 1] if eos in got else got
                    matched += got[: len(want)] == want
                    total += 1
                    policy += len(want)
        return {"turns_matched": matched / max(total, 1), "policy_tokens": policy}

    def single_turn():
        prompts = [e["prompt"] for e in episodes]
        new = 0
        for start in range(0, len(prompts), args.batch):
            chunk = prompts[start : start + args.batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_tokens,
                                     do_sample=False, eos_token_id=eos, pad_token_id=pad)  # fmt: skip
            new += int((out[:, width:] != pad).sum())
        return new

    return {"framework": "transformers", "torch_threads": threads, "transformers": tf.__version__,
            "results": {"reprefill": timed(replay, args.runs), "single-turn": timed(single_turn, args.runs)}}


def subprocess_json(argv: list[str], stdin: str | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv], input=stdin, capture_output=True, text=True,
                          cwd=ROOT)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--every-turn", action="store_true")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-turns", type=int, default=2)
    ap.add_argument("--turn-tokens", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json")
    ap.add_argument("--worker", choices=["jax", "hf"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "jax":
        print(json.dumps(worker_jax(args)))
        return
    if args.worker == "hf":
        print(json.dumps(worker_hf(args, json.loads(sys.stdin.read()))))
        return
    common = [f"--batch={args.batch}", f"--max-turns={args.max_turns}", f"--turn-tokens={args.turn_tokens}",
              f"--max-tokens={args.max_tokens}", f"--runs={args.runs}"]  # fmt: skip
    common += (["--model", args.model] if args.model else []) + (["--every-turn"] if args.every_turn else [])
    jx = subprocess_json(["--worker=jax", *common])
    episodes = jx["results"]["carry"].pop("out")
    jx["results"]["reprefill"].pop("out")
    hf_runs = [subprocess_json(["--worker=hf", *common, "--torch-threads", str(t)], json.dumps(episodes))
               for t in args.torch_threads]  # fmt: skip
    hf = min(hf_runs, key=lambda r: r["results"]["reprefill"]["median_s"])
    policy = sum(sum(e["policy"]) for e in episodes)
    single_tokens = jx["results"]["single-turn"]["out"]
    rows = [
        ("jaxrlhf carry", jx["results"]["carry"], policy),
        ("jaxrlhf reprefill", jx["results"]["reprefill"], policy),
        ("jaxrlhf single-turn", jx["results"]["single-turn"], single_tokens),
        (f"transformers reprefill ({hf['torch_threads']} threads)", hf["results"]["reprefill"], policy),
        (f"transformers single-turn ({hf['torch_threads']} threads)", hf["results"]["single-turn"],
         hf["results"]["single-turn"]["out"]),
    ]  # fmt: skip
    summary = {
        "model": jx["model"], "episodes": len(episodes), "policy_tokens": policy,
        "turns_per_episode": sum(e["turns"] for e in episodes) / len(episodes),
        "episodes_with_calls": sum(e["calls"] > 0 for e in episodes) / len(episodes),
        "same_episodes_carry_vs_reprefill": jx["same_episodes_carry_vs_reprefill"],
        "transformers_turns_matched": hf["results"]["reprefill"]["out"]["turns_matched"],
        "carry_rebuilds": jx["results"]["carry"]["rebuilds"],
        "rows": [{"way": name, "median_s": r["median_s"], "first_s": r["first_s"], "tokens": tokens,
                  "tokens_per_s": tokens / r["median_s"], "prefilled_tokens": r.get("prefilled_tokens")}
                 for name, r, tokens in rows],
        "args": {k: v for k, v in vars(args).items() if k not in ("json", "worker")},
        "example": episodes[0]["messages"],
    }  # fmt: skip
    print(f"{len(episodes)} episodes, {summary['turns_per_episode']:.2f} turns each, "
          f"{summary['episodes_with_calls']:.2f} with a call; carry = reprefill on "
          f"{summary['same_episodes_carry_vs_reprefill']:.2f} of them; transformers' turns equal on "
          f"{summary['transformers_turns_matched']:.2f}")  # fmt: skip
    print("| way | median s | tokens | tokens/s | prefilled tokens |")
    print("|---|---|---|---|---|")
    for r in summary["rows"]:
        pre = "" if r["prefilled_tokens"] is None else str(r["prefilled_tokens"])
        print(f"| {r['way']} | {r['median_s']:.2f} | {r['tokens']} | {r['tokens_per_s']:.1f} | {pre} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
