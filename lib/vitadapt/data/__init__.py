"""Dataset sources, as a registry of small builder functions.

Every source returns :class:`Splits`: train / val / test datasets of ``(PIL RGB image, label)`` pairs
(label ``-1`` for unlabelled images), the class names and a plain description of where the data came
from, which the notebooks print and every metrics.json records.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vitadapt.paths import REPO_ROOT, resolve


class DataMissingError(FileNotFoundError):
    """A dataset is not where it was looked for; the message says what to run or set."""


class BadImageError(OSError):
    """An image file cannot be decoded; the message names it and the command that lists every bad file."""


SKIP_BAD_ENV = "VITADAPT_SKIP_BAD_IMAGES"


def skip_bad_images(flag: bool | None = None) -> bool:
    """``flag`` when given, else $VITADAPT_SKIP_BAD_IMAGES (1/true/yes/on or 0/false/no/off; unset: off)."""
    if flag is not None:
        return bool(flag)
    v = os.environ.get(SKIP_BAD_ENV, "").strip().lower()
    if v in ("", "0", "false", "no", "off"):
        return False
    if v in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"${SKIP_BAD_ENV}={v!r} is not valid; valid values: 1, true, yes, on, 0, false, no, off")


def image_problem(path: Path) -> str | None:
    """None when the image file decodes completely, else what is wrong with it (GeoTIFFs: read by rasterio)."""
    try:
        if Path(path).suffix.lower() in (".tif", ".tiff") and importlib.util.find_spec("rasterio"):
            import rasterio
            with rasterio.open(path) as src:
                src.read()
            return None
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # truncated (OSError), not an image (UnidentifiedImageError), missing, ...
        return f"{type(e).__name__}: {e}"
    return None


_CHECKED: dict[tuple, str | None] = {}


def _checked_problem(path: Path) -> str | None:
    """:func:`image_problem`, remembered per (path, size, mtime) for this process."""
    try:
        st = path.stat()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _CHECKED:
        _CHECKED[key] = image_problem(path)
    return _CHECKED[key]


def scan_command(where) -> str:
    return f"python -m vitadapt.data.manifest scan {where}"


@dataclass
class Splits:
    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    source: str
    info: dict = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def record(self) -> dict:
        """What metrics.json stores about the data a run used."""
        return {"dataset": self.name, "source": self.source, "num_classes": len(self.classes),
                "counts": self.counts(), **{k: v for k, v in self.info.items() if isinstance(v, (str, int, float))}}


DATASETS: dict[str, Callable[..., Splits]] = {}


def register(name: str):
    def deco(fn):
        DATASETS[name] = fn
        return fn
    return deco


class FileList(Dataset):
    """Images read from a list of files, with integer labels.

    An unreadable file (truncated, not an image) raises :class:`BadImageError` naming it. With ``skip_bad``
    (default: $VITADAPT_SKIP_BAD_IMAGES) every file is decoded once up front and the bad ones are left out,
    with a warning that counts them; ``skipped`` lists them."""

    def __init__(self, paths: Sequence[Path], targets: Sequence[int], skip_bad: bool | None = None):
        if len(paths) != len(targets):
            raise ValueError("paths and targets differ in length")
        self.paths = [Path(p) for p in paths]
        self.targets = list(targets)
        self.skipped: list[Path] = []
        if skip_bad_images(skip_bad) and self.paths:
            keep = [i for i, p in enumerate(self.paths) if _checked_problem(p) is None]
            if len(keep) < len(self.paths):
                kept, folder = set(keep), self._folder(self.paths)
                self.skipped = [p for i, p in enumerate(self.paths) if i not in kept]
                self.paths = [self.paths[i] for i in keep]
                self.targets = [self.targets[i] for i in keep]
                warnings.warn(f"skipped {len(self.skipped)} unreadable image(s) of {len(self.skipped) + len(keep)} "
                              f"(skip_bad_images / ${SKIP_BAD_ENV}), e.g. {', '.join(map(str, self.skipped[:3]))}; "
                              f"list them all with `{scan_command(folder)}`", stacklevel=2)

    @staticmethod
    def _folder(paths: Sequence[Path]) -> str:
        try:
            return os.path.commonpath([str(p.parent) for p in paths])
        except ValueError:
            return str(paths[0].parent)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        p = self.paths[i]
        try:
            with Image.open(p) as im:
                return im.convert("RGB"), self.targets[i]
        except (OSError, SyntaxError, ValueError) as e:   # PIL: truncated, unidentified, broken headers
            raise BadImageError(
                f"cannot read image {p}: {type(e).__name__}: {e}. List every unreadable file with "
                f"`{scan_command(self._folder(self.paths))}`; set {SKIP_BAD_ENV}=1 to leave them out "
                f"(with a warning)") from e


def skipped_info(*datasets: Dataset) -> dict:
    """``{"bad_images_skipped": n}`` when files were left out (recorded in metrics.json), else ``{}``."""
    n = sum(len(getattr(d, "skipped", ())) for d in datasets)
    return {"bad_images_skipped": n} if n else {}


class Subset(Dataset):
    """A subset that keeps ``targets`` and ``classes`` visible."""

    def __init__(self, base: Dataset, indices: Sequence[int]):
        self.base, self.indices = base, list(indices)
        base_targets = getattr(base, "targets", None)
        self.targets = [base_targets[i] for i in self.indices] if base_targets is not None else None

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]]


def per_class_subset(ds: Dataset, n_per_class: int, seed: int) -> Dataset:
    """At most ``n_per_class`` items of every class, drawn with ``seed``; 0 keeps everything.

    Stratified and deterministic: the same (dataset, n, seed) always gives the same indices."""
    if n_per_class <= 0:
        return ds
    targets = np.asarray(ds.targets)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        keep.extend(rng.permutation(idx)[:n_per_class].tolist())
    return Subset(ds, sorted(keep))


def stratified_split(targets: Sequence[int], fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Split indices per class by ``fractions`` (summing to 1), seeded; every class in every split."""
    total = sum(fractions.values())
    if abs(total - 1) > 1e-9:
        raise ValueError(f"fractions {fractions} sum to {total}, not 1")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    out = {k: [] for k in fractions}
    names = list(fractions)
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        n = len(idx)
        cuts, acc = [], 0.0
        for k in names[:-1]:
            acc += fractions[k]
            cuts.append(int(round(acc * n)))
        for k, part in zip(names, np.split(idx, cuts)):
            out[k].extend(part.tolist())
    return {k: sorted(v) for k, v in out.items()}


@dataclass
class Layout:
    """What a dataset folder must hold: ``expected`` (words for error messages) and ``check``; ``hint``
    says how to get the data, in the not-found message."""
    expected: str
    check: Callable[[Path], bool]
    hint: str = ""


#: dataset name -> Layout; a dataset without one needs a non-empty folder
LAYOUTS: dict[str, Layout] = {}


def root_env(name: str) -> str:
    return f"VITADAPT_{name.upper()}_ROOT"


def default_places(name: str) -> list[Path]:
    return [REPO_ROOT / "data" / name, REPO_ROOT.parent / "shared" / "data" / name]


def explicit_root(name: str, root: str = "") -> tuple[Path, str] | None:
    """The explicitly given location of dataset ``name`` and how it was given: ``root`` (data_root), else
    $VITADAPT_<NAME>_ROOT; None when neither is set."""
    if root:
        return resolve(root), f"data_root={str(root)!r}"
    env = os.environ.get(root_env(name), "")
    if env:
        return resolve(env), f"${root_env(name)}={env!r}"
    return None


def find_root(name: str, root: str = "", places: Sequence[Path] | None = None) -> Path:
    """The folder of dataset ``name``; the one rule of the dataset builders and ``make verify-data``.

    An explicitly given location (``root``, i.e. data_root, else $VITADAPT_<NAME>_ROOT; relative paths are
    taken from the repository root) is used, or it is an error naming it and what was expected there. Only
    when none is given are ``places`` searched (default: data/<name>, ../shared/data/<name>)."""
    layout = LAYOUTS.get(name)
    expected = layout.expected if layout else "a non-empty folder with the dataset's files"
    ok = lambda p: p.is_dir() and (layout.check(p) if layout else any(p.iterdir()))
    given = explicit_root(name, root)
    if given:
        p, how = given
        if ok(p):
            return p
        undo = "pass data_root=''" if root else f"unset {root_env(name)}"
        if not p.is_dir():
            problem = f"does not exist ({p}); expected a folder with {expected}"
        else:
            problem = f"lacks {expected} ({p}{' is empty' if not any(p.iterdir()) else ''})"
        raise DataMissingError(f"{how} for dataset {name!r} {problem}. Point it at a complete copy, or {undo} "
                               f"to search the default places ({', '.join(map(str, default_places(name)))}).")
    places = list(default_places(name) if places is None else places)
    for p in places:
        if ok(p):
            return p
    raise DataMissingError(
        f"dataset {name!r} not found; looked in {', '.join(str(c) for c in places)} for {expected}. "
        f"{layout.hint + ' ' if layout and layout.hint else ''}"
        f"Set data_root=... (papermill -p data_root PATH) or {root_env(name)}, or put it in data/{name}.")


def get_dataset(name: str, **kwargs) -> Splits:
    """Build the splits of dataset ``name`` (see :data:`DATASETS`)."""
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not valid; valid values: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](**kwargs)


def subsample(splits: Splits, seed: int, n_train_per_class: int = 0, n_val_per_class: int = 0,
              n_test_per_class: int = 0) -> Splits:
    """Per-class subsets of each split. The training subset varies with ``seed``; validation and test
    subsets are drawn with a fixed seed so every seed is scored on the same images."""
    if not splits.classes:
        raise ValueError(f"dataset {splits.name!r} is unlabelled; it cannot be subsampled per class")
    return Splits(splits.name, per_class_subset(splits.train, n_train_per_class, seed),
                  per_class_subset(splits.val, n_val_per_class, 10_007),
                  per_class_subset(splits.test, n_test_per_class, 10_009),
                  splits.classes, splits.source, dict(splits.info, subset_seed=seed))


# register the built-in sources
from vitadapt.data import sources as _sources  # noqa: E402,F401
from vitadapt.data import vtab as _vtab  # noqa: E402,F401
from vitadapt.data import digits as _digits  # noqa: E402,F401
