"""The splash attention kernel (Pallas interpret mode on CPU) through the trainers: DPO on packed
`[prompt][chosen][rejected]` rows and a reward model give the XLA path's losses step by step."""

from __future__ import annotations

import numpy as np
import pytest
from test_scan_trainers import _files, _losses
from test_trainer import data_files, tiny_dir  # noqa: F401  (fixtures)


@pytest.mark.parametrize("kind", ["dpo", "reward"])
def test_splash_trainer_matches_xla(kind, tiny_dir, data_files, tmp_path):  # noqa: F811
    files = _files(kind, data_files, tmp_path)
    a, _ = _losses(kind, tiny_dir, files, str(tmp_path / "xla"), **{"model.attention": "xla"})
    b, _ = _losses(kind, tiny_dir, files, str(tmp_path / "splash"), **{"model.attention": "splash"})
    assert len(a) == 3 and np.abs(a - a[0]).max() > 1e-3  # the losses move
    np.testing.assert_allclose(b, a, atol=2e-5)
