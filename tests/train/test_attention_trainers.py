"""The splash attention kernel (Pallas interpret mode on CPU) through the trainers: DPO on packed
`[prompt][chosen][rejected]` rows and a reward model give the XLA path's losses step by step."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.runs import files_for, train_losses


@pytest.mark.parametrize("kind", ["dpo", "reward"])
def test_splash_trainer_matches_xla(kind, tiny_dir, data_files, tmp_path):
    files = files_for(kind, data_files, tmp_path)
    a, _ = train_losses(kind, tiny_dir, files, str(tmp_path / "xla"), **{"model.attention": "xla"})
    b, _ = train_losses(kind, tiny_dir, files, str(tmp_path / "splash"), **{"model.attention": "splash"})
    assert len(a) == 3 and np.abs(a - a[0]).max() > 1e-3  # the losses move
    np.testing.assert_allclose(b, a, atol=2e-5)
    for run, backend in (("xla", "xla"), ("splash", "splash")):  # the option reached the model
        with open(tmp_path / run / "summary.json") as f:
            assert json.load(f)["model"]["attention"] == backend, run
