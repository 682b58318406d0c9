"""Get the data and weights that are not a torchgeo download: one command each.

``python -m vitadapt.data.fetch <name> [--root DIR]`` (``make data DATASET=<name>``), ``name`` one of
:data:`RECIPES`:

- ``fmow``: fMoW-RGB v1.1 in the WILDS layout (``<root>/fmow_v1.1/rgb_metadata.csv`` and
  ``images/rgb_img_<row>.png``), the official WILDS archive (CodaLab bundle, ~54 GB compressed, no published
  checksum), as :func:`vitadapt.data.sources.fmow` reads it.
- ``vtab1k``: the 19 VTAB-1k tasks in the NOAH / SSF / RepAdapter folder layout
  (``<root>/<task>/{train800,val200,train800val200,test}.txt`` + images). The prepared archive sits behind a
  Google Drive link, which a plain HTTP client cannot fetch: the command prints the steps, extracts an archive
  given with ``--archive``, and verifies the layout once it is in place.
- ``fgvc``: the five FGVC sets in VPT's layout (``<root>/<folder>/{train,val,test}.json``). CUB-200-2011,
  Oxford Flowers and Stanford Dogs are downloaded; VPT's json splits (Google Drive), NABirds (terms to accept)
  and Stanford Cars (no official host left) are steps printed for the user; every set is verified.
- ``mae_decoder``: the official MAE ViT-L/16 pre-training checkpoint *with its decoder*
  (``mae_pretrain_vit_large_full.pth``, facebookresearch/mae issue 8), the file ExPLoRA's MAE variant loads
  with ``mae_decoder=`` (:data:`MAE_DECODER_FILE`).

The folder is the dataset's location by the README rule: ``--root``, else ``$VITADAPT_<NAME>_ROOT``, else
``data/<name>`` (``data/mae`` for the checkpoint). Downloads go through urllib, which honours
``$HTTPS_PROXY`` / ``$NO_PROXY``; each goes to ``<root>/.downloads/<file>.part`` and is renamed when complete
and its checksum (where one is published) agrees; an interrupted download resumes from its ``.part`` file;
archives are extracted into a temporary folder beside the target and moved into place, then the layout is
verified and the place printed. Without the network: one line saying why, exit code 1, nothing written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vitadapt.data import DataMissingError, explicit_root
from vitadapt.paths import REPO_ROOT, shown

__all__ = ["RECIPES", "Recipe", "Remote", "FetchError", "fetch", "reachable", "download_url", "extract",
           "target_root", "MAE_DECODER_FILE", "MAE_DECODER_URL", "main"]

OFFLINE_ENV = "VITADAPT_OFFLINE"

#: the official MAE ViT-L/16 checkpoint that holds the decoder (encoder-only releases lack ``decoder_*``)
MAE_DECODER_URL = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large_full.pth"
MAE_DECODER_FILE = "data/mae/mae_pretrain_vit_large_full.pth"


class FetchError(RuntimeError):
    """A download, checksum or extraction failed; the message is the one line the command prints."""


_REACHED: dict[str, str | None] = {}


def reachable(url: str, timeout: float = 10.0) -> str | None:
    """None when the server of ``url`` answers (through the proxies of $HTTPS_PROXY / $NO_PROXY, as urllib reads
    them; any HTTP status counts), else why not, in a few words; asked once per server and process.
    $VITADAPT_OFFLINE=1 is never reachable."""
    if os.environ.get(OFFLINE_ENV) == "1":
        return f"${OFFLINE_ENV}=1"
    parts = urllib.parse.urlsplit(url)
    key = f"{parts.scheme}://{parts.netloc}"
    if key not in _REACHED:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                _REACHED[key] = None
        except urllib.error.HTTPError:          # the server answered (403, 405, ...): the network is there
            _REACHED[key] = None
        except (urllib.error.URLError, OSError, ValueError) as e:
            _REACHED[key] = f"{parts.hostname} is not reachable ({getattr(e, 'reason', e)})"
    return _REACHED[key]


def _md5(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def download_url(url: str, dest: Path, md5: str = "") -> Path:
    """``url`` to ``dest``: written to ``dest.part`` (resumed with an HTTP Range request when it exists and the
    server allows it), its md5 checked when given, then renamed to ``dest``. Raises :class:`FetchError`."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resumed = have and resp.status == 206
            with part.open("ab" if resumed else "wb") as fh:
                shutil.copyfileobj(resp, fh, 1 << 22)
    except urllib.error.HTTPError as e:
        if not (e.code == 416 and have):    # 416: the .part file is already complete
            raise FetchError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(f"download of {url} stopped ({getattr(e, 'reason', e)}); run the command again to resume "
                         f"from {shown(part)}") from e
    if md5 and (got := _md5(part)) != md5:
        part.unlink()
        raise FetchError(f"{url}: md5 {got} differs from the published {md5}; the file was deleted, run again")
    os.replace(part, dest)
    return dest


def _merge(src: Path, dst: Path) -> None:
    """Move the tree ``src`` into ``dst``: new entries are renamed into place, folders are merged, files replace."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        target = dst / entry.name
        if entry.is_dir() and target.is_dir():
            _merge(entry, target)
        else:
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)


def extract(archive: Path, into: Path) -> None:
    """Extract a .tar[.gz] / .tgz / .zip ``archive`` into a hidden temporary folder in ``into``, then move its
    contents into ``into`` (merged with what is there): an interrupted extraction leaves only that hidden folder,
    which the next run replaces."""
    tmp = into / f".{archive.name}.extracting"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                t.extractall(tmp, filter="data")
        else:
            raise FetchError(f"{archive} is neither a tar nor a zip archive")
        _merge(tmp, into)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise FetchError(f"extracting {archive} failed ({type(e).__name__}: {e}); delete it and run again") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- what each name fetches and how its layout is checked --------------------------------------------------

@dataclass(frozen=True)
class Remote:
    """One file to download: ``url``, its ``file`` name, a human ``size``, the published ``md5`` ('' if none),
    ``into`` (the folder under the root it is extracted into; None: kept as the file ``<root>/<file>``) and
    ``present`` (whether its contents are already in place under the root: then it is not fetched)."""
    url: str
    file: str
    size: str
    present: Callable[[Path], bool]
    md5: str = ""
    into: str | None = ""


@dataclass(frozen=True)
class Recipe:
    """How to get one name: the ``files`` to download, ``manual`` steps for what plain HTTP cannot fetch,
    ``check`` (the problems of the layout at a root, [] when complete) and ``layout`` (words for messages)."""
    name: str
    what: str
    default: str
    files: tuple[Remote, ...]
    check: Callable[[Path], list[str]]
    layout: str
    manual: str = ""


def _first_path(listing: Path) -> str | None:
    """The first image path of a VTAB-1k list file or a VPT json split (None when empty or unreadable)."""
    try:
        if listing.suffix == ".json":
            return next(iter(json.loads(listing.read_text())), None)
        with listing.open() as fh:
            line = fh.readline().strip()
        return line.rsplit(None, 1)[0] if line else None
    except (OSError, ValueError, IndexError):
        return None


def _check_fmow(root: Path) -> list[str]:
    d = root / "fmow_v1.1"
    meta = d / "rgb_metadata.csv"
    if not meta.is_file():
        return [f"{shown(meta)} is missing"]
    with meta.open() as fh:
        n = sum(1 for _ in fh) - 1
    missing = [f"images/rgb_img_{i}.png" for i in (0, n - 1) if n > 0 and not (d / "images" / f"rgb_img_{i}.png").is_file()]
    return [f"{shown(d)} lacks {', '.join(missing)} ({n} rows in rgb_metadata.csv)"] if missing or n < 1 else []


def _check_vtab1k(root: Path) -> list[str]:
    from vitadapt.data.vtab import VTAB1K_TASKS
    out = []
    for task in VTAB1K_TASKS:
        d = root / task
        lists = [d / f"{f}.txt" for f in ("train800", "val200", "train800val200", "test")]
        absent = [p.name for p in lists if not p.is_file()]
        first = None if absent else _first_path(d / "test.txt")
        if absent:
            out.append(f"{task}: no {', '.join(absent)}")
        elif first is None or not (d / first).is_file():
            out.append(f"{task}: the first test image {first!r} is not under {shown(d)}")
    return out


def _check_fgvc(root: Path) -> list[str]:
    from vitadapt.data.vtab import FGVC_TASKS
    out = []
    for task, (folder, sub) in FGVC_TASKS.items():
        d = root / folder
        absent = [f"{s}.json" for s in ("train", "val", "test") if not (d / f"{s}.json").is_file()]
        first = None if absent else _first_path(d / "train.json")
        if absent:
            out.append(f"{task}: no {', '.join(absent)} in {shown(d)}")
        elif first is None or not (d / sub / first).is_file():
            out.append(f"{task}: the first training image {first!r} is not under {shown(d / sub)}")
    return out


def _check_mae(root: Path) -> list[str]:
    p = root / Path(MAE_DECODER_FILE).name
    if not p.is_file():
        return [f"{shown(p)} is missing"]
    import torch
    try:
        ckpt = torch.load(p, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # a truncated or foreign file
        return [f"{shown(p)} does not load ({type(e).__name__}: {str(e)[:120]})"]
    keys = (ckpt.get("model", ckpt) if isinstance(ckpt, dict) else {}).keys()
    if not any(k.startswith("decoder_blocks.") for k in keys):
        return [f"{shown(p)} holds no MAE decoder (no decoder_blocks.* keys): an encoder-only checkpoint?"]
    return []


VTAB1K_STEPS = """\
The prepared VTAB-1k folders (NOAH / SSF / RepAdapter: vtab-1k.zip, a few GB) sit behind a Google Drive link, which a plain
HTTP client cannot fetch. On a machine with a browser or with `pip install gdown`:
  1. gdown 1yZKwiKdsBzTfBgnStRveYMokc7GMMd5p      (https://drive.google.com/file/d/1yZKwiKdsBzTfBgnStRveYMokc7GMMd5p,
     vtab-1k.zip, linked from RepAdapter's and NOAH's READMEs)
  2. python -m vitadapt.data.fetch vtab1k --archive vtab-1k.zip [--root {root}]
     (or unzip it yourself so that {root}/<task>/train800.txt exists; the zip's top folder vtab-1k/ is the root)
Expected: {root}/<task>/{{train800,val200,train800val200,test}}.txt ('<image path> <label>' lines) and the images,
for the 19 tasks cifar, caltech101, ..., smallnorb_ele."""

FGVC_STEPS = """\
Not fetchable by plain HTTP, to put in place by hand (the command then verifies them):
  - VPT's json splits (train.json, val.json, test.json per set): the Google Drive folder linked from VPT's README
    (github.com/KMnP/vpt, "FGVC" datasets), https://drive.google.com/drive/folders/1mnvxTkYxmOr2W9QjcgS64UBpoJ4UmKaM;
    copy each set's three files into {root}/<folder>/ (CUB_200_2011, nabirds, OxfordFlower, Stanford-dogs,
    Stanford-cars).
  - NABirds: accept the terms at https://dl.allaboutbirds.org/nabirds, then extract it so that
    {root}/nabirds/images/<class id>/<file>.jpg exists.
  - Stanford Cars: the original host is gone; use a mirror of the original archives (cars_train/, cars_test/)
    under {root}/Stanford-cars/ so that the json paths resolve.
Expected: {root}/<folder>/{{train,val,test}}.json mapping image paths (relative to <folder>/<images>) to class ids;
images: CUB_200_2011/images, nabirds/images, OxfordFlower/, Stanford-dogs/Images, Stanford-cars/."""


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("fmow", "fMoW-RGB v1.1, WILDS layout (62 classes, 523,846 images)", "data/fmow",
           (Remote("https://worksheets.codalab.org/rest/bundles/0xaec91eb7c9d548ebb15e1b5e60f966ab/contents/blob/",
                   "fmow_v1.1.tar.gz", "54 GB (about 55 GB extracted)",
                   lambda r: (r / "fmow_v1.1" / "rgb_metadata.csv").is_file(), into="fmow_v1.1"),),
           _check_fmow, "<root>/fmow_v1.1/rgb_metadata.csv and <root>/fmow_v1.1/images/rgb_img_<row>.png"),
    Recipe("vtab1k", "VTAB-1k, 19 tasks in the NOAH/SSF folder layout", "data/vtab1k", (), _check_vtab1k,
           "<root>/<task>/{train800,val200,train800val200,test}.txt + images", VTAB1K_STEPS),
    Recipe("fgvc", "the five FGVC sets in VPT's layout (CUB, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars)",
           "data/fgvc",
           (Remote("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
                   "CUB_200_2011.tgz", "1.1 GB", lambda r: (r / "CUB_200_2011" / "images").is_dir(),
                   md5="97eceeb196236b17998738112f37df78", into=""),
            Remote("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz", "102flowers.tgz", "330 MB",
                   lambda r: (r / "OxfordFlower" / "jpg").is_dir(), md5="52808999861908f626f3c1f4e79d11fa",
                   into="OxfordFlower"),
            Remote("http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar", "stanford_dogs_images.tar",
                   "760 MB", lambda r: (r / "Stanford-dogs" / "Images").is_dir(), into="Stanford-dogs")),
           _check_fgvc, "<root>/<folder>/{train,val,test}.json + images", FGVC_STEPS),
    Recipe("mae_decoder", "the official MAE ViT-L/16 pre-training checkpoint with its decoder", "data/mae",
           (Remote(MAE_DECODER_URL, Path(MAE_DECODER_FILE).name, "1.3 GB",
                   lambda r: (r / Path(MAE_DECODER_FILE).name).is_file(), into=None),),
           _check_mae, f"<root>/{Path(MAE_DECODER_FILE).name} (a dict with 'model' holding decoder_* keys)"),
]}


def _recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"name={name!r} is not valid; valid values: {', '.join(RECIPES)} (the torchgeo datasets "
                         f"eurosat, resisc45, ucmerced download on a real run)")
    return RECIPES[name]


def target_root(name: str, root: str = "") -> Path:
    """Where ``name`` goes: ``root``, else $VITADAPT_<NAME>_ROOT, else the recipe's folder under the repository."""
    recipe = _recipe(name)
    given = explicit_root(name, root)
    return given[0] if given else REPO_ROOT / recipe.default


def fetch(name: str, root: str = "", archive: str = "", keep_archives: bool = False) -> Path:
    """Get ``name`` (see :data:`RECIPES`) into its folder and verify the layout; returns the folder.

    ``archive``: a local archive to extract there instead of downloading (e.g. vtab-1k.zip fetched by hand).
    Raises :class:`FetchError` when the network is needed and not reachable (nothing written) or a download
    fails, :class:`~vitadapt.data.DataMissingError` when the layout is still incomplete (after the printed steps)."""
    recipe = _recipe(name)
    dest = target_root(name, root)
    if archive and not Path(archive).is_file():
        raise ValueError(f"--archive {archive!r} is not a file")
    if not recipe.check(dest):
        print(f"{name}: already in place at {shown(dest)}")
        return dest
    if archive:
        print(f"{name}: extracting {archive} into {shown(dest)}")
        extract(Path(archive), dest)
        _flatten_single_top(dest, recipe)
    todo = [f for f in recipe.files if not f.present(dest)]
    if todo:
        why = reachable(todo[0].url)
        if why:
            raise FetchError(f"{name}: cannot download ({why}); nothing was written. Run it where the network (or "
                             f"$HTTPS_PROXY) reaches {urllib.parse.urlsplit(todo[0].url).hostname}")
        downloads = dest / ".downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        for f in todo:
            final = dest / f.file if f.into is None else downloads / f.file
            if not final.is_file():
                print(f"{name}: downloading {f.url} ({f.size}) to {shown(final)}")
                download_url(f.url, final, f.md5)
            if f.into is not None:
                print(f"{name}: extracting {f.file} into {shown(dest / f.into)}")
                extract(final, dest / f.into)
                if not keep_archives:
                    final.unlink()
        if not any(downloads.iterdir()):
            downloads.rmdir()
    problems = recipe.check(dest) if dest.is_dir() else [f"{shown(dest)} does not exist"]
    if problems:
        if recipe.manual:
            print(recipe.manual.format(root=shown(dest)))
        raise DataMissingError(f"{name} at {shown(dest)} is not complete ({len(problems)} problem(s): "
                               f"{'; '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}); expected "
                               f"{recipe.layout}")
    print(f"{name}: ready at {shown(dest)} ({recipe.what})")
    return dest


def _flatten_single_top(dest: Path, recipe: Recipe) -> None:
    """An archive with one top folder (vtab-1k.zip holds vtab-1k/<task>/...): its contents become the root's."""
    if not recipe.check(dest):
        return
    tops = [p for p in dest.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(tops) == 1 and not recipe.check(tops[0]):
        tmp = dest / f".{tops[0].name}.moving"
        os.replace(tops[0], tmp)
        _merge(tmp, dest)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns 0 when the layout is verified, 1 otherwise (one line on stderr saying why)."""
    ap = argparse.ArgumentParser(prog="python -m vitadapt.data.fetch", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help=f"one of {', '.join(RECIPES)}")
    ap.add_argument("--root", default="", help="the folder (default: $VITADAPT_<NAME>_ROOT, else data/<name>)")
    ap.add_argument("--archive", default="", help="a local archive to extract instead of downloading (vtab1k)")
    ap.add_argument("--keep-archives", action="store_true", help="keep downloaded archives in <root>/.downloads")
    a = ap.parse_args(argv)
    try:
        fetch(a.name, a.root, a.archive, a.keep_archives)
    except (ValueError, FetchError, DataMissingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
