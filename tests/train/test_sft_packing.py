"""SFT packing (`sft.packing`): best-fit decreasing against a plain re-implementation, and exactness --
a packed row's per-example log-probs, loss and gradient equal the unpacked ones on the XLA and the
splash (Pallas, interpreted on CPU) attention backends."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf.data.sft import PackedRow, SFTTokens, collate_sft, pack_sequences
from jaxrlhf.train.objectives import SFTObjective, sft_token_logps


def plain_best_fit_decreasing(lengths, capacity):
    """Best fit decreasing, written from its definition: longest first (ties: lower index), each into
    the open bin with the least room that still fits it (ties: the earlier bin), else a new bin."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
            bins[b].append(i)
            room[b] -= lengths[i]
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, size=200).tolist()
    bins = pack_sequences(lengths, 64)
    assert bins == plain_best_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= 2 * -(-sum(lengths) // 64)  # any-fit packs at least half full
    with pytest.raises(ValueError, match="more than 64"):
        pack_sequences([10, 65], 64)


def sequences(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        mask = (rng.random(n) < 0.7).astype(np.int32)
        mask[0] = 0
        out.append(SFTTokens(rng.integers(3, vocab, n).astype(np.int32), mask))
    return out


@pytest.mark.parametrize("attention", ["xla", "splash"])
def test_packed_rows_equal_unpacked(tiny_dir, attention):
    from jaxrlhf.models import from_pretrained

    model = from_pretrained(tiny_dir, attention=attention)
    seqs = sequences(model.config.vocab_size, [9, 17, 5, 30, 12, 3, 20])
    bins = pack_sequences([s.length for s in seqs], 40)
    assert any(len(b) > 1 for b in bins)
    packed = collate_sft([PackedRow(tuple(seqs[i] for i in b)) for b in bins], pad_id=0, buckets=[48])
    single = collate_sft([PackedRow((s,)) for s in seqs], pad_id=0, buckets=[48])
    lp_packed, w_packed = (np.asarray(x) for x in sft_token_logps(model, packed))
    lp_single, w_single = (np.asarray(x) for x in sft_token_logps(model, single))
    for row, b in enumerate(bins):  # each example's targets, found where collate put them
        at = 0
        for i in b:
            n = seqs[i].length
            got = lp_packed[row, at : at + n - 1]
            np.testing.assert_allclose(got, lp_single[i, : n - 1], rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(w_packed[row, at : at + n - 1], w_single[i, : n - 1])
            at += n
    # the boundary target (an example's first token, predicted from the previous example) is never counted
    assert w_packed.sum() == w_single.sum() == sum(s.loss_mask[1:].sum() for s in seqs)

    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, batch):
        nll_sum, tokens, _ = SFTObjective()(nnx.merge(graphdef, params), batch)
        return nll_sum / tokens

    jit_grad = jax.jit(jax.value_and_grad(loss))
    (lv_p, g_p), (lv_s, g_s) = jit_grad(params, packed), jit_grad(params, single)
    np.testing.assert_allclose(float(lv_p), float(lv_s), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_s), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-6)


def test_segment_mask_and_positions():
    seqs = sequences(50, [3, 2])
    batch = collate_sft([PackedRow(tuple(seqs))], pad_id=0, buckets=[8])
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0, 0, 0]]
    assert batch["positions"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 0]]
    from jaxrlhf.models.decoder import make_attention_mask
    from jaxrlhf.train.objectives import segment_attention_mask

    mask = np.asarray(make_attention_mask(segment_attention_mask(jnp.asarray(batch["segment_ids"])),
                                          jnp.asarray(batch["positions"])))[0]  # fmt: skip
    want = np.zeros((8, 8), bool)
    want[:3, :3] = np.tril(np.ones((3, 3), bool))
    want[3:5, 3:5] = np.tril(np.ones((2, 2), bool))
    np.testing.assert_array_equal(mask, want)
