"""Re-running an experiment with the same seed on CPU gives identical metrics."""

import pandas as pd

from vitadapt.config import build_config
from vitadapt.experiments.baselines import BaselineConfig, run_baselines


def test_same_seed_same_metrics(tmp_path, monkeypatch):
    import vitadapt.eval as ev
    monkeypatch.setattr(ev, "CACHE", tmp_path)      # no feature cache shared between the two runs
    cfg = build_config(BaselineConfig, "smoke", "01_baselines", seeds=[3], compare_random=False,
                       n_train_per_class=6, n_val_per_class=3, n_test_per_class=4)
    a = run_baselines(cfg)
    monkeypatch.setattr(ev, "CACHE", tmp_path / "second")
    b = run_baselines(cfg)
    pd.testing.assert_frame_equal(a, b)
    assert set(a["eval"]) == {"linear probe", "kNN"}
