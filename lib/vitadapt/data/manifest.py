"""Data manifests: one YAML per dataset or weight source (origin, licence, size, sha256), and their check.

A manifest of ``kind: folder`` describes a tree of files by count, bytes and a tree digest: the sha256 of
the sorted lines ``"<sha256 of file>  <relative path>"``; ``checksums: <file>`` names those lines, committed
in data_manifests/, so a mismatch names the missing, extra and changed files of a copy anywhere.
``kind: file`` describes one file by size and sha256. ``locate`` says where to look: ``dataset:<name>``
(:func:`vitadapt.data.find_root`, the rule the dataset builders use), ``package:<module>/<relpath>``.

    python -m vitadapt.data.manifest verify [NAME ...]          # what `make verify-data` runs
    python -m vitadapt.data.manifest describe PATH [--checksums OUT]  # a manifest's size/sha256 fields for PATH
    python -m vitadapt.data.manifest scan NAME|FOLDER [--root R]   # list every image file that does not decode
    python -m vitadapt.data.manifest split aid                  # (re)write data_manifests/aid_split.csv
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
from pathlib import Path

import yaml

from vitadapt.data import DataMissingError, find_root, image_problem, scan_command
from vitadapt.data.sources import IMAGE_EXTS
from vitadapt.paths import MANIFESTS

SHOW = 5   # files named per kind of difference


class ManifestMismatchError(ValueError):
    """The data on disk is not the data the manifest describes."""


def file_sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def tree_lines(root: Path) -> list[str]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [f"{file_sha256(p)}  {p.relative_to(root).as_posix()}" for p in files]


def describe(path: Path, lines: list[str] | None = None) -> dict:
    """The size and sha256 fields of a manifest for ``path`` (file or folder); ``lines``: its tree_lines."""
    if path.is_dir():
        lines = tree_lines(path) if lines is None else lines
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return {"kind": "folder", "files": len(lines), "bytes": size,
                "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}
    return {"kind": "file", "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def load(name: str, manifests: Path | None = None) -> dict:
    manifests = MANIFESTS if manifests is None else manifests
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


def read_checksums(path: Path) -> dict[str, str]:
    """A checksum list (``"<sha256>  <relative path>"`` per line, ``./`` prefixes allowed) as {path: sha256}."""
    out = {}
    for ln in path.read_text().splitlines():
        if ln.strip():
            digest, rel = ln.split(None, 1)
            out[rel.strip().removeprefix("./")] = digest
    return out


def _differing(want: dict[str, str], have: dict[str, str], root: Path) -> str:
    """``differing files (N): <first SHOW, each (missing|extra|changed[, unreadable: why])> ...; counts``."""
    kind = {k: "missing" if k not in have else "extra" if k not in want else "changed"
            for k in want.keys() | have.keys() if want.get(k) != have.get(k)}
    bad = sorted(kind)
    shown = []
    for f in bad[:SHOW]:
        why = image_problem(root / f) if kind[f] != "missing" and Path(f).suffix.lower() in IMAGE_EXTS else None
        shown.append(f"{f} ({kind[f]}{', unreadable: ' + why if why else ''})")
    counts = ", ".join(f"{k} {n}" for k in ("missing", "extra", "changed") if (n := list(kind.values()).count(k)))
    return f"differing files ({len(bad)}): {', '.join(shown)}{' ...' if len(bad) > SHOW else ''} [{counts}]"


def verify(m: dict, path: Path, sha_list: Path | None = None) -> None:
    """Raise :class:`ManifestMismatchError` naming what differs; return quietly when all matches.

    For a folder, the per-file checksums (``sha_list``, else the manifest's ``checksums`` file in
    data_manifests/) name the missing, extra and changed files, and which changed images do not decode."""
    lines = tree_lines(path) if path.is_dir() else None
    got = describe(path, lines)
    problems = [f"{k}: manifest {m[k]!r}, found {got[k]!r}" for k in ("kind", "files", "bytes", "sha256")
                if k in m and k in got and m[k] != got[k]]
    if not problems:
        return
    if sha_list is None and m.get("checksums"):
        sha_list = MANIFESTS / m["checksums"]
    detail = ""
    if lines is not None and sha_list is not None and sha_list.exists():
        have = {ln.split("  ", 1)[1]: ln.split("  ", 1)[0] for ln in lines}
        detail = f"; {_differing(read_checksums(sha_list), have, path)} (per {sha_list})"
    hint = f" List undecodable images with `{scan_command(path)}`." if lines is not None else ""
    raise ManifestMismatchError(f"{m.get('name', path)} at {path} does not match its manifest: "
                                f"{'; '.join(problems)}{detail}. Restore the original data "
                                f"(origin: {m.get('origin', '?')}) or point the data root elsewhere.{hint}")


def scan(paths: list[Path]) -> list[tuple[Path, str]]:
    """(path, problem) for every file in ``paths`` that does not decode as an image."""
    return [(p, why) for p in paths if (why := image_problem(p))]


def dataset_files(target: str, root: str = "") -> tuple[str, list[Path]]:
    """The image files of a folder, or of a registered dataset (``root``: its data_root)."""
    p = Path(target)
    if p.is_dir():
        return str(p), sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
    from vitadapt.data import DATASETS, get_dataset
    if target not in DATASETS:
        raise ValueError(f"{target!r} is neither a folder nor a dataset; valid datasets: {', '.join(sorted(DATASETS))}")
    s = get_dataset(target, root=root, download=False, skip_bad_images=False)
    files = sorted({Path(f) for d in (s.train, s.val, s.test) for f in getattr(d, "paths", ())})
    return f"{target} at {s.info.get('root', '?')}", files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vitadapt.data.manifest")
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify")
    v.add_argument("names", nargs="*")
    d = sub.add_parser("describe")
    d.add_argument("path")
    d.add_argument("--checksums", help="also write the per-file checksum list of a folder to this file")
    c = sub.add_parser("scan", help="list the image files of a dataset or folder that do not decode")
    c.add_argument("target", help="a dataset name (aid, fmow, ...) or a folder")
    c.add_argument("--root", default="", help="the dataset's data_root")
    s = sub.add_parser("split")
    s.add_argument("name", choices=["aid"])
    args = ap.parse_args(argv)
    if args.cmd == "describe":
        path = Path(args.path)
        lines = tree_lines(path) if path.is_dir() else None
        if args.checksums and lines is not None:
            Path(args.checksums).write_text("".join(ln + "\n" for ln in lines))
        print(yaml.safe_dump(describe(path, lines), sort_keys=False))
        return 0
    if args.cmd == "scan":
        what, files = dataset_files(args.target, args.root)
        bad = scan(files)
        for p, why in bad:
            print(f"bad      {p}: {why}")
        print(f"{len(bad)} of {len(files)} image files of {what} do not decode")
        return 1 if bad else 0
    if args.cmd == "split":
        from vitadapt.data.sources import write_split_manifest
        counts = write_split_manifest(find_root(args.name), MANIFESTS / f"{args.name}_split.csv")
        print(f"wrote data_manifests/{args.name}_split.csv: {counts}")
        return 0
    names = args.names or sorted(p.stem for p in MANIFESTS.glob("*.yaml"))
    failed = 0
    for name in names:
        m = load(name, MANIFESTS)
        if m["kind"] == "online":
            try:
                print(f"present  {name}: {locate(m)} (online source; torchgeo/wilds check their own sums)")
            except DataMissingError:
                print(f"absent   {name}: online source, fetched on first use with the internet ({m['origin']})")
            continue
        try:
            path = locate(m)
            beside = path.parent / f"{path.name}.sha256"   # a list next to the folder serves when the manifest has none
            sha_list = beside if m["kind"] == "folder" and not m.get("checksums") and beside.exists() else None
            verify(m, path, sha_list)
            print(f"ok       {name}: {path}")
        except (DataMissingError, ManifestMismatchError) as e:
            failed += 1
            print(f"FAILED   {name}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
