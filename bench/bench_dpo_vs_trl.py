"""DPO (and reward-model) training-step throughput: jaxrlhf vs TRL, on CPU, same model, same pairs.

Model: the embedded demo model SmolLM2-135M-Instruct (`jaxrlhf.models.demo.demo_model_path()`),
float32 on both sides. Data: the shipped preference set `jaxrlhf/assets/dpo_demo/train.jsonl`,
first `(warmup + steps) * batch_size` pairs in file order, the same pairs in the same order for both
frameworks (TRL with `train_sampling_strategy="sequential"`).

Configurations (each one runs in its own subprocess, so that peak RSS is its own):

* ``jax-same-step``   jaxrlhf DPO, frozen reference copy evaluated inside the compiled step.
* ``jax-precomputed`` jaxrlhf DPO, reference log-probs computed once beforehand and fed in the batch.
* ``trl-ref-model``   ``trl.DPOTrainer`` default: a reference model evaluated every step.
* ``trl-precomputed`` ``trl.DPOTrainer`` with ``precompute_ref_log_probs=True``.
* ``jax-reward`` / ``trl-reward``  Bradley-Terry reward model (score head) on the same pairs
  (`bench/bench_reward_vs_trl.py` runs only these).
* ``jax-lora`` / ``trl-lora``  (``--benchmarks lora``, with ``jax-same-step``) LoRA r=16, alpha 32,
  all seven projections, the base with adapters off as the reference; TRL with a peft
  ``LoraConfig``. jaxrlhf rows also record XLA's memory analysis and the optimizer state's size.
* ``jax-breakdown``   (not in the default set) where jaxrlhf's DPO step time goes: forward-only
  policy log-probs, policy+reference forward, loss + gradient, full step with the optimizer.

Timing: the first step (compilation for jaxrlhf; eager warm-up for PyTorch), then `warmup - 1`
further warm-up steps, then `steps` timed steps. During each step the CPU time used by *other*
processes is measured (`/proc/stat` minus this process's own CPU time); the median (min/max) is over
the timed steps where that stayed <= `--max-foreign` cores ("clean" steps), and a configuration with
more than one unclean timed step is measured again (`--retries`). jaxrlhf steps are
timed around ``step_fn(state, device_put(batch))`` until the loss is on the host (collation of the
numpy batch is done beforehand and timed separately); TRL steps between a `TrainerCallback`'s
``on_step_begin`` and ``on_step_end`` (forward, backward, clipping, optimizer; batch fetch and
logging excluded).

Tokens: the real tokens of each pair as a non-packed implementation processes them,
``prompt + chosen + prompt + rejected`` (``2P + C + R``), counted from jaxrlhf's tokenization; TRL's
tokenization of the same rendered texts is checked to give the same counts. ``pairs/s`` is
``batch_size / median step``.

    python bench/bench_dpo_vs_trl.py                       # DPO, 4 configurations, ~6 min on 2 idle cores
    python bench/bench_dpo_vs_trl.py --buckets 64 96 128 192 256 384 512   # buckets that fit the demo rows
    python bench/bench_dpo_vs_trl.py --quick               # 1 warm-up + 3 timed steps (smoke run)
    python bench/bench_dpo_vs_trl.py --benchmarks dpo reward
    python bench/bench_dpo_vs_trl.py --configs jax-breakdown
    python bench/bench_dpo_vs_trl.py --from-json results.json   # re-print saved results

Needs `trl` (``pip install -e '.[bench]'``). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_FILE = os.path.join(HERE, "..", "jaxrlhf", "assets", "dpo_demo", "train.jsonl")
DPO_CONFIGS = ["jax-same-step", "jax-precomputed", "trl-ref-model", "trl-precomputed"]
REWARD_CONFIGS = ["jax-reward", "trl-reward"]
# LoRA r=16 (alpha 32, all seven projections) with the base as the reference, against full DPO
# with a same-step reference copy and TRL + peft (`--benchmarks lora`).
LORA_CONFIGS = ["jax-lora", "jax-same-step", "trl-lora"]
LORA_RANK, LORA_ALPHA = 16, 32.0
ALL_CONFIGS = DPO_CONFIGS + REWARD_CONFIGS + ["jax-lora", "trl-lora", "jax-breakdown"]
# Which TRL configuration each jaxrlhf one is compared with.
BASELINE = {
    "jax-same-step": "trl-ref-model",
    "jax-precomputed": "trl-precomputed",
    "jax-reward": "trl-reward",
    "jax-lora": "trl-lora",
}
LEARNING_RATE = 5e-6
BETA = 0.1
RESULT_TAG = "BENCH_RESULT "


# ------------------------------------------------------------------------------------------ data


def load_pairs(tokenizer, n: int, max_length: int, max_prompt_length: int):
    """The first `n` pairs of the demo set: (rendered text examples, jaxrlhf TokenizedPairs)."""
    from jaxrlhf.data import load_rows, parse_preferences, tokenize_pairs

    examples, _ = parse_preferences(load_rows(DATA_FILE), tokenizer)
    if n > len(examples):
        raise SystemExit(f"need {n} pairs, the demo set has {len(examples)}: lower --steps/--batch-size")
    examples = examples[:n]
    pairs, stats = tokenize_pairs(
        examples, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length
    )
    if stats.dropped or stats.truncated_prompt or stats.truncated_completion:
        raise SystemExit(f"pairs were dropped or truncated ({stats}); raise --max-length")
    return examples, pairs


def pair_tokens(pairs) -> list[int]:
    """Real tokens per pair as a non-packed implementation processes them: 2P + C + R."""
    return [2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]


def batches_of(items, batch_size: int):
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class CpuMeter:
    """CPU used by *other* processes while a step runs, in cores: (machine busy time - this
    process's CPU time) / wall time, from /proc/stat and os.times(). 0 on an otherwise idle machine."""

    HZ = os.sysconf("SC_CLK_TCK")

    def __init__(self):
        self.foreign: list[float] = []
        self.own_cpu_s: list[float] = []  # this process's CPU seconds (all threads) per interval
        self._start = None

    @classmethod
    def _sample(cls):
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = (v[0] + v[1] + v[2] + sum(v[5:8])) / cls.HZ  # user nice system irq softirq steal
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system

    def start(self):
        self._start = self._sample()

    def stop(self):
        (w0, b0, o0), (w1, b1, o1) = self._start, self._sample()
        self.foreign.append(max(0.0, ((b1 - b0) - (o1 - o0)) / (w1 - w0)))
        self.own_cpu_s.append(o1 - o0)


def summarize(times: list[float], warmup: int, meter: CpuMeter) -> dict:
    timed, foreign = times[warmup:], meter.foreign
    return {
        "warmup": warmup,
        "all_cpu_s": meter.own_cpu_s,
        "cpu_s": statistics.median(meter.own_cpu_s[warmup:]),
        "first_step_s": times[0],
        "step_s": statistics.median(timed),
        "step_min_s": min(timed),
        "step_max_s": max(timed),
        "all_steps_s": times,
        "foreign_cores": statistics.median(foreign[warmup:]),
        "foreign_cores_max": max(foreign[warmup:]),
        "all_foreign_cores": foreign,
    }


# ------------------------------------------------------------------------------------ jaxrlhf


def run_jax(config: str, args) -> dict:
    import jax
    import numpy as np

    from jaxrlhf.data import collate_pairs
    from jaxrlhf.models import from_pretrained, load_tokenizer
    from jaxrlhf.models.demo import demo_model_path
    from jaxrlhf.models.lora import LoRASpec
    from jaxrlhf.models.lora import trainable as lora_trainable
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.train.objectives import DPOObjective, RewardObjective, add_targets, pair_logps
    from jaxrlhf.train.step import (
        batch_sharding,
        create_state,
        make_eval_fn,
        make_optimizer,
        make_schedule,
        make_train_step,
        state_shardings,
    )

    B, n_steps = args.batch_size, args.warmup + args.steps
    path = demo_model_path()
    tokenizer = load_tokenizer(path)
    pad_id = tokenizer.pad_token_id
    _, pairs = load_pairs(tokenizer, n_steps * B, args.max_length, args.max_prompt_length)
    chunks = batches_of(pairs, B)
    reward = config == "jax-reward"
    precomputed = config == "jax-precomputed"

    mesh = make_mesh(devices=jax.devices()[:1])
    t0 = time.perf_counter()
    lora = LoRASpec.build(LORA_RANK, LORA_ALPHA) if config == "jax-lora" else None
    head = "score" if reward else "lm"
    model = from_pretrained(path, head=head, init_score_head=reward, mesh=mesh, lora=lora)
    load_s = time.perf_counter() - t0
    objective = RewardObjective() if reward else DPOObjective(beta=BETA)
    schedule = make_schedule(LEARNING_RATE, n_steps, kind="linear")
    # AdamW, weight decay 0, global-norm clipping at 1.0: TRL's defaults
    optimizer = make_optimizer(schedule)
    same_step = config in ("jax-same-step", "jax-breakdown", "jax-lora")
    trained = lora_trainable("lm") if lora is not None else None
    graphdef, state = create_state(model, optimizer, mesh, with_reference=same_step, trainable=trained)
    del model

    def collate(chunk, ref=None):
        batch = collate_pairs(chunk, pad_id=pad_id, batch_size=B, buckets=args.buckets)
        if not reward:
            batch = add_targets(batch, args.buckets)
        if ref is not None:
            batch["ref_chosen"], batch["ref_rejected"] = ref
        return batch

    def to_device(batch, micro: bool = True):
        out = {}
        for k, v in batch.items():
            v = v.reshape(1, *v.shape) if micro else v  # one micro-batch: [A=1, B, ...]
            out[k] = jax.device_put(v, batch_sharding(mesh, v.ndim, micro_axis=micro))
        return out

    refs = [None] * len(chunks)
    precompute_s = None
    if precomputed:  # the reference = the initial policy, as the trainer does
        t0 = time.perf_counter()
        fn = make_eval_fn(graphdef, pair_logps, mesh)
        for i, chunk in enumerate(chunks):
            out = fn(state.params, to_device(collate(chunk), micro=False))
            refs[i] = (np.asarray(out["chosen"]), np.asarray(out["rejected"]))
        precompute_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    host_batches = [collate(chunk, ref) for chunk, ref in zip(chunks, refs, strict=True)]
    collate_ms = (time.perf_counter() - t0) / len(chunks) * 1e3
    step_fn = make_train_step(graphdef, objective, optimizer, schedule, state_shardings(state), mesh)

    if config == "jax-breakdown":
        return breakdown(graphdef, state, step_fn, objective, host_batches, to_device, args) | {
            "config": config,
        }

    # XLA's memory analysis of the compiled step, and the optimizer state's size (LoRA vs full)
    memory = step_fn.lower(state, to_device(host_batches[0])).compile().memory_analysis()
    mib = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree)) / 2**20  # noqa: E731
    sizes = {"opt_state_mib": mib(state.opt_state), "trained_params_mib": mib(state.params),
             "xla_temp_mib": memory.temp_size_in_bytes / 2**20,
             "xla_argument_mib": memory.argument_size_in_bytes / 2**20}  # fmt: skip
    times, losses, compiled_at, meter = [], [], [], CpuMeter()
    for i, batch in enumerate(host_batches):
        before = step_fn.num_compilations()
        meter.start()
        t0 = time.perf_counter()
        state, metrics = step_fn(state, to_device(batch))
        losses.append(float(metrics["loss"]))  # waits for the step
        times.append(time.perf_counter() - t0)
        meter.stop()
        if step_fn.num_compilations() > before:
            compiled_at.append(i)
    result = summarize(times, args.warmup, meter)  # the driver leaves steps that compiled out
    tokens = pair_tokens(pairs)
    step_tokens = [sum(tokens[i * B : (i + 1) * B]) for i in range(n_steps)]
    shapes = sorted({tuple(b["input_ids"].shape) for b in host_batches})
    return result | {
        "config": config,
        "framework": "jaxrlhf",
        "tokens_per_step": statistics.mean(step_tokens[args.warmup :]),
        "positions_per_step": statistics.mean(b["input_ids"].size for b in host_batches[args.warmup :]),
        "lm_head_positions_per_step": (
            None if reward else statistics.mean(b["target_index"].size for b in host_batches[args.warmup :])
        ),
        "batch_shapes": [list(s) for s in shapes],
        "compilations": step_fn.num_compilations(),
        "compiled_at_steps": compiled_at,
        "losses": losses,
        "load_s": load_s,
        "precompute_s": precompute_s,
        "collate_ms": collate_ms,
        "peak_rss_mib": peak_rss_mib(),
    } | sizes


def breakdown(graphdef, state, step_fn, objective, host_batches, to_device, args) -> dict:
    """Median time of each part of the same-step DPO step, on the first timed batch."""
    import jax
    from flax import nnx

    from jaxrlhf.train.objectives import pair_logps

    batch = to_device(host_batches[0])
    micro = jax.tree.map(lambda x: x[0], batch)

    @jax.jit
    def policy_fwd(params, b):
        return pair_logps(nnx.merge(graphdef, params), b)

    @jax.jit
    def both_fwd(params, ref, b):
        return pair_logps(nnx.merge(graphdef, params), b), pair_logps(nnx.merge(graphdef, ref), b)

    @jax.jit
    def loss_and_grad(params, ref, b):
        ref_model = nnx.merge(graphdef, ref)
        return jax.value_and_grad(lambda p: objective(nnx.merge(graphdef, p), b, ref_model)[0])(params)

    def timeit(fn, *a):
        n = max(args.steps, 3)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        first = time.perf_counter() - t0
        ts, meter = [], CpuMeter()
        for _ in range(n):
            meter.start()
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            ts.append(time.perf_counter() - t0)
            meter.stop()
        return {"first_s": first, "median_s": statistics.median(ts), "foreign_cores": max(meter.foreign)}

    parts = {
        "policy forward (log-probs)": timeit(policy_fwd, state.params, micro),
        "policy + reference forward": timeit(both_fwd, state.params, state.ref_params, micro),
        "policy fwd+bwd + reference fwd (no optimizer)": timeit(
            loss_and_grad, state.params, state.ref_params, micro
        ),
    }
    times, meter = [], CpuMeter()
    for _ in range(args.warmup + max(args.steps, 3)):
        meter.start()
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        float(metrics["loss"])
        times.append(time.perf_counter() - t0)
        meter.stop()
    parts["full train step (+ AdamW update)"] = {
        "first_s": times[0],
        "median_s": statistics.median(times[args.warmup :]),
        "foreign_cores": max(meter.foreign[args.warmup :]),
    }
    return {
        "framework": "jaxrlhf",
        "breakdown": parts,
        "batch_shape": list(host_batches[0]["input_ids"].shape),
        "peak_rss_mib": peak_rss_mib(),
    }


# ---------------------------------------------------------------------------------------- TRL


def run_trl(config: str, args) -> dict:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    from jaxrlhf.models import load_tokenizer
    from jaxrlhf.models.demo import demo_model_path

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    B, n_steps = args.batch_size, args.warmup + args.steps
    path = demo_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    examples, pairs = load_pairs(load_tokenizer(path), n_steps * B, args.max_length, args.max_prompt_length)
    reward = config == "trl-reward"

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.start = 0.0
            self.meter = CpuMeter()

        def on_step_begin(self, a, state, control, **kw):
            self.meter.start()
            self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.times.append(time.perf_counter() - self.start)
            self.meter.stop()

    timer = StepTimer()
    out_dir = tempfile.mkdtemp(prefix="bench_trl_")
    common = dict(
        output_dir=out_dir,
        per_device_train_batch_size=B,
        gradient_accumulation_steps=1,
        max_length=args.max_length,
        learning_rate=LEARNING_RATE,
        bf16=False,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        max_steps=n_steps,
        dataloader_num_workers=0,
        save_strategy="no",
        gradient_checkpointing=False,
        train_sampling_strategy="sequential",
        lr_scheduler_type="linear",
        disable_tqdm=True,
        seed=0,
    )
    t0 = time.perf_counter()
    if reward:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32, attn_implementation=args.attn
        )
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        # Pre-tokenized rows: exactly jaxrlhf's token ids (prompt + completion).
        rows = [
            {
                "chosen_ids": [*map(int, p.prompt_ids), *map(int, p.chosen_ids)],
                "rejected_ids": [*map(int, p.prompt_ids), *map(int, p.rejected_ids)],
            }
            for p in pairs
        ]
        load_s = time.perf_counter() - t0
        cfg = trl.RewardConfig(**common)
        trainer = trl.RewardTrainer(
            model=model,
            args=cfg,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[timer],
        )
        precompute_s = None
        trl_tokens = [len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in trainer.train_dataset]
        positions = [
            2 * B * max(max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in chunk)
            for chunk in batches_of(list(trainer.train_dataset), B)
        ]
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=args.attn)
        load_s = time.perf_counter() - t0
        # Standard (text) rows: the prompt / completion texts jaxrlhf renders from the conversations.
        rows = [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in examples]
        cfg = trl.DPOConfig(
            **common, beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=config == "trl-precomputed"
        )
        peft_config = None
        if config == "trl-lora":  # the reference is the base with the adapters disabled, as ours
            import peft

            peft_config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules="all-linear",
                                          lora_dropout=0.0, task_type="CAUSAL_LM")  # fmt: skip
        t0 = time.perf_counter()
        trainer = trl.DPOTrainer(
            model=model,
            args=cfg,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[timer],
            peft_config=peft_config,
        )
        # Trainer construction = tokenization (+ the reference pass when precomputing).
        precompute_s = time.perf_counter() - t0 if config == "trl-precomputed" else None
        ds = trainer.train_dataset
        trl_tokens = [2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in ds]
        positions = [
            2
            * B
            * max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in chunk)
            for chunk in batches_of(list(ds), B)
        ]
    mismatched = sum(a != b for a, b in zip(trl_tokens, pair_tokens(pairs), strict=True))
    trainer.train()
    result = summarize(timer.times, args.warmup, timer.meter)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = pair_tokens(pairs)
    step_tokens = [sum(tokens[i * B : (i + 1) * B]) for i in range(n_steps)]
    return result | {
        "config": config,
        "framework": "trl",
        "tokens_per_step": statistics.mean(step_tokens[args.warmup :]),
        "positions_per_step": statistics.mean(positions[args.warmup :]),
        "pairs_tokenized_differently": mismatched,
        "has_ref_model": getattr(trainer, "ref_model", None) is not None,
        "attn_implementation": model.config._attn_implementation,
        "losses": losses,
        "load_s": load_s,
        "precompute_s": precompute_s,
        "peak_rss_mib": peak_rss_mib(),
    }


# ------------------------------------------------------------------------------------- driver


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    versions = {}
    for mod in ("jax", "flax", "torch", "transformers", "trl"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), **versions}


def foreign_busy(seconds: float = 3.0) -> float:
    """Cores kept busy by other processes over `seconds` (this driver sleeps meanwhile)."""
    meter = CpuMeter()
    meter.start()
    time.sleep(seconds)
    meter.stop()
    return meter.foreign[0]


def wait_for_idle(args) -> float:
    """Wait (up to --idle-wait seconds) until other processes use less than --max-foreign cores."""
    deadline = time.perf_counter() + args.idle_wait
    busy = foreign_busy()
    while busy > args.max_foreign and time.perf_counter() < deadline:
        print(f"  waiting: other processes use {busy:.1f} cores", flush=True)
        time.sleep(20)
        busy = foreign_busy()
    return busy


def finalize(r: dict, max_foreign: float) -> dict:
    """Step statistics over the *clean* timed steps: those during which other processes used at most
    `max_foreign` cores (all timed steps if none is clean), leaving out steps that compiled."""
    if "all_steps_s" not in r:
        return r
    times, foreign = r["all_steps_s"], r["all_foreign_cores"]
    warmup = r.get("warmup", 2)
    compiled = set(r.get("compiled_at_steps", []))
    timed = [i for i in range(warmup, len(times)) if i not in compiled]
    clean = [i for i in timed if foreign[i] <= max_foreign]
    use = clean or timed
    r.update(
        step_s=statistics.median(times[i] for i in use),
        step_min_s=min(times[i] for i in use),
        step_max_s=max(times[i] for i in use),
        foreign_cores=statistics.median(foreign[i] for i in use),
        foreign_cores_timed_max=max(foreign[i] for i in timed),
        clean_steps=len(clean),
        timed_steps=len(timed),
    )
    if "all_cpu_s" in r:
        r["cpu_s"] = statistics.median(r["all_cpu_s"][i] for i in use)
    return r


def run_worker(config: str, args) -> dict:
    """Run `config`, and again (up to --retries times) while more than one of its timed steps ran with
    other processes using more than --max-foreign cores; the run with the most clean steps is kept."""
    runs = []
    for attempt in range(args.retries + 1):
        idle = wait_for_idle(args)
        r = finalize(run_worker_once(config, args), args.max_foreign)
        r["foreign_cores_before"] = idle
        runs.append(r)
        if "breakdown" in r or r["clean_steps"] >= r["timed_steps"] - 1:
            break
        if attempt < args.retries:
            print(
                f"  {config}: only {r['clean_steps']} of {r['timed_steps']} timed steps ran undisturbed "
                f"(load {r['load_before']} → {r['load_after']}): measuring again",
                flush=True,
            )
    best = max(runs, key=lambda r: (r.get("clean_steps", 0), -r.get("foreign_cores", 0.0)))
    best["attempts"] = len(runs)
    return best


def run_worker_once(config: str, args) -> dict:
    """One configuration in a fresh interpreter (its own peak RSS, no shared caches)."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        config,
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--max-length",
        str(args.max_length),
        "--max-prompt-length",
        str(args.max_prompt_length),
        "--threads",
        str(args.threads),
        "--attn",
        args.attn,
    ]
    if args.buckets:
        cmd += ["--buckets", *map(str, args.buckets)]
    load_before = loadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)), None)
    if proc.returncode or line is None:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{config} failed (exit {proc.returncode})")
    result = json.loads(line[len(RESULT_TAG) :])
    result.update(load_before=load_before, load_after=loadavg(), wall_s=wall)
    return result


def fmt(x, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def table(results: dict[str, dict], batch_size: int) -> str:
    head = (
        "| config | first step s | step s: median (min–max; clean/timed steps) | tokens/s | pairs/s "
        "| vs TRL | CPU s/step | peak RSS MiB | padded positions/step | other procs' CPU (cores) "
        "| load avg before → after |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        if "breakdown" in r:
            continue
        tps = r["tokens_per_step"] / r["step_s"]
        base = results.get(BASELINE.get(name, ""))
        speedup = f"**{base['step_s'] / r['step_s']:.2f}×**" if base else "–"
        pos = f"{r['positions_per_step']:.0f}"
        if r.get("lm_head_positions_per_step"):
            pos += f" (LM head {r['lm_head_positions_per_step']:.0f})"
        lines.append(
            f"| {name} | {r['first_step_s']:.1f} "
            f"| {r['step_s']:.2f} ({r['step_min_s']:.2f}–{r['step_max_s']:.2f}; "
            f"{r.get('clean_steps', '?')}/{r.get('timed_steps', '?')}) "
            f"| {tps:.0f} | {batch_size / r['step_s']:.2f} | {speedup} | {fmt(r.get('cpu_s'), '.1f')} "
            f"| {r['peak_rss_mib']:.0f} | {pos} | {r['foreign_cores']:.2f} "
            f"| {r['load_before']} → {r['load_after']} |"
        )
    return "\n".join(lines)


def breakdown_table(r: dict) -> str:
    lines = [
        "| part (one micro-batch " + "×".join(map(str, r["batch_shape"])) + ") | first call s | median s "
        "| other procs' CPU (cores, max) |",
        "|---|---|---|---|",
    ]
    for name, v in r["breakdown"].items():
        lines.append(f"| {name} | {v['first_s']:.2f} | {v['median_s']:.2f} | {v['foreign_cores']:.2f} |")
    return "\n".join(lines)


def print_results(results: dict[str, dict], batch_size: int) -> None:
    if any("breakdown" not in r for r in results.values()):
        print(table(results, batch_size))
    for name, r in results.items():
        if "breakdown" in r:
            print(f"\n{name}:\n" + breakdown_table(r))


def main(argv: list[str] | None = None, default_benchmarks: tuple[str, ...] = ("dpo",)) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--benchmarks", nargs="+", choices=["dpo", "reward", "lora"], default=list(default_benchmarks)
    )
    p.add_argument("--configs", nargs="+", choices=ALL_CONFIGS, help="run these instead of --benchmarks")
    p.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed steps instead of 2 + 5")
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5, 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps, the first included (default 2)")
    p.add_argument(
        "--buckets",
        type=int,
        nargs="+",
        default=None,
        help="jaxrlhf padding buckets (data.buckets; default: the library's 64, 128, 256, ...)",
    )
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for TRL")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="TRL attention implementation")
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.25,
        help="re-measure a configuration when other processes used more CPU cores than this "
        "(median over its timed steps)",
    )
    p.add_argument("--retries", type=int, default=1, help="re-measurements per configuration")
    p.add_argument(
        "--idle-wait",
        type=float,
        default=180,
        help="seconds to wait, before each configuration, for other processes to go idle",
    )
    p.add_argument("--json", help="also write all results to this file")
    p.add_argument("--from-json", nargs="+", help="only print the tables of results saved with --json")
    p.add_argument("--worker", choices=ALL_CONFIGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.quick else 5
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2

    if args.from_json:  # re-render saved results
        for file in args.from_json:
            with open(file) as f:
                saved = json.load(f)
            results = {k: finalize(v, args.max_foreign) for k, v in saved["results"].items()}
            m = saved["machine"]
            print(
                f"{file}: {m['cpu']}, {m['cores']} cores; jax {m['jax']}, torch {m['torch']}, "
                f"transformers {m['transformers']}, trl {m['trl']}; batch {saved['args']['batch_size']}, "
                f"buckets {saved['args'].get('buckets')}\n"
            )
            print_results(results, saved["args"]["batch_size"])
            print()
        return
    if args.worker:
        run = run_jax if args.worker.startswith("jax") else run_trl
        print(RESULT_TAG + json.dumps(run(args.worker, args)), flush=True)
        return

    configs = args.configs or [
        c for b in args.benchmarks
        for c in {"dpo": DPO_CONFIGS, "reward": REWARD_CONFIGS, "lora": LORA_CONFIGS}[b]
    ]
    info = machine()
    print(
        f"{info['cpu']}, {info['cores']} cores; python {info['python']}, jax {info['jax']}, "
        f"flax {info['flax']}, torch {info['torch']}, transformers {info['transformers']}, trl {info['trl']}"
    )
    print(
        f"batch {args.batch_size} pairs, {args.warmup} warm-up + {args.steps} timed steps, "
        f"TRL attn={args.attn}, torch threads={args.threads}; load average at start: {loadavg()}",
        flush=True,
    )
    results: dict[str, dict] = {}
    for config in configs:
        r = run_worker(config, args)
        results[config] = r
        if "breakdown" in r:
            print(
                f"{config}: done in {r['wall_s']:.0f}s (load {r['load_before']} → {r['load_after']})",
                flush=True,
            )
            continue
        extra = ""
        if r.get("compilations") is not None:
            extra = f", compilations {r['compilations']} at steps {r['compiled_at_steps']}"
        if r.get("pairs_tokenized_differently"):
            extra += f", WARNING: {r['pairs_tokenized_differently']} pairs tokenized differently by TRL"
        print(
            f"{config}: step {r['step_s']:.2f}s (first {r['first_step_s']:.1f}s), losses "
            f"{[round(x, 4) for x in r['losses'][:3]]}..., precompute {fmt(r['precompute_s'], '.1f')}s"
            f"{extra}; wall {r['wall_s']:.0f}s, load {r['load_before']} → {r['load_after']}",
            flush=True,
        )
    print()
    print_results(results, args.batch_size)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
