import csv

import numpy as np
import pytest
from PIL import Image

from vitadapt.data import (DATASETS, DataMissingError, find_root, get_dataset, per_class_subset, stratified_split,
                           subsample)
from vitadapt.data.synthetic import CLASSES, SyntheticShapes, render


# ---- synthetic ----------------------------------------------------------------------------------

def test_synthetic_is_deterministic_by_seed():
    a = SyntheticShapes(3, size=32, style="target", split="train", seed=5)
    b = SyntheticShapes(3, size=32, style="target", split="train", seed=5)
    c = SyntheticShapes(3, size=32, style="target", split="train", seed=6)
    for i in range(len(a)):
        assert np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0]))
        assert a[i][1] == b[i][1]
    assert any(not np.array_equal(np.asarray(a[i][0]), np.asarray(c[i][0])) for i in range(len(a)))


def test_synthetic_splits_and_styles_differ():
    tr = SyntheticShapes(2, split="train")
    te = SyntheticShapes(2, split="test")
    src = SyntheticShapes(2, style="source")
    assert not np.array_equal(np.asarray(tr[0][0]), np.asarray(te[0][0]))
    # the target style is textured: far more local variation than the flat source style
    grad = lambda ds: np.mean([np.abs(np.diff(np.asarray(ds[i][0], float), axis=0)).mean() for i in range(len(ds))])
    assert grad(tr) > 2 * grad(src)


def test_synthetic_is_class_balanced_and_labels_match_classes():
    ds = SyntheticShapes(4, n_classes=5)
    assert len(ds) == 20 and np.bincount(ds.targets).tolist() == [4] * 5
    assert ds.classes == list(CLASSES[:5])
    img, y = ds[7]
    assert isinstance(img, Image.Image) and img.size == (32, 32) and y == ds.targets[7]


def test_synthetic_bad_values_name_valid_ones():
    with pytest.raises(ValueError, match="style='sat'.*source, target"):
        SyntheticShapes(2, style="sat")
    with pytest.raises(ValueError, match="split='dev'.*train, val, test"):
        SyntheticShapes(2, split="dev")
    with pytest.raises(ValueError, match="class index 99"):
        render(99, 16, "source", np.random.default_rng(0))


# ---- splits -------------------------------------------------------------------------------------

def test_stratified_split_is_deterministic_disjoint_and_stratified():
    targets = [c for c in range(6) for _ in range(50 + 10 * c)]
    a = stratified_split(targets, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=3)
    b = stratified_split(targets, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=3)
    c = stratified_split(targets, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=4)
    assert a == b and a != c
    all_idx = a["train"] + a["val"] + a["test"]
    assert sorted(all_idx) == list(range(len(targets)))
    t = np.asarray(targets)
    for k, frac in {"train": 0.7, "val": 0.1, "test": 0.2}.items():
        for cls in range(6):
            n_cls = (t == cls).sum()
            n = (t[a[k]] == cls).sum()
            assert abs(n - frac * n_cls) <= 1, (k, cls, n, n_cls)


def test_stratified_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum to"):
        stratified_split([0, 1], {"train": 0.5, "test": 0.2}, 0)


def test_per_class_subset_draws_n_per_class_by_seed():
    ds = SyntheticShapes(10, n_classes=4)
    a = per_class_subset(ds, 3, seed=1)
    b = per_class_subset(ds, 3, seed=1)
    c = per_class_subset(ds, 3, seed=2)
    assert a.indices == b.indices != c.indices
    assert np.bincount(a.targets).tolist() == [3, 3, 3, 3]
    assert per_class_subset(ds, 0, seed=1) is ds


def test_subsample_keeps_val_and_test_fixed_across_seeds():
    s = get_dataset("synthetic", n_train_per_class=5, n_val_per_class=4, n_test_per_class=4)
    a, b = subsample(s, 0, 5, 2, 3), subsample(s, 1, 5, 2, 3)
    assert a.train.indices != b.train.indices
    assert a.val.indices == b.val.indices and a.test.indices == b.test.indices


def test_unknown_dataset_names_valid_ones():
    with pytest.raises(ValueError, match="dataset='imagenet'.*aid.*synthetic"):
        get_dataset("imagenet")


def test_missing_root_says_what_to_set(tmp_path):
    with pytest.raises(DataMissingError, match="data_root"):
        find_root("aid", str(tmp_path / "nope"))


# ---- AID (read in place from ../shared) ---------------------------------------------------------

def test_aid_split_manifest_is_stratified_and_complete(shared_aid):
    from vitadapt.paths import MANIFESTS
    rows = list(csv.DictReader((MANIFESTS / "aid_split.csv").open()))
    assert len(rows) == 10_000 and len({r["path"] for r in rows}) == 10_000
    by_class = {}
    for r in rows:
        by_class.setdefault(r["class"], []).append(r["split"])
    assert len(by_class) == 30
    for cls, splits in by_class.items():
        n = len(splits)
        assert abs(splits.count("test") - 0.2 * n) <= 1 and abs(splits.count("val") - 0.1 * n) <= 1, cls


def test_aid_split_manifest_regenerates_identically(shared_aid, tmp_path):
    from vitadapt.data.sources import write_split_manifest
    from vitadapt.paths import MANIFESTS
    write_split_manifest(shared_aid, tmp_path / "aid_split.csv", seed=0)
    assert (tmp_path / "aid_split.csv").read_text() == (MANIFESTS / "aid_split.csv").read_text()


def test_aid_loads_with_class_names(shared_aid):
    s = get_dataset("aid")
    assert s.counts() == {"train": 7000, "val": 1000, "test": 2000}
    assert len(s.classes) == 30 and s.classes[0] == "Airport"
    img, y = s.test[0]
    assert img.size == (150, 150) and img.mode == "RGB" and s.classes[y] in str(s.test.paths[0])
    assert "research use only" in s.source


# ---- unlabelled Sentinel-2 tiles ----------------------------------------------------------------

def test_sentinel2_tiles_are_unlabelled_disjoint_tiles():
    s = get_dataset("sentinel2_tiles", tile_size=150)
    assert s.classes == []
    img, y = s.train[0]
    assert y == -1 and img.size == (150, 150)
    corners = [set(d.corners) for d in (s.train, s.val, s.test)]
    assert not (corners[0] & corners[1]) and not (corners[0] & corners[2])
    assert np.asarray(img).std() > 5          # real imagery, not a blank tile


def test_registry_lists_the_issue_sources():
    assert {"synthetic", "synthetic_source", "aid", "eurosat", "resisc45", "ucmerced", "sentinel2_tiles",
            "fmow"} <= set(DATASETS)
