"""Tiny random-init Hugging Face models (PyTorch, float32) for every supported model type.

Every parameter, norms and biases included, is perturbed away from its default init so that a
mis-mapped tensor (say q_norm loaded as k_norm) changes the logits.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch
import transformers as tf

from helpers.procs import cpu_env

VOCAB = 96

MODEL_TYPES = (
    "llama", "llama3_rope", "smollm2", "mistral", "qwen2", "qwen3", "gpt2", "gemma", "gemma2", "gemma3",
    "mixtral", "qwen3_moe",
)  # fmt: skip
# Families whose layers differ: qwen2 with the sliding window on the middle layer of three only.
MIXED_TYPES = ("qwen2_mixed",)


def tiny_config(kind: str) -> tf.PretrainedConfig:
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    if kind == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    if kind == "llama3_rope":
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 500000.0,
        }
        return tf.LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=False)
    if kind == "smollm2":  # llama with tied embeddings and GQA (3 query heads per kv head)
        return tf.LlamaConfig(
            **{**common, "num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 96},
            tie_word_embeddings=True,
        )
    if kind == "mistral":  # window smaller than the test sequences, so it matters
        return tf.MistralConfig(**common, sliding_window=5, tie_word_embeddings=False)
    if kind == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=False)
    if kind == "qwen2_mixed":
        layer_types = ["full_attention", "sliding_attention", "full_attention"]
        return tf.Qwen2Config(
            **{**common, "num_hidden_layers": 3}, sliding_window=5, use_sliding_window=True,
            layer_types=layer_types, tie_word_embeddings=False,
        )  # fmt: skip
    if kind == "qwen3":
        return tf.Qwen3Config(**common, head_dim=24, tie_word_embeddings=False)
    if kind == "gemma":  # head_dim != hidden / heads, as Gemma's 256; untied (Gemma 2 and 3 are tied)
        return tf.GemmaConfig(**common, head_dim=24, tie_word_embeddings=False)
    if kind == "gemma2":
        # A window shorter than the test rows, query_pre_attn_scalar != head_dim, and soft caps
        # that bind (test logits reach ~4 before the final cap; scores reach ~1 before theirs).
        return tf.Gemma2Config(
            **common, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
            attn_logit_softcapping=0.5, final_logit_softcapping=2.0,
        )  # fmt: skip
    if kind == "gemma3":  # local and global layers with their own RoPE, scaled RoPE on global ones
        rope = {
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
        }
        return tf.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 3}, head_dim=16, sliding_window=4, query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters=rope, final_logit_softcapping=3.0,
        )  # fmt: skip
    if kind == "mixtral":
        return tf.MixtralConfig(
            **common, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
            router_aux_loss_coef=0.02,
        )  # fmt: skip
    if kind == "qwen3_moe":  # top-k weights not renormalised (norm_topk_prob=False)
        return tf.Qwen3MoeConfig(
            **common, head_dim=16, num_experts=5, num_experts_per_tok=3, moe_intermediate_size=40,
            norm_topk_prob=False, tie_word_embeddings=False,
        )  # fmt: skip
    if kind == "qwen3_moe_mixed":  # a dense MLP layer between sparse ones
        return tf.Qwen3MoeConfig(
            **{**common, "num_hidden_layers": 3}, head_dim=16, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=40, norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=False,
        )  # fmt: skip
    if kind == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=128,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    raise ValueError(kind)


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def make_hf_model(kind: str, head: str = "lm", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tiny_config(kind)
    cfg._attn_implementation = "eager"
    if head == "lm":
        model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    else:
        cfg.num_labels = 1
        model = tf.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")
    return perturb(model.float().eval(), seed)


def saved_hf_model(kind: str, tmp_path_factory, head: str = "lm") -> tuple[torch.nn.Module, str]:
    """(a `make_hf_model` transformers model, the checkpoint directory it was saved to)."""
    hf = make_hf_model(kind, head)
    path = str(tmp_path_factory.mktemp(kind))
    hf.save_pretrained(path)
    return hf, path


def padded_batch(side: str, seed: int = 0, lengths=(11, 7, 3), total: int = 12):
    """Token ids, attention mask and position ids (numpy) for a batch padded on `side`."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), np.int32)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        toks = rng.integers(3, VOCAB, size=n)
        sl = slice(total - n, total) if side == "left" else slice(0, n)
        ids[i, sl], mask[i, sl] = toks, 1
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return ids, mask, pos


def hf_logits(model: torch.nn.Module, ids, mask, pos) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(pos, dtype=torch.long),
        )
    return out.logits.float().numpy()


def run_with_cpu_devices(script: str, devices: int = 8, timeout: int = 600) -> str:
    """Run `script` in a fresh Python process that sees `devices` simulated CPU devices (the XLA flag
    must be set before jax is imported); check it exits 0 and prints OK; return its stdout."""
    env = cpu_env(devices)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "OK" in proc.stdout
    return proc.stdout


# The small tokenizer's training text: a fixed list, so that shipping a new asset does not retrain
# it (a new vocabulary changes every tiny model, and with it every tolerance measured on them).
TOKENIZER_CORPUS = (
    "dpo_demo/test.jsonl", "dpo_demo/train.jsonl", "dpo_demo/train_policy.jsonl", "grpo_demo/test.jsonl",
    "grpo_demo/train.jsonl", "sentiment/pairs_test.jsonl", "sentiment/pairs_train.jsonl",
    "sentiment/preferred_train.jsonl", "sentiment/prompts_test.jsonl", "sentiment/prompts_train.jsonl",
)  # fmt: skip


def small_smollm_tokenizer(path: str, vocab_size: int = 1024) -> int:
    """SmolLM2's tokenizer with its byte-level BPE retrained to `vocab_size` tokens on the shipped demo
    data, saved at `path`: the same special tokens and ids, chat template, pre-tokenizer and decoder,
    and any text encodes (byte-level), but the LM head of a tiny model is 48x smaller (at -O0 a
    [8, 96] gradient step of the 32-wide model: 567 ms with 49,152 tokens, 30 ms with 512).
    Returns the vocabulary size."""
    import json
    import shutil

    from tokenizers import Tokenizer, pre_tokenizers, trainers

    from jaxrlhf.models.demo import demo_model_path

    real = demo_model_path()
    core = Tokenizer.from_file(os.path.join(real, "tokenizer.json"))
    specials = [tok.content for _, tok in sorted(core.get_added_tokens_decoder().items())]  # ids 0..16
    assets = os.path.join(os.path.dirname(__file__), "..", "..", "jaxrlhf", "assets")

    def texts():
        for file in TOKENIZER_CORPUS:
            file = os.path.join(assets, file)
            with open(file) as f:
                for line in f:
                    yield json.dumps(json.loads(line), ensure_ascii=False)

    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    core.train_from_iterator(texts(), trainer)
    os.makedirs(path, exist_ok=True)
    core.save(os.path.join(path, "tokenizer.json"))
    for name in ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if os.path.exists(os.path.join(real, name)):
            shutil.copy(os.path.join(real, name), path)
    return core.get_vocab_size()


def save_tiny_smollm(
    path: str, *, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2, family: str = "llama",
    full_vocab: bool = False,
) -> str:
    """A random model with SmolLM2's tokenizer (chat template and special tokens included; its BPE cut to
    ~1k tokens by `small_smollm_tokenizer`, or the real 49,152 with `full_vocab`) saved at `path`: a
    checkpoint the trainers, `jaxrlhf eval` and `chat` take as they take the demo model. `family`:
    a llama, or a Gemma 2 (window, soft caps) or Qwen3-MoE (4 experts, load-balancing loss on)."""
    from jaxrlhf.models import load_tokenizer
    from jaxrlhf.models.demo import demo_model_path

    vocab = 49152 if full_vocab else small_smollm_tokenizer(path)
    sizes = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
    )  # fmt: skip
    if family == "llama":
        cfg = tf.LlamaConfig(**sizes, tie_word_embeddings=True)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(**sizes, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(
            **sizes, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            norm_topk_prob=True, tie_word_embeddings=True, output_router_logits=True,
            router_aux_loss_coef=0.01,
        )  # fmt: skip
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    if full_vocab:
        load_tokenizer(demo_model_path()).save_pretrained(path)
    return path
