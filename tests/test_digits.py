"""The scikit-learn digits source: registered, stratified and seeded splits, PIL RGB items, cache keys."""

import numpy as np
import pytest
from PIL import Image

from vitadapt.data import DATASETS, get_dataset, subsample
from vitadapt.data.digits import DigitsImages, load_digits_arrays
from vitadapt.eval import _item_keys


def test_registered_and_splits_are_disjoint_stratified_and_complete():
    assert "digits" in DATASETS
    s = get_dataset("digits", size=32)
    imgs, labels = load_digits_arrays()
    assert imgs.shape == (1797, 8, 8) and imgs.dtype == np.uint8 and imgs.max() == 255
    idx = [set(getattr(s, k).indices) for k in ("train", "val", "test")]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert sum(map(len, idx)) == 1797
    assert s.classes == [str(c) for c in range(10)]
    for part, frac in (("train", 0.6), ("val", 0.1), ("test", 0.3)):
        counts = np.bincount(getattr(s, part).targets, minlength=10)
        assert counts.min() > 0
        assert abs(counts.sum() / 1797 - frac) < 0.01
    # labels match the arrays
    assert all(labels[i] == y for i, y in zip(s.test.indices, s.test.targets))


def test_items_are_rgb_pil_at_size_and_deterministic():
    a = get_dataset("digits", size=40)
    b = get_dataset("digits", size=40)
    img, y = a.train[3]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (40, 40)
    assert y == a.train.targets[3]
    assert np.array_equal(np.asarray(img), np.asarray(b.train[3][0]))
    arr = np.asarray(img)
    assert np.array_equal(arr[..., 0], arr[..., 1])            # grey in three channels
    raw = DigitsImages([a.train.indices[3]], "train", size=8)[0][0]
    assert raw.size == (8, 8)


def test_seed_changes_the_split_and_subsample_is_per_class():
    a, c = get_dataset("digits", seed=0), get_dataset("digits", seed=1)
    assert a.train.indices != c.train.indices
    sub = subsample(a, seed=2, n_train_per_class=5, n_val_per_class=2, n_test_per_class=3)
    assert np.bincount(sub.train.targets).tolist() == [5] * 10
    assert len(sub.val) == 20 and len(sub.test) == 30


def test_cache_keys_differ_between_splits_and_sizes():
    a, b = get_dataset("digits", size=32), get_dataset("digits", size=48)
    keys = [set(_item_keys(s)) for s in (a.train, a.val, a.test, b.train)]
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not keys[i] & keys[j]


def test_bad_values():
    with pytest.raises(ValueError, match="resample='lanczos'"):
        DigitsImages([0], "train", resample="lanczos")
    with pytest.raises(ValueError, match="size=4"):
        DigitsImages([0], "train", size=4)


def test_array_backed_splits_never_share_cache_keys():
    """Fashion-MNIST's splits are arrays with no path or split attribute: their keys must still differ."""
    from vitadapt.data.vtab import ArrayImages
    a = ArrayImages(np.zeros((3, 4, 4), np.uint8), [0, 1, 2])
    b = ArrayImages(np.ones((3, 4, 4), np.uint8), [0, 1, 2])
    c = ArrayImages(np.zeros((3, 4, 4), np.uint8), [0, 1, 2])
    assert not set(_item_keys(a)) & set(_item_keys(b))
    assert _item_keys(a) == _item_keys(c)                      # same content: same keys (the cache is shared)
