"""One GRPO step: jaxrlhf `GRPOEngine.step` vs TRL's `GRPOTrainer` (transformers `generate`, no vLLM),
on CPU, same model, same prompts, same reward functions, alternating step by step in one run.

Model: the embedded demo model SmolLM2-135M-Instruct (`jaxrlhf.models.demo.demo_model_path()`),
float32, the same directory (weights and tokenizer) for both; no reference model (beta = 0). `--tiny`:
a 2-layer random Llama (hidden 32) saved by transformers with the demo tokenizer, 2 timed steps (the
smoke run `tests/bench/test_bench_grpo.py` uses), by default with P=2 x G=4 and N=8.

Prompts: the first `--prompts` (4) rows of `jaxrlhf/assets/grpo_demo/train.jsonl`, the same 4 every
step. jaxrlhf renders them as its GRPO trainer does (`load_prompt_rows`: the chat template with a
generation prompt, pad `<|endoftext|>` id 0) and left-pads them to the longest prompt; TRL gets the
conversations and applies the same template itself, and left-pads to the same width (the script
checks that both feed the sampler the same prompt ids: `same_prompt_ids`). Rewards: the demo
config's `jaxrlhf.rewards:accuracy_reward` and `format_reward`, weights 1.0 and 0.2, given the
rows' `answer` / `family` columns (TRL's reward-function signature, called the same way by both).

Settings (both): G = `--num-generations` (8) completions per prompt, so 32 per step; at most
`--max-completion-length` (24) new tokens; temperature 1.0, no top-k / top-p; loss_type "dapo",
epsilon 0.2, scale_rewards "group", num_iterations 1, one optimizer step on all 32 completions
(jaxrlhf `num_mini_batches=1`; TRL `per_device_train_batch_size=32, gradient_accumulation_steps=1`);
AdamW lr 2e-6 constant, betas (0.9, 0.999), eps 1e-8, no weight decay, gradient clipping at norm 1.0.
Neither re-scores the old log-probs with an extra forward (jaxrlhf reuses the sampler's; TRL skips it
when generation and optimizer steps are aligned), and TRL runs without gradient checkpointing and in
float32 (its GRPOConfig defaults are `gradient_checkpointing=True`, `bf16=True`), as jaxrlhf on CPU
(no remat, float32).

Layout of the update: jaxrlhf trains on packed groups by default (`grpo.pack_groups`, on here): one
row per prompt, the prompt once and then its G completions, each attending to the prompt and to
itself (Lp + G N tokens per prompt, the same log-probs), while TRL runs each completion in its own row
after a copy of its prompt (G (Lp + N) tokens). `--no-pack-groups` gives jaxrlhf TRL's layout, so the
update does the same token count on both sides. TRL 1.16 always computes the update's log-probs and
entropies with its chunked fused-LM-head kernel (`trl/kernels/chunked_logprob.py`), which without
Triton (CPU) runs in plain torch; there is no setting to turn it off.

Equal work: by default every completion is exactly `--max-completion-length` tokens: both get an
EOS id that no token has (2**30) instead of `<|im_end|>`, so both samplers run all N decode steps
from the unmodified distribution and the completion masks cover all N tokens (a sampled `<|im_end|>`
is an ordinary token). jaxrlhf: `eos_token_ids=[2**30]`; TRL: `generation_kwargs={"eos_token_id":
[2**30]}` (the `generate` stopping rule) and the trainer's `eos_token_ids` attribute set to the same
(the completion mask). (TRL's own `min_new_tokens` would do it too, but adds a logits processor that
costs ~0.1 s per decode step on this CPU.) `--stop-at-eos` instead lets both stop at `<|im_end|>`
(the work then depends on the sampled lengths: compare the `completion length` column).

Timing (each phase ends with its results on the host / ready).
* jaxrlhf: the `time/generation`, `time/scoring`, `time/update` metrics `GRPOEngine.step` returns;
  "total" is the wall time of `step()`. Scoring = decoding, the reward functions on the host, and the
  compiled advantage / mask computation; update = the compiled loss forward, backward and AdamW step.
* TRL: by wrapping methods of the trainer in place: generation = from entry into
  `_generate_and_score_completions` to the return of the policy's `generate` (the chat-template
  tokenisation of the prompts, ~ms, is included; jaxrlhf tokenises before the step); scoring = from
  there to the return of `_generate_and_score_completions` (decoding, reward functions, advantages;
  no log-prob pass at beta = 0 / num_iterations = 1); update = from there to the callback
  `on_step_end` (the loss forward with entropies, backward, clipping, AdamW step, zero_grad).
  "total" = from entry into `_generate_and_score_completions` to `on_step_end` (the dataloader
  fetch before it and the logging after it are left out). `torch.optim.AdamW.step` calls are counted
  (1 per step, as jaxrlhf).

Both frameworks run at once in their own subprocess (`torch.set_num_threads(--threads)`; XLA's CPU
thread pool as it comes) and are driven in lockstep: the driver asks one for a step, waits for it to
finish, then asks the other (the order alternates each round: jax/trl, trl/jax, ...), so each step
runs alone and background load is shared fairly. Step 0 is the warm-up (for jaxrlhf it includes XLA
compilation: reported as "first step"); the table reports the median of the following `--steps`.
For each step the driver also measures how many cores *other* processes used (`/proc/stat` minus
the child's own CPU time): the "other load" column; the child's own CPU seconds per step are
reported too (less sensitive to contention than wall time).

    python bench/bench_grpo_vs_trl.py                      # P=4 x G=8, N=24, 1 warm-up + 3 steps
    python bench/bench_grpo_vs_trl.py --steps 5 --json /tmp/grpo.json
    python bench/bench_grpo_vs_trl.py --stop-at-eos        # natural lengths instead of fixed
    python bench/bench_grpo_vs_trl.py --tiny               # smoke run (tests/bench/test_bench_grpo.py)

Needs `trl` (1.16) and `datasets`; not part of the test suite's timings.
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
DATA_FILE = os.path.join(ROOT, "jaxrlhf", "assets", "grpo_demo", "train.jsonl")
TAG = "BENCH_RESULT "
LR = 2e-6
REWARD_FUNCS = ["jaxrlhf.rewards:accuracy_reward", "jaxrlhf.rewards:format_reward"]
REWARD_WEIGHTS = [1.0, 0.2]
NO_EOS = 2**30  # the EOS id in fixed-length mode: no token has it
PHASES = ("generation", "scoring", "update", "total")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "n/a"


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + sum(v[5:8])) / os.sysconf("SC_CLK_TCK")  # user nice system irq softirq steal


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def load_rows(n: int) -> list[dict]:
    with open(DATA_FILE) as f:
        rows = [json.loads(line) for line in f if line.strip()][:n]
    if len(rows) < n:
        raise SystemExit(f"{DATA_FILE} has only {len(rows)} prompts")
    return rows


def make_tiny(directory: str) -> str:
    """A 2-layer random Llama with the demo tokenizer (transformers' safetensors layout)."""
    import transformers as tf

    from jaxrlhf.models import load_tokenizer
    from jaxrlhf.models.demo import demo_model_path

    tok = load_tokenizer(demo_model_path())
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)  # fmt: skip
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def send(record: dict) -> None:
    print(TAG + json.dumps(record), flush=True)


def wait_for_command(expected: str = "step") -> None:
    line = sys.stdin.readline()
    if line.strip() != expected:
        raise SystemExit(f"expected {expected!r} from the driver, got {line!r}")


def summarize(steps: list[dict]) -> dict:
    first, rest = steps[0], steps[1:]
    out = {"first": first, "all": steps}
    for k in (*PHASES, "cpu_s", "completion_length", "foreign_cores"):
        vals = [s[k] for s in rest if s.get(k) is not None]
        out[k] = statistics.median(vals) if vals else None
    out["total_min"] = min(s["total"] for s in rest)
    out["total_max"] = max(s["total"] for s in rest)
    return out


# ----------------------------------------------------------------------------------- jaxrlhf


def run_jax(args) -> None:
    import jax
    import numpy as np

    from jaxrlhf.data import left_pad
    from jaxrlhf.models import from_pretrained, load_tokenizer
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.train.algorithms.grpo import load_reward_funcs, reward_table
    from jaxrlhf.train.config import GRPOConfig
    from jaxrlhf.train.grpo import GRPOEngine
    from jaxrlhf.train.online import load_prompt_rows
    from jaxrlhf.train.step import make_optimizer, make_schedule

    wait_for_command("load")  # with --tiny the model is being written meanwhile
    t0 = time.perf_counter()
    tok = load_tokenizer(args.model_path)
    with tempfile.TemporaryDirectory() as tmp:  # the first P rows, read as the GRPO trainer reads them
        first = os.path.join(tmp, "prompts.jsonl")
        with open(first, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in load_rows(args.prompts))
        rows = load_prompt_rows([first], tok, max_prompt_length=10_000)
    ids, mask = left_pad([r for r, _ in rows], tok.pad_token_id)
    columns = [c for _, c in rows]
    mesh = make_mesh(devices=jax.devices()[:1])
    policy = from_pretrained(args.model_path, mesh=mesh)
    cfg = GRPOConfig(
        reward_funcs=REWARD_FUNCS, reward_weights=REWARD_WEIGHTS, num_generations=args.num_generations,
        num_iterations=1, num_mini_batches=1, max_completion_length=args.max_completion_length,
        temperature=1.0, beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        pack_groups=not args.no_pack_groups,
    )  # fmt: skip
    funcs = load_reward_funcs(cfg.reward_funcs)
    optimizer = make_optimizer(make_schedule(LR, 1000, kind="constant"), max_grad_norm=1.0)
    eos = [int(tok.eos_token_id)] if args.stop_at_eos else [NO_EOS]
    engine = GRPOEngine(
        policy, cfg, optimizer, mesh, eos_token_ids=eos, pad_token_id=int(tok.pad_token_id),
        reward_weights=cfg.reward_weights, num_reward_funcs=len(funcs), seed=0,
    )  # fmt: skip
    del policy
    reward_fn = reward_table(funcs, tok, columns, args.num_generations, np.arange(len(rows)))
    names = [n for n, _ in funcs]
    send({"ready": True, "load_s": time.perf_counter() - t0, "prompt_ids": [
        [int(t) for t in r] for r in ids]})  # fmt: skip
    for _ in range(1 + args.steps):
        wait_for_command()
        cpu0, start = own_cpu(), time.perf_counter()
        m = engine.step(ids, mask, reward_fn, names)
        total, cpu_s = time.perf_counter() - start, own_cpu() - cpu0
        send({
            "generation": m["time/generation"], "scoring": m["time/scoring"], "update": m["time/update"],
            "total": total, "cpu_s": cpu_s, "completion_length": m["completions/mean_length"],
            "reward": m["reward"], "loss": m["loss"],
            "optimizer_steps": cfg.num_iterations * cfg.num_mini_batches,  # by construction
        })  # fmt: skip
    send(
        {"done": True, "jax": jax.__version__, "devices": str(jax.devices()), "prompt_shape": list(ids.shape)}
    )


# --------------------------------------------------------------------------------------- TRL


def run_trl(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from jaxrlhf.models import load_tokenizer
    from jaxrlhf.rewards import accuracy_reward, format_reward

    if args.make_tiny:
        make_tiny(args.model_path)
        send({"made": args.model_path})
    t0 = time.perf_counter()
    tok = load_tokenizer(args.model_path)
    rows = load_rows(args.prompts)
    dataset = Dataset.from_list(
        [{"prompt": r["prompt"], "answer": r["answer"], "family": r["family"]} for r in rows]
    )
    policy = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    policy.config.pad_token_id = tok.pad_token_id
    n = args.max_completion_length
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.prompts * args.num_generations,
        gradient_accumulation_steps=1,
        num_generations=args.num_generations,
        max_completion_length=n,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        epsilon=0.2,
        num_iterations=1,
        loss_type="dapo",
        scale_rewards="group",
        mask_truncated_completions=False,
        reward_weights=REWARD_WEIGHTS,
        generation_kwargs=None if args.stop_at_eos else {"eos_token_id": [NO_EOS]},
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        max_steps=1 + args.steps,
        shuffle_dataset=False,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        log_completions=False,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    cur: dict = {}
    seen: dict = {}

    orig_step = torch.optim.AdamW.step

    def counted_step(self, *a, **k):
        cur["optimizer_steps"] = cur.get("optimizer_steps", 0) + 1
        return orig_step(self, *a, **k)

    torch.optim.AdamW.step = counted_step

    orig_generate = policy.generate

    def timed_generate(*a, **k):
        cur["gen_start"] = time.perf_counter()
        out = orig_generate(*a, **k)
        cur["gen_end"] = time.perf_counter()
        prompt = k["input_ids"]
        resp = out[:, prompt.shape[1] :]
        is_eos = torch.isin(resp, torch.tensor(trainer.eos_token_ids))
        length = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, resp.shape[1])
        cur["completion_length"] = float(length.float().mean())
        cur["generated_width"] = int(resp.shape[1])
        if "prompt_ids" not in seen:
            seen["prompt_ids"] = sorted({tuple(int(t) for t in r) for r in prompt.tolist()})
        return out

    policy.generate = timed_generate

    class Lockstep(TrainerCallback):
        def on_step_begin(self, a, state, control, **k):
            wait_for_command()
            cur.clear()
            cur["cpu0"] = own_cpu()

        def on_step_end(self, a, state, control, **k):
            end = time.perf_counter()
            metrics = trainer._metrics.get("train", {})
            last = lambda key: float(metrics[key][-1]) if metrics.get(key) else None  # noqa: E731
            send({
                "generation": cur["gen_end"] - cur["start"], "scoring": cur["scored"] - cur["gen_end"],
                "update": end - cur["scored"], "total": end - cur["start"], "cpu_s": own_cpu() - cur["cpu0"],
                "prep": cur["gen_start"] - cur["start"], "completion_length": cur["completion_length"],
                "generated_width": cur["generated_width"], "reward": last("reward"),
                "optimizer_steps": cur.get("optimizer_steps", 0),
            })  # fmt: skip

    trainer = GRPOTrainer(
        model=policy, reward_funcs=[accuracy_reward, format_reward], args=cfg, train_dataset=dataset,
        processing_class=tok, callbacks=[Lockstep()],
    )  # fmt: skip
    if not args.stop_at_eos:  # the completion mask: through the first of these ids
        trainer.eos_token_ids = [NO_EOS]
    orig_score = trainer._generate_and_score_completions

    def timed_score(*a, **k):
        cur["start"] = time.perf_counter()
        out = orig_score(*a, **k)
        cur["scored"] = time.perf_counter()
        return out

    trainer._generate_and_score_completions = timed_score
    send({"ready": True, "load_s": time.perf_counter() - t0})
    trainer.train()
    send({
        "done": True, "trl": trl.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "optimizer": type(trainer.optimizer.optimizer).__name__,
        "optim": str(cfg.optim), "prompt_ids": [list(r) for r in seen.get("prompt_ids", [])],
        "eos_token_ids": list(trainer.eos_token_ids),
    })  # fmt: skip


# ------------------------------------------------------------------------------------ driver


class Child:
    def __init__(self, framework: str, args):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", framework,
               "--model-path", args.model_path, "--steps", str(args.steps), "--prompts", str(args.prompts),
               "--num-generations", str(args.num_generations),
               "--max-completion-length", str(args.max_completion_length),
               "--threads", str(args.threads)]  # fmt: skip
        if args.stop_at_eos:
            cmd.append("--stop-at-eos")
        if args.no_pack_groups:
            cmd.append("--no-pack-groups")
        if framework == "trl" and args.tiny and not os.path.exists(args.model_path):
            cmd.append("--make-tiny")  # while the jax child imports
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(args.threads))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        self.name = framework
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )

    def read(self) -> dict:
        """The next tagged record; other stdout lines are passed to stderr."""
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG) :])
            print(f"[{self.name}] {line.rstrip()}", file=sys.stderr, flush=True)
        self.proc.wait()
        raise RuntimeError(f"{self.name} child exited (rc {self.proc.returncode}) without a result")

    def command(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def step(self) -> dict:
        busy0, wall0 = busy_seconds(), time.perf_counter()
        self.command("step")
        rec = self.read()
        wall = time.perf_counter() - wall0
        rec["foreign_cores"] = max(0.0, (busy_seconds() - busy0 - rec["cpu_s"]) / wall)
        return rec

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_all(args) -> dict:
    frameworks = ["jax", "trl"] if args.only is None else [args.only]
    if args.tiny and "trl" not in frameworks:
        make_tiny(args.model_path)
    children = {fw: Child(fw, args) for fw in frameworks}  # loading runs in parallel
    try:
        if "trl" in children and "--make-tiny" in children["trl"].proc.args:
            children["trl"].read()  # {"made": ...}
        if "jax" in children:
            children["jax"].command("load")
        ready = {fw: c.read() for fw, c in children.items()}
        before = uptime()
        print(f"[driver] {before}", file=sys.stderr, flush=True)
        steps: dict[str, list[dict]] = {fw: [] for fw in frameworks}
        for i in range(1 + args.steps):
            for fw in frameworks if i % 2 == 0 else frameworks[::-1]:
                rec = children[fw].step()
                steps[fw].append(rec)
                print(f"{fw} step {i}: {json.dumps(rec)}", file=sys.stderr, flush=True)
        done = {fw: c.read() for fw, c in children.items()}
        for c in children.values():
            c.proc.stdin.close()
            c.proc.wait(timeout=120)
        after = uptime()
        print(f"[driver] {after}", file=sys.stderr, flush=True)
    finally:
        for c in children.values():
            c.kill()
    results = {}
    for fw in frameworks:
        r = summarize(steps[fw])
        info = dict(done[fw])
        info.pop("done")
        r.update(info, load_s=ready[fw]["load_s"], uptime_before=before, uptime_after=after)
        if fw == "jax":
            r["prompt_ids"] = ready[fw]["prompt_ids"]
        results[fw] = r
    settings = {
        "model": "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct (demo)",
        "model_path": args.model_path, "prompts": args.prompts, "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length, "fixed_length": not args.stop_at_eos,
        "jax_pack_groups": not args.no_pack_groups,
        "steps": args.steps, "threads": args.threads, "temperature": 1.0, "learning_rate": LR, "beta": 0.0,
        "loss_type": "dapo", "num_iterations": 1, "reward_funcs": REWARD_FUNCS,
        "reward_weights": REWARD_WEIGHTS,
    }  # fmt: skip
    for r in results.values():
        r["settings"] = settings
    if "jax" in results and "trl" in results:
        jx, tr = results["jax"], results["trl"]
        jx["same_prompt_ids"] = (
            sorted(map(list, {tuple(p) for p in jx.pop("prompt_ids")})) == tr["prompt_ids"]
        )
        jx["speedup_vs_trl"] = {k: tr[k] / jx[k] if jx[k] else None for k in (*PHASES, "cpu_s")}
    return results


def table(results: dict) -> str:
    lines = [
        "| framework | first step s (compile) | generation s | scoring s | update s | total s/step "
        "| CPU s/step | completion length | other load (cores) | speed-up vs TRL |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    trl_total = results.get("trl", {}).get("total")
    for fw, r in results.items():
        su = f"{trl_total / r['total']:.2f}x" if trl_total else "n/a"
        name = "jaxrlhf" if fw == "jax" else "TRL " + r.get("trl", "")
        lines.append(
            f"| {name} | {r['first']['total']:.2f} | {r['generation']:.2f} | {r['scoring']:.3f} "
            f"| {r['update']:.2f} | {r['total']:.2f} | {r['cpu_s']:.2f} | {r['completion_length']:.1f} "
            f"| {r['foreign_cores']:.2f} | {su} |"
        )
    return "\n".join(lines)


def report(results: dict, args) -> None:
    print(
        f"\nGRPO step: P={args.prompts} prompts x G={args.num_generations}, N={args.max_completion_length} "
        f"({'fixed length' if not args.stop_at_eos else 'stop at EOS'}), jaxrlhf "
        f"{'unpacked rows' if args.no_pack_groups else 'packed groups'}, "
        f"{'tiny random model' if args.tiny else 'SmolLM2-135M-Instruct'} float32, threads={args.threads}, "
        f"median of {args.steps} timed step(s) after 1 warm-up{'' if args.only else ', alternating'}\n"
    )
    print(table(results))
    if "jax" in results and "trl" in results:
        s = results["jax"]["speedup_vs_trl"]
        print("\nTRL time / jaxrlhf time: " + ", ".join(f"{k} {v:.2f}x" for k, v in s.items() if v))
        print(f"same prompt ids fed to both samplers: {results['jax']['same_prompt_ids']}")
    for fw, r in results.items():
        f = r["first"]
        opt = sorted({s.get("optimizer_steps") for s in r["all"]})
        print(f"\n{fw}: first-step breakdown gen/score/update = {f['generation']:.2f}/{f['scoring']:.2f}/"
              f"{f['update']:.2f}s; total min/max {r['total_min']:.2f}/{r['total_max']:.2f}s; "
              f"optimizer steps per step {opt}; load {r['load_s']:.1f}s")  # fmt: skip
        print(f"{fw}: uptime before: {r['uptime_before']}; after: {r['uptime_after']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=None, help="prompts per step, P (default 4; --tiny: 2)")
    p.add_argument("--num-generations", type=int, default=None, help="completions per prompt, G (default 8; "
                   "--tiny: 4)")  # fmt: skip
    p.add_argument("--max-completion-length", type=int, default=None, help="N (default 24; --tiny: 8)")
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps after 1 warm-up (default 3; --tiny: 2)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--stop-at-eos", action="store_true", help="stop at EOS instead of fixed-length completions"
    )
    p.add_argument("--no-pack-groups", action="store_true", help="jaxrlhf: one row per completion, as TRL")
    p.add_argument(
        "--tiny", action="store_true", help="a tiny random model, P=2 x G=4, N=8, 2 steps (a smoke run)"
    )
    p.add_argument("--only", choices=["jax", "trl"], default=None)
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--make-tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", choices=["jax", "trl"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    defaults = {
        "prompts": (4, 2),
        "num_generations": (8, 4),
        "max_completion_length": (24, 8),
        "steps": (3, 2),
    }
    for name, (full, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.child:
        import torch  # noqa: F401  (before JAX: keep torch's thread pool to --threads)

        torch.set_num_threads(args.threads)
        run_jax(args) if args.child == "jax" else run_trl(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            args.model_path = os.path.join(tmp, "tiny")  # written by the trl child (or here, with --only jax)
        else:
            from jaxrlhf.models.demo import demo_model_path

            args.model_path = demo_model_path()
        results = run_all(args)
    report(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
