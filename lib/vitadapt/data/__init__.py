"""Dataset sources, as a registry of small builder functions.

Every source returns :class:`Splits`: train / val / test datasets of ``(PIL RGB image, label)`` pairs
(label ``-1`` for unlabelled images), the class names and a plain description of where the data came
from, which the notebooks print and every metrics.json records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vitadapt.paths import REPO_ROOT, resolve


class DataMissingError(FileNotFoundError):
    """A dataset is not where it was looked for; the message says what to run or set."""


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
    """Images read from a list of files, with integer labels."""

    def __init__(self, paths: Sequence[Path], targets: Sequence[int]):
        if len(paths) != len(targets):
            raise ValueError("paths and targets differ in length")
        self.paths = [Path(p) for p in paths]
        self.targets = list(targets)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB"), self.targets[i]


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


def find_root(name: str, root: str = "", marker: str | None = None) -> Path:
    """The dataset folder: ``root`` if given, else $VITADAPT_<NAME>_ROOT, data/<name>, ../shared/data/<name>."""
    if root:
        p = resolve(root)
        if not p.is_dir():
            raise DataMissingError(f"data_root={root!r} for dataset {name!r} does not exist ({p})")
        return p
    candidates = []
    env = os.environ.get(f"VITADAPT_{name.upper()}_ROOT")
    if env:
        candidates.append(Path(env))
    candidates += [REPO_ROOT / "data" / name, REPO_ROOT.parent / "shared" / "data" / name]
    for p in candidates:
        if p.is_dir() and (marker is None or (p / marker).exists()):
            return p
    raise DataMissingError(
        f"dataset {name!r} not found; looked in {', '.join(str(c) for c in candidates)}. "
        f"Set data_root=... (papermill -p data_root PATH) or VITADAPT_{name.upper()}_ROOT, or put it in data/{name}.")


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
