"""The cpu profile (the default of `make reproduce`) without AID: each notebook that reads AID falls back, loudly and
recorded, to torchgeo's UCMerced (a download, faked here by a local fixture in UCMerced's on-disk layout); offline,
the run stops with an error naming AID and how to get it."""

import dataclasses
import io
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

import vitadapt.data
from vitadapt.config import build_config
from vitadapt.data import DataMissingError
from vitadapt.experiments.baselines import BaselineConfig
from vitadapt.experiments.data_backbones import DataBackboneConfig
from vitadapt.experiments.explora import ExploraConfig
from vitadapt.experiments.rlrr import RLRRConfig
from vitadapt.experiments.upstep import UpStepConfig
from vitadapt.protocol import setup
from vitadapt.runner import discover

CONFIGS = {"00": DataBackboneConfig, "01": BaselineConfig, "10": ExploraConfig, "11": ExploraConfig,
           "12": ExploraConfig, "20": UpStepConfig, "21": UpStepConfig, "30": RLRRConfig, "31": RLRRConfig}
CLASSES = ["agricultural", "beach", "forest"]          # UCMerced's folder names are lower case


def _ucmerced_server(d):
    """The files torchgeo's UCMerced downloads, in their layout: UCMerced_LandUse.zip (UCMerced_LandUse/Images/
    <class>/<class>NN.tif; 3 classes x 5 tiny images, split 3/1/1) and the split lists uc_merced-<split>.txt."""
    d.mkdir()
    splits = {"train": [], "val": [], "test": []}
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(d / "UCMerced_LandUse.zip", "w") as z:
        for c in CLASSES:
            for i, split in enumerate(["train", "train", "train", "val", "test"]):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="TIFF")
                z.writestr(f"UCMerced_LandUse/Images/{c}/{c}{i:02d}.tif", buf.getvalue())
                splits[split].append(f"{c}{i:02d}.tif")
    for s, files in splits.items():
        (d / f"uc_merced-{s}.txt").write_text("\n".join(files) + "\n")


@pytest.fixture
def no_aid(tmp_path, monkeypatch):
    """A clone without ../shared beside it: AID in none of its default places (data/aid, ../shared/data/aid), no
    $VITADAPT_AID_ROOT; UCMerced not here either (a real run downloads it into $VITADAPT_UCMERCED_ROOT)."""
    real = vitadapt.data.default_places
    monkeypatch.setattr(vitadapt.data, "default_places",
                        lambda name: [tmp_path / "clone" / "data" / name] if name == "aid" else real(name))
    monkeypatch.delenv("VITADAPT_AID_ROOT", raising=False)
    monkeypatch.setenv("VITADAPT_UCMERCED_ROOT", str(tmp_path / "ucmerced"))


@pytest.fixture
def ucmerced_download(tmp_path, monkeypatch):
    """torchgeo's server reachable, and its download (torchgeo.datasets.ucmerced.download_url) copying the fixture;
    returns the URLs asked for."""
    import torchgeo.datasets.ucmerced as tgu

    import vitadapt.data.fetch
    server = tmp_path / "server"
    _ucmerced_server(server)
    asked = []

    def fake_download(url, root, filename=None, md5=None, **_):
        asked.append(url)
        shutil.copy(server / url.rsplit("/", 1)[1], root)
    monkeypatch.setattr(tgu, "download_url", fake_download)
    monkeypatch.setattr(vitadapt.data.fetch, "reachable", lambda url, timeout=10.0: None)
    monkeypatch.delenv("VITADAPT_OFFLINE", raising=False)
    return asked


def _needs_fashion_mnist(nb):
    if nb[:2] in ("20", "30"):                   # their other domains / tasks must be here (make setup)
        try:
            vitadapt.data.get_dataset("fashion_mnist", download=False)
        except DataMissingError as e:
            pytest.skip(str(e))


@pytest.mark.parametrize("nb", ["00_data_and_backbones", "01_baselines", "10_explora_dinov2", "20_upstep", "30_rlrr"])
def test_cpu_profile_without_aid_falls_back_to_ucmerced_loudly(nb, no_aid, ucmerced_download, tmp_path, capsys):
    _needs_fashion_mnist(nb)
    with pytest.warns(UserWarning, match="FALLBACK"):
        S = setup.start(nb, CONFIGS[nb[:2]], "cpu", out_dir=str(tmp_path / "out"))
    out = capsys.readouterr().out
    assert "!!!!!!!! FALLBACK" in out and "ucmerced" in out and "'aid'" in out
    assert S.dry is None and not ucmerced_download               # it runs; the probe downloaded nothing
    used = setup._data_used(S.cfg)
    assert "ucmerced" in used and "aid" not in used
    rec = S.run.record()["sources"]["fallback"]
    assert rec["fallback"] == 0 and "ucmerced" in rec["dataset_used"] and "aid" in rec["configured"]["data"]
    assert "dataset 'aid' not found" in rec["reason"]
    if nb[:2] in ("00", "01", "10"):                            # 20 / 5 / 20 per class fit UCMerced's split
        assert (S.cfg.n_train_per_class, S.cfg.n_val_per_class, S.cfg.n_test_per_class) == (20, 5, 20)
    if nb == "20_upstep":                                       # the Fashion-MNIST domain forgets on UCMerced
        assert S.cfg.forgetting_fallback == "ucmerced" and "aid" not in S.cfg.domains
    if nb == "30_rlrr":
        assert S.cfg.groups["specialized"] == ["ucmerced"] and S.cfg.n_test == 420


def test_the_fallback_reads_ucmerced_through_torchgeos_download(no_aid, ucmerced_download, tmp_path):
    with pytest.warns(UserWarning, match="FALLBACK"):
        S = setup.start("10_explora_dinov2", ExploraConfig, "cpu", out_dir=str(tmp_path / "out"), quiet=True)
    splits = setup.labelled(S.cfg, 0)                           # the notebook's data build: downloads (the fixture)
    assert splits.name == "ucmerced" and splits.classes == CLASSES and "UCMerced via torchgeo" in splits.source
    assert splits.counts() == {"train": 9, "val": 3, "test": 3}
    assert [u.rsplit("/", 1)[1] for u in ucmerced_download] == [
        "UCMerced_LandUse.zip", "uc_merced-train.txt", "uc_merced-val.txt", "uc_merced-test.txt"]
    img, y = splits.train[0]
    assert img.mode == "RGB" and 0 <= y < 3


def test_offline_without_aid_the_error_names_aid_and_how_to_get_it(no_aid, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VITADAPT_OFFLINE", "1")                 # torchgeo's server cannot be reached
    with pytest.raises(DataMissingError) as err:
        setup.start("10_explora_dinov2", ExploraConfig, "cpu", out_dir=str(tmp_path / "out"))
    msg = str(err.value)
    assert "dataset 'aid' not found" in msg and "'ucmerced'" in msg and "VITADAPT_OFFLINE" in msg
    assert "Xia et al. 2017" in msg and "Wuhan University" in msg and "<root>/<ClassName>/<file>.jpg" in msg
    assert "$VITADAPT_AID_ROOT" in msg and "make verify-data" in msg and "dry_run='auto'" in msg
    # dry_run=auto: a dry run saying what is missing, and the same how-to printed
    S = setup.start("10_explora_dinov2", ExploraConfig, "cpu", out_dir=str(tmp_path / "out"), dry_run="auto")
    assert S.dry.startswith("not available here: dataset 'aid'") and "Xia et al. 2017" in capsys.readouterr().out


@pytest.mark.parametrize("nb", [p.stem for p in discover("") if p.stem[:2] in CONFIGS])
def test_every_cpu_notebook_reading_aid_has_a_fallback_that_fits_ucmerced(nb):
    cfg = build_config(CONFIGS[nb[:2]], "cpu", nb)
    alts = [dataclasses.replace(cfg, **alt) for alt in cfg.fallbacks]   # each a valid config
    if "aid" in setup._data_used(cfg):
        assert alts and all("aid" not in setup._data_used(a) and "ucmerced" in setup._data_used(a) for a in alts)
    for a in alts:                                   # torchgeo's UCMerced split: about 60/20/20 images per class
        if a.dataset == "ucmerced":
            assert a.n_train_per_class <= 40 and a.n_val_per_class <= 10 and a.n_test_per_class <= 20
        assert "aid" not in (getattr(a, "forgetting_dataset", ""), getattr(a, "forgetting_fallback", ""))
