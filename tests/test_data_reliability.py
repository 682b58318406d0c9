"""Reliability of data and caches: explicit data locations, per-file checksums, unreadable images, cache writes."""

import errno
import hashlib
import multiprocessing as mp
import os
import time
import warnings

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import vitadapt.data as vdata
from vitadapt.data import BadImageError, DataMissingError, FileList, find_root, get_dataset
from vitadapt.data import manifest
from vitadapt.data.cachefile import CacheDiskFullError
from vitadapt.eval import FeatureCache
from vitadapt.paths import MANIFESTS, REPO_ROOT


def _jpeg(path, seed=0, size=64):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3)).astype(np.uint8)).save(path)
    return path


def _truncate(path):
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 2])
    return path


# ---- 1. an explicit location is used or it is an error; defaults only when nothing is explicit -----------

def test_env_root_at_an_empty_folder_is_an_error_in_builders_and_verify(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("VITADAPT_AID_ROOT", str(empty))
    with pytest.raises(DataMissingError, match=r"\$VITADAPT_AID_ROOT=.*empty.*lacks the 30 AID class folders"):
        get_dataset("aid")                         # was: silently read ../shared/data/aid
    assert manifest.main(["verify", "aid"]) == 1    # the same rule, the same message
    out = capsys.readouterr().out
    assert "FAILED   aid: $VITADAPT_AID_ROOT=" in out and "lacks the 30 AID class folders" in out
    monkeypatch.setenv("VITADAPT_AID_ROOT", str(tmp_path / "absent"))
    with pytest.raises(DataMissingError, match=r"\$VITADAPT_AID_ROOT=.*does not exist.*unset VITADAPT_AID_ROOT"):
        get_dataset("aid")


def test_data_root_at_an_empty_folder_names_it_and_what_was_expected(tmp_path):
    with pytest.raises(DataMissingError, match=r"data_root='.*' for dataset 'aid' lacks the 30 AID class folders"):
        get_dataset("aid", root=str(tmp_path))


def test_env_root_of_fashion_mnist_is_not_silently_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("VITADAPT_FASHION_MNIST_ROOT", str(tmp_path))
    with pytest.raises(DataMissingError, match=r"\$VITADAPT_FASHION_MNIST_ROOT=.*lacks the IDX files"):
        get_dataset("fashion_mnist")               # was: the Debian copy, if installed


def test_default_places_only_when_nothing_is_explicit(tmp_path, monkeypatch):
    repo_copy = tmp_path / "repo" / "data" / "aid"
    other = tmp_path / "other"
    for d in (repo_copy, other):
        (d / "Airport").mkdir(parents=True)
        (d / "Viaduct").mkdir()
    monkeypatch.setattr(vdata, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.delenv("VITADAPT_AID_ROOT", raising=False)
    assert find_root("aid") == repo_copy
    monkeypatch.setenv("VITADAPT_AID_ROOT", str(other))
    assert find_root("aid") == other
    assert find_root("aid", str(repo_copy)) == repo_copy      # data_root wins over the environment


# ---- 2. verify names the differing files of a copy anywhere ----------------------------------------------

def _manifest_fixture(tmp_path, monkeypatch, n=6):
    root = tmp_path / "copy"
    for i in range(n):
        _jpeg(root / "ab"[i % 2] / f"{i}.jpg", i)
    mdir = tmp_path / "manifests"
    mdir.mkdir()
    lines = manifest.tree_lines(root)
    (mdir / "tiny.sha256").write_text("".join(ln + "\n" for ln in lines))
    m = {"name": "tiny", "origin": "test", "licence": "test", "locate": "dataset:tiny", "checksums": "tiny.sha256",
         **manifest.describe(root)}
    (mdir / "tiny.yaml").write_text(yaml.safe_dump(m))
    monkeypatch.setattr(manifest, "MANIFESTS", mdir)
    monkeypatch.setenv("VITADAPT_TINY_ROOT", str(root))
    return root


def test_verify_names_missing_extra_and_changed_files_without_a_list_beside_the_copy(tmp_path, monkeypatch, capsys):
    root = _manifest_fixture(tmp_path, monkeypatch)
    assert manifest.main(["verify", "tiny"]) == 0
    (root / "a" / "0.jpg").unlink()
    _jpeg(root / "c" / "new.jpg", 99)
    _truncate(root / "b" / "1.jpg")
    assert not (tmp_path / "copy.sha256").exists()
    assert manifest.main(["verify", "tiny"]) == 1
    out = capsys.readouterr().out
    assert ("differing files (3): a/0.jpg (missing), b/1.jpg (changed, unreadable: OSError: image file is truncated"
            in out), out
    assert "c/new.jpg (extra) [missing 1, extra 1, changed 1]" in out and "manifest.py scan" not in out
    assert "python -m vitadapt.data.manifest scan " in out


def test_verify_shows_the_first_files_and_the_count(tmp_path, monkeypatch):
    root = _manifest_fixture(tmp_path, monkeypatch, n=8)
    for p in sorted(root.rglob("*.jpg")):
        _jpeg(p, 1000 + int(p.stem))
    with pytest.raises(manifest.ManifestMismatchError, match=r"differing files \(8\): (\S+ \(changed\), ){4}\S+ "
                                                             r"\(changed\) \.\.\. \[changed 8\]"):
        manifest.verify(manifest.load("tiny", manifest.MANIFESTS), root)


@pytest.mark.parametrize("name", ["aid", "sentinel2_tiles"])
def test_every_folder_manifest_commits_per_file_checksums_that_give_its_digest(name):
    m = manifest.load(name)
    lines = (MANIFESTS / m["checksums"]).read_text().splitlines()
    assert len(lines) == m["files"] and hashlib.sha256("\n".join(lines).encode()).hexdigest() == m["sha256"]
    folders = {p.stem for p in MANIFESTS.glob("*.yaml") if manifest.load(p.stem)["kind"] == "folder"}
    assert folders == {"aid", "sentinel2_tiles"}


def test_committed_aid_checksums_are_the_shared_list():
    m = manifest.load("aid")
    assert m["files"] == 10_000
    shared = REPO_ROOT.parent / "shared" / "data" / "aid.sha256"
    if shared.exists():
        assert manifest.read_checksums(shared) == manifest.read_checksums(MANIFESTS / m["checksums"])


# ---- 3. unreadable images: the path and the command; skipped only when asked --------------------------------

def test_truncated_jpeg_names_its_path_and_the_scan_command(tmp_path, monkeypatch):
    monkeypatch.delenv("VITADAPT_SKIP_BAD_IMAGES", raising=False)
    good, bad = _jpeg(tmp_path / "x" / "good.jpg"), _truncate(_jpeg(tmp_path / "x" / "bad.jpg", 1))
    ds = FileList([good, bad], [0, 1])
    assert ds[0][0].size == (64, 64)
    with pytest.raises(BadImageError, match=rf"cannot read image {bad}: OSError: image file is truncated.*"
                                            rf"python -m vitadapt\.data\.manifest scan {tmp_path / 'x'}.*"
                                            rf"VITADAPT_SKIP_BAD_IMAGES=1"):
        ds[1]
    batches = iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=list))
    with pytest.raises(BadImageError, match=str(bad)):    # the path survives the worker process
        next(batches)
    batches._shutdown_workers()


def test_scan_lists_every_unreadable_file(tmp_path, capsys):
    for i in range(4):
        _jpeg(tmp_path / "c" / f"{i}.jpg", i)
    bad = [_truncate(tmp_path / "c" / "1.jpg"), _truncate(tmp_path / "c" / "3.jpg")]
    assert manifest.main(["scan", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [ln.split(": ", 1)[0] for ln in out[:2]] == [f"bad      {p}" for p in bad]
    assert out[-1] == f"2 of 4 image files of {tmp_path} do not decode"


def _fmow_satmae(root):
    import csv
    with (root / "train_62classes.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["category", "image_path"])
        for i in range(10):
            w.writerow(["airport", f"tr/{i}.png"])
            _jpeg(root / "tr" / f"{i}.png", i)
    (root / "val_62classes.csv").write_text("category,image_path\nzoo,te/0.png\n")
    _jpeg(root / "te" / "0.png")
    return _truncate(root / "tr" / "4.png")


def test_scan_by_dataset_name_reads_where_the_builder_reads(tmp_path, capsys):
    bad = _fmow_satmae(tmp_path)
    assert manifest.main(["scan", "fmow", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"bad      {bad}: OSError: image file is truncated" in out
    assert out.splitlines()[-1] == f"1 of 11 image files of fmow at {tmp_path} do not decode"
    with pytest.raises(ValueError, match="'nope' is neither a folder nor a dataset; valid datasets: aid, "):
        manifest.main(["scan", "nope"])


def test_skip_bad_images_leaves_them_out_with_a_counting_warning(tmp_path, monkeypatch):
    paths = [_jpeg(tmp_path / f"{i}.jpg", i) for i in range(3)]
    _truncate(paths[1])
    monkeypatch.setenv("VITADAPT_SKIP_BAD_IMAGES", "1")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) of 3 .*1\.jpg.*manifest scan"):
        ds = FileList(paths, [0, 1, 2])
    assert len(ds) == 2 and ds.targets == [0, 2] and ds.skipped == [paths[1]]
    assert [ds[i][1] for i in range(2)] == [0, 2]
    monkeypatch.setenv("VITADAPT_SKIP_BAD_IMAGES", "maybe")
    with pytest.raises(ValueError, match="VITADAPT_SKIP_BAD_IMAGES='maybe' is not valid; valid values: 1, true"):
        FileList(paths, [0, 1, 2])
    monkeypatch.delenv("VITADAPT_SKIP_BAD_IMAGES")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(FileList(paths, [0, 1, 2])) == 3          # off unless asked


def test_builder_parameter_skips_and_records_the_count(tmp_path):
    _fmow_satmae(tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        s = get_dataset("fmow", root=str(tmp_path), skip_bad_images=True)
    assert sum(s.counts().values()) == 10 and s.info["bad_images_skipped"] == 1 and s.record()["bad_images_skipped"] == 1


def test_torchgeo_items_name_their_file(tmp_path):
    from vitadapt.data.sources import TorchgeoRGB

    class Fake:
        root, classes, targets = str(tmp_path), ["a", "b"], [0, 1, 0]
        samples = [(str(tmp_path / f"{i}.tif"), t) for i, t in enumerate(targets)]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            if i == 1:
                raise OSError("TIFFReadEncodedStrip() failed")
            return {"image": torch.zeros(3, 4, 4), "label": torch.tensor(self.targets[i])}

    with pytest.raises(BadImageError, match=r"1\.tif: OSError: TIFFReadEncodedStrip"):
        TorchgeoRGB(Fake(), None, 255.0, skip_bad=False)[1]
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ds = TorchgeoRGB(Fake(), None, 255.0, skip_bad=True)
    assert len(ds) == 2 and ds.paths == [str(tmp_path / "0.tif"), str(tmp_path / "2.tif")] and ds[1][1] == 0


def test_truncated_idx_file_names_its_path(tmp_path):
    from vitadapt.data.vtab import read_idx, write_idx
    p = tmp_path / "x-idx1-ubyte.gz"
    write_idx(p, np.arange(1000, dtype=np.uint8))
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(ValueError, match=f"{p} cannot be read"):
        read_idx(p)


# ---- 4. cache writes: per-process temporary files; a full disk says so ---------------------------------------

KEY = {"backbone": "test", "img_size": 32}


def _fill(root, who, barrier, q):
    try:
        real = torch.save

        def slow_save(obj, f, *a, **kw):   # hold the temporary file open long enough for the other process
            real(obj, f, *a, **kw)
            time.sleep(0.3)
        torch.save = slow_save
        c = FeatureCache(KEY, root)
        c.store = {f"{who}:{i}": torch.full((4,), float(i)) for i in range(3)}
        barrier.wait(timeout=30)
        c._save()
        q.put((who, "ok"))
    except BaseException as e:  # noqa: BLE001 - report it to the test
        q.put((who, f"{type(e).__name__}: {e}"))
    finally:
        q.close()
        q.join_thread()      # flush the report before leaving without pytest's exit handlers
        os._exit(0)


def test_two_processes_fill_the_same_cold_feature_cache_key(tmp_path):
    ctx = mp.get_context("fork")
    barrier, q = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_fill, args=(tmp_path, w, barrier, q)) for w in ("p1", "p2")]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results == {"p1": "ok", "p2": "ok"}
    store = FeatureCache(KEY, tmp_path).store
    assert store and {k.split(":")[0] for k in store} <= {"p1", "p2"}
    assert [p.name for p in tmp_path.iterdir()] == [FeatureCache(KEY, tmp_path).path.name]   # no temp files


def _full_disk(kind):
    def save(obj, f, *a, **kw):
        with open(f, "wb") as fh:
            fh.write(b"PK partial")
        if kind == "torch":
            raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        raise OSError(errno.ENOSPC, "No space left on device")
    return save


@pytest.mark.parametrize("kind", ["torch", "oserror"])
def test_full_disk_writing_the_feature_cache_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch, kind):
    c = FeatureCache(KEY, tmp_path / "features")
    c.store = {"a": torch.zeros(4)}
    monkeypatch.setattr(torch, "save", _full_disk(kind))
    with pytest.raises(CacheDiskFullError, match=rf"disk full writing the feature cache {c.path} \(set VITADAPT_CACHE "
                                                 rf"to another folder or free space\)"):
        c._save()
    assert list((tmp_path / "features").iterdir()) == []


def test_full_disk_writing_the_weight_conversion_cache(tmp_path, monkeypatch):
    from vitadapt.models import imgfocus
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    monkeypatch.setattr(imgfocus, "onnx_path", lambda: onnx)
    monkeypatch.setattr(imgfocus, "convert", lambda src: {"w": torch.ones(2)})
    monkeypatch.setattr(torch, "save", _full_disk("torch"))
    with pytest.raises(CacheDiskFullError, match=r"disk full writing the weight-conversion cache .*\.pt \(set "
                                                 r"VITADAPT_CACHE to another folder or free space\)"):
        imgfocus.cached_state_dict(tmp_path / "weights")
    assert list((tmp_path / "weights").iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(imgfocus, "onnx_path", lambda: onnx)
    monkeypatch.setattr(imgfocus, "convert", lambda src: {"w": torch.ones(2)})
    assert imgfocus.cached_state_dict(tmp_path / "weights")["w"].sum() == 2
    assert [p.suffix for p in (tmp_path / "weights").iterdir()] == [".pt"]


def test_unreadable_feature_cache_is_rebuilt_not_fatal(tmp_path):
    c = FeatureCache(KEY, tmp_path)
    c.path.write_bytes(b"PK half a file")
    with pytest.warns(UserWarning, match="ignoring the unreadable feature cache"):
        assert FeatureCache(KEY, tmp_path).store == {}


def test_feature_cache_of_an_older_layout_is_rebuilt_not_fatal(tmp_path):
    """A cache file written before the keyed-file layout (same key, features under another name) reads as empty."""
    c = FeatureCache(KEY, tmp_path)
    torch.save({"key": c.file.key, "features": {"a": torch.zeros(4)}}, c.path)
    assert FeatureCache(KEY, tmp_path).store == {}
