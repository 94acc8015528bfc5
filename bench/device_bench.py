"""One script for a lent accelerator: train-step throughput and MFU per attention backend, and
generation against transformers, on a 1B-class model. Writes JSON and prints a table.

Model: Llama-3.2-1B shapes (16 layers, hidden 2048, 32 query / 8 key-value heads of 64, MLP 8192,
vocab 128256, tied embeddings, Llama 3 RoPE scaling), random init by transformers (PyTorch), saved
as safetensors and loaded by `from_pretrained`: bfloat16 compute, float32 master parameters and
Adam, scanned layers (`remat: auto`). Synthetic token ids, fixed seed.

* SFT step on `[8, 2048]` (every token trained);
* DPO step, same-step reference, 8 pairs of prompt 1024 + chosen 512 + rejected 512 tokens:
  packed (`[8, 2048]` rows `[prompt][chosen][rejected]`, the prompt run once) and unpacked (`[16,
  1536]` rows prompt+chosen and prompt+rejected, what TRL runs); tokens/s counts each pair's
  `2P + C + R` tokens for both, so the packed row's saving shows as throughput;
* per attention backend that runs on this platform (`xla` always; `cudnn` on GPU; `splash` on TPU);
* MFU = model FLOPs / step time / peak bf16 FLOP/s of the chip: 6 N per trained token (2 N forward
  for the reference), N the non-embedding parameters plus the LM head, plus causal attention
  `6 L T d_attn` per trained token (3 for a reference token);
* generation: the KV-cache sampler, greedy, B = 64, 128-token prompts + 256 new tokens, against
  transformers `generate` (bf16, same weights, same GPU, `min_new_tokens` so both decode 256).

    python bench/device_bench.py --json device_bench.json          # the accelerator run (< 8 min)
    python bench/device_bench.py --tiny --json /tmp/tiny.json      # CPU smoke run (the test does this)

Not part of the test suite's timings; tests/bench/test_device_bench.py runs `--tiny`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

LLAMA_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
    rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
)  # fmt: skip
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True,
)  # fmt: skip
# Peak dense bfloat16 FLOP/s per chip, by `device_kind` substring.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12,
             "TPU v5e": 197e12, "TPU v4": 275e12, "TPU v6": 918e12}  # fmt: skip


def peak_flops(device: Any) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_BF16.items() if k.lower() in kind.lower()), None)


def make_checkpoint(shape: dict, directory: str) -> dict:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(**shape)
    model = tf.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    return {"params": sum(p.numel() for p in model.parameters())}


def model_flops_per_token(shape: dict, seq: int) -> tuple[float, float]:
    """(trained-token FLOPs, forward-only-token FLOPs): 6N / 2N plus causal attention."""
    d, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    layers = shape["num_hidden_layers"]
    h, n, k = shape["head_dim"], shape["num_attention_heads"], shape["num_key_value_heads"]
    per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f
    dense = layers * per_layer + d * v  # the LM head is a matmul; the embedding lookup is not
    attention = layers * seq * n * h  # causal: half of the 2 T d_attn of QK^T and PV, x2 flops
    return 6 * dense + 6 * attention, 2 * dense + 2 * attention


def time_steps(fn, state, batches, steps: int) -> tuple[Any, list[float], float]:
    state, metrics = fn(state, batches[0])  # compile + first step
    first_loss = float(metrics["loss"])
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, metrics = fn(state, batches[(i + 1) % len(batches)])
        float(metrics["loss"])
        times.append(time.perf_counter() - t0)
    return state, times, first_loss


def synthetic_pairs(shape: dict, n: int, prompt: int, completion: int) -> list[tuple[np.ndarray, ...]]:
    """`n` (prompt, chosen, rejected) id arrays; completions end with the EOS id (`vocab - 1`)."""
    rng = np.random.default_rng(2)
    eos = shape["vocab_size"] - 1

    def ids(k: int, end: bool = False) -> np.ndarray:
        out = rng.integers(3, eos, size=k).astype(np.int32)
        if end:
            out[-1] = eos
        return out

    return [(ids(prompt), ids(completion, True), ids(completion, True)) for _ in range(n)]


def train_rows(args, shape: dict, path: str, backend: str) -> list[dict]:
    import jax

    from jaxrlhf.data import TokenizedPair, collate_pairs, collate_sequences
    from jaxrlhf.data.sft import PackedRow, SFTTokens, collate_sft
    from jaxrlhf.models import from_pretrained
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.train.objectives import DPOObjective, SFTObjective, add_targets
    from jaxrlhf.train.step import (
        batch_sharding,
        create_state,
        make_optimizer,
        make_schedule,
        make_train_step,
        state_shardings,
    )  # fmt: skip

    rng = np.random.default_rng(0)
    mesh = make_mesh(devices=jax.devices()[:1])
    B, T = args.batch, args.seq
    P, C = T // 2, T // 4
    trained, forward = model_flops_per_token(shape, T)
    peak = peak_flops(jax.devices()[0])
    out = []

    def put(batch):
        arrays = {k: np.asarray(v)[None] for k, v in batch.items()}  # one micro-batch
        return {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in arrays.items()}

    def ids(n):
        return rng.integers(3, shape["vocab_size"], size=n).astype(np.int32)

    def run(name, objective, batches, tokens, flops, with_reference):
        model = from_pretrained(path, dtype="bfloat16", mesh=mesh, scan_layers=True, attention=backend)
        schedule = make_schedule(1e-6, 1000, kind="constant")
        optimizer = make_optimizer(schedule)
        graphdef, state = create_state(model, optimizer, mesh, with_reference=with_reference)
        del model
        fn = make_train_step(graphdef, objective, optimizer, schedule, state_shardings(state), mesh)
        t0 = time.perf_counter()
        state, times, first_loss = time_steps(fn, state, batches, args.steps)
        med = statistics.median(times)
        row = {"what": name, "attention": backend, "shape": [B, T], "step_s": med, "min_s": min(times),
               "first_call_s": time.perf_counter() - t0 - sum(times), "tokens_per_s": tokens / med,
               "mfu": flops / med / peak if peak else None, "first_loss": first_loss}  # fmt: skip
        print(json.dumps(row), flush=True)
        out.append(row)
        del state

    seqs = [PackedRow((SFTTokens(ids(T), np.r_[0, np.ones(T - 1, np.int32)]),)) for _ in range(B)]
    sft = [put(collate_sft(seqs, pad_id=0, batch_size=B, buckets=[T])) for _ in range(2)]
    run("sft", SFTObjective(), sft, B * T, trained * B * T, False)

    pairs = [TokenizedPair(*p) for p in synthetic_pairs(shape, B, P, C)]
    pair_tokens = B * (2 * P + 2 * C)
    packed = put(add_targets(collate_pairs(pairs, pad_id=0, batch_size=B, buckets=[T]), [T]))
    packed_flops = (trained + forward) * B * T
    run("dpo_packed", DPOObjective(beta=0.1), [packed], pair_tokens, packed_flops, True)

    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    unpacked = put(collate_sequences(rows, pad_id=0, batch_size=2 * B, buckets=[P + C]))
    t_un, f_un = model_flops_per_token(shape, P + C)
    run("dpo_unpacked", UnpackedDPO(), [unpacked], pair_tokens, (t_un + f_un) * 2 * B * (P + C), True)
    return out


class UnpackedDPO:
    """DPO on unpacked rows (the first half chosen, the second half rejected, each `prompt +
    completion`), as TRL computes it: the prompt runs twice. Only for this benchmark."""

    def __call__(self, model, batch, ref_model):
        import jax
        import jax.numpy as jnp

        from jaxrlhf.losses import dpo_loss
        from jaxrlhf.losses.token import token_logprobs_from_hidden

        def seq_logps(m):
            hidden = m.hidden_states(batch["input_ids"], batch["attention_mask"], batch["positions"])
            head = m.lm_head_kernel().astype(hidden.dtype)
            labels = batch["input_ids"][:, 1:]
            logps = token_logprobs_from_hidden(hidden[:, :-1], head, labels, chunk_size=1024)
            return jnp.sum(logps * batch["completion_mask"][:, 1:], axis=1)

        policy, ref = seq_logps(model), jax.lax.stop_gradient(seq_logps(ref_model))
        half = policy.shape[0] // 2
        loss, metrics = dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], beta=0.1)
        return loss, jnp.float32(1.0), metrics


def generation_rows(args, path: str, backend: str) -> list[dict]:
    import jax

    from jaxrlhf.generation import generate
    from jaxrlhf.models import from_pretrained

    model = from_pretrained(
        path, dtype="bfloat16", param_dtype="bfloat16", scan_layers=True, attention=backend
    )
    rng = np.random.default_rng(1)
    size = (args.gen_batch, args.gen_prompt)
    prompts = rng.integers(3, model.config.vocab_size, size=size).astype(np.int32)
    mask = np.ones_like(prompts)
    kw = dict(max_new_tokens=args.gen_new, eos_token_ids=[], pad_token_id=0, temperature=0.0)
    t0 = time.perf_counter()
    jax.block_until_ready(generate(model, prompts, mask, **kw).tokens)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.gen_calls):
        t0 = time.perf_counter()
        tokens = generate(model, prompts, mask, **kw).tokens
        jax.block_until_ready(tokens)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    new = args.gen_batch * args.gen_new
    shape = [args.gen_batch, args.gen_prompt, args.gen_new]
    row = {"what": "generate", "attention": backend, "shape": shape,
           "call_s": med, "first_call_s": first, "tokens_per_s": new / med,
           "first_tokens": np.asarray(tokens)[0, :8].tolist()}  # fmt: skip
    print(json.dumps(row), flush=True)
    return [row]


def grpo_rows(args, path: str, backend: str) -> list[dict]:
    """GRPO iterations (P prompts x G completions: sample, score, packed update) with a closed-form
    host reward, bf16 scanned model; median seconds per phase after a warm-up iteration."""
    import jax

    from jaxrlhf.models import from_pretrained
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.train.config import GRPOConfig
    from jaxrlhf.train.grpo import GRPOEngine
    from jaxrlhf.train.step import make_optimizer, make_schedule

    mesh = make_mesh(devices=jax.devices()[:1])
    model = from_pretrained(path, dtype="bfloat16", param_dtype="bfloat16", scan_layers=True,
                            attention=backend, mesh=mesh)  # fmt: skip
    p, g, prompt, new = args.grpo_shape
    cfg = GRPOConfig(num_generations=g, max_completion_length=new)
    engine = GRPOEngine(model, cfg, make_optimizer(make_schedule(1e-6, 100, kind="constant")), mesh,
                        eos_token_ids=[], pad_token_id=0)  # fmt: skip
    prompts = np.random.default_rng(2).integers(3, model.config.vocab_size, (p, prompt)).astype(np.int32)
    mask = np.ones_like(prompts)

    def reward(ids, completion_mask):  # a cheap verifiable reward: even tokens
        return ((ids[:, -completion_mask.shape[1]:] % 2 == 0) * completion_mask).mean(1, keepdims=True)

    runs = [engine.step(prompts, mask, reward) for _ in range(1 + max(args.steps - 1, 1))]
    phases = ("time/generation", "time/scoring", "time/update")
    med = {k.split("/")[1] + "_s": statistics.median(r[k] for r in runs[1:]) for k in phases}
    row = {"what": "grpo", "attention": backend, "shape": [p, g, prompt, new], **med,
           "tokens_per_s": p * g * new / sum(med.values()),  # completion tokens per second of iteration
           "step_s": sum(med.values()), "first_step_s": sum(runs[0][k] for k in phases)}  # fmt: skip
    print(json.dumps(row), flush=True)
    return [row]


def transformers_generation(args, path: str) -> dict:
    import torch
    import transformers as tf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    rng = np.random.default_rng(1)
    prompts = rng.integers(3, model.config.vocab_size, size=(args.gen_batch, args.gen_prompt))
    ids = torch.tensor(prompts, device=device)
    kw = dict(max_new_tokens=args.gen_new, min_new_tokens=args.gen_new, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))  # fmt: skip
    with torch.no_grad():
        model.generate(ids, **kw)
        times = []
        for _ in range(args.gen_calls):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    new = args.gen_batch * args.gen_new
    row = {"what": "generate_transformers", "call_s": med, "tokens_per_s": new / med,
           "first_tokens": out[0, args.gen_prompt : args.gen_prompt + 8].tolist()}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def word_tokenizer(vocab_size: int) -> Any:
    """A tokenizer whose text is the ids themselves ("t17 t4 ... </s>"): TRL tokenizes text, and
    this makes its token ids exactly ours (no BOS; "</s>" is the EOS id `vocab - 1`)."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size - 1)} | {"</s>": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="t0")


def trl_dpo_row(args, shape: dict, path: str) -> dict:
    """TRL's DPOTrainer step on the same model (float32 weights, bf16 autocast on GPU), the same
    pairs (as text that tokenizes to our ids; TRL appends the EOS itself), the same batch size."""
    import datasets
    import torch
    import transformers as tf
    import trl

    B, T = args.batch, args.seq
    P, C = T // 2, T // 4
    words = lambda a: " ".join(f"t{i}" for i in a)  # noqa: E731
    pairs = synthetic_pairs(shape, B, P, C)
    rows = [{"prompt": words(p) + " ", "chosen": words(c[:-1]) + " ", "rejected": words(r[:-1]) + " "}
            for p, c, r in pairs]  # fmt: skip
    cuda = torch.cuda.is_available()

    class Timer(tf.TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, *a, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    steps = args.steps + 2
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = trl.DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_"), per_device_train_batch_size=B, max_length=T,
        learning_rate=1e-6, beta=0.1, bf16=cuda, use_cpu=not cuda, report_to=[], max_steps=steps,
        save_strategy="no", gradient_checkpointing=False, disable_tqdm=True, logging_steps=1,
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=model, args=config, train_dataset=datasets.Dataset.from_list(rows * steps),
        processing_class=word_tokenizer(shape["vocab_size"]), callbacks=[timer],
    )  # fmt: skip
    for i, (p, c, r) in enumerate(pairs):  # TRL's token ids are exactly ours
        got = trainer.train_dataset[i]
        want = [p.tolist(), c.tolist(), r.tolist()]
        assert [got["prompt_ids"], got["chosen_ids"], got["rejected_ids"]] == want, f"pair {i}"
    trainer.train()
    med = statistics.median(timer.times[2:])
    row = {"what": "dpo_trl", "attention": model.config._attn_implementation, "shape": [B, T], "step_s": med,
           "min_s": min(timer.times[2:]), "tokens_per_s": B * (2 * P + 2 * C) / med, "mfu": None,
           "first_loss": next(h["loss"] for h in trainer.state.log_history if "loss" in h)}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def backends_here(requested: list[str], tiny: bool) -> list[str]:
    import jax

    platform = jax.default_backend()
    runnable = {"xla", *(["cudnn"] if platform == "gpu" else []), *(["splash"] if platform == "tpu" else [])}
    if tiny and platform == "cpu":
        runnable.add("splash")  # Pallas interpret mode: slow, but exercises the code path
    return [b for b in requested if b in runnable]


def table(results: list[dict]) -> str:
    lines = ["| what | attention | step / call | tokens/s | MFU |", "|---|---|---|---|---|"]
    for r in results:
        t = r.get("step_s", r.get("call_s"))
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") else "n/a"
        what, attention, tps = r["what"], r.get("attention", "-"), r["tokens_per_s"]
        lines.append(f"| {what} | {attention} | {t:.3f} s | {tps:,.0f} | {mfu} |")
    return "\n".join(lines)


def ratios(results: list[dict]) -> list[str]:
    """The issue's targets: MFU >= 40 % (SFT, DPO), DPO >= 1.5x TRL, generation >= 2x transformers."""

    def best(what: str) -> dict | None:
        rows = [r for r in results if r["what"] == what]
        return max(rows, key=lambda r: r["tokens_per_s"], default=None)

    lines = []
    dpo, trl, gen, hf = best("dpo_packed"), best("dpo_trl"), best("generate"), best("generate_transformers")
    if dpo and trl:
        ratio = dpo["tokens_per_s"] / trl["tokens_per_s"]
        lines.append(f"DPO step, packed ({dpo['attention']}) / TRL: {ratio:.2f}x")
    if gen and hf:
        ratio = gen["tokens_per_s"] / hf["tokens_per_s"]
        lines.append(f"generation ({gen['attention']}) / transformers: {ratio:.2f}x")
    for what in ("sft", "dpo_packed"):
        r = best(what)
        if r and r.get("mfu"):
            lines.append(f"{what} MFU ({r['attention']}): {100 * r['mfu']:.1f} %")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 2-layer model and short rows (CPU smoke run)")
    p.add_argument("--backends", default="xla,cudnn,splash", help="comma list; those this platform runs")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument("--skip-trl", action="store_true", help="no TRL DPO step even when trl is installed")
    p.add_argument("--skip-grpo", action="store_true", help="no GRPO iteration")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    shape = TINY if args.tiny else LLAMA_1B
    args.batch, args.seq = (2, 128) if args.tiny else (8, 2048)
    gen = (2, 8, 8, 1) if args.tiny else (64, 128, 256, 2)
    args.gen_batch, args.gen_prompt, args.gen_new, args.gen_calls = gen
    args.grpo_shape = (2, 2, 8, 4) if args.tiny else (16, 8, 256, 512)  # prompts, G, prompt, new tokens
    if args.tiny:
        args.steps = min(args.steps, 2)

    import jax

    info = {"devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind,
            "jax": jax.__version__, "peak_bf16_flops": peak_flops(jax.devices()[0])}  # fmt: skip
    print(json.dumps(info), flush=True)
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        info.update(make_checkpoint(shape, tmp))
        backends = backends_here(args.backends.split(","), args.tiny)
        for backend in backends:
            results += train_rows(args, shape, tmp, backend)
        if not args.skip_trl:
            try:
                import datasets  # noqa: F401
                import trl  # noqa: F401
            except ImportError as e:
                print(f"TRL DPO step skipped: {e} (carry the trl and datasets wheels)", flush=True)
            else:
                results.append(trl_dpo_row(args, shape, tmp))
        if not args.skip_grpo:
            for backend in backends:
                results += grpo_rows(args, tmp, backend)
        if not args.skip_generate:
            for backend in backends:
                results += generation_rows(args, tmp, backend)
            results.append(transformers_generation(args, tmp))
    print(table(results))
    summary = ratios(results)
    print("\n".join(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
