import numpy as np
import pytest
import torch

from vitadapt.data.synthetic import SyntheticShapes
from vitadapt.eval import FeatureCache, knn_eval, knn_predict, linear_probe, model_fingerprint, pool_tokens


def _blobs(n, seed, d=8, C=3, spread=0.3):
    rng = np.random.default_rng(seed)
    centers = np.eye(C, d) * 3
    y = np.arange(n) % C
    return centers[y] + rng.normal(0, spread, (n, d)), y


def test_linear_probe_separable_and_selected_on_val():
    tr, va, te = _blobs(60, 0), _blobs(30, 1), _blobs(30, 2)
    r = linear_probe(*tr, *va, *te, Cs=(0.001, 1.0))
    assert r["test_acc"] == 1.0 and r["C"] in (0.001, 1.0)
    assert set(r["val_curve"]) == {"0.001", "1.0"}


def test_linear_probe_never_looks_at_test():
    tr, va = _blobs(60, 0), _blobs(30, 1)
    Xte, yte = _blobs(30, 2)
    a = linear_probe(*tr, *va, Xte, yte, Cs=(0.01, 1.0))
    b = linear_probe(*tr, *va, Xte, (yte + 1) % 3, Cs=(0.01, 1.0))   # scrambled test labels
    assert a["C"] == b["C"] and a["val_acc"] == b["val_acc"] and b["test_acc"] == 0.0


def test_knn_weighted_vote():
    Xtr = np.array([[1.0, 0], [0.9, 0.1], [0, 1.0]])
    ytr = np.array([0, 0, 1])
    assert knn_predict(Xtr, ytr, np.array([[0.1, 1.0], [1.0, 0.05]]), k=1).tolist() == [1, 0]
    r = knn_eval(*_blobs(60, 0), *_blobs(30, 1), *_blobs(30, 2), ks=(1, 5))
    assert r["test_acc"] == 1.0 and r["k"] in (1, 5)


def test_pool_tokens(tiny_vit):
    m = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert pool_tokens(m, x, "cls").shape == (2, 48)
        assert pool_tokens(m, x, "cls+avg").shape == (2, 96)
    with pytest.raises(ValueError, match="feature='max' is not valid"):
        pool_tokens(m, x, "max")


def test_feature_cache_computes_only_missing_items_and_separates_models(tiny_vit, tmp_path, monkeypatch):
    import vitadapt.eval as ev
    calls = []
    real = ev.extract_features
    monkeypatch.setattr(ev, "extract_features", lambda m, ds, *a, **k: calls.append(len(ds)) or real(m, ds, *a, **k))
    m = tiny_vit()
    ds = SyntheticShapes(3, n_classes=4)
    from vitadapt.data import Subset
    key = {"fingerprint": model_fingerprint(m)}
    X1, y1 = FeatureCache(key, tmp_path).features(m, Subset(ds, [0, 1, 2, 3]), 32)
    X2, y2 = FeatureCache(key, tmp_path).features(m, Subset(ds, [2, 3, 4, 5]), 32)   # a new process would reload
    assert calls == [4, 2]
    np.testing.assert_allclose(X1[2:], X2[:2])
    m2 = tiny_vit()
    with torch.no_grad():
        m2.cls_token.add_(1.0)
    assert model_fingerprint(m2) != model_fingerprint(m)
