"""`python -m vitadapt.data.fetch` (make data): fMoW, VTAB-1k, FGVC and the MAE decoder checkpoint, on local fixtures
only. The download function is replaced by a copy of a fixture archive; the resumable download itself is tested
against a local HTTP server that honours Range requests."""

import csv
import hashlib
import http.server
import io
import json
import tarfile
import threading
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from vitadapt.data import DataMissingError, get_dataset
from vitadapt.data import fetch as F
from vitadapt.data.vtab import FGVC_TASKS, VTAB1K_TASKS


def _png_bytes(seed, size=8):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3)).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _tar(path, files: dict):
    """A .tar.gz of ``files`` ({name in the archive: bytes})."""
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _zip(path, files: dict):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


@pytest.fixture
def online(monkeypatch):
    """The network "reachable" and downloads served from ``served`` ({url: fixture file}); returns (served, calls)."""
    served, calls = {}, []

    def fake_download(url, dest, md5=""):
        calls.append((url, dest.name, md5))
        dest.write_bytes(served[url].read_bytes())
        return dest
    monkeypatch.setattr(F, "reachable", lambda url, timeout=10.0: None)
    monkeypatch.setattr(F, "download_url", fake_download)
    return served, calls


def _fmow_archive(path):
    rows = io.StringIO()
    w = csv.writer(rows)
    w.writerow(["split", "img_filename", "category", "country_code", "timestamp"])
    files = {}
    for i, (split, cat) in enumerate([("train", "airport"), ("id_val", "dam"), ("id_test", "zoo")]):
        w.writerow([split, f"img_{i}.jpg", cat, "USA", "2015-01-01"])
        files[f"images/rgb_img_{i}.png"] = _png_bytes(i)
    files["rgb_metadata.csv"] = rows.getvalue().encode()
    files["RELEASE_v1.1.txt"] = b"v1.1"
    return _tar(path, files)


def test_fmow_is_downloaded_extracted_into_the_wilds_layout_and_read(online, tmp_path, capsys):
    served, calls = online
    served[F.RECIPES["fmow"].files[0].url] = _fmow_archive(tmp_path / "fixture.tar.gz")
    root = tmp_path / "fmow"
    assert F.main(["fmow", "--root", str(root)]) == 0
    assert "ready at" in capsys.readouterr().out
    assert (root / "fmow_v1.1" / "rgb_metadata.csv").is_file() and not (root / ".downloads").exists()
    assert not list(root.rglob("*.extracting")) and not list(root.rglob("*.part"))
    s = get_dataset("fmow", root=str(root))
    assert s.info["layout"] == "WILDS" and s.counts() == {"train": 1, "val": 1, "test": 1}
    assert s.classes[s.test[0][1]] == "zoo"
    assert F.main(["fmow", "--root", str(root)]) == 0 and len(calls) == 1      # in place: nothing fetched again
    assert "already in place" in capsys.readouterr().out


def test_without_the_network_one_line_exit_1_nothing_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VITADAPT_OFFLINE", "1")
    for name in ("fmow", "fgvc", "mae_decoder"):
        root = tmp_path / name
        assert F.main([name, "--root", str(root)]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "cannot download" in err and "nothing was written" in err
        assert not root.exists()


def test_bad_name_names_the_valid_ones(capsys):
    assert F.main(["imagenet"]) == 1
    assert "valid values: fmow, vtab1k, fgvc, mae_decoder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="name='imagenet' is not valid"):
        F.fetch("imagenet")


def test_default_place_follows_the_location_rule(monkeypatch, tmp_path):
    monkeypatch.delenv("VITADAPT_FMOW_ROOT", raising=False)
    assert F.target_root("fmow") == F.REPO_ROOT / "data" / "fmow"
    assert F.target_root("mae_decoder") == F.REPO_ROOT / "data" / "mae"
    monkeypatch.setenv("VITADAPT_FMOW_ROOT", str(tmp_path))
    assert F.target_root("fmow") == tmp_path
    assert F.target_root("fmow", str(tmp_path / "x")) == tmp_path / "x"


def _mae_checkpoint(path, decoder=True):
    model = {"cls_token": torch.zeros(1, 1, 4), "blocks.0.norm1.weight": torch.ones(4)}
    if decoder:
        model.update({"mask_token": torch.zeros(1, 1, 2), "decoder_blocks.0.norm1.weight": torch.ones(2),
                      "decoder_pred.weight": torch.zeros(3, 2)})
    torch.save({"model": model}, path)
    return path


def test_mae_decoder_checkpoint_official_name_and_decoder_verified(online, tmp_path, capsys):
    served, calls = online
    assert F.MAE_DECODER_URL == "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large_full.pth"
    served[F.MAE_DECODER_URL] = _mae_checkpoint(tmp_path / "full.pth")
    assert F.main(["mae_decoder", "--root", str(tmp_path / "mae")]) == 0
    got = tmp_path / "mae" / "mae_pretrain_vit_large_full.pth"
    assert got.is_file() and calls[0][1] == got.name
    from vitadapt.ssl.mae import mae_decoder_state_dict
    assert "decoder.blocks.0.norm1.weight" in mae_decoder_state_dict(torch.load(got, weights_only=False))
    # an encoder-only checkpoint under that name is refused, saying why
    served[F.MAE_DECODER_URL] = _mae_checkpoint(tmp_path / "encoder.pth", decoder=False)
    with pytest.raises(DataMissingError, match="no MAE decoder"):
        F.fetch("mae_decoder", str(tmp_path / "mae2"))


def _vtab1k_files(prefix="vtab-1k/"):
    files = {}
    for t in VTAB1K_TASKS:
        rows = {}
        for split, n in (("train800", 2), ("val200", 1), ("test", 2)):
            rows[split] = [f"images/{split}_{i}.png {i % 2}" for i in range(n)]
            for i in range(n):
                files[f"{prefix}{t}/images/{split}_{i}.png"] = _png_bytes(i)
            files[f"{prefix}{t}/{split}.txt"] = ("\n".join(rows[split]) + "\n").encode()
        files[f"{prefix}{t}/train800val200.txt"] = ("\n".join(rows["train800"] + rows["val200"]) + "\n").encode()
    return files


def test_vtab1k_prints_the_steps_then_extracts_a_given_archive_and_verifies(tmp_path, capsys):
    root = tmp_path / "vtab1k"
    assert F.main(["vtab1k", "--root", str(root)]) == 1
    out = capsys.readouterr()
    assert "gdown" in out.out and "train800val200" in out.out and "not complete" in out.err
    archive = _zip(tmp_path / "vtab-1k.zip", _vtab1k_files())     # the zip's top folder is vtab-1k/
    assert F.main(["vtab1k", "--root", str(root), "--archive", str(archive)]) == 0
    assert (root / "dtd" / "train800.txt").is_file()
    s = get_dataset("vtab1k", root=str(root), task="dtd")
    assert s.counts() == {"train": 2, "val": 1, "test": 2}


def _fgvc_archives(tmp_path):
    cub = {f"CUB_200_2011/images/001.A/a_{i}.jpg": _png_bytes(i) for i in range(3)}
    cub["attributes.txt"] = b"x"
    flowers = {f"jpg/image_{i:05d}.jpg": _png_bytes(i) for i in range(1, 4)}
    dogs = {f"Images/n0-Chihuahua/d_{i}.jpg": _png_bytes(i) for i in range(3)}
    return [_tar(tmp_path / f"{n}.tgz", f) for n, f in (("cub", cub), ("flowers", flowers), ("dogs", dogs))]


def test_fgvc_downloads_what_it_can_lists_the_rest_and_verifies_the_vpt_layout(online, tmp_path, capsys):
    served, calls = online
    for remote, archive in zip(F.RECIPES["fgvc"].files, _fgvc_archives(tmp_path)):
        served[remote.url] = archive
    root = tmp_path / "fgvc"
    with pytest.raises(DataMissingError, match="nabirds: no train.json"):
        F.fetch("fgvc", str(root))
    assert "VPT" in capsys.readouterr().out and {c[0] for c in calls} == set(served)
    assert (root / "CUB_200_2011" / "images" / "001.A" / "a_0.jpg").is_file()
    assert (root / "OxfordFlower" / "jpg" / "image_00001.jpg").is_file()
    assert (root / "Stanford-dogs" / "Images" / "n0-Chihuahua" / "d_0.jpg").is_file()
    # the json splits and the two hand-fetched sets put in place: verified, and the reader takes them
    firsts = {"cub": "001.A/a_0.jpg", "oxford_flowers": "jpg/image_00001.jpg",
              "stanford_dogs": "n0-Chihuahua/d_0.jpg", "nabirds": "0295/n_0.jpg", "stanford_cars": "cars_train/c_0.jpg"}
    for task, (folder, sub) in FGVC_TASKS.items():
        img = root / folder / sub / firsts[task]
        if not img.exists():
            img.parent.mkdir(parents=True, exist_ok=True)
            img.write_bytes(_png_bytes(7))
        for split in ("train", "val", "test"):
            (root / folder / f"{split}.json").write_text(json.dumps({firsts[task]: 3}))
    assert F.fetch("fgvc", str(root)) == root and len(calls) == 3
    assert get_dataset("fgvc", root=str(root), task="cub").counts() == {"train": 1, "val": 1, "test": 1}


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    blob = b""
    requests: list = []

    def do_GET(self):
        rng = self.headers.get("Range")
        self.requests.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        body = self.blob[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_download_resumes_from_its_part_file_and_checks_the_md5(tmp_path, monkeypatch):
    monkeypatch.delenv("VITADAPT_OFFLINE", raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    _RangeHandler.blob = bytes(range(256)) * 100
    _RangeHandler.requests = []
    server = http.server.HTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/a.bin"
        dest = tmp_path / "a.bin"
        dest.with_name("a.bin.part").write_bytes(_RangeHandler.blob[:1000])      # an interrupted earlier try
        md5 = hashlib.md5(_RangeHandler.blob).hexdigest()
        assert F.download_url(url, dest, md5) == dest
        assert dest.read_bytes() == _RangeHandler.blob and _RangeHandler.requests == ["bytes=1000-"]
        assert not dest.with_name("a.bin.part").exists()
        with pytest.raises(F.FetchError, match="md5"):                          # a wrong checksum: deleted
            F.download_url(url, tmp_path / "b.bin", "0" * 32)
        assert not (tmp_path / "b.bin").exists() and not (tmp_path / "b.bin.part").exists()
        assert F.reachable(url) is None
    finally:
        server.shutdown()
