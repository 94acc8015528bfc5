"""Adam's moments live where their parameters live: on a (data=2, fsdp=4) mesh of 8 CPU devices,
every moment of `create_state` (plain, with frozen layers and a score-head learning rate, unrolled
and scanned) and of `PPOEngine` has its parameter's sharding, and device 0 holds a quarter of the
FSDP-split moments, not all of them."""

from __future__ import annotations

from helpers.tiny_hf import make_hf_model, run_with_cpu_devices

SCRIPT = """
import jax, numpy as np
from jaxrlhf.models import from_pretrained
from jaxrlhf.parallel import make_mesh
from jaxrlhf.train.config import PPOConfig
from jaxrlhf.train.ppo import PPOEngine
from jaxrlhf.train.step import create_state, frozen_params, make_optimizer, make_schedule

path = {path!r}
mesh = make_mesh(data=2, fsdp=4)
key = jax.tree_util.keystr

def check(params, opt_state, every=True):
    by_path = {{key(k): x for k, x in jax.tree_util.tree_leaves_with_path(params)}}
    matched = split = 0
    for k, m in jax.tree_util.tree_leaves_with_path(opt_state):
        owner = [p for p in by_path if key(k).endswith(p) and by_path[p].shape == m.shape]
        if not owner:
            assert m.ndim == 0, key(k)  # counts: replicated scalars
            continue
        p = by_path[max(owner, key=len)]
        assert m.sharding.is_equivalent_to(p.sharding, m.ndim), (key(k), m.sharding, p.sharding)
        matched += 1
        if "fsdp" in str(m.sharding.spec):
            split += 1
            local = m.addressable_shards[0].data.size
            assert local * 4 == m.size, (key(k), local, m.size)
    # Adam's mu and nu for every parameter (frozen ones have none), and the FSDP-split ones exist
    assert (matched == 2 * len(by_path) if every else matched > 0) and split >= 4, (matched, split)

for scan in (False, True):
    for frozen in (None, frozen_params(1, scan_layers=scan)):
        opt = make_optimizer(make_schedule(1e-3, 10), frozen=frozen, head_lr_scale=3.0)
        model = from_pretrained(path, mesh=mesh, scan_layers=scan)
        _, state = create_state(model, opt, mesh, with_reference=True)
        check(state.params, state.opt_state, every=frozen is None)

policy = from_pretrained(path, mesh=mesh)
critic = from_pretrained(path, head="score", init_score_head=True, mesh=mesh)
opt = make_optimizer(make_schedule(1e-3, 10))
engine = PPOEngine(policy, critic, None, PPOConfig(response_length=4), opt, mesh, eos_token_ids=[1],
                   pad_token_id=0)
check(engine.state.params, engine.state.opt_state)
print("OK")
"""


def test_adam_moments_are_sharded_like_their_parameters(tmp_path):
    path = str(tmp_path / "m")
    make_hf_model("llama").save_pretrained(path)
    run_with_cpu_devices(SCRIPT.format(path=path))
