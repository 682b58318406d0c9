import numpy as np
import pytest
import torch

from vitadapt.data.synthetic import SyntheticShapes
from vitadapt.eval import (FeatureCache, autocast, autocast_dtype, eval_device, extract_features, knn_eval, knn_predict,
                           knn_topk, linear_probe, loader_options, model_fingerprint, pool_tokens)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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


def _dense_knn(Xtr, ytr, Xq, k, T=0.07, C=None):
    """The kNN of before the blocks: the whole query x train matrix at once."""
    tr = torch.nn.functional.normalize(torch.as_tensor(Xtr, dtype=torch.float32), dim=1)
    q = torch.nn.functional.normalize(torch.as_tensor(Xq, dtype=torch.float32), dim=1)
    ytr_t = torch.as_tensor(ytr, dtype=torch.long)
    sims, idx = (q @ tr.T).topk(min(k, len(tr)), dim=1)
    votes = torch.zeros(len(q), C or int(ytr_t.max()) + 1).scatter_add_(1, ytr_t[idx], (sims / T).exp())
    return votes.argmax(1).numpy()


def test_knn_in_blocks_predicts_as_the_dense_matrix():
    for seed in range(40):
        rng = np.random.default_rng(seed)
        ntr, nq, d, C, k = (int(rng.integers(*r)) for r in ((1, 200), (1, 60), (2, 24), (2, 7), (1, 25)))
        Xtr, ytr, Xq = rng.normal(size=(ntr, d)), rng.integers(0, C, ntr), rng.normal(size=(nq, d))
        want = _dense_knn(Xtr, ytr, Xq, k, C=C)
        for chunk_q, chunk_train in ((1, 1), (3, 7), (16, 64), (4096, 4096)):
            got = knn_predict(Xtr, ytr, Xq, k, num_classes=C, chunk_q=chunk_q, chunk_train=chunk_train)
            np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}, chunks {chunk_q} x {chunk_train}")


def test_knn_in_blocks_breaks_ties_as_before():
    """Training rows repeated three times, with different classes, tie exactly in similarity (unit basis vectors:
    every similarity is one product) and in votes: the lowest class wins (argmax), in blocks as in one matrix. Where
    one block holds everything the neighbours are exactly ``topk``'s, ties at the k-th place included; across blocks
    such a tie (which ``torch.topk`` breaks in no documented order) may pick another of the tied rows."""
    Xtr = np.concatenate([np.eye(5)] * 3)
    ytr = np.array([2, 1, 0, 2, 1] + [1, 2, 0, 0, 2] + [0, 0, 1, 1, 2])
    Xq = np.abs(np.random.default_rng(1).normal(size=(8, 5)))
    for k in (1, 2, 3, 4, 6, 9, 15):
        want = _dense_knn(Xtr, ytr, Xq, k, C=3)
        np.testing.assert_array_equal(knn_predict(Xtr, ytr, Xq, k, num_classes=3), want)
        if k % 3 == 0:                                        # no tie straddles the k-th place
            for chunks in ((1, 1), (2, 5), (5, 4), (3, 2)):
                np.testing.assert_array_equal(knn_predict(Xtr, ytr, Xq, k, num_classes=3, chunk_q=chunks[0],
                                                          chunk_train=chunks[1]), want, err_msg=f"k={k} {chunks}")
    nearest = Xq.argmax(1)                                    # k=3: the three copies of the nearest basis vector
    votes = [sorted(ytr[[j, 5 + j, 10 + j]].tolist()) for j in nearest]
    expected = [min(set(v), key=lambda c: (-v.count(c), c)) for v in votes]   # most votes, then lowest class
    assert knn_predict(Xtr, ytr, Xq, 3, num_classes=3, chunk_q=2, chunk_train=4).tolist() == expected
    s, i = knn_topk(Xtr, Xq, 4)
    ref = (torch.nn.functional.normalize(torch.as_tensor(Xq, dtype=torch.float32), dim=1)
           @ torch.nn.functional.normalize(torch.as_tensor(Xtr, dtype=torch.float32), dim=1).T).topk(4, dim=1)
    assert torch.equal(s, ref.values) and torch.equal(i, ref.indices)


def test_knn_memory_is_one_block_whatever_the_sizes(monkeypatch):
    import vitadapt.eval as ev
    shapes, real = [], ev._similarity_block
    monkeypatch.setattr(ev, "_similarity_block", lambda q, tr: shapes.append((len(q), len(tr))) or real(q, tr))
    rng = np.random.default_rng(0)
    Xtr, ytr, Xq = rng.normal(size=(1000, 16)), rng.integers(0, 5, 1000), rng.normal(size=(300, 16))
    got = knn_predict(Xtr, ytr, Xq, 20, chunk_q=64, chunk_train=100)
    assert max(a * b for a, b in shapes) <= 64 * 100 and sum(b for a, b in shapes) == 1000 * 5   # 5 query blocks
    np.testing.assert_array_equal(got, _dense_knn(Xtr, ytr, Xq, 20))
    with pytest.raises(ValueError, match="chunk_train=0 is not valid"):
        knn_predict(Xtr, ytr, Xq, 20, chunk_train=0)


def test_eval_device_and_autocast(monkeypatch):
    assert eval_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    import vitadapt.eval as ev
    monkeypatch.setattr(ev, "_mps_available", lambda: False)
    assert eval_device("auto") == torch.device("cpu")
    for acc in ("cuda", "gpu", "mps"):
        with pytest.raises(ValueError, match=f"accelerator='{acc}' but no"):
            eval_device(acc)
    with pytest.raises(ValueError, match="accelerator='tpu' is not valid"):
        eval_device("tpu")
    for p in ("32-true", "bf16-mixed", "16-mixed", "bf16-true"):          # the CPU stays fp32
        assert autocast_dtype("cpu", p) is None
        assert not torch.is_autocast_cpu_enabled() and isinstance(autocast("cpu", p), type(autocast("cpu")))
    assert autocast_dtype("cuda", "bf16-mixed") is torch.bfloat16 and autocast_dtype("cuda", "16-mixed") is torch.float16
    assert autocast_dtype("cuda", "32-true") is None
    with pytest.raises(ValueError, match="precision='fp8' is not valid"):
        autocast("cuda", "fp8")


def test_loader_options_ignore_what_does_not_apply():
    assert loader_options(0, True, True, "cpu") == {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    assert loader_options(4, True, True, "cuda") == {"num_workers": 4, "pin_memory": True, "persistent_workers": True}
    assert loader_options(2, False, False, "cuda")["pin_memory"] is False
    with pytest.raises(ValueError, match="num_workers=-1 is not valid"):
        loader_options(-1)
    from vitadapt.config import ExperimentConfig
    with pytest.raises(ValueError, match="pin_memory='yes' must be True or False"):
        ExperimentConfig(pin_memory="yes")


def test_extract_features_on_cpu_is_fp32_whatever_the_precision(tiny_vit):
    m = tiny_vit()
    ds = SyntheticShapes(3, n_classes=4)
    X32, y = extract_features(m, ds, 32, 8)
    Xbf, _ = extract_features(m, ds, 32, 8, precision="bf16-mixed")
    assert X32.dtype == np.float32 and np.array_equal(X32, Xbf) and len(y) == len(ds)
    with pytest.raises(ValueError, match="precision='half' is not valid"):
        extract_features(m, ds, 32, precision="half")


@cuda
def test_evaluation_on_cuda_matches_the_cpu(tiny_vit):
    m = tiny_vit()
    ds = SyntheticShapes(3, n_classes=4)
    X, _ = extract_features(m, ds, 32, 8)
    Xg, _ = extract_features(m, ds, 32, 8, device="cuda", precision="bf16-mixed", pin_memory=True)
    assert Xg.dtype == np.float32 and next(m.parameters()).device.type == "cpu"      # the model went back
    np.testing.assert_allclose(Xg, X, atol=0.1, rtol=0.05)
    rng = np.random.default_rng(0)
    Xtr, ytr, Xq = rng.normal(size=(2000, 32)), rng.integers(0, 5, 2000), rng.normal(size=(500, 32))
    np.testing.assert_array_equal(knn_predict(Xtr, ytr, Xq, 20, device="cuda", chunk_q=128, chunk_train=300),
                                  _dense_knn(Xtr, ytr, Xq, 20))
    tr, va, te = _blobs(60, 0), _blobs(30, 1), _blobs(30, 2)
    assert linear_probe(*tr, *va, *te, Cs=(0.001, 1.0), device="cuda")["test_acc"] == 1.0
