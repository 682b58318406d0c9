"""VTAB-1k-style tasks: procedural structured tasks, the IDX reader, Fashion-MNIST, the VTAB-1k / FGVC folder
readers on tiny fixtures, and vtab_task's 800/200 + test splits."""

import gzip
import json
import struct

import numpy as np
import pytest
from PIL import Image

from vitadapt.data import DATASETS, DataMissingError, get_dataset
from vitadapt.data import vtab
from vitadapt.data.vtab import (VTAB_GROUPS, Procedural, read_idx, read_vtab1k_list, stratified_sample, task_group,
                                vtab_task, write_idx)

STRUCTURED = ("clevr_count", "dsprites_location", "dsprites_orientation")


def _arr(ds, i):
    return np.asarray(ds[i][0])


# ---- procedural tasks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("task", STRUCTURED)
def test_procedural_is_deterministic_by_seed_and_split(task):
    a = Procedural(task, 6, size=40, seed=3)
    b = Procedural(task, 6, size=40, seed=3)
    c = Procedural(task, 6, size=40, seed=4)
    t = Procedural(task, 6, size=40, seed=3, split="test")
    assert all(np.array_equal(_arr(a, i), _arr(b, i)) and a[i][1] == b[i][1] for i in range(6))
    assert any(not np.array_equal(_arr(a, i), _arr(c, i)) for i in range(6))
    assert any(not np.array_equal(_arr(a, i), _arr(t, i)) for i in range(6))
    img, y = a[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (40, 40)


@pytest.mark.parametrize("task,n_classes", [("clevr_count", 8), ("dsprites_location", 16),
                                            ("dsprites_orientation", 16)])
def test_procedural_labels_are_balanced_and_in_range(task, n_classes):
    ds = Procedural(task, 5 * n_classes, size=32)
    assert len(ds.classes) == n_classes
    assert np.bincount(ds.targets).tolist() == [5] * n_classes
    assert all(ds[i][1] == ds.targets[i] for i in range(0, len(ds), 7))


def test_dsprites_bins_are_configurable():
    ds = Procedural("dsprites_orientation", 24, size=32, bins=8)
    assert len(ds.classes) == 8 and max(ds.targets) == 7
    with pytest.raises(ValueError, match="bins=1 out of range"):
        Procedural("dsprites_location", 4, bins=1)
    with pytest.raises(ValueError, match="task='clevr' is not valid"):
        Procedural("clevr", 4)


def test_dsprites_location_label_is_the_x_position_of_the_sprite():
    ds = Procedural("dsprites_location", 64, size=64, bins=8)
    for i in range(0, 64, 3):
        img, y = ds[i]
        m = np.asarray(img)[..., 0] > 127
        assert m.any()
        cx = (np.nonzero(m)[1].mean() + 0.5) / 64          # sprite centroid in [0, 1]
        px = (cx - 0.16) / 0.68                             # back to the generator's position
        assert abs(px - (y + 0.5) / 8) < 0.5 / 8 + 0.06     # within its bin (plus the shape's asymmetry)


def test_clevr_count_draws_more_objects_for_higher_labels():
    ds = Procedural("clevr_count", 80, size=96)
    # pixels away from the floor colour grow with the number of objects
    def busy(i):
        a = np.asarray(ds[i][0]).astype(float)
        return (np.abs(a - np.median(a, axis=(0, 1))).max(-1) > 40).mean()
    few = np.mean([busy(i) for i in range(80) if ds.targets[i] == 0])
    many = np.mean([busy(i) for i in range(80) if ds.targets[i] == 7])
    assert many > 1.8 * few


def test_structured_tasks_are_registered():
    assert set(STRUCTURED) | {"fashion_mnist", "vtab1k", "fgvc"} <= set(DATASETS)
    s = get_dataset("clevr_count", size=32)
    assert s.counts() == {"train": 10_000, "val": 2_000, "test": 2_000} and len(s.classes) == 8
    assert task_group("dsprites_orientation") == "structured" and task_group("aid") == "specialized"
    assert task_group("vtab1k:eurosat") == "specialized"
    assert VTAB_GROUPS["natural"] == ("fashion_mnist",)


# ---- vtab_task ----------------------------------------------------------------------------------------

def test_vtab_task_800_200_seeded_stratified_and_a_fixed_test_set():
    a = vtab_task("dsprites_orientation", seed=0, n_test=160, size=32)
    b = vtab_task("dsprites_orientation", seed=0, n_test=160, size=32)
    c = vtab_task("dsprites_orientation", seed=1, n_test=160, size=32)
    assert a.counts() == {"train": 800, "val": 200, "test": 160}
    assert a.train.indices == b.train.indices and a.val.indices == b.val.indices
    assert a.train.indices != c.train.indices
    assert a.test.indices == c.test.indices                    # every seed is tested on the same images
    assert np.bincount(a.train.targets).tolist() == [50] * 16  # stratified
    assert np.bincount(a.val.targets).tolist() == [12] * 8 + [13] * 8 or sorted(np.bincount(a.val.targets)) == [12] * 8 + [13] * 8
    assert a.info["n_train"] == 800 and a.info["split_seed"] == 0


def test_vtab_task_takes_its_settings_by_name():
    s = vtab_task("dsprites_location", 0, n_train=40, n_val=10, n_test=20, size=32, bins=4)
    assert s.counts() == {"train": 40, "val": 10, "test": 20} and len(s.classes) == 4
    s = vtab_task("dsprites_location", 0, n_train=8, size=32, bins=4)
    assert len(s.train) == 8
    with pytest.raises(ValueError, match="unknown vtab_task setting"):
        vtab_task("dsprites_location", 0, n_trian=8)


def test_val_from_the_training_pool_is_disjoint_from_train():
    class Tiny:
        def __init__(self, n):
            self.targets = [i % 4 for i in range(n)]
    targets = [i % 5 for i in range(100)]
    rng = np.random.default_rng(0)
    tr = stratified_sample(targets, 60, rng)
    va = stratified_sample(targets, 30, rng, exclude=tr)
    assert not set(tr) & set(va) and len(tr) == 60 and len(va) == 30
    assert np.bincount(np.asarray(targets)[tr]).tolist() == [12] * 5
    assert stratified_sample(targets, 500, rng) == list(range(100))


# ---- IDX + Fashion-MNIST ------------------------------------------------------------------------------

def test_read_idx_on_hand_written_files(tmp_path):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">3i", 2, 3, 4) + imgs.tobytes()
    (tmp_path / "x-idx3-ubyte").write_bytes(raw)
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as fh:
        fh.write(raw)
    labels = np.array([7, 1], np.uint8)
    (tmp_path / "y-idx1-ubyte").write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">i", 2) + labels.tobytes())
    ints = np.array([[1, -2], [300000, 4]], np.int32)
    (tmp_path / "z").write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2i", 2, 2) + ints.astype(">i4").tobytes())
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte"), imgs)
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), imgs)
    assert read_idx(tmp_path / "y-idx1-ubyte").tolist() == [7, 1]
    assert read_idx(tmp_path / "z").tolist() == ints.tolist()
    write_idx(tmp_path / "w.gz", ints)
    assert read_idx(tmp_path / "w.gz").tolist() == ints.tolist()
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="data bytes"):
        read_idx(tmp_path / "short")


def _fake_fashion(root, n_train=100, n_test=20):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))


def test_fashion_mnist_from_a_folder_of_idx_files(tmp_path):
    _fake_fashion(tmp_path)
    s = get_dataset("fashion_mnist", root=str(tmp_path))
    assert s.counts() == {"train": 90, "val": 10, "test": 20} and len(s.classes) == 10
    img, y = s.train[0]
    assert img.mode == "RGB" and img.size == (28, 28) and 0 <= y < 10
    assert "MIT" in s.source


def test_fashion_mnist_missing_says_make_setup(tmp_path, monkeypatch):
    monkeypatch.setattr(vtab, "FASHION_SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(vtab, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.delenv("VITADAPT_FASHION_MNIST_ROOT", raising=False)
    with pytest.raises(DataMissingError, match=r"make setup.*apt-get install -y dataset-fashion-mnist"):
        get_dataset("fashion_mnist")
    with pytest.raises(DataMissingError, match="lacks the IDX files"):
        get_dataset("fashion_mnist", root=str(tmp_path))


def test_installed_fashion_mnist_if_present():
    try:
        s = get_dataset("fashion_mnist")
    except DataMissingError as e:
        pytest.skip(str(e))
    assert s.counts() == {"train": 54_000, "val": 6_000, "test": 10_000}
    t = vtab_task("fashion_mnist", 0, n_test=100)
    assert t.counts() == {"train": 800, "val": 200, "test": 100}
    assert np.bincount(t.train.targets).tolist() == [80] * 10


# ---- the real layouts, on tiny fixtures ---------------------------------------------------------------

def _img(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _vtab1k_fixture(root, task="dsprites_loc", n=(8, 4, 6)):
    d = root / task
    lines = {}
    for split, k in zip(("train800", "val200", "test"), n):
        rows = []
        for i in range(k):
            rel = f"images/{split}/{i}.png"
            _img(d / rel, 10 * i)
            rows.append(f"{rel} {i % 4}")
        lines[split] = rows
        (d / f"{split}.txt").write_text("\n".join(rows) + "\n")
    (d / "train800val200.txt").write_text("\n".join(lines["train800"] + lines["val200"]) + "\n")
    return d


def test_vtab1k_folder_reader(tmp_path):
    _vtab1k_fixture(tmp_path)
    s = get_dataset("vtab1k", root=str(tmp_path), task="dsprites_loc")
    assert s.counts() == {"train": 8, "val": 4, "test": 6} and len(s.classes) == 16
    img, y = s.test[5]
    assert img.size == (8, 8) and y == 1 and np.asarray(img)[0, 0, 0] == 50
    t = vtab_task("vtab1k:dsprites_loc", seed=3, vtab1k_root=str(tmp_path))
    assert t.counts() == s.counts()                      # the standard lists are used as they are
    assert [p.name for p in t.train.paths] == [p.name for p in s.train.paths]
    t = vtab_task("vtab1k:dsprites_loc", seed=3, vtab1k_root=str(tmp_path), n_train=4, n_val=2, n_test=3)
    assert t.counts() == {"train": 4, "val": 2, "test": 3}


def test_vtab1k_reader_errors(tmp_path):
    d = _vtab1k_fixture(tmp_path)
    (d / "train800val200.txt").write_text("images/train800/0.png 0\n")
    with pytest.raises(ValueError, match="not the union"):
        get_dataset("vtab1k", root=str(tmp_path), task="dsprites_loc")
    with pytest.raises(DataMissingError, match="lacks"):
        get_dataset("vtab1k", root=str(tmp_path), task="cifar")
    (tmp_path / "bad.txt").write_text("a.png 1\nno_label_here\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected"):
        read_vtab1k_list(tmp_path / "bad.txt")
    with pytest.raises(DataMissingError):
        get_dataset("vtab1k", root=str(tmp_path / "absent"), task="cifar")


def _fgvc_set(d, images: str, sizes: dict, rel, label) -> None:
    """A VPT-layout FGVC set in ``d``: ``{split}.json`` mapping ``rel(split, i)`` under ``d/images`` to ``label(i)``."""
    for split, k in sizes.items():
        ann = {}
        for i in range(k):
            _img(d / images / rel(split, i), i)
            ann[rel(split, i)] = label(i)
        (d / f"{split}.json").write_text(json.dumps(ann))


def test_fgvc_vpt_layout(tmp_path):
    _fgvc_set(tmp_path / "CUB_200_2011", "images", {"train": 6, "val": 2, "test": 4},
              lambda split, i: f"{100 + i % 3:03d}.bird/{split}_{i}.jpg", lambda i: 5 + 2 * (i % 3))  # ids from 5
    s = get_dataset("fgvc", root=str(tmp_path), task="cub")
    assert s.counts() == {"train": 6, "val": 2, "test": 4} and s.classes == ["5", "7", "9"]
    assert sorted(set(s.train.targets)) == [0, 1, 2]


def test_fgvc_task_keeps_vpts_own_splits_not_the_800_200_draw(tmp_path):
    _fgvc_set(tmp_path / "Stanford-dogs", "Images", {"train": 12, "val": 4, "test": 5},
              lambda split, i: f"n0{i % 2}/{split}_{i}.jpg", lambda i: i % 2)
    t = vtab_task("fgvc:stanford_dogs", seed=1, fgvc_root=str(tmp_path), n_train=4, n_val=2, n_test=3)
    assert t.counts() == {"train": 12, "val": 4, "test": 5} and t.info["split"] == "VPT json"
