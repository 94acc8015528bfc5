"""The compiled KV-cache sampler `jaxrlhf.generation.generate` against transformers and first principles.

* greedy decoding equals transformers' `generate(do_sample=False)` token for token on every tiny model
  type (left-padded prompts of different lengths, rows stopping at EOS mid-way) and on the demo model;
* the returned log-probs equal a plain full forward over prompt + completion;
* `filter_logits` / `sample_tokens` against numpy written from the definitions, and the empirical
  distribution of samples against softmax(logits / T);
* a model sharded on a (2, 2, 2) mesh of simulated CPU devices decodes the same tokens.
"""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers.tiny_hf import MODEL_TYPES, VOCAB, padded_batch, run_with_cpu_devices

from jaxrlhf.generation import filter_logits, generate, sample_tokens
from jaxrlhf.models import from_pretrained

PAD = 0  # the tiny configs' pad id; prompt ids are drawn from [3, VOCAB)
CONFIG_EOS = 1  # the tiny configs' eos id


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """transformers runs ~100x slower with 2 torch threads once XLA's CPU thread pool is live in the same
    process (2-core machine); one thread keeps the reference runs fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dirs(hf_checkpoint):
    """One saved tiny HF model per type: {kind: (hf_model, directory)}."""
    return {kind: hf_checkpoint(kind) for kind in MODEL_TYPES}


def _hf_greedy(hf, ids, mask, n, eos):
    """transformers greedy decoding: tokens `[B, n]` (padded with PAD where it stopped early) and the
    log-softmax of its logits at each step `[B, n, V]`."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=list(eos),
            pad_token_id=PAD,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[:, ids.shape[1] :].numpy()
    logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).numpy()
    done = tokens.shape[1]
    tokens = np.pad(tokens, ((0, 0), (0, n - done)), constant_values=PAD)
    return tokens, logp


def _mask_through_first_eos(tokens, eos):
    is_eos = np.isin(tokens, eos)
    return ((np.cumsum(is_eos, axis=1) - is_eos) == 0).astype(np.int32)


def _pick_eos(ref, n):
    """An id that one row greedily produces mid-way (first occurrence at step 2..n-3) while another row
    never produces it (nor the config's EOS), so the batch has early-stopping and full-length rows."""
    free_rows = [r for r in range(len(ref)) if CONFIG_EOS not in ref[r]]
    for r in range(len(ref)):
        for k in range(2, n - 2):
            t = int(ref[r, k])
            if t in (CONFIG_EOS, PAD) or t in ref[r, :k]:
                continue
            if any(t not in ref[s] for s in free_rows if s != r):
                return t, r, k
    raise AssertionError(f"no usable mid-way EOS in {ref}")


@pytest.mark.parametrize("kind", MODEL_TYPES)
def test_greedy_matches_transformers_generate(kind, tiny_dirs):
    hf, path = tiny_dirs[kind]
    model = from_pretrained(path)
    n = 10
    ids, mask, _ = padded_batch("left", seed=1, lengths=(9, 4, 1, 6), total=9)
    free_run, _ = _hf_greedy(hf, ids, mask, n, [CONFIG_EOS])
    eos_id, row, step = _pick_eos(free_run, n)
    eos = [CONFIG_EOS, eos_id]

    ref, ref_logp = _hf_greedy(hf, ids, mask, n, eos)
    ref_mask = _mask_through_first_eos(ref, eos)
    assert ref_mask[row].sum() == step + 1 and ref[row, step] == eos_id  # the row stops mid-way
    assert ref_mask.sum(1).max() == n  # and another row runs the full length

    got = generate(model, ids, mask, max_new_tokens=n, eos_token_ids=eos, pad_token_id=PAD, temperature=0.0)
    tokens, cmask, logp = (np.asarray(x) for x in (got.tokens, got.completion_mask, got.logprobs))
    assert tokens.shape == cmask.shape == logp.shape == (len(ids), n)
    np.testing.assert_array_equal(tokens, ref)
    np.testing.assert_array_equal(cmask, ref_mask)
    assert (tokens[cmask == 0] == PAD).all()
    assert (logp[cmask == 0] == 0).all()
    # greedy log-probs: log-softmax of the (unscaled) logits, as transformers computed them
    steps = ref_logp.shape[1]
    want = np.take_along_axis(ref_logp, ref[:, :steps, None], -1)[..., 0] * ref_mask[:, :steps]
    np.testing.assert_allclose(logp[:, :steps], want, atol=1e-4)


# ----------------------------------------------------------------------------------- demo model


def test_demo_greedy_matches_transformers_batched_chat():
    import transformers as tf

    from jaxrlhf.models import load_tokenizer
    from jaxrlhf.models.demo import demo_model_path

    path = demo_model_path()
    tok = load_tokenizer(path)
    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    texts = ["Write a short poem about the sea.", "Explain why the sky is blue."]
    chats = [
        tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
        for t in texts
    ]
    enc = tok(chats, padding=True, add_special_tokens=False, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    assert mask[:, 0].min() == 0 and mask[:, -1].min() == 1  # really left-padded, different lengths
    n = 18
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[:, ids.shape[1] :].numpy()
    assert ref.shape == (2, n) and tok.eos_token_id not in ref  # >= 16 real tokens in both rows
    got = generate(
        from_pretrained(path), ids, mask, max_new_tokens=n, eos_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id, temperature=0.0,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got.tokens), ref)
    assert np.asarray(got.completion_mask).min() == 1


# ----------------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("kind", ["qwen3", "mistral", "gpt2"])
def test_sampled_logprobs_match_full_forward(kind, tiny_dirs):
    _, path = tiny_dirs[kind]
    model = from_pretrained(path)
    temperature, n, k = 0.7, 12, 8
    ids, mask, _ = padded_batch("left", seed=2, lengths=(9, 3, 7, 1, 5, 8), total=9)
    eos = [CONFIG_EOS, 5, 17, 40, 66]
    got = generate(
        model, ids, mask, max_new_tokens=n, eos_token_ids=eos, pad_token_id=PAD,
        rng=jax.random.key(3), temperature=temperature, top_k=k,
    )  # fmt: skip
    tokens, cmask, logp = (np.asarray(x) for x in (got.tokens, got.completion_mask, got.logprobs))
    lengths = cmask.sum(1)
    assert lengths.min() < n and lengths.max() == n, lengths  # some rows stop early, some do not
    np.testing.assert_array_equal(cmask, _mask_through_first_eos(tokens, eos))
    assert (tokens[cmask == 0] == PAD).all() and (logp[cmask == 0] == 0).all()

    full_ids = np.concatenate([ids, tokens], 1)
    full_mask = np.concatenate([mask, cmask], 1)
    logits = np.asarray(model(jnp.asarray(full_ids), jnp.asarray(full_mask)))[:, ids.shape[1] - 1 : -1]
    ref = np.asarray(jax.nn.log_softmax(jnp.asarray(logits) / temperature, axis=-1))
    want = np.take_along_axis(ref, tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(logp[cmask == 1], want[cmask == 1], atol=1e-4)
    want_entropy = -(np.exp(ref) * ref).sum(-1)
    entropy = np.asarray(got.entropy)
    np.testing.assert_allclose(entropy[cmask == 1], want_entropy[cmask == 1], atol=1e-4)
    assert (entropy[cmask == 0] == 0).all()
    # log-probs are under the unfiltered distribution, but every sampled token is inside the top-k
    rank = (logits > np.take_along_axis(logits, tokens[..., None], -1)).sum(-1)
    assert (rank[cmask == 1] < k).all()


def test_out_of_vocab_prompt_padding_is_harmless(tiny_dirs):
    # load_tokenizer may add a new `<|pad|>` whose id is len(tokenizer) >= vocab_size and documents that
    # "the id never reaches the model's embedding"; masked prompt padding must not change anything.
    _, path = tiny_dirs["qwen2"]
    model = from_pretrained(path)
    ids, mask, _ = padded_batch("left", seed=1, lengths=(9, 4), total=9)
    kw = dict(max_new_tokens=5, eos_token_ids=[CONFIG_EOS], temperature=0.0)
    ref = generate(model, ids, mask, pad_token_id=PAD, **kw)
    oov = generate(model, np.where(mask == 1, ids, VOCAB), mask, pad_token_id=VOCAB, **kw)
    assert np.isfinite(np.asarray(oov.logprobs)).all()
    np.testing.assert_array_equal(np.asarray(oov.tokens), np.asarray(ref.tokens))


# ----------------------------------------------------------------------------- filter / sample


def _np_top_k(x, k):
    out = np.full_like(x, -np.inf)
    for i, row in enumerate(x):
        keep = np.argsort(-row)[:k]
        out[i, keep] = row[keep]
    return out


def _np_top_p(x, p):
    """Keep the smallest set of most likely tokens whose probability mass reaches p."""
    out = np.full_like(x, -np.inf)
    for i, row in enumerate(x):
        finite = np.isfinite(row)
        probs = np.where(finite, np.exp(row - row[finite].max()), 0.0)
        probs = probs / probs.sum()
        order = np.argsort(-row)
        mass, keep = 0.0, []
        for j in order:
            keep.append(j)
            mass += probs[j]
            if mass >= p:
                break
        out[i, keep] = row[keep]
    return out


def _kept(x):
    return np.asarray(x) > np.finfo(np.float32).min / 2


def test_filter_logits_top_k_and_top_p_match_numpy():
    x = np.random.default_rng(0).normal(size=(16, 50)).astype(np.float32) * 2
    np.testing.assert_array_equal(np.asarray(filter_logits(jnp.asarray(x))), x)  # no-op by default
    for k in (1, 3, 10, 50):
        got = np.asarray(filter_logits(jnp.asarray(x), top_k=k))
        assert (_kept(got).sum(1) == k).all()
        np.testing.assert_array_equal(_kept(got), np.isfinite(_np_top_k(x, k)))
        np.testing.assert_array_equal(got[_kept(got)], x[_kept(got)])  # survivors unchanged
    for p in (0.05, 0.3, 0.5, 0.9, 0.99):
        got = np.asarray(filter_logits(jnp.asarray(x), top_p=p))
        np.testing.assert_array_equal(_kept(got), np.isfinite(_np_top_p(x, p)), err_msg=str(p))
        np.testing.assert_array_equal(got[_kept(got)], x[_kept(got)])
    for k, p in ((10, 0.5), (4, 0.9)):  # top-p acts on the distribution renormalised over the top-k
        got = np.asarray(filter_logits(jnp.asarray(x), top_k=k, top_p=p))
        np.testing.assert_array_equal(_kept(got), np.isfinite(_np_top_p(_np_top_k(x, k), p)))
    # the most likely token always survives, even when it alone exceeds the mass or p is tiny
    peaked = x.copy()
    peaked[:, 7] = 30.0
    for p in (1e-6, 0.5):
        got = np.asarray(filter_logits(jnp.asarray(peaked), top_p=p))
        assert (_kept(got).sum(1) == 1).all() and _kept(got)[:, 7].all()
    got = np.asarray(filter_logits(jnp.asarray(x), top_p=1e-6))
    np.testing.assert_array_equal(np.argmax(_kept(got), 1), np.argmax(x, 1))
    assert (_kept(got).sum(1) == 1).all()


def test_sample_tokens_deterministic_and_greedy():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 40)).astype(np.float32))
    kw = dict(temperature=0.8, top_k=0, top_p=0.95)
    a, la, ea = sample_tokens(x, jax.random.key(5), **kw)
    b, lb, _ = sample_tokens(x, jax.random.key(5), **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    c, _, _ = sample_tokens(jnp.tile(x, (16, 1)), jax.random.key(6), **kw)
    d, _, _ = sample_tokens(jnp.tile(x, (16, 1)), jax.random.key(7), **kw)
    assert (np.asarray(c) != np.asarray(d)).any()
    # log-prob and entropy of the unfiltered softmax(x / T), in float64 numpy
    z = np.asarray(x, np.float64) / 0.8
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    np.testing.assert_allclose(np.asarray(la), logp[np.arange(8), np.asarray(a)], atol=1e-6)
    np.testing.assert_allclose(np.asarray(ea), -(np.exp(logp) * logp).sum(1), atol=1e-5)
    g, lg, _ = sample_tokens(x, jax.random.key(0), temperature=0.0, top_k=0, top_p=1.0)
    np.testing.assert_array_equal(np.asarray(g), np.argmax(np.asarray(x), 1))
    assert np.asarray(g).dtype == np.int32
    np.testing.assert_allclose(np.asarray(lg), np.asarray(jax.nn.log_softmax(x)).max(1), atol=1e-6)


def test_generate_with_fixed_key_is_deterministic_and_needs_rng(tiny_dirs):
    model = from_pretrained(tiny_dirs["llama"][1])
    ids, mask, _ = padded_batch("left", seed=4, lengths=(6, 3), total=6)
    kw = dict(max_new_tokens=6, eos_token_ids=[CONFIG_EOS], pad_token_id=PAD, temperature=1.0, top_p=0.9)
    a = generate(model, ids, mask, rng=jax.random.key(11), **kw)
    b = generate(model, ids, mask, rng=jax.random.key(11), **kw)
    c = generate(model, ids, mask, rng=jax.random.key(12), **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    with pytest.raises(ValueError):
        generate(model, ids, mask, **kw)


def _chi2(counts, probs):
    """Pearson statistic over bins with expected count >= 5 (the rest pooled) and its dof."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return stat, int(keep.sum()) - 1


def _assert_matches(counts, probs):
    stat, dof = _chi2(counts, probs)
    assert stat < dof + 5 * np.sqrt(2 * dof), (stat, dof)  # ~5 sigma: loose, and the seed is fixed


def test_sample_distribution_matches_softmax():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(1, 12)).astype(np.float32) * 1.5)
    rows, t = 20000, 0.7
    x = jnp.tile(logits, (rows, 1))
    tokens, _, _ = sample_tokens(x, jax.random.key(0), temperature=t, top_k=0, top_p=1.0)
    counts = np.bincount(np.asarray(tokens), minlength=12)
    _assert_matches(counts, np.asarray(jax.nn.softmax(logits[0] / t)))
    # with top-k: zero outside the k most likely, renormalised softmax inside
    tokens, _, _ = sample_tokens(x, jax.random.key(1), temperature=t, top_k=4, top_p=1.0)
    counts = np.bincount(np.asarray(tokens), minlength=12)
    top = np.argsort(-np.asarray(logits[0]))[:4]
    probs = np.zeros(12)
    probs[top] = np.asarray(jax.nn.softmax(logits[0, top] / t))
    assert counts[probs == 0].sum() == 0
    _assert_matches(counts[top], probs[top])
    # with top-p: zero outside the nucleus of softmax(logits / T), renormalised softmax inside
    tokens, _, _ = sample_tokens(x, jax.random.key(2), temperature=t, top_k=0, top_p=0.8)
    counts = np.bincount(np.asarray(tokens), minlength=12)
    nucleus = np.isfinite(_np_top_p(np.asarray(logits) / t, 0.8))[0]
    assert 1 < nucleus.sum() < 12
    probs = np.asarray(jax.nn.softmax(jnp.where(jnp.asarray(nucleus), logits[0] / t, -jnp.inf)))
    assert counts[~nucleus].sum() == 0
    _assert_matches(counts[nucleus], probs[nucleus])


def test_generate_first_token_distribution_matches_model(tiny_dirs):
    model = from_pretrained(tiny_dirs["qwen2"][1])
    ids, mask, _ = padded_batch("left", seed=5, lengths=(5,), total=7)
    rows, t = 4000, 1.3
    got = generate(
        model, np.repeat(ids, rows, 0), np.repeat(mask, rows, 0), max_new_tokens=1,
        eos_token_ids=[CONFIG_EOS], pad_token_id=PAD, rng=jax.random.key(0), temperature=t,
    )  # fmt: skip
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))[0, -1]
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits) / t))
    counts = np.bincount(np.asarray(got.tokens)[:, 0], minlength=VOCAB)
    assert (counts > 0).sum() > 20  # really sampled, not one token repeated
    _assert_matches(counts, probs)


# ----------------------------------------------------------------------------------- sharded

SHARDED_SCRIPT = textwrap.dedent(
    """
    import tempfile
    import jax, numpy as np
    from helpers.tiny_hf import make_hf_model, padded_batch
    from jaxrlhf.generation import generate
    from jaxrlhf.models import from_pretrained
    from jaxrlhf.parallel import make_mesh
    assert jax.device_count() == 8
    ids, mask, _ = padded_batch("left", seed=3, lengths=(9, 2, 6, 4), total=9)
    for kind in ("smollm2", "qwen3"):
        path = tempfile.mkdtemp()
        make_hf_model(kind).save_pretrained(path)
        kw = dict(max_new_tokens=10, eos_token_ids=[1], pad_token_id=0, temperature=0.0)
        ref = generate(from_pretrained(path), ids, mask, **kw)
        model = from_pretrained(path, mesh=make_mesh(2, 2, 2))
        q = model.layers[0].self_attn.q_proj.kernel[...]
        assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.size < q.size
        got = generate(model, ids, mask, **kw)
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens), err_msg=kind)
        np.testing.assert_array_equal(np.asarray(got.completion_mask), np.asarray(ref.completion_mask))
        np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(ref.logprobs), atol=1e-5)
    print("OK")
    """
)


def test_sharded_model_generates_same_greedy_tokens():
    run_with_cpu_devices(SHARDED_SCRIPT)
