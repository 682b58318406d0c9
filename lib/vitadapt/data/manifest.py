"""Data manifests: one YAML per dataset or weight source (origin, licence, size, sha256), and their check.

A manifest of ``kind: folder`` describes a tree of files by count, bytes and a tree digest: the sha256 of
the sorted lines ``"<sha256 of file>  <relative path>"``. ``kind: file`` describes one file by size and sha256.
``locate`` says where to look: ``dataset:<name>`` (the dataset search path), ``package:<module>/<relpath>``.

    python -m vitadapt.data.manifest verify [NAME ...]   # what `make verify-data` runs
    python -m vitadapt.data.manifest describe NAME PATH  # print a manifest's size/sha256 fields for PATH
    python -m vitadapt.data.manifest split aid           # (re)write data_manifests/aid_split.csv
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
from pathlib import Path

import yaml

from vitadapt.data import DataMissingError, find_root
from vitadapt.paths import MANIFESTS


class ManifestMismatchError(ValueError):
    """The data on disk is not the data the manifest describes."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_lines(root: Path) -> list[str]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [f"{file_sha256(p)}  {p.relative_to(root).as_posix()}" for p in files]


def describe(path: Path) -> dict:
    """The size and sha256 fields of a manifest for ``path`` (file or folder)."""
    if path.is_dir():
        lines = tree_lines(path)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return {"kind": "folder", "files": len(lines), "bytes": size,
                "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}
    return {"kind": "file", "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def load(name: str, manifests: Path = MANIFESTS) -> dict:
    path = manifests / f"{name}.yaml"
    if not path.exists():
        valid = sorted(p.stem for p in manifests.glob("*.yaml"))
        raise ValueError(f"no manifest named {name!r}; valid names: {', '.join(valid)}")
    return yaml.safe_load(path.read_text())


def locate(m: dict, root: str = "") -> Path:
    where = m["locate"]
    if where.startswith("dataset:"):
        return find_root(where.split(":", 1)[1], root)
    if where.startswith("package:"):
        mod, _, rel = where.split(":", 1)[1].partition("/")
        spec = importlib.util.find_spec(mod)
        if spec is None:
            raise DataMissingError(f"package {mod!r} is not installed; run `make setup`")
        p = Path(list(spec.submodule_search_locations)[0]) / rel
        if not p.exists():
            raise DataMissingError(f"{p} is missing; reinstall the {mod} package (`make setup`)")
        return p
    raise ValueError(f"locate={where!r} is not valid; valid forms: dataset:<name>, package:<module>/<path>")


def verify(m: dict, path: Path, sha_list: Path | None = None) -> None:
    """Raise :class:`ManifestMismatchError` naming what differs; return quietly when all matches."""
    got = describe(path)
    problems = [f"{k}: manifest {m[k]!r}, found {got[k]!r}" for k in ("kind", "files", "bytes", "sha256")
                if k in m and k in got and m[k] != got[k]]
    if not problems:
        return
    detail = ""
    if got["kind"] == "folder" and sha_list is not None and sha_list.exists():
        want = {ln.split(None, 1)[1].removeprefix("./"): ln.split(None, 1)[0]
                for ln in sha_list.read_text().splitlines() if ln.strip()}
        have = {ln.split("  ", 1)[1]: ln.split("  ", 1)[0] for ln in tree_lines(path)}
        bad = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        detail = f"; differing files ({len(bad)}): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"
    raise ManifestMismatchError(f"{m.get('name', path)} at {path} does not match its manifest: "
                                f"{'; '.join(problems)}{detail}. Restore the original data "
                                f"(origin: {m.get('origin', '?')}) or point the data root elsewhere.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vitadapt.data.manifest")
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify")
    v.add_argument("names", nargs="*")
    d = sub.add_parser("describe")
    d.add_argument("path")
    s = sub.add_parser("split")
    s.add_argument("name", choices=["aid"])
    args = ap.parse_args(argv)
    if args.cmd == "describe":
        print(yaml.safe_dump(describe(Path(args.path)), sort_keys=False))
        return 0
    if args.cmd == "split":
        from vitadapt.data.sources import write_split_manifest
        counts = write_split_manifest(find_root(args.name), MANIFESTS / f"{args.name}_split.csv")
        print(f"wrote data_manifests/{args.name}_split.csv: {counts}")
        return 0
    names = args.names or sorted(p.stem for p in MANIFESTS.glob("*.yaml"))
    failed = 0
    for name in names:
        m = load(name)
        if m["kind"] == "online":
            try:
                print(f"present  {name}: {locate(m)} (online source; torchgeo/wilds check their own sums)")
            except DataMissingError:
                print(f"absent   {name}: online source, fetched on first use with the internet ({m['origin']})")
            continue
        try:
            path = locate(m)
            sha_list = path.parent / f"{path.name}.sha256" if m["kind"] == "folder" else None
            verify(m, path, sha_list)
            print(f"ok       {name}: {path}")
        except (DataMissingError, ManifestMismatchError) as e:
            failed += 1
            print(f"FAILED   {name}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
