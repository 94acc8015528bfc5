"""Token-level building blocks: log-probs, entropy and masked reductions.

Every function here is a small, pure ``jax.numpy`` function that is safe under ``jax.jit``,
``jax.grad`` and ``jax.vmap``. All arithmetic is done in float32, even for bfloat16 inputs, because
log-softmax and long masked sums lose too much precision in bfloat16.

Masks are float or bool arrays with the same shape as the values they mask (1 = real token).
Array names carry their shape: B batch, T time, V vocab, D hidden, N flattened positions.
"""

from __future__ import annotations

import math
import operator

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "token_logprobs",
    "entropy_from_logits",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "token_logprobs_from_hidden",
    "sequence_logprobs",
]


def _concrete(x) -> float | None:
    """Returns ``x`` as a Python float when it is known at trace time, else None.

    Validation runs in Python at call time; a value that is traced (passed as a non-static jit
    argument) cannot be checked there, so it is skipped rather than crashing the trace.
    """
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return float(x)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        return None


def _check_temperature(temperature) -> None:
    t = _concrete(temperature)
    if t is not None and not t > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")


def _real(mask: Array) -> Array:
    """Boolean "is a real token" view of a float or bool mask."""
    return jnp.asarray(mask) != 0


def token_logprobs(logits_BxTxV: Array, labels_BxT: Array, *, temperature: float = 1.0) -> Array:
    r"""Log-probability of each label under ``softmax(logits / temperature)``.

    .. math:: \log p(y_t) = z_{t,y_t} / \tau - \operatorname{logsumexp}_v(z_{t,v} / \tau)

    Standard next-token log-likelihood of autoregressive LMs; used by every RLHF objective
    (PPO, Ouyang et al. 2022, arXiv:2203.02155; DPO, Rafailov et al. 2023, arXiv:2305.18290).
    No masking is applied. Any leading shape is allowed: ``logits [..., V]``, ``labels [...]``.

    Args:
      logits_BxTxV: unnormalised logits, any float dtype.
      labels_BxT: integer token ids with shape ``logits.shape[:-1]``.
      temperature: sampling temperature (> 0) the logits are divided by.

    Returns:
      float32 log-probs with the shape of ``labels``.
    """
    _check_temperature(temperature)
    logits_BxTxV = logits_BxTxV.astype(jnp.float32) / temperature
    # logsumexp subtracts the max first, so logits of +-1e4 stay finite.
    lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    labels_BxTx1 = jnp.asarray(labels_BxT).astype(jnp.int32)[..., None]
    picked_BxT = jnp.take_along_axis(logits_BxTxV, labels_BxTx1, axis=-1)[..., 0]
    return picked_BxT - lse_BxT


def entropy_from_logits(logits_BxTxV: Array, *, temperature: float = 1.0) -> Array:
    r"""Entropy (nats) of ``softmax(logits / temperature)`` at every position.

    .. math:: H_t = -\sum_v p_{t,v} \log p_{t,v}

    Logged as a diagnostic in PPO for LMs (Ouyang et al. 2022, arXiv:2203.02155).

    Returns:
      float32 entropies with shape ``logits.shape[:-1]``.
    """
    _check_temperature(temperature)
    logits_BxTxV = logits_BxTxV.astype(jnp.float32) / temperature
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    # exp(logp) underflows to exactly 0 for very unlikely tokens, so 0 * (-huge) = 0, never NaN.
    return -jnp.sum(jnp.exp(logp_BxTxV) * logp_BxTxV, axis=-1)


def masked_sum(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    r"""Sum of ``x * mask`` over ``axis`` (all axes when None), in float32.

    .. math:: \sum_i x_i m_i

    Masked-out entries are excluded with ``where`` (not only multiplied by 0), so NaN/inf
    padding cannot leak into the result or its gradient.
    """
    x = jnp.asarray(x).astype(jnp.float32)
    mask = jnp.asarray(mask)
    xm = jnp.where(_real(mask), x * mask.astype(jnp.float32), 0.0)
    return jnp.sum(xm, axis=axis)


def masked_mean(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    r"""Masked mean ``sum(x * mask) / sum(mask)`` over ``axis``; 0 for an all-masked reduction.

    .. math:: \bar x = \frac{\sum_i x_i m_i}{\sum_i m_i}
    """
    mask = jnp.asarray(mask)
    total = masked_sum(x, mask, axis=axis)
    count = jnp.sum(mask.astype(jnp.float32), axis=axis)
    # Double where: the safe denominator keeps the gradient of the unused branch finite.
    nonempty = count > 0
    return jnp.where(nonempty, total / jnp.where(nonempty, count, 1.0), 0.0)


def masked_var(x: Array, mask: Array, *, unbiased: bool = True) -> Array:
    r"""Variance over all masked elements.

    .. math:: \sigma^2 = \overline{(x - \bar x)^2} \cdot \tfrac{n}{n-1}\ \text{(if unbiased)},
       \quad n = \sum_i m_i

    With ``unbiased=True`` and ``n <= 1`` the result is 0 (never NaN/inf).
    Matches TRL's ``masked_var`` except for that degenerate case, where TRL raises.
    """
    mask = jnp.asarray(mask)
    mean = masked_mean(x, mask)
    centered = jnp.asarray(x).astype(jnp.float32) - mean
    var = masked_mean(jnp.square(centered), mask)
    if unbiased:
        n = jnp.sum(mask.astype(jnp.float32))
        ok = n > 1
        var = jnp.where(ok, var * n / jnp.where(ok, n - 1.0, 1.0), 0.0)
    return var


def masked_whiten(
    x: Array,
    mask: Array,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
) -> Array:
    r"""Normalise ``x`` to zero mean / unit variance over the masked elements.

    .. math:: \hat x = (x - \bar x) / \sqrt{\sigma^2 + \epsilon}
       \; (+\, \bar x \text{ if not shift\_mean})

    Advantage whitening used by PPO for LMs (Ziegler et al. 2019, arXiv:1909.08593; TRL/OpenAI
    ``whiten`` semantics: ``shift_mean=False`` adds the mean back). Masked-out entries are set to 0.
    """
    mask = jnp.asarray(mask)
    x = jnp.asarray(x).astype(jnp.float32)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=unbiased)
    whitened = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(_real(mask), whitened, 0.0)


def token_logprobs_from_hidden(
    hidden_BxTxD: Array,
    lm_head_DxV: Array,
    labels_BxT: Array,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    soft_cap: float | None = None,
    batch_shards: int = 1,
) -> Array:
    r"""``token_logprobs(hidden @ lm_head, labels)`` without materialising the ``[N, V]`` logits.

    .. math:: \log p(y_n) = z_{n,y_n} / \tau - \operatorname{logsumexp}_v(z_{n,v} / \tau),
       \quad z = h W \text{ (or } c \tanh(h W / c) \text{ with soft\_cap } c\text{)}

    The ``N = prod(hidden.shape[:-1])`` positions are processed about ``chunk_size`` at a time with
    ``jax.lax.map``: for ``[B, T, D]`` input with more than ``chunk_size`` positions a chunk is
    every row's next ``chunk_size * batch_shards // B`` positions (the batch axis stays whole, so a
    batch sharded over ``batch_shards`` devices stays sharded and each device takes ``chunk_size`` of
    its own positions per chunk); otherwise the positions are flattened (batch-major, which keeps a
    batch split) and padded up to a multiple of ``chunk_size``. Each chunk's body is
    wrapped in ``jax.checkpoint``, so the backward pass recomputes that chunk's logits instead of
    saving them: peak memory is O(chunk_size * V) instead of O(N * V) (the "chunked / fused
    cross-entropy" trick, e.g. Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language
    Models", arXiv:2411.09009). Values and gradients (w.r.t. ``hidden`` and ``lm_head``) equal the
    direct computation.

    Args:
      hidden_BxTxD: final hidden states ``[..., D]``.
      lm_head_DxV: output projection kernel ``[D, V]`` (``x @ W`` layout).
      labels_BxT: integer token ids ``[...]`` matching ``hidden.shape[:-1]``.
      chunk_size: positions per chunk (a positive int, static).
      temperature: logits are divided by this (> 0).
      soft_cap: Gemma 2's final-logit soft-capping ``c tanh(z / c)``, applied before the
        temperature (as transformers computes the logits, then samplers divide them).
      batch_shards: devices the batch axis is split over (static). Chunks are sized per device:
        with the global count instead, a batch over 64 devices would run 64 times as many chunks of
        1/64 the size, each gathering the whole LM head again (and reducing its gradient again).

    Returns:
      float32 log-probs with shape ``hidden.shape[:-1]``.
    """
    _check_temperature(temperature)
    try:  # any Python / numpy integer, but not a bool, float or traced value
        valid = not isinstance(chunk_size, bool) and operator.index(chunk_size) > 0
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    chunk_size = operator.index(chunk_size)
    if lm_head_DxV.ndim != 2:
        raise ValueError(f"lm_head must be 2-D [D, V], got shape {lm_head_DxV.shape}.")
    lead_shape = hidden_BxTxD.shape[:-1]
    D = hidden_BxTxD.shape[-1]
    if lm_head_DxV.shape[0] != D:
        raise ValueError(
            f"hidden has D={D} but lm_head has shape {lm_head_DxV.shape}; expected [D, V]."
        )
    if tuple(jnp.shape(labels_BxT)) != tuple(lead_shape):
        raise ValueError(
            f"labels shape {jnp.shape(labels_BxT)} must equal hidden.shape[:-1] = {lead_shape}."
        )

    N = math.prod(lead_shape)
    if N == 0:
        return jnp.zeros(lead_shape, jnp.float32)
    labels = jnp.asarray(labels_BxT).astype(jnp.int32)

    @jax.checkpoint  # backward recomputes this chunk's logits instead of storing them
    def chunk_logps(hidden_xD: Array, labels_x: Array) -> Array:
        # One 2-D matmul (a [B, K, D] chunk is flattened: its major, batch-split axis keeps the
        # split). bf16 operands stay bf16 for the matmul but accumulate and return float32.
        hidden_MxD = hidden_xD.reshape(-1, D)
        logits_MxV = jnp.dot(hidden_MxD, lm_head_DxV, preferred_element_type=jnp.float32)
        if soft_cap is not None:
            logits_MxV = soft_cap * jnp.tanh(logits_MxV / soft_cap)
        logps_M = token_logprobs(logits_MxV, labels_x.reshape(-1), temperature=temperature)
        return logps_M.reshape(labels_x.shape)

    if len(lead_shape) >= 2 and N > chunk_size:
        # Chunks run along T and keep the whole batch axis, so a batch split over devices stays
        # split: each device computes its own rows' chunks (chunk_size positions in all).
        B, T = lead_shape[0], N // lead_shape[0]
        K = max(1, min(chunk_size * max(batch_shards, 1) // max(B, 1), T))
        C = -(-T // K)
        pad = C * K - T
        # Padding positions are zeros / label 0: finite, sliced off before anything depends on
        # them, so they contribute exactly zero gradient.
        hidden_BxTxD = jnp.pad(hidden_BxTxD.reshape(B, T, D), ((0, 0), (0, pad), (0, 0)))
        labels_BxT = jnp.pad(labels.reshape(B, T), ((0, 0), (0, pad)))
        hidden_CxBxKxD = hidden_BxTxD.reshape(B, C, K, D).transpose(1, 0, 2, 3)
        labels_CxBxK = labels_BxT.reshape(B, C, K).transpose(1, 0, 2)
        logps_CxBxK = jax.lax.map(lambda args: chunk_logps(*args), (hidden_CxBxKxD, labels_CxBxK))
        return logps_CxBxK.transpose(1, 0, 2).reshape(B, C * K)[:, :T].reshape(lead_shape)

    K = min(chunk_size, N)  # no point padding a short input up to a big chunk
    C = -(-N // K)  # number of chunks
    pad = C * K - N
    hidden_CxKxD = jnp.pad(hidden_BxTxD.reshape(N, D), ((0, pad), (0, 0))).reshape(C, K, D)
    labels_CxK = jnp.pad(labels.reshape(N), (0, pad)).reshape(C, K)
    logps_CxK = jax.lax.map(lambda args: chunk_logps(*args), (hidden_CxKxD, labels_CxK))
    return logps_CxK.reshape(C * K)[:N].reshape(lead_shape)


def sequence_logprobs(token_logps_BxT: Array, mask_BxT: Array, *, average: bool = False) -> Array:
    r"""Per-sequence log-prob: sum (or mean) of token log-probs over the real tokens of each row.

    .. math:: \log \pi(y \mid x) = \sum_t m_t \log \pi(y_t \mid x, y_{<t})
       \quad (\text{divided by } \textstyle\sum_t m_t \text{ if average})

    The sequence score of DPO (Rafailov et al. 2023, arXiv:2305.18290); ``average=True`` gives the
    length-normalised score of SimPO (Meng et al. 2024, arXiv:2405.14734). Reduces the last (T)
    axis, so ``[B, T] -> [B]``. An all-masked row gives 0.
    """
    if average:
        return masked_mean(token_logps_BxT, mask_BxT, axis=-1)
    return masked_sum(token_logps_BxT, mask_BxT, axis=-1)
