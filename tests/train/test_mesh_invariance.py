"""DPO and reward losses and gradients on 8 simulated CPU devices equal one device's (float32, 1e-5)."""

from __future__ import annotations

import textwrap

from helpers.tiny_hf import run_with_cpu_devices

SCRIPT = textwrap.dedent(
    """
    import tempfile
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from helpers.pairs import random_pairs
    from helpers.tiny_hf import make_hf_model
    from jaxrlhf.data import collate_pairs
    from jaxrlhf.models import from_pretrained
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.train.objectives import DPOObjective, RewardObjective, add_targets
    from jaxrlhf.train.step import batch_sharding, create_state, make_optimizer, make_schedule
    from jaxrlhf.train.step import make_train_step, state_shardings
    assert jax.device_count() == 8
    path = tempfile.mkdtemp()
    make_hf_model("smollm2").save_pretrained(path)
    batch_np = add_targets(collate_pairs(random_pairs(16, seed=5), pad_id=0))

    def run(mesh, head, objective):
        model = from_pretrained(path, mesh=mesh, head=head, init_score_head=True)
        graphdef, params = nnx.split(model, nnx.Param)
        batch = {k: jax.device_put(v, batch_sharding(mesh, v.ndim, micro_axis=False))
                  for k, v in batch_np.items()}
        # the reference is a perturbed copy (same values on every mesh), so the DPO loss is not
        # trivially ln 2
        def perturb(tree):
            leaves, treedef = jax.tree.flatten(tree)
            noise = lambda i, x: 0.01 * jax.random.normal(jax.random.key(i), x.shape, x.dtype)
            return jax.tree.unflatten(treedef, [x + noise(i, x) for i, x in enumerate(leaves)])
        ref_params = perturb(params)
        def loss(p, b):
            num, den, _ = objective(nnx.merge(graphdef, p), b, nnx.merge(graphdef, ref_params))
            return num / den
        value, grads = jax.jit(jax.value_and_grad(loss))(params, batch)
        flat = [np.asarray(g) for g in jax.tree.leaves(grads)]
        # and the full compiled train step (accumulation over 2 micro-batches) on this mesh, twice
        schedule = make_schedule(1e-3, 10, kind="constant")
        opt = make_optimizer(schedule)
        graphdef, state = create_state(model, opt, mesh, with_reference=head == "lm")
        if head == "lm":
            state = state.replace(ref_params=perturb(state.ref_params))
        step = make_train_step(graphdef, objective, opt, schedule, state_shardings(state), mesh)
        micro = {k: v.reshape(2, 8, *v.shape[1:]) for k, v in batch_np.items()}
        micro = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in micro.items()}
        state, metrics = step(state, micro)
        state, metrics2 = step(state, micro)
        return (float(value), flat, float(metrics["loss"]), float(metrics["grad_norm"]),
                float(metrics2["loss"]))

    for head, objective in (("lm", DPOObjective(beta=0.5)), ("score", RewardObjective())):
        one = run(make_mesh(devices=jax.devices()[:1]), head, objective)
        if head == "lm":  # otherwise every mesh would trivially give ln 2
            assert abs(one[0] - np.log(2)) > 1e-3 and abs(one[2] - np.log(2)) > 1e-3, one[::2]
        assert abs(one[4] - one[2]) > 1e-6, (head, one[2], one[4])  # the first step changed the loss
        print(head, "one device: loss", one[0], "step losses", one[2], one[4])
        for shape in ((8, 1, 1), (2, 4, 1), (2, 2, 2)):
            got = run(make_mesh(*shape), head, objective)
            assert abs(got[0] - one[0]) <= 1e-5, (head, shape, got[0], one[0])
            err = max(float(np.abs(a - b).max()) for a, b in zip(got[1], one[1]))
            assert err <= 1e-5, (head, shape, err)
            assert abs(got[2] - one[2]) <= 1e-5 and abs(got[3] - one[3]) <= 1e-4, (head, shape)
            assert abs(got[4] - one[4]) <= 1e-5, (head, shape, got[4], one[4])
            print(head, shape, "loss", got[0], "max grad diff", err)
    print("OK")
    """
)


def test_mesh_invariance_dpo_and_reward():
    run_with_cpu_devices(SCRIPT, timeout=900)


LORA_SCRIPT = textwrap.dedent(
    """
    import tempfile
    import jax, numpy as np
    from helpers.pairs import random_pairs
    from helpers.tiny_hf import make_hf_model
    from jaxrlhf.data import collate_pairs
    from jaxrlhf.models import from_pretrained
    from jaxrlhf.models.lora import LoRASpec, trainable
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.train.objectives import DPOObjective, add_targets
    from jaxrlhf.train.step import batch_sharding, create_state, make_optimizer, make_schedule
    from jaxrlhf.train.step import make_train_step, state_shardings
    path = tempfile.mkdtemp()
    make_hf_model("smollm2").save_pretrained(path)
    batch_np = add_targets(collate_pairs(random_pairs(16, seed=5), pad_id=0))
    spec = LoRASpec.build(4, 16.0)

    def run(mesh, scan):
        model = from_pretrained(path, mesh=mesh, lora=spec, scan_layers=scan)
        schedule = make_schedule(3e-2, 10, kind="constant")
        opt = make_optimizer(schedule)
        graphdef, state = create_state(model, opt, mesh, with_reference=True, trainable=trainable("lm"))
        step = make_train_step(graphdef, DPOObjective(beta=0.5), opt, schedule, state_shardings(state), mesh)
        micro = {k: v.reshape(2, 8, *v.shape[1:]) for k, v in batch_np.items()}
        micro = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in micro.items()}
        losses, norms = [], []
        for _ in range(3):  # the first step moves B off zero; the next ones see the adapters
            state, metrics = step(state, micro)
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
        return losses, norms

    for scan in (False, True):
        one = run(make_mesh(devices=jax.devices()[:1]), scan)
        assert abs(one[0][2] - one[0][0]) > 1e-4, one[0]
        for shape in ((8, 1, 1), (2, 2, 2)):
            got = run(make_mesh(*shape), scan)
            assert np.abs(np.array(got[0]) - np.array(one[0])).max() <= 1e-5, (scan, shape, got[0], one[0])
            # (parameters are not compared: Adam turns reduction-order noise in near-zero
            # gradients into lr-sized steps; the losses after them are what must agree, and the
            # gradient norms: tightly at the first step, within that noise after two Adam steps)
            np.testing.assert_allclose(got[1][0], one[1][0], rtol=1e-4, err_msg=str((scan, shape)))
            np.testing.assert_allclose(got[1][1:], one[1][1:], rtol=1e-3, err_msg=str((scan, shape)))
    print("OK")
    """
)


def test_mesh_invariance_lora_dpo():
    """LoRA DPO (base reference, adapters trained) on 8 devices equals one device, unrolled and scanned."""
    run_with_cpu_devices(LORA_SCRIPT, timeout=900)
