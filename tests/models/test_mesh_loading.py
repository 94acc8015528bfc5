"""Loading straight onto a mesh of 8 simulated CPU devices gives the single-device logits."""

from __future__ import annotations

import textwrap

from helpers.tiny_hf import run_with_cpu_devices

SCRIPT = textwrap.dedent(
    """
    import tempfile
    import jax, jax.numpy as jnp, numpy as np
    from helpers.tiny_hf import make_hf_model, padded_batch
    from jaxrlhf.models import from_pretrained
    from jaxrlhf.parallel import make_mesh
    assert jax.device_count() == 8
    for kind in ("smollm2", "gpt2", "qwen3"):
        path = tempfile.mkdtemp()
        make_hf_model(kind).save_pretrained(path)
        ref_model = from_pretrained(path)
        ids, mask, pos = padded_batch("left", seed=0, lengths=(11, 7, 3, 12), total=12)
        ref = np.asarray(ref_model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)))
        for shape in ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)):
            mesh = make_mesh(*shape)
            model = from_pretrained(path, mesh=mesh)
            q = model.layers[0].self_attn.q_proj.kernel[...]
            assert len(q.sharding.device_set) == 8
            if shape[1] * shape[2] > 1:  # parameters really are split, not replicated
                assert q.addressable_shards[0].data.size < q.size, (kind, shape)
            got = np.asarray(jax.jit(lambda m, i, a, p: m(i, a, p))(
                model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)))
            err = np.abs(got - ref)[mask.astype(bool)].max()
            assert err <= 1e-5, (kind, shape, err)
    print("OK")
    """
)


def test_from_pretrained_on_mesh_matches_single_device():
    run_with_cpu_devices(SCRIPT)
