"""Scanned vs unrolled decoder layers, and the remat policies, on the demo model (CPU).

For each configuration, in its own subprocess (so compile caches and peak RSS are its own):

* the DPO train step (same-step reference, AdamW) on `[8, 96]` packed pairs from the shipped demo
  data: trace + lower time, XLA compile time, median step time over the timed steps, and XLA's memory
  analysis of the compiled step (arguments, outputs, temporaries; per device); `--repeats` runs per
  layout, alternating, and the pooled median step time of each;
* forward vs gradient alone (`--breakdown`): `hidden_states` on random `[8, 96]` ids and its
  `jax.grad`, jitted, median of 5 calls, two alternating runs per layout;
* greedy KV-cache generation (`--generate`): batch 8 chat prompts of the demo data, 64 new tokens;
  compile time and median wall time per call.

    python bench/bench_scan_layers.py                              # unrolled vs scanned, remat auto
    python bench/bench_scan_layers.py --remat none                 # both keeping every residual
    python bench/bench_scan_layers.py --memory-only --seq 512 --steps 1 --warmup 0 \
        --remat none full dots_saveable dots_with_no_batch_dims_saveable offload_dots  # memory
    python bench/bench_scan_layers.py --generate                   # also the sampler
    python bench/bench_scan_layers.py --remat --breakdown          # forward vs gradient only
    python bench/bench_scan_layers.py --json out.json

Not part of the test suite (timing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_FILE = os.path.join(HERE, "..", "jaxrlhf", "assets", "dpo_demo", "train.jsonl")
TAG = "BENCH_RESULT "


def run_step(scan: bool, remat: str, args: argparse.Namespace) -> dict:
    import jax

    from jaxrlhf.data import collate_pairs, load_rows, parse_preferences, tokenize_pairs
    from jaxrlhf.models import from_pretrained, load_tokenizer
    from jaxrlhf.models.demo import demo_model_path
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.train.objectives import DPOObjective, add_targets
    from jaxrlhf.train.step import (
        batch_sharding,
        create_state,
        make_optimizer,
        make_schedule,
        make_train_step,
        state_shardings,
    )

    B, T = args.batch_size, args.seq
    path = demo_model_path()
    tok = load_tokenizer(path)
    examples, _ = parse_preferences(load_rows(DATA_FILE), tok)
    pairs, _ = tokenize_pairs(examples[: B * args.steps], tok, max_length=T, max_prompt_length=T // 2)
    mesh = make_mesh(devices=jax.devices()[:1])
    model = from_pretrained(path, mesh=mesh, scan_layers=scan, remat=remat)
    schedule = make_schedule(5e-6, args.steps, kind="linear")
    optimizer = make_optimizer(schedule)
    graphdef, state = create_state(model, optimizer, mesh, with_reference=True)
    del model
    shardings = state_shardings(state)
    step_fn = make_train_step(graphdef, DPOObjective(beta=0.1), optimizer, schedule, shardings, mesh)

    def device_batch(chunk):
        batch = add_targets(collate_pairs(chunk, pad_id=tok.pad_token_id, batch_size=B, buckets=[T]), [T])
        return {
            k: jax.device_put(v[None], batch_sharding(mesh, v.ndim + 1)) for k, v in batch.items()
        }

    batches = [device_batch(pairs[i * B : (i + 1) * B]) for i in range(args.steps)]
    t0 = time.perf_counter()
    lowered = step_fn.lower(state, batches[0])
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    times, losses = [], []
    for batch in [] if args.memory_only else batches:
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - t0)
    timed = times[args.warmup :] or [float("nan")]
    return {
        "what": "dpo_step",
        "scan_layers": scan,
        "remat": remat,
        "shape": [B, T],
        "lower_s": lower_s,
        "compile_s": compile_s,
        "step_s": statistics.median(timed),
        "step_min_s": min(timed),
        "step_max_s": max(timed),
        "step_times": [] if args.memory_only else timed,
        "losses": losses,
        "argument_mib": mem.argument_size_in_bytes / 2**20,
        "output_mib": mem.output_size_in_bytes / 2**20,
        "temp_mib": mem.temp_size_in_bytes / 2**20,
        "alias_mib": mem.alias_size_in_bytes / 2**20,
    }


def run_generate(scan: bool, args: argparse.Namespace) -> dict:
    import numpy as np

    from jaxrlhf.data import load_rows
    from jaxrlhf.generation import generate
    from jaxrlhf.models import from_pretrained, load_tokenizer
    from jaxrlhf.models.demo import demo_model_path

    path = demo_model_path()
    tok = load_tokenizer(path)
    rows = load_rows(DATA_FILE)
    prompts = [tok.apply_chat_template(rows[i]["prompt"], add_generation_prompt=True, tokenize=False)
               for i in range(args.batch_size)]  # fmt: skip
    enc = tok(prompts, padding=True, return_tensors="np", add_special_tokens=False)
    model = from_pretrained(path, scan_layers=scan)
    kw = dict(max_new_tokens=64, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
              temperature=0.0)  # fmt: skip
    t0 = time.perf_counter()
    out = generate(model, enc["input_ids"], enc["attention_mask"], **kw)
    np.asarray(out.tokens)
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(args.gen_calls):
        t0 = time.perf_counter()
        np.asarray(generate(model, enc["input_ids"], enc["attention_mask"], **kw).tokens)
        times.append(time.perf_counter() - t0)
    return {
        "what": "generate",
        "scan_layers": scan,
        "shape": list(enc["input_ids"].shape),
        "first_call_s": first_s,
        "call_s": statistics.median(times),
        "new_tokens": int(np.asarray(out.completion_mask).sum()),
    }


def run_breakdown(scan: bool, args: argparse.Namespace) -> dict:
    """Forward vs backward: `hidden_states` on random `[B, T]` ids, jitted, and its `jax.grad`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxrlhf.models import from_pretrained
    from jaxrlhf.models.demo import demo_model_path

    model = from_pretrained(demo_model_path(), scan_layers=scan, remat=args.worker_remat)
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 40000, (args.batch_size, args.seq)))
    def loss(params: Any, layer_grads: bool = True) -> Any:
        if not layer_grads:  # backward through the layers for the activations only (no dW)
            params = jax.tree_util.tree_map_with_path(
                lambda k, x: jax.lax.stop_gradient(x) if "layers" in jax.tree_util.keystr(k) else x, params
            )
        return jnp.sum(nnx.merge(graphdef, params).hidden_states(ids) ** 2)

    fns = {
        "forward_s": jax.jit(lambda p: jnp.sum(nnx.merge(graphdef, p).hidden_states(ids))),
        "grad_s": jax.jit(jax.grad(loss)),
        "grad_activations_only_s": jax.jit(jax.grad(lambda p: loss(p, layer_grads=False))),
    }
    out: dict = {"what": "breakdown", "scan_layers": scan, "shape": [args.batch_size, args.seq]}
    for name, fn in fns.items():
        jax.block_until_ready(fn(params))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params))
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def worker(args: argparse.Namespace) -> None:
    scan = args.worker_scan == "1"
    if args.worker == "step":
        result = run_step(scan, args.worker_remat, args)
    elif args.worker == "breakdown":
        result = run_breakdown(scan, args)
        result["remat"] = args.worker_remat
    else:
        result = run_generate(scan, args)
    print(TAG + json.dumps(result), flush=True)


def spawn(kind: str, scan: bool, remat: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--worker-scan", "1" if scan else "0",
           "--worker-remat", remat, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch-size", str(args.batch_size), "--seq", str(args.seq),
           "--gen-calls", str(args.gen_calls)] + (["--memory-only"] if args.memory_only else [])  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} scan={scan} remat={remat} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith(TAG))
    return json.loads(line[len(TAG) :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--remat", nargs="*", default=["auto"], help="policies to time (none given: no step)")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per layout (the VM drifts)")
    p.add_argument("--generate", action="store_true", help="also time greedy generation")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=96)
    p.add_argument("--gen-calls", type=int, default=3)
    p.add_argument("--memory-only", action="store_true", help="compile and report memory; run no step")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--breakdown", action="store_true", help="also time forward vs gradient alone")
    p.add_argument("--worker", choices=["step", "generate", "breakdown"], help=argparse.SUPPRESS)
    p.add_argument("--worker-scan", help=argparse.SUPPRESS)
    p.add_argument("--worker-remat", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    results = []
    for remat in args.remat:
        pooled: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):  # alternating U, S, U, S: the VM drifts by a few percent
            for scan in (False, True):
                r = spawn("step", scan, remat, args)
                results.append(r)
                pooled[scan] += r["step_times"]
                print(
                    f"dpo step [{args.batch_size}, {args.seq}] scan={str(scan):5} remat={remat:33} "
                    f"lower {r['lower_s']:6.2f} s  compile {r['compile_s']:6.2f} s  step {r['step_s']:.3f} s "
                    f"({r['step_min_s']:.3f}-{r['step_max_s']:.3f})  args {r['argument_mib']:7.1f} MiB  "
                    f"temp {r['temp_mib']:7.1f} MiB  out {r['output_mib']:7.1f} MiB",
                    flush=True,
                )
        if not args.memory_only:
            unrolled, scanned = (statistics.median(pooled[k]) for k in (False, True))
            print(f"remat={remat}: median step over {len(pooled[True])} steps each: "
                  f"unrolled {unrolled:.3f} s, scanned {scanned:.3f} s, "
                  f"scanned / unrolled = {scanned / unrolled:.3f}", flush=True)  # fmt: skip
    if args.generate:
        for scan in (False, True):
            r = spawn("generate", scan, "none", args)
            results.append(r)
            print(
                f"generate {r['shape']} +64 scan={str(scan):5} first call {r['first_call_s']:6.2f} s  "
                f"call {r['call_s']:.3f} s  ({r['new_tokens']} new tokens)",
                flush=True,
            )
    if args.breakdown:
        for _ in range(2):  # alternating runs: the VM drifts by a few percent
            for scan in (False, True):
                r = spawn("breakdown", scan, args.remat[0] if args.remat else "auto", args)
                results.append(r)
                print(f"hidden_states {r['shape']} scan={str(scan):5} forward {r['forward_s']:.3f} s  "
                      f"gradient {r['grad_s']:.3f} s  activations-only gradient "
                      f"{r['grad_activations_only_s']:.3f} s", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
