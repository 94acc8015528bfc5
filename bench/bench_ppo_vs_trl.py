"""One PPO iteration: jaxrlhf `PPOEngine.step` vs TRL's `PPOTrainer`, on CPU, same model, same prompts.

Model: the embedded demo model SmolLM2-135M-Instruct (`jaxrlhf.models.demo.demo_model_path()`), float32,
the same directory for policy, reference, value model and reward model (value/reward: a randomly
initialised 1-output score head; the reward is meaningless, only the timing matters). Prompts: the
first 8 conversations of `jaxrlhf/assets/dpo_demo/test.jsonl`, rendered with the chat template and a
generation prompt by `jaxrlhf.models.load_tokenizer` (pad `<|endoftext|>` id 0, EOS `<|im_end|>`), and
left-padded to a common length; the same ids for both frameworks. Both sample at temperature 0.7 with
no top-k/top-p, stop at EOS (TRL `stop_token="eos"`), at most `--response-length` tokens.

One iteration = rollout of 8 prompts, scoring (policy, reference, value and reward forwards, rewards,
GAE) and `num_ppo_epochs` x `num_mini_batches` optimizer steps (Adam, lr 1e-6, eps 1e-5, constant).
TRL's rollout batch is `per_device_train_batch_size * gradient_accumulation_steps` and each rollout
is split into `num_mini_batches`; TRL runs with `per_device_train_batch_size=4,
gradient_accumulation_steps=2`: an 8-prompt rollout and 4-row minibatches, as jaxrlhf. Accelerate
would skip every other optimizer step while accumulating, but each rollout is the last batch of the
8-row dataset, so it steps after every minibatch; the script counts `torch.optim.AdamW.step` calls
to show it (E x M = 4 per iteration, as jaxrlhf).

Timing.
* jaxrlhf: the `time/generation`, `time/scoring`, `time/update` metrics `PPOEngine.step` returns
  (each ends with the results on the host / ready); "total" is the wall time of `step()`.
* TRL: `PPOTrainer.train()` runs all iterations in one call; the phases are timed by wrapping
  functions of `trl.experimental.ppo.ppo_trainer` in place: generation = the `batch_generation` call
  (HF `generate`); scoring = from its return to the first grad-enabled `forward` (log-probs from the
  generation logits, reference forward, value and reward forwards, rewards, GAE, whitening, TRL's
  `gc.collect()`); update = from there to the callback `on_step_end` (all forwards/backwards/Adam
  steps, plus TRL's metric gathering and `self.log`). "total" = from the start of `batch_generation`
  to `on_step_end` (the dataloader fetch before generation is not included, ~ms).

Iteration 0 is the warm-up (for jaxrlhf it includes XLA compilation: reported as "first iteration");
the table reports the median of the following `--iters` iterations. Each framework runs in its own
subprocess with `torch.set_num_threads(--threads)` (and for JAX, XLA's CPU thread pool as it comes).
`uptime` is recorded before and after each run.

TRL: the installed `trl` (1.16) no longer ships PPO (it was removed after 1.12). Pass
`--trl-path DIR` with an unpacked TRL wheel that has `trl/experimental/ppo` (e.g.
`pip download trl==1.12.0 --no-deps -d /tmp/w && unzip -q /tmp/w/trl-1.12.0-*.whl -d /tmp/trl112`);
DIR is put first on `sys.path` of the TRL subprocess only.

    python bench/bench_ppo_vs_trl.py --trl-path /tmp/trl112                # both, N=24 E=2 M=2, 2 threads
    python bench/bench_ppo_vs_trl.py --trl-path /tmp/trl112 --threads 1
    python bench/bench_ppo_vs_trl.py --only jax
    python bench/bench_ppo_vs_trl.py --trl-path /tmp/trl112 --frozen-layers 20   # the top 10 of 30 trained

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA_FILE = os.path.join(ROOT, "jaxrlhf", "assets", "dpo_demo", "test.jsonl")
TAG = "BENCH_RESULT "
LR = 1e-6


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "n/a"


def load_prompts(n: int):
    """(left-padded ids [n, P] int32, mask [n, P] int32, tokenizer, model path)."""
    from jaxrlhf.data import left_pad
    from jaxrlhf.models import load_tokenizer
    from jaxrlhf.models.demo import demo_model_path

    path = demo_model_path()
    tok = load_tokenizer(path)
    with open(DATA_FILE) as f:
        rows = [json.loads(line) for line in f if line.strip()][:n]
    seqs = []
    for row in rows:
        text = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        seqs.append(tok(text, add_special_tokens=False)["input_ids"])
    ids, mask = left_pad(seqs, tok.pad_token_id)
    return ids, mask, tok, path


def summarize(iters: list[dict]) -> dict:
    first, rest = iters[0], iters[1:]
    out = {"first": first, "all": iters}
    for k in ("generation", "scoring", "update", "total", "response_length"):
        out[k] = statistics.median(it[k] for it in rest)
    out["total_min"] = min(it["total"] for it in rest)
    out["total_max"] = max(it["total"] for it in rest)
    return out


# ----------------------------------------------------------------------------------- jaxrlhf


def run_jax(args) -> dict:
    import jax

    from jaxrlhf.models import from_pretrained
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.train.config import PPOConfig
    from jaxrlhf.train.ppo import PPOEngine
    from jaxrlhf.train.step import frozen_params, make_optimizer, make_schedule

    ids, mask, tok, path = load_prompts(args.batch_size)
    mesh = make_mesh(devices=jax.devices()[:1])
    t0 = time.perf_counter()
    n = args.frozen_layers
    policy = from_pretrained(path, mesh=mesh, frozen_layers=n)
    critic = from_pretrained(path, head="score", init_score_head=True, mesh=mesh, frozen_layers=n)
    reward = from_pretrained(path, head="score", init_score_head=True, mesh=mesh, frozen_layers=n)
    cfg = PPOConfig(
        response_length=args.response_length,
        temperature=0.7,
        num_ppo_epochs=args.epochs,
        num_mini_batches=args.mini_batches,
        missing_eos_penalty=None,
    )
    optimizer = make_optimizer(make_schedule(LR, 100, kind="constant"), eps=1e-5,
                               frozen=frozen_params(n) if n else None)  # fmt: skip
    engine = PPOEngine(
        policy, critic, reward, cfg, optimizer, mesh,
        eos_token_ids=[int(tok.eos_token_id)], pad_token_id=int(tok.pad_token_id), seed=0,
    )  # fmt: skip
    load_s = time.perf_counter() - t0
    print(f"jax: frozen_layers={n}, one shared trunk: {engine.trunk}", file=sys.stderr, flush=True)
    iters = []
    for i in range(1 + args.iters):
        start = time.perf_counter()
        m = engine.step(ids, mask)
        total = time.perf_counter() - start
        iters.append({
            "generation": m["time/generation"], "scoring": m["time/scoring"], "update": m["time/update"],
            "total": total, "response_length": m["val/response_length"], "kl": m["objective/kl"],
            "loss_value": m["loss/value_avg"],
        })  # fmt: skip
        print(f"jax iter {i}: {json.dumps(iters[-1])}", file=sys.stderr, flush=True)
    out = summarize(iters)
    out.update(load_s=load_s, prompt_shape=list(ids.shape), jax=jax.__version__,
               devices=str(jax.devices()))  # fmt: skip
    return out


# --------------------------------------------------------------------------------------- TRL


def run_trl(args) -> dict:
    if args.trl_path:
        sys.path.insert(0, args.trl_path)
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        from trl.experimental.ppo import ppo_trainer as ppo_mod
    except ImportError:
        from trl import PPOConfig, PPOTrainer  # older TRL
        from trl.trainer import ppo_trainer as ppo_mod

    ids, mask, tok, path = load_prompts(args.batch_size)
    # the collator re-pads left (tokenizer padding_side="left") to the same common width
    rows = [[int(t) for t, m in zip(r, mr, strict=False) if m] for r, mr in zip(ids, mask, strict=False)]
    dataset = Dataset.from_dict({"input_ids": rows})

    t0 = time.perf_counter()
    kw = {"torch_dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(path, **kw)
    ref = AutoModelForCausalLM.from_pretrained(path, **kw)
    value = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kw)
    reward = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kw)
    for m in (policy, ref, value, reward):
        m.config.pad_token_id = tok.pad_token_id
    for m in (policy, value):  # --frozen-layers: the embeddings (and tied head) and the first layers
        frozen = [m.model.embed_tokens, *m.model.layers[: args.frozen_layers]] if args.frozen_layers else []
        for module in frozen:
            module.requires_grad_(False)  # the Trainer's optimizer takes only parameters that need grads

    n_iter = 1 + args.iters
    micro = args.batch_size // args.mini_batches
    cfg = PPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=args.mini_batches,
        num_mini_batches=args.mini_batches,
        num_ppo_epochs=args.epochs,
        response_length=args.response_length,
        temperature=0.7,
        total_episodes=args.batch_size * n_iter,
        learning_rate=LR,
        lr_scheduler_type="constant",
        adam_epsilon=1e-5,
        missing_eos_penalty=None,
        stop_token="eos",
        num_sample_generations=0,
        local_rollout_forward_batch_size=args.batch_size,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )

    marks: list[dict] = []
    cur: dict = {}

    orig_gen, orig_fwd = ppo_mod.batch_generation, ppo_mod.forward

    def timed_generation(*a, **k):
        cur.clear()
        cur["gen_start"] = time.perf_counter()
        out = orig_gen(*a, **k)
        cur["gen_end"] = time.perf_counter()
        resp = out[0][:, a[1].shape[1] :]
        is_eos = resp == tok.eos_token_id
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, resp.shape[1])
        cur["response_length"] = float(first.float().mean())
        return out

    def timed_forward(*a, **k):
        if torch.is_grad_enabled() and "update_start" not in cur:
            cur["update_start"] = time.perf_counter()
        return orig_fwd(*a, **k)

    ppo_mod.batch_generation = timed_generation
    ppo_mod.forward = timed_forward

    # count the optimizer steps that really happen (accelerate skips `step()` while accumulating)
    orig_step = torch.optim.AdamW.step

    def counted_step(self, *a, **k):
        cur["optimizer_steps"] = cur.get("optimizer_steps", 0) + 1
        return orig_step(self, *a, **k)

    torch.optim.AdamW.step = counted_step

    logs: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **k):
            cur["end"] = time.perf_counter()
            marks.append(dict(cur))
            print(f"trl iter {len(marks) - 1}: {marks[-1]['end'] - marks[-1]['gen_start']:.2f}s",
                  file=sys.stderr, flush=True)  # fmt: skip

        def on_log(self, a, state, control, logs=None, **k):
            if logs:
                logs_list.append(dict(logs))

    logs_list = logs
    trainer = PPOTrainer(
        args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
        value_model=value, train_dataset=dataset, eval_dataset=dataset, callbacks=[Timer()],
    )  # fmt: skip
    load_s = time.perf_counter() - t0
    trainer.train()
    iters = []
    for i, mk in enumerate(marks):
        lg = logs[i] if i < len(logs) else {}
        iters.append({
            "generation": mk["gen_end"] - mk["gen_start"],
            "scoring": mk["update_start"] - mk["gen_end"],
            "update": mk["end"] - mk["update_start"],
            "total": mk["end"] - mk["gen_start"],
            "response_length": mk["response_length"],
            "kl": lg.get("objective/kl"), "loss_value": lg.get("loss/value_avg"),
            "num_eos_tokens": lg.get("val/num_eos_tokens"),
            "optimizer_steps": mk.get("optimizer_steps", 0),
        })  # fmt: skip
    out = summarize(iters)
    out.update(load_s=load_s, trl=trl.__version__, trl_file=trl.__file__, torch=torch.__version__,
               transformers=transformers.__version__, threads=torch.get_num_threads())  # fmt: skip
    return out


# ------------------------------------------------------------------------------------ driver


def child(args) -> None:
    if args.framework == "jax":
        import torch  # noqa: F401  (tokenizer side only; keep torch from taking all cores)

        torch.set_num_threads(args.threads)
        res = run_jax(args)
    else:
        res = run_trl(args)
    print(TAG + json.dumps(res), flush=True)


def spawn(framework: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", framework,
           "--response-length", str(args.response_length), "--epochs", str(args.epochs),
           "--mini-batches", str(args.mini_batches), "--iters", str(args.iters),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--frozen-layers", str(args.frozen_layers)]  # fmt: skip
    if args.trl_path:
        cmd += ["--trl-path", args.trl_path]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    before = uptime()
    print(f"[{framework}] {before}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env, cwd=ROOT)
    after = uptime()
    print(f"[{framework}] {after}", file=sys.stderr, flush=True)
    for line in proc.stdout.splitlines():
        if line.startswith(TAG):
            res = json.loads(line[len(TAG) :])
            res["uptime_before"], res["uptime_after"] = before, after
            return res
    raise SystemExit(f"{framework} run failed (rc {proc.returncode}); stdout tail:\n{proc.stdout[-3000:]}")


def table(results: dict, args) -> str:
    lines = [
        "| framework | first iteration s (compile) | generation s | scoring s | update s | total s/iter "
        "| speed-up vs TRL |",
        "|---|---|---|---|---|---|---|",
    ]
    trl_total = results.get("trl", {}).get("total")
    for fw, r in results.items():
        su = f"{trl_total / r['total']:.2f}x" if trl_total else "n/a"
        lines.append(
            f"| {'jaxrlhf' if fw == 'jax' else 'TRL ' + r.get('trl', '')} | {r['first']['total']:.2f} "
            f"| {r['generation']:.2f} | {r['scoring']:.2f} | {r['update']:.2f} | {r['total']:.2f} | {su} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--response-length", type=int, default=24)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--mini-batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=3, help="timed iterations after 1 warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--frozen-layers", type=int, default=0,
                   help="train above the first N layers (jaxrlhf: frozen_layers; TRL: requires_grad off)")
    p.add_argument("--trl-path", default=None, help="directory with an unpacked TRL that has PPO")
    p.add_argument("--only", choices=["jax", "trl"], default=None)
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--child", choices=["jax", "trl"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.framework = args.child
        child(args)
        return
    results = {}
    for fw in ["jax", "trl"] if args.only is None else [args.only]:
        results[fw] = spawn(fw, args)
    print(
        f"\nN={args.response_length} E={args.epochs} M={args.mini_batches} batch={args.batch_size} "
        f"threads={args.threads}, median of {args.iters} iterations after 1 warm-up\n"
    )
    print(table(results, args))
    for fw, r in results.items():
        steps = sorted({it.get("optimizer_steps", args.epochs * args.mini_batches) for it in r["all"]})
        print(f"\n{fw}: optimizer steps per iteration {steps} (E x M = {args.epochs * args.mini_batches})")
        print(f"{fw}: first-iteration breakdown gen/score/update = {r['first']['generation']:.2f}/"
              f"{r['first']['scoring']:.2f}/{r['first']['update']:.2f}s; total min/max "
              f"{r['total_min']:.2f}/{r['total_max']:.2f}s; load {r['load_s']:.1f}s; "
              f"uptime before: {r['uptime_before']}; after: {r['uptime_after']}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
