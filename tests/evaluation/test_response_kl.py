"""`jaxrlhf.evaluation.response_kl` against a transformers (PyTorch, float32) reference: two different
random tiny llamas score a left-padded rollout of three rows (prompt lengths 6, 4, 2; completion
lengths 5, 3, 1), each row run alone and unpadded; the summed log-ratio of the completion tokens under
temperature T (log softmax of logits / T in float64) must match per row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.tiny_hf import VOCAB, make_hf_model

from jaxrlhf.evaluation import response_kl
from jaxrlhf.models import from_pretrained

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT_LENGTHS = (6, 4, 2)
COMPLETION_LENGTHS = (5, 3, 1)
P, N = 6, 5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(policy HF, reference HF, policy CausalLM, reference CausalLM): different seeds, so different
    weights."""
    hf = []
    loaded = []
    for seed in (0, 1):
        model = make_hf_model("llama", seed=seed)
        path = str(tmp_path_factory.mktemp(f"kl_llama_{seed}"))
        model.save_pretrained(path)
        hf.append(model)
        loaded.append(from_pretrained(path))
    return hf[0], hf[1], loaded[0], loaded[1]


def _rollout(filler_seed: int | None = None):
    """(prompt_ids, prompt_mask, tokens, completion_mask, per-row prompts, per-row completions): pad
    positions hold 0, or with `filler_seed` random tokens; the real tokens are the same either way."""
    rng = np.random.default_rng(1234)
    prompts = [rng.integers(3, VOCAB, size=n) for n in PROMPT_LENGTHS]
    completions = [rng.integers(3, VOCAB, size=n) for n in COMPLETION_LENGTHS]
    fill = np.random.default_rng(filler_seed)
    prompt_ids = np.zeros((3, P), np.int32)
    prompt_mask = np.zeros((3, P), np.int32)
    tokens = np.zeros((3, N), np.int32)
    completion_mask = np.zeros((3, N), np.int32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        if filler_seed is not None:  # arbitrary tokens in the positions the masks hide
            prompt_ids[i] = fill.integers(0, VOCAB, size=P)
            tokens[i] = fill.integers(0, VOCAB, size=N)
        prompt_ids[i, P - len(p) :], prompt_mask[i, P - len(p) :] = p, 1
        tokens[i, : len(c)], completion_mask[i, : len(c)] = c, 1
    return prompt_ids, prompt_mask, tokens, completion_mask, prompts, completions


def _token_logprobs(hf: torch.nn.Module, prompt: np.ndarray, completion: np.ndarray, temperature: float):
    """log softmax(logits / T)[y_t] (float64) of each completion token, the row run alone, unpadded."""
    ids = np.concatenate([prompt, completion])
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(ids[None], dtype=torch.long)).logits[0].float().numpy()
    logits = logits[len(prompt) - 1 : len(ids) - 1].astype(np.float64) / temperature  # predict y_t
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return logp[np.arange(len(completion)), completion]


def _reference_kl(policy_hf, reference_hf, prompts, completions, temperature: float) -> np.ndarray:
    out = []
    for p, c in zip(prompts, completions, strict=True):
        policy_logp = _token_logprobs(policy_hf, p, c, temperature)
        out.append(np.sum(policy_logp - _token_logprobs(reference_hf, p, c, temperature)))
    return np.array(out)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_kl_matches_transformers(models, temperature):
    policy_hf, reference_hf, policy, reference = models
    prompt_ids, prompt_mask, tokens, completion_mask, prompts, completions = _rollout()
    expected = _reference_kl(policy_hf, reference_hf, prompts, completions, temperature)
    # the reference itself discriminates: the models differ on every row, the rows differ from each
    # other, and the temperature changes the values by far more than the tolerance
    assert np.all(np.abs(expected) > 1e-2), expected
    assert len(set(np.round(expected, 3))) == 3, expected
    other = _reference_kl(policy_hf, reference_hf, prompts, completions, 1.0 if temperature != 1.0 else 0.7)
    assert np.all(np.abs(other - expected) > 1e-2), (expected, other)

    out = response_kl(
        policy, reference, prompt_ids, prompt_mask, tokens, completion_mask, temperature=temperature
    )
    assert isinstance(out, np.ndarray) and out.shape == (3,), (type(out), np.shape(out))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_default_temperature_is_one(models):
    _, _, policy, reference = models
    prompt_ids, prompt_mask, tokens, completion_mask, _, _ = _rollout()
    np.testing.assert_array_equal(
        response_kl(policy, reference, prompt_ids, prompt_mask, tokens, completion_mask),
        response_kl(policy, reference, prompt_ids, prompt_mask, tokens, completion_mask, temperature=1.0),
    )


def test_masked_positions_are_invisible(models):
    """Whatever tokens sit in the prompt padding and after a completion's end, the result is the same."""
    policy_hf, reference_hf, policy, reference = models
    plain = _rollout()
    filled = _rollout(filler_seed=7)
    assert not np.array_equal(plain[0], filled[0]) and not np.array_equal(plain[2], filled[2])
    a = response_kl(policy, reference, *plain[:4])
    b = response_kl(policy, reference, *filled[:4])
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        b, _reference_kl(policy_hf, reference_hf, *plain[4:], 1.0), rtol=1e-4, atol=1e-4
    )


def test_a_model_against_itself_is_zero(models):
    _, _, policy, _ = models
    prompt_ids, prompt_mask, tokens, completion_mask, _, _ = _rollout()
    for temperature in (1.0, 0.7):
        out = response_kl(
            policy, policy, prompt_ids, prompt_mask, tokens, completion_mask, temperature=temperature
        )
        np.testing.assert_allclose(out, np.zeros(3), atol=1e-6)


def test_a_policy_above_the_references_frozen_layers_shares_its_trunk(tmp_path):
    """A policy that differs from its reference only above `frozen_layers` (as one trained with
    them does): the two share one trunk (computed once) and the KL still matches transformers."""
    import copy

    from jaxrlhf.models import shared_trunk

    reference_hf = make_hf_model("llama", seed=0)
    policy_hf = copy.deepcopy(reference_hf)
    with torch.no_grad():
        for p in policy_hf.model.layers[1].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    loaded = []
    for name, hf in (("policy", policy_hf), ("reference", reference_hf)):
        hf.save_pretrained(str(tmp_path / name))
        loaded.append(from_pretrained(str(tmp_path / name), frozen_layers=1))
    policy, reference = loaded
    assert shared_trunk(policy, reference)
    prompt_ids, prompt_mask, tokens, completion_mask, prompts, completions = _rollout()
    expected = _reference_kl(policy_hf, reference_hf, prompts, completions, 0.7)
    assert np.all(np.abs(expected) > 1e-3), expected
    out = response_kl(policy, reference, prompt_ids, prompt_mask, tokens, completion_mask, temperature=0.7)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
