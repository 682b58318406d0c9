"""The online sources (torchgeo EuroSAT / RESISC45 / UCMerced, fMoW) read through their real loaders from tiny
fixtures written here in the same on-disk layouts, so the code path is tested without the internet."""

import csv
import os

import numpy as np
import pytest
from PIL import Image

from vitadapt.data import DataMissingError, get_dataset

CLASSES = ["Forest", "River", "Highway"]


def _write_tif(path, arr):
    import rasterio
    path.parent.mkdir(parents=True, exist_ok=True)
    bands, h, w = arr.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=bands, dtype=arr.dtype) as dst:
        dst.write(arr)


def make_fixture(name, root):
    rng = np.random.default_rng(0)
    splits = {"train": [], "val": [], "test": []}
    for c in CLASSES:
        for i in range(4):
            split = ["train", "train", "val", "test"][i]
            if name == "eurosat":
                fn = f"{c}_{i + 1}.tif"
                _write_tif(root / "ds/images/remote_sensing/otherDatasets/sentinel_2/tif" / c / fn,
                           rng.integers(0, 4000, (13, 64, 64)).astype(np.uint16))
                splits[split].append(fn.replace(".tif", ".jpg"))
            elif name == "ucmerced":
                fn = f"{c.lower()}{i:02d}.tif"
                _write_tif(root / "UCMerced_LandUse/Images" / c.lower() / fn,
                           rng.integers(0, 255, (3, 256, 256)).astype(np.uint8))
                splits[split].append(fn)
            elif name == "resisc45":
                fn = f"{c.lower()}_{i + 1:03d}.jpg"
                p = root / "NWPU-RESISC45" / c.lower() / fn
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (256, 256, 3)).astype(np.uint8)).save(p)
                splits[split].append(fn)
    pattern = {"eurosat": "eurosat-{}.txt", "ucmerced": "uc_merced-{}.txt", "resisc45": "resisc45-{}.txt"}[name]
    for s, files in splits.items():
        (root / pattern.format(s)).write_text("\n".join(files) + "\n")


@pytest.mark.parametrize("name", ["eurosat", "ucmerced", "resisc45"])
def test_torchgeo_sources_read_their_layout_offline(name, tmp_path):
    make_fixture(name, tmp_path)
    s = get_dataset(name, root=str(tmp_path), download=False)
    assert s.counts() == {"train": 6, "val": 3, "test": 3}
    assert len(s.classes) == 3
    img, y = s.train[0]
    assert img.mode == "RGB" and 0 <= y < 3
    assert np.asarray(img).std() > 0
    assert "torchgeo" in s.source


def test_torchgeo_source_missing_offline_is_a_clear_error(tmp_path):
    with pytest.raises(DataMissingError, match="download=True|data_root"):
        get_dataset("eurosat", root=str(tmp_path), download=False)


def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3)).astype(np.uint8)).save(path)


def test_fmow_wilds_layout(tmp_path):
    d = tmp_path / "fmow_v1.1"
    rows = [("train", "airport"), ("train", "dam"), ("id_val", "airport"), ("val", "dam"), ("test", "zoo"),
            ("seq", "zoo")]
    d.mkdir(parents=True)
    with (d / "rgb_metadata.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["split", "img_filename", "category", "country_code", "timestamp"])
        for i, (split, cat) in enumerate(rows):
            w.writerow([split, f"img_{i}.jpg", cat, "USA", "2015-01-01"])
            _png(d / "images" / f"rgb_img_{i}.png", i)
    s = get_dataset("fmow", root=str(tmp_path))
    assert s.counts() == {"train": 2, "val": 2, "test": 1}
    assert len(s.classes) == 62 and s.info["layout"] == "WILDS"
    img, y = s.test[0]
    assert s.classes[y] == "zoo" and img.size == (32, 32)


def test_fmow_satmae_layout(tmp_path):
    for name, cats in [("train_62classes.csv", ["airport"] * 10 + ["dam"] * 10), ("val_62classes.csv", ["zoo", "dam"])]:
        with (tmp_path / name).open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["category", "location_id", "image_id", "timestamp", "image_path"])
            for i, c in enumerate(cats):
                rel = f"{name[:3]}/{c}_{i}.png"
                w.writerow([c, i, 0, "2015", rel])
                _png(tmp_path / rel, i)
    s = get_dataset("fmow", root=str(tmp_path))
    assert s.info["layout"] == "SatMAE"
    assert s.counts() == {"train": 18, "val": 2, "test": 2}
    assert sorted(np.bincount(s.val.targets, minlength=62).nonzero()[0]) == [0, 12]   # one airport, one dam


def test_fmow_without_metadata_says_how_to_get_it(tmp_path):
    with pytest.raises(DataMissingError, match="rgb_metadata.csv.*train_62classes.csv"):
        get_dataset("fmow", root=str(tmp_path))


def test_torchgeo_probe_says_a_real_run_downloads_it_and_the_real_run_does(tmp_path, monkeypatch, capsys):
    """``dry_run: auto`` probes with download=False: with the server reachable the dataset is "not here; a real run
    downloads it" (no dry run), and the real run downloads into data/<name> (here under a stand-in repo root)."""
    import torchgeo.datasets as tgd

    import vitadapt.data
    import vitadapt.data.fetch
    import vitadapt.data.sources
    from vitadapt.config import ExperimentConfig
    from vitadapt.protocol.setup import dry_run_reason
    monkeypatch.setattr(vitadapt.data, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(vitadapt.data.sources, "REPO_ROOT", tmp_path)
    monkeypatch.delenv("VITADAPT_EUROSAT_ROOT", raising=False)
    asked = []
    monkeypatch.setattr(vitadapt.data.fetch, "reachable", lambda url, timeout=10.0: asked.append(url))
    probe = {"dataset 'eurosat'": lambda: get_dataset("eurosat", download=False)}
    cfg = ExperimentConfig(dry_run="auto", weights="random", accelerator="cpu")
    assert dry_run_reason(cfg, probe) is None
    assert "not here" in capsys.readouterr().out and asked and "hf.co" in asked[0]
    s = get_dataset("eurosat", download=False)
    assert s.info["download_pending"] == 1 and "a real run downloads it" in s.source
    assert not (tmp_path / "data" / "eurosat").exists()                    # the probe writes nothing

    real = tgd.EuroSAT
    seen = []

    def fake_eurosat(root, split, download, **kw):    # torchgeo's download, replaced by writing the fixture
        seen.append((root, download))
        if not (tmp_path / "data" / "eurosat" / "eurosat-train.txt").exists():
            make_fixture("eurosat", tmp_path / "data" / "eurosat")
        return real(root=root, split=split, download=False, **kw)
    monkeypatch.setattr(tgd, "EuroSAT", fake_eurosat)
    s = get_dataset("eurosat", download=True)
    assert s.counts() == {"train": 6, "val": 3, "test": 3}
    assert seen[0] == (str(tmp_path / "data" / "eurosat"), True)


def test_torchgeo_probe_unreachable_says_why(tmp_path, monkeypatch):
    import vitadapt.data.fetch
    monkeypatch.setattr(vitadapt.data.fetch, "reachable", lambda url, timeout=10.0: "hf.co is not reachable (proxy)")
    with pytest.raises(DataMissingError, match=r"cannot be downloaded from here \(hf.co is not reachable \(proxy\)\)"):
        get_dataset("resisc45", root=str(tmp_path / "absent"), download=False)
    assert not (tmp_path / "absent").exists()
