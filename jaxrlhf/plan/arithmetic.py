"""The memory arithmetic of docs/scaling.md and the model FLOPs of MFU: bytes and FLOPs per device
by formula, with no compiler involved, to set beside what the compiler reports.

Symbols (docs/scaling.md): V vocabulary, D hidden, F MLP width, L layers, N / K query / key-value heads,
H head dim; a mesh is `{"data", "fsdp", "tensor"}` sizes.
"""

from __future__ import annotations

import dataclasses

from jaxrlhf.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Dims:
    """The shape symbols of docs/scaling.md."""

    V: int  # vocabulary
    D: int  # hidden
    F: float  # MLP width (mixture of experts, for FLOPs: the width a token uses)
    L: int  # layers
    N: int  # query heads
    K: int  # key/value heads
    H: int  # head dim

    @classmethod
    def of(cls, cfg: ModelConfig) -> Dims:
        return cls(cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers,
                   cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)  # fmt: skip

    @property
    def layer_params(self) -> int:
        """q, k, v, o, gate, up, down and the two norm scales of one decoder layer."""
        d, q, kv = self.D, self.N * self.H, self.K * self.H
        return d * q + 2 * d * kv + q * d + 3 * d * self.F + 2 * d

    def params(self, head: str = "lm") -> int:
        """P: embedding, layers, final norm, and an untied LM head `[D, V]` or a score head `[D, 1]`."""
        out = self.V if head == "lm" else 1
        return self.V * self.D + self.L * self.layer_params + self.D + self.D * out


def saved_per_token(d: Dims, remat: str, t_len: int, tp: int) -> float:
    """Bytes one decoder layer keeps per token for the backward pass (bf16 activations, attention
    scores float32), under each remat policy; `tp` splits heads and the MLP width."""
    q, kv, f, n = d.N * d.H / tp, d.K * d.H / tp, d.F / tp, d.N / tp
    layer_input = 2 * d.D
    weight_dots = 2 * (q + 2 * kv) + 2 * d.D + 2 * 2 * f + 2 * d.D  # q,k,v  o  gate,up  down
    attention_dots = 4 * n * t_len + 2 * q  # QK^T scores (f32) and PV
    everything = (
        weight_dots + attention_dots
        + (2 + 4) * n * t_len  # softmax probabilities (bf16) and exponentials (f32)
        + 2 * (q + kv)  # rotated q, k
        + 2 * 2 * f  # activation, gate * up
        + 2 * 4 * d.D  # the two norms' float32 intermediates
    )  # fmt: skip
    if remat in ("full", "offload_dots"):  # offload_dots keeps its dots in host memory
        return layer_input
    if remat == "dots_with_no_batch_dims_saveable":
        return layer_input + weight_dots
    if remat == "dots_saveable":
        return layer_input + weight_dots + attention_dots
    return layer_input + everything


def estimate(
    d: Dims, step: str, mesh: dict[str, int], remat: str, batch: int, seq: int, accum: int,
    *, batch_bytes: float, prompt_len: int, minibatches: int, frozen_bytes: int = 4, chunk: int = 1024,
) -> dict[str, float]:  # fmt: skip
    """Per-device bytes by component, for one call of `step` under FSDP (docs/scaling.md).

    Assumes the step is partitioned as FSDP intends: activations split over the batch, each layer's
    weights all-gathered when used. `total` is the sum of the components; `resident` (PPO) is what
    the engine keeps on the device outside the compiled function."""
    tp = mesh["tensor"]
    shards = mesh["fsdp"] * tp  # parameters are split over fsdp x tensor, replicated over data
    rows = batch / (mesh["data"] * mesh["fsdp"])  # rows per device per step
    p_lm, p_score = d.params("lm"), d.params("score")
    # One layer's weights gathered (f32) and its gradient before the reduce-scatter; the LM head
    # `[D, V]` is gathered the same way (the head runs data-parallel), at another time: the larger.
    layer = 2 * 4 * max(d.layer_params, d.D * d.V) / tp
    # One chunk of f32 logits and their cotangent: token_logprobs_from_hidden takes `chunk` positions
    # of this device's rows of the (micro-)batch at a time (chunk // rows of each row).
    per_row = max(1, min(chunk // max(int(rows / accum), 1), seq))
    logits = 2 * 4 * rows / accum * per_row * d.V / tp
    working = saved_per_token(d, "none", seq, tp)  # one layer's forward values while it runs
    out: dict[str, float] = {"batch": batch_bytes}
    if step in ("dpo", "dpo_same_step", "sft"):
        out["params"] = 4 * p_lm / shards
        out["opt_state"] = 8 * p_lm / shards  # Adam mu, nu in float32
        if step == "dpo_same_step":
            out["reference"] = frozen_bytes * p_lm / shards
        # the float32 gradient, the accumulator (accum > 1) and the optimizer's update tree
        out["grads"] = (4 + 4 * (accum > 1) + 4) * p_lm / shards
        out["activations"] = rows / accum * seq * (d.L * saved_per_token(d, remat, seq, tp) + working)
        out["weights"], out["logits"] = layer, logits
    elif step == "ppo":
        p = p_lm + p_score
        out["params"], out["opt_state"], out["grads"] = 4 * p / shards, 8 * p / shards, 8 * p / shards
        # policy and critic both keep their activations until the joint backward pass
        tokens = rows / minibatches * seq
        out["activations"] = tokens * (2 * d.L * saved_per_token(d, remat, seq, tp) + working)
        out["weights"], out["logits"] = layer, logits
        out["resident"] = frozen_bytes * (p_lm + p_score) / shards  # reference and reward model
    elif step == "score":  # no gradients: one layer's values at a time
        out["params"] = (4 * p_score + frozen_bytes * (p_lm + p_score)) / shards  # critic, ref, reward
        out["activations"] = rows * seq * working
        out["weights"], out["logits"] = layer / 2, logits / 2
        out["resident"] = (4 * p_lm + 8 * (p_lm + p_score)) / shards  # the policy; Adam state
    elif step == "generate":
        out["params"] = 4 * p_lm / shards
        out["kv_cache"] = rows * 2 * d.L * seq * d.K * d.H / tp * 2  # k and v [B, P+N, K, H], bf16
        out["activations"] = rows * prompt_len * saved_per_token(d, "none", prompt_len, tp)  # prefill
        out["weights"], out["logits"] = layer / 2, 3 * 4 * rows * d.V / tp
        out["resident"] = (8 * p_lm + 12 * p_score + 2 * frozen_bytes * p_lm) / shards
    out["args"] = out["batch"] + sum(out.get(k, 0.0) for k in ("params", "opt_state", "reference"))
    out["total"] = sum(v for k, v in out.items() if k not in ("args", "resident"))
    return out



def model_flops(d: Dims, step: str, tokens: float, context: float, *, generated: float = 0.0) -> float:
    """Model FLOPs of one step (what MFU counts: no remat recompute), over all devices.

    Per token, a matmul with n weights costs 2n forward and 4n backward; causal attention costs
    2 * 2 * (context / 2) * N * H per layer forward (QK^T and PV over half the context on average),
    twice that backward (Chowdhery et al. 2022, PaLM, appendix B; here with the causal half).
    `tokens`: rows x tokens per row in the step; `generated`: the sampler's new tokens.
    """
    matmul = d.L * (d.layer_params - 2 * d.D) + d.D * d.V  # layers and the LM head (not the lookup)
    score = d.L * (d.layer_params - 2 * d.D) + d.D  # a critic / reward model: score head [D, 1]
    attention = d.L * 2 * context * d.N * d.H  # forward, per token: 2 x 2 x (context / 2) x N x H
    forward, train = 2 * matmul + attention, 3 * (2 * matmul + attention)
    if step in ("sft", "dpo"):
        return tokens * train
    if step == "dpo_same_step":  # the reference's forward pass too
        return tokens * (train + forward)
    if step == "reward":
        return tokens * 3 * (2 * score + attention)
    if step == "ppo":  # policy and critic, forward and backward
        return tokens * (train + 3 * (2 * score + attention))
    if step == "score":  # reference, critic and reward model forward
        return tokens * (forward + 2 * (2 * score + attention))
    if step == "grpo":
        return tokens * train
    if step in ("generate", "grpo_generate"):  # prefill of the prompts, then one token at a time
        return tokens * forward + generated * (2 * matmul + 2 * 2 * context * d.N * d.H * d.L)
    raise ValueError(f"no model FLOPs for step {step!r}")


def attention_flops(d: Dims, step: str, tokens: float, context: float, remat: str) -> float:
    """FLOPs of the attention kernels alone (QK^T and PV, causal half), all devices: what runs inside
    splash's Mosaic kernels, which carry no compiler estimate. Training adds the backward (twice the
    forward) and, under any remat policy but `none`, the recomputed forward."""
    forward = tokens * d.L * 2 * context * d.N * d.H
    if step in ("generate", "grpo_generate", "score"):
        return forward * (3 if step == "score" else 1)  # score: reference, critic, reward model
    passes = 3 + (remat != "none")
    if step == "dpo_same_step":
        return forward * (passes + 1)
    if step == "ppo":
        return 2 * forward * passes  # policy and critic
    return forward * passes
