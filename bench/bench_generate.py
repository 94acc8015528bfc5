"""Decoding throughput: jaxrlhf's compiled KV-cache sampler (`jaxrlhf.generation.generate`) vs
transformers' `model.generate`, on CPU, same model, same prompts, same number of new tokens.

Model: the embedded demo model SmolLM2-135M-Instruct (`jaxrlhf.models.demo.demo_model_path()`), float32
on both sides (transformers with its default attention and `DynamicCache`). Prompts: the first `--batch`
prompts of `jaxrlhf/assets/dpo_demo/test.jsonl`, rendered with the chat template (generation prompt
added) and left-padded by `load_tokenizer` into one `[B, P]` batch, identical for both frameworks.

Every row generates exactly `--max-new-tokens` tokens: jaxrlhf gets an EOS id that never occurs (-1),
transformers gets the real EOS with `min_new_tokens = max_new_tokens` (which masks EOS out). Modes:
``greedy`` (temperature 0 / `do_sample=False`), ``sample`` (temperature 0.7) and ``sample top-p``
(temperature 0.7, top-p 0.9); top-k is off on both sides (transformers' default of 50 is overridden).

Timing: the first call (for jaxrlhf: tracing + XLA compilation + one run; for transformers an eager
warm-up), then the median (and min / max) of `--runs` timed calls, each until the tokens are on the
host. `compile` is first call minus the steady-state median. tokens/s = B * max_new_tokens / median.
Each framework runs in its own subprocess: with XLA's CPU thread pool live in the same process,
PyTorch with 2 intra-op threads slows down by up to 100x on a 2-core machine, which would not be a fair
baseline. transformers runs once per `--torch-threads` value (default 2 and 1: on a busy 2-core machine
one intra-op thread can be several times faster than two); speed-ups are against the faster one.
`other procs` is the average number of cores other processes kept busy during the timed calls.

As a sanity check the greedy tokens of both frameworks are compared (up to each row's first real EOS,
which transformers suppresses and jaxrlhf does not stop at).

    python bench/bench_generate.py                       # ~5 min on 2 idle CPU cores
    python bench/bench_generate.py --max-new-tokens 16 --runs 1   # quick

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_FILE = os.path.join(HERE, "..", "jaxrlhf", "assets", "dpo_demo", "test.jsonl")
TEMPERATURE, TOP_P = 0.7, 0.9
# mode -> (jaxrlhf `generate` keywords, transformers `generate` keywords); transformers' default top_k
# (50) is switched off explicitly.
MODES = {
    "greedy": ({"temperature": 0.0}, {"do_sample": False}),
    "sample": ({"temperature": TEMPERATURE}, {"do_sample": True, "temperature": TEMPERATURE, "top_k": 0}),
    "sample top-p": (
        {"temperature": TEMPERATURE, "top_p": TOP_P},
        {"do_sample": True, "temperature": TEMPERATURE, "top_p": TOP_P, "top_k": 0},
    ),
}


def prompts(tok, batch: int):
    import numpy as np

    with open(DATA_FILE) as f:
        rows = [json.loads(line) for line in f][:batch]
    texts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    enc = tok(texts, padding=True, add_special_tokens=False, return_tensors="np")
    assert tok.padding_side == "left"
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def _busy_s() -> tuple[float, float]:
    """(seconds of CPU time used by all processes, by this process) so far."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = sum(v) - v[3] - (v[4] if len(v) > 4 else 0)  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def timed(fn, runs: int) -> dict:
    """First call, then `runs` timed calls; `foreign_cores` is the average number of cores that other
    processes kept busy during the timed calls (0 on an otherwise idle machine)."""
    start = time.perf_counter()
    out = fn(0)
    first = time.perf_counter() - start
    times = []
    busy0, own0, wall0 = *_busy_s(), time.perf_counter()
    for i in range(runs):
        start = time.perf_counter()
        out = fn(i + 1)
        times.append(time.perf_counter() - start)
    busy1, own1, wall1 = *_busy_s(), time.perf_counter()
    foreign = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)
    median = statistics.median(times)
    return {"first_s": first, "median_s": median, "min_s": min(times), "max_s": max(times),
            "foreign_cores": foreign, "out": out}  # fmt: skip


def worker_jax(args) -> dict:
    import jax
    import numpy as np

    from jaxrlhf.generation import generate
    from jaxrlhf.models import from_pretrained, load_tokenizer
    from jaxrlhf.models.demo import demo_model_path

    path = demo_model_path()
    tok = load_tokenizer(path)
    model = from_pretrained(path)
    ids, mask = prompts(tok, args.batch)
    results = {}
    for mode, (sampling, _) in MODES.items():

        def run(i, sampling=sampling):
            gen = generate(
                model, ids, mask, max_new_tokens=args.max_new_tokens, eos_token_ids=[-1],
                pad_token_id=tok.pad_token_id, rng=jax.random.key(i), **sampling,
            )  # fmt: skip
            tokens = np.asarray(gen.tokens)
            assert np.asarray(gen.completion_mask).all()  # every row ran the full length
            return tokens.tolist()

        results[mode] = timed(run, args.runs)
    return {"framework": "jaxrlhf", "versions": {"jax": jax.__version__}, "prompt_shape": list(ids.shape),
            "eos": tok.eos_token_id, "results": results}  # fmt: skip


def worker_hf(args) -> dict:
    import torch
    import transformers as tf

    from jaxrlhf.models import load_tokenizer
    from jaxrlhf.models.demo import demo_model_path

    torch.set_num_threads(args.torch_threads)
    path = demo_model_path()
    tok = load_tokenizer(path)
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, mask = prompts(tok, args.batch)
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    n = args.max_new_tokens
    results = {}
    for mode, (_, sampling) in MODES.items():

        def run(i, sampling=sampling):
            torch.manual_seed(i)
            with torch.no_grad():
                out = model.generate(
                    ids_t, attention_mask=mask_t, max_new_tokens=n, min_new_tokens=n,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **sampling,
                )  # fmt: skip
            tokens = out[:, ids.shape[1] :]
            assert tokens.shape == (len(ids), n)
            return tokens.tolist()

        results[mode] = timed(run, args.runs)
    return {"framework": "transformers", "prompt_shape": list(ids.shape), "eos": tok.eos_token_id,
            "versions": {"torch": torch.__version__, "transformers": tf.__version__,
                         "torch_threads": torch.get_num_threads()},
            "results": results}  # fmt: skip


def run_worker(name: str, args, torch_threads: int = 2) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name,
           "--batch", str(args.batch), "--max-new-tokens", str(args.max_new_tokens), "--runs", str(args.runs),
           "--torch-threads", str(torch_threads)]  # fmt: skip
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    wait_for_idle(args.idle_wait, args.max_load)
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} worker failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load"] = [load, os.getloadavg()[0]]
    return out


def wait_for_idle(seconds: float, max_load: float) -> None:
    deadline = time.perf_counter() + seconds
    while os.getloadavg()[0] > max_load and time.perf_counter() < deadline:
        print(f"  waiting for the 1-min load average ({os.getloadavg()[0]:.2f}) to drop below {max_load}",
              file=sys.stderr, flush=True)  # fmt: skip
        time.sleep(15)


def greedy_agreement(ours, theirs, eos: int) -> tuple[int, int]:
    """Rows whose greedy tokens agree, up to and including our first real EOS (after which transformers,
    with EOS suppressed, and jaxrlhf, with EOS disabled, legitimately diverge)."""
    same = 0
    for a, b in zip(ours, theirs, strict=True):
        cut = a.index(eos) if eos in a else len(a)
        same += a[:cut] == b[:cut]
    return same, len(ours)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--torch-threads", type=int, nargs="+", default=[2, 1],
                    help="transformers is run once per value (torch.set_num_threads)")  # fmt: skip
    ap.add_argument("--idle-wait", type=float, default=0, help="seconds to wait for a quiet machine first")
    ap.add_argument("--max-load", type=float, default=1.0, help="the 1-min load average that counts as quiet")
    ap.add_argument("--worker", choices=("jax", "hf"), help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args()
    if args.worker:
        args.torch_threads = args.torch_threads[0]
        out = worker_jax(args) if args.worker == "jax" else worker_hf(args)
        print(json.dumps(out))
        return

    ours = run_worker("jax", args)
    hfs = [run_worker("hf", args, t) for t in args.torch_threads]
    b, n = args.batch, args.max_new_tokens
    label = {id(ours): "jaxrlhf `generate`"}
    for hf in hfs:
        label[id(hf)] = f"transformers `generate`, {hf['versions']['torch_threads']} torch threads"
    print(f"model: SmolLM2-135M-Instruct float32; batch {b} x prompt {ours['prompt_shape'][1]} "
          f"(left-padded); {n} new tokens per row; {args.runs} timed runs after 1 warm-up")  # fmt: skip
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; versions: {ours['versions']} "
          f"{hfs[0]['versions']}")  # fmt: skip
    for res in [ours, *hfs]:
        print(f"1-min load average before/after {label[id(res)]}: {res['load'][0]:.2f}/{res['load'][1]:.2f}")
    for hf in hfs:
        same, total = greedy_agreement(ours["results"]["greedy"]["out"], hf["results"]["greedy"]["out"],
                                       ours["eos"])  # fmt: skip
        print(f"greedy sanity check vs {label[id(hf)]}: {same}/{total} rows identical up to the first EOS")
    print()
    print("| mode | framework | first call (s) | compile (s) | steady median (s) [min-max] "
          "| other procs (cores) | tokens/s | speed-up vs best transformers |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for mode in MODES:
        base = min(hf["results"][mode]["median_s"] for hf in hfs)
        for res in [ours, *hfs]:
            r = res["results"][mode]
            compile_s = f"{r['first_s'] - r['median_s']:.1f}" if res is ours else "-"
            cells = [
                mode, label[id(res)], f"{r['first_s']:.2f}", compile_s,
                f"{r['median_s']:.2f} [{r['min_s']:.2f}-{r['max_s']:.2f}]", f"{r['foreign_cores']:.1f}",
                f"{b * n / r['median_s']:.1f}", f"{base / r['median_s']:.2f}x",
            ]  # fmt: skip
            print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jaxrlhf": ours, "transformers": hfs}, f)


if __name__ == "__main__":
    main()
