"""VTAB-1k-style tasks (Zhai et al. 2019): 800 training + 200 validation labelled images per task and a separate
test set, in three groups (Natural, Specialized, Structured).

Offline sources registered here (all return :class:`~vitadapt.data.Splits` of ``(PIL RGB, label)``):

- ``fashion_mnist`` (Natural): Zalando's Fashion-MNIST (MIT), read from Debian's ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz``) with a small IDX reader (:func:`read_idx`);
  28x28 grey converted to RGB. The official 60k training images are split 54k/6k (train/val pools, stratified,
  seed 0); the official 10k test images are the test pool.
- Structured tasks generated in-repo, every image a pure function of (seed, split, index):

  * ``clevr_count``: 3-10 CLEVR-like objects (shaded spheres, cubes and cylinders of eight CLEVR colours,
    rubber or metal, with shadows and perspective) on a plain floor; label = count - 3 (8 classes), as VTAB's
    ``clevr(task="count_all")``.
  * ``dsprites_location``: one white sprite (square, ellipse or heart; 6 scales; any orientation; any y) on
    black; label = the x position binned into ``bins`` bins (VTAB ``dsprites(predicted_attribute=
    "label_x_position", num_classes=16)``).
  * ``dsprites_orientation``: the same sprites; label = the orientation in [0, 2 pi) binned into ``bins`` bins
    (VTAB ``label_orientation``, 16). As in dSprites, the square (4-fold) and the ellipse (2-fold) are symmetric,
    so part of the orientation labels is ambiguous by construction: the task's ceiling is below 100 %.

  Classes are balanced (label = index mod classes, the other factors drawn at random given the label).

For the paper profile:

- ``vtab1k`` (``task=...``): the standard VTAB-1k folders used by the NOAH / SSF / RLRR code,
  ``<root>/<task>/{train800,val200,train800val200,test}.txt`` with lines ``<relative image path> <label>``.
  Task names and groups: :data:`VTAB1K_TASKS`, :data:`VTAB1K_GROUPS`.
- ``fgvc`` (``task=...``): the FGVC sets in the VPT layout (``<root>/<folder>/{train,val,test}.json`` mapping
  image paths to class ids; :data:`FGVC_TASKS`).

:func:`vtab_task` turns any labelled source into one VTAB-1k-style task: ``n_train`` (800) training and
``n_val`` (200) validation images drawn with a seed (stratified: every class in proportion to its share), and a
test set (all of it, or ``n_test`` images drawn with a fixed seed, the same for every run). Validation images
come from the source's validation pool when it has enough, else from its training pool (disjoint from the
training images); test images are never among them. FGVC tasks are the exception: they keep VPT's own
train / val / test splits whole, whatever ``n_train`` / ``n_val`` / ``n_test`` say.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vitadapt.data import (LAYOUTS, DataMissingError, FileList, Layout, Splits, Subset, find_root, get_dataset,
                           register, skipped_info, stratified_split)
from vitadapt.paths import REPO_ROOT

__all__ = ["read_idx", "write_idx", "Procedural", "ArrayImages", "VTAB_GROUPS", "VTAB1K_TASKS", "VTAB1K_GROUPS",
           "FGVC_TASKS", "vtab_task", "task_group", "stratified_sample", "read_vtab1k_list"]

#: the offline VTAB-style benchmark of the cpu/smoke profiles (configurable per notebook)
VTAB_GROUPS: dict[str, tuple[str, ...]] = {
    "natural": ("fashion_mnist",),
    "specialized": ("aid",),
    "structured": ("clevr_count", "dsprites_location", "dsprites_orientation"),
}

#: VTAB-1k folder name -> number of classes (the 19 tasks, in the usual table order)
VTAB1K_TASKS: dict[str, int] = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
    "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
    "smallnorb_azi": 18, "smallnorb_ele": 9,
}
VTAB1K_GROUPS: dict[str, tuple[str, ...]] = {
    "natural": tuple(f"vtab1k:{t}" for t in ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet",
                                             "svhn", "sun397")),
    "specialized": tuple(f"vtab1k:{t}" for t in ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy")),
    "structured": tuple(f"vtab1k:{t}" for t in ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc",
                                                "dsprites_ori", "smallnorb_azi", "smallnorb_ele")),
}

#: FGVC task -> (folder in the VPT layout, image sub-folder)
FGVC_TASKS: dict[str, tuple[str, str]] = {
    "cub": ("CUB_200_2011", "images"),
    "nabirds": ("nabirds", "images"),
    "oxford_flowers": ("OxfordFlower", ""),
    "stanford_dogs": ("Stanford-dogs", "Images"),
    "stanford_cars": ("Stanford-cars", ""),
}

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def task_group(name: str, groups: dict | None = None) -> str:
    """The VTAB group of task ``name`` in ``groups`` (default: the offline groups, then VTAB-1k's)."""
    for g in ([groups] if groups else [VTAB_GROUPS, VTAB1K_GROUPS]):
        for k, names in g.items():
            if name in names:
                return k
    if name.startswith("fgvc:"):
        return "fgvc"
    raise ValueError(f"task {name!r} is in no group; groups: {groups or VTAB_GROUPS}")


# ---------------------------------------------------------------------------------------------------------
# IDX files (MNIST / Fashion-MNIST)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array: magic ``00 00 <dtype> <ndim>``, then ``ndim``
    big-endian int32 dimensions, then the data in C order."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (EOFError, OSError) as e:    # a truncated .gz says "Compressed file ended ..." without the path
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); restore the file "
                         f"(`{FASHION_APT}` for Fashion-MNIST)") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (magic {data[:4].hex()})")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type 0x{code:02x}; known: {', '.join(hex(c) for c in _IDX_DTYPES)}")
    dims = struct.unpack(f">{ndim}i", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    n = int(np.prod(dims)) if dims else 1
    start = 4 + 4 * ndim
    if len(data) - start != n * dtype.itemsize:
        raise ValueError(f"{path}: {len(data) - start} data bytes, the header says {n * dtype.itemsize} ({dims})")
    arr = np.frombuffer(data, dtype=dtype, count=n, offset=start).reshape(dims)
    return arr.astype(dtype.newbyteorder("=")) if dtype.byteorder == ">" else arr


def write_idx(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Write ``arr`` as an IDX file (gzipped when the name ends in .gz); the inverse of :func:`read_idx`."""
    arr = np.asarray(arr)
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B, np.dtype(np.int32): 0x0C,
            np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}[arr.dtype.newbyteorder("=")]
    blob = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
    blob += arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(blob)


class ArrayImages(Dataset):
    """Images held in a uint8 array (N, H, W) or (N, H, W, 3), returned as PIL RGB."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: Sequence[str] = ()):
        if len(images) != len(targets):
            raise ValueError("images and targets differ in length")
        self.images, self.targets, self.classes = images, [int(t) for t in targets], list(classes)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return Image.fromarray(np.ascontiguousarray(self.images[i])).convert("RGB"), self.targets[i]


FASHION_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")
FASHION_APT = "apt-get install -y dataset-fashion-mnist"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")   # where the Debian package puts the files
_ARRAYS: dict[str, tuple] = {}


LAYOUTS["fashion_mnist"] = Layout(
    f"the IDX files {', '.join(FASHION_FILES)}", lambda p: all((p / f).exists() for f in FASHION_FILES),
    f"Run `make setup` (which runs `{FASHION_APT}` as root: Debian/Ubuntu's package of the Zalando files, MIT licence).")


def _fashion_root(root: str = "") -> Path:
    """data_root, else $VITADAPT_FASHION_MNIST_ROOT (used or an error), else data/, ../shared/data/, the Debian folder."""
    return find_root("fashion_mnist", root, [REPO_ROOT / "data" / "fashion_mnist",
                                             REPO_ROOT.parent / "shared" / "data" / "fashion_mnist", FASHION_SYSTEM_DIR])


@register("fashion_mnist")
def fashion_mnist(root: str = "", **_) -> Splits:
    """Fashion-MNIST (10 classes, 28x28 grey -> RGB) from the IDX files; 54k/6k/10k train/val/test pools."""
    r = _fashion_root(root)
    key = str(r)
    if key not in _ARRAYS:
        xtr, ytr = read_idx(r / FASHION_FILES[0]), read_idx(r / FASHION_FILES[1])
        xte, yte = read_idx(r / FASHION_FILES[2]), read_idx(r / FASHION_FILES[3])
        _ARRAYS[key] = (xtr, ytr, xte, yte)
    xtr, ytr, xte, yte = _ARRAYS[key]
    cut = stratified_split(ytr.tolist(), {"train": 0.9, "val": 0.1}, seed=0)
    mk = lambda idx: ArrayImages(xtr[idx], ytr[idx], FASHION_CLASSES)
    return Splits("fashion_mnist", mk(cut["train"]), mk(cut["val"]), ArrayImages(xte, yte, FASHION_CLASSES),
                  list(FASHION_CLASSES), f"Fashion-MNIST (Xiao et al. 2017, Zalando, MIT) IDX files at {r}",
                  {"root": key, "licence": "MIT"})


# ---------------------------------------------------------------------------------------------------------
# Procedural structured tasks

# CLEVR's eight colours (RGB, 0-255)
CLEVR_COLOURS = np.array([[87, 87, 87], [173, 35, 35], [42, 75, 215], [29, 105, 20], [129, 74, 25],
                          [129, 38, 192], [41, 208, 208], [255, 238, 51]], float)


def render_clevr(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` CLEVR-like objects on a grey floor, HxWx3 uint8. Objects nearer the camera (lower in the
    image) are larger; each casts a soft shadow to the lower right; metal objects get a specular highlight.
    Objects are kept apart (rejection sampling), so the count is always visible."""
    yy, xx = (np.mgrid[0:size, 0:size].astype(float) + 0.5) / size
    img = (118 + 40 * yy)[..., None] * np.array([1.0, 1.0, 1.02])
    objs = []
    for _ in range(count):
        for attempt in range(300):
            y = rng.uniform(0.25, 0.88)
            x = rng.uniform(0.08, 0.92)
            r = rng.uniform(0.045, 0.075) * (0.6 + 0.8 * y) * (1 - 0.0015 * attempt)
            if all((x - ox) ** 2 + (y - oy) ** 2 > (1.1 * (r + orr)) ** 2 for ox, oy, orr, *_ in objs):
                break
        objs.append((x, y, r, int(rng.integers(3)), CLEVR_COLOURS[rng.integers(len(CLEVR_COLOURS))],
                     bool(rng.random() < 0.5)))

    def window(x, y, half):   # pixel slices of the box of half-size ``half`` (in frame units) around (x, y)
        lo = lambda c: max(0, int((c - half) * size))
        hi = lambda c: min(size, int((c + half) * size) + 2)
        return slice(lo(y), hi(y)), slice(lo(x), hi(x))

    for x, y, r, *_ in objs:   # shadows first, under every object
        w = window(x + 0.55 * r, y + 0.35 * r, 1.4 * r)
        d = ((xx[w] - x - 0.55 * r) / (1.25 * r)) ** 2 + ((yy[w] - y - 0.35 * r) / (0.5 * r)) ** 2
        img[w] *= (1 - 0.35 * np.clip(1.3 - d, 0, 1))[..., None]
    for x, y, r, shape, colour, metal in sorted(objs, key=lambda o: o[1]):   # far to near
        w = window(x, y, 1.05 * r)
        u, v = (xx[w] - x) / r, (yy[w] - y) / r
        patch = img[w]
        if shape == 0:                                          # sphere: Lambert shading from the upper left
            m = u ** 2 + v ** 2 < 1
            nz = np.sqrt(np.clip(1 - u ** 2 - v ** 2, 0, 1))
            lam = np.clip(-0.5 * u - 0.6 * v + 0.62 * nz, 0, 1)
            col = colour * (0.3 + 0.8 * lam)[..., None]
            if metal:
                col = col + 200 * (lam ** 18)[..., None]
            patch[m] = col[m]
        elif shape == 1:                                        # cube: front face and a lighter top face
            front = (np.abs(u) < 0.8) & (v > -0.45) & (v < 0.95)
            top = (v <= -0.45) & (v > -0.95) & (u > -0.8 + (-0.45 - v) * 0.5) & (u < 0.8 + (-0.45 - v) * 0.5)
            col = colour * (0.62 + 0.12 * (1 - v))[..., None]
            patch[front] = col[front]
            patch[top] = colour * (1.15 if not metal else 1.35)
        else:                                                   # cylinder: body shaded across, elliptic top
            body = (np.abs(u) < 0.75) & (v > -0.55) & (v < 0.9)
            prof = np.sqrt(np.clip(1 - (u / 0.75) ** 2, 0, 1))
            col = colour * (0.35 + 0.75 * prof * (1 - 0.3 * (u > 0)))[..., None]
            if metal:
                col = col + 150 * (np.clip(prof - 0.85, 0, 1) * 6)[..., None]
            patch[body] = col[body]
            cap = (u / 0.75) ** 2 + ((v + 0.55) / 0.3) ** 2 < 1
            patch[cap] = colour * 1.1
    img += rng.normal(0, 2.5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


SPRITES = ("square", "ellipse", "heart")


def _sprite_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "square":
        return (np.abs(u) < 0.8) & (np.abs(v) < 0.8)
    if shape == "ellipse":
        return (u / 1.0) ** 2 + (v / 0.5) ** 2 < 1
    if shape == "heart":   # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, scaled to about the same area, tip down
        x, y = u * 1.25, -v * 1.25 + 0.15
        return (x ** 2 + y ** 2 - 1) ** 3 - x ** 2 * y ** 3 <= 0
    raise AssertionError(shape)


def render_sprite(shape: str, scale: float, theta: float, px: float, py: float, size: int) -> np.ndarray:
    """A white dSprites-style sprite on black, HxWx3 uint8: ``scale`` in [0.5, 1], ``theta`` in radians,
    position (``px``, ``py``) in [0, 1] mapped into the frame with a margin (as dSprites' 32 positions)."""
    yy, xx = (np.mgrid[0:size, 0:size].astype(float) + 0.5) / size
    cx, cy = 0.16 + 0.68 * px, 0.16 + 0.68 * py
    rad = 0.13 * scale
    ca, sa = np.cos(theta), np.sin(theta)
    dx, dy = (xx - cx) / rad, (yy - cy) / rad
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy
    m = _sprite_mask(shape, u, v)
    return np.repeat((m * 255).astype(np.uint8)[..., None], 3, axis=2)


_TASKS = {"clevr_count": 8, "dsprites_location": None, "dsprites_orientation": None}


class Procedural(Dataset):
    """``n`` images of one structured task, balanced (label = index mod classes), each a pure function of
    (task, seed, split, index). ``bins`` sets the classes of the dSprites tasks (VTAB: 16)."""

    def __init__(self, task: str, n: int, size: int = 64, split: str = "train", seed: int = 0, bins: int = 16):
        if task not in _TASKS:
            raise ValueError(f"task={task!r} is not valid; valid values: {', '.join(_TASKS)}")
        if split not in _SPLIT_IDS:
            raise ValueError(f"split={split!r} is not valid; valid values: {', '.join(_SPLIT_IDS)}")
        if not 2 <= bins <= 64:
            raise ValueError(f"bins={bins} out of range; valid: 2 <= bins <= 64")
        self.task, self.n, self.size, self.split, self.seed, self.bins = task, n, size, split, seed, bins
        c = _TASKS[task] or bins
        self.n_classes = c
        if task == "clevr_count":
            self.classes = [f"{k} objects" for k in range(3, 11)]
        elif task == "dsprites_location":
            self.classes = [f"x bin {k}" for k in range(c)]
        else:
            self.classes = [f"{360 * k / c:.1f}-{360 * (k + 1) / c:.1f} deg" for k in range(c)]
        self.targets = [i % c for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        y = self.targets[i]
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], list(_TASKS).index(self.task), i])
        if self.task == "clevr_count":
            img = render_clevr(y + 3, self.size, rng)
        else:
            shape = SPRITES[rng.integers(len(SPRITES))]
            scale = float(np.linspace(0.5, 1.0, 6)[rng.integers(6)])
            theta, px, py = rng.uniform(0, 2 * np.pi), rng.uniform(0, 1), rng.uniform(0, 1)
            if self.task == "dsprites_location":
                px = (y + rng.uniform(0, 1)) / self.bins
            else:
                theta = 2 * np.pi * (y + rng.uniform(0, 1)) / self.bins
            img = render_sprite(shape, scale, theta, px, py, self.size)
        return Image.fromarray(img), y


def _procedural(task: str, seed: int = 0, size: int = 64, bins: int = 16, pool: tuple = (10_000, 2_000, 2_000),
                **_) -> Splits:
    parts = {s: Procedural(task, n, size, s, seed, bins) for s, n in zip(("train", "val", "test"), pool)}
    desc = {"clevr_count": "CLEVR-style counting (3-10 objects, label = count - 3)",
            "dsprites_location": f"dSprites-style x position ({bins} bins)",
            "dsprites_orientation": f"dSprites-style orientation ({bins} bins of 360 deg)"}[task]
    return Splits(task, parts["train"], parts["val"], parts["test"], parts["train"].classes,
                  f"{desc}, {size} px, generated in-repo (vitadapt.data.vtab), seed {seed}",
                  {"size": size, "bins": bins, "generator_seed": seed})


for _t in _TASKS:
    register(_t)(lambda _n=_t, **kw: _procedural(_n, **kw))


# ---------------------------------------------------------------------------------------------------------
# The real VTAB-1k folders and the FGVC sets (paper profile)

def read_vtab1k_list(path: Path) -> tuple[list[str], list[int]]:
    """A VTAB-1k list file: one ``<relative path> <label>`` per line (the path may not contain spaces)."""
    paths, labels = [], []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{n}: expected '<path> <label>', got {line!r}")
        paths.append(parts[0])
        labels.append(int(parts[1]))
    return paths, labels


LAYOUTS["vtab1k"] = Layout("the VTAB-1k task folders <task>/{train800,val200,train800val200,test}.txt + images",
                          lambda p: any(p.iterdir()), "Get it with `make data DATASET=vtab1k` (it prints the steps).")
LAYOUTS["fgvc"] = Layout("the FGVC folders in VPT's layout <folder>/{train,val,test}.json + images",
                        lambda p: any(p.iterdir()), "Get them with `make data DATASET=fgvc` (it prints the steps).")


@register("vtab1k")
def vtab1k(root: str = "", task: str = "", skip_bad_images: bool | None = None, **_) -> Splits:
    """One VTAB-1k task from ``<root>/<task>/`` (lists train800.txt, val200.txt, test.txt; train800val200.txt
    is checked to be their union)."""
    base = find_root("vtab1k", root)
    if not task:
        raise DataMissingError(f"vtab1k needs task=...; one of {', '.join(VTAB1K_TASKS)}")
    d = base / task
    lists = {k: d / f"{f}.txt" for k, f in (("train", "train800"), ("val", "val200"), ("test", "test"))}
    missing = [str(p) for p in lists.values() if not p.exists()]
    if missing:
        raise DataMissingError(f"VTAB-1k task {task!r} at {d} lacks {', '.join(missing)}; the standard layout is "
                               f"<root>/<task>/{{train800,val200,train800val200,test}}.txt + images (NOAH/SSF/RLRR "
                               f"repos; `make data DATASET=vtab1k`)")
    parts = {k: read_vtab1k_list(p) for k, p in lists.items()}
    both = d / "train800val200.txt"
    if both.exists():
        tv = read_vtab1k_list(both)
        if sorted(zip(*tv)) != sorted(zip(parts["train"][0] + parts["val"][0], parts["train"][1] + parts["val"][1])):
            raise ValueError(f"{both} is not the union of train800.txt and val200.txt")
    n_cls = VTAB1K_TASKS.get(task) or 1 + max(max(v[1]) for v in parts.values())
    ds = {k: FileList([d / p for p in v[0]], v[1], skip_bad_images) for k, v in parts.items()}
    return Splits(f"vtab1k:{task}", ds["train"], ds["val"], ds["test"], [str(i) for i in range(n_cls)],
                  f"VTAB-1k {task} (standard 800/200 lists) at {d}",
                  {"root": str(d), "fixed_split": 1, **skipped_info(*ds.values())})


@register("fgvc")
def fgvc(root: str = "", task: str = "", skip_bad_images: bool | None = None, **_) -> Splits:
    """One FGVC set in the VPT layout: ``<root>/<folder>/{train,val,test}.json`` ({image path: class id}),
    images under ``<folder>/<image sub-folder>``; class ids are renumbered 0..C-1 in sorted order."""
    base = find_root("fgvc", root)
    if task not in FGVC_TASKS:
        raise DataMissingError(f"fgvc needs task=...; one of {', '.join(FGVC_TASKS)}")
    folder, sub = FGVC_TASKS[task]
    d = base / folder
    parts = {}
    for split in ("train", "val", "test"):
        p = d / f"{split}.json"
        if not p.exists():
            raise DataMissingError(f"FGVC {task!r}: {p} is missing (VPT layout: train.json, val.json, test.json; "
                                   f"`make data DATASET=fgvc`)")
        parts[split] = json.loads(p.read_text())
    ids = sorted({v for part in parts.values() for v in part.values()})
    cont = {v: i for i, v in enumerate(ids)}
    ds = {k: FileList([d / sub / p for p in v], [cont[c] for c in v.values()], skip_bad_images)
          for k, v in parts.items()}
    return Splits(f"fgvc:{task}", ds["train"], ds["val"], ds["test"], [str(i) for i in ids],
                  f"FGVC {task} (VPT json splits) at {d}",
                  {"root": str(d), "fixed_split": 1, **skipped_info(*ds.values())})


# ---------------------------------------------------------------------------------------------------------
# One VTAB-1k-style task from any labelled source

def stratified_sample(targets: Sequence[int], n: int, rng: np.random.Generator,
                      exclude: Sequence[int] = ()) -> list[int]:
    """``n`` indices drawn without replacement, every class in proportion to its share (largest remainder),
    none of ``exclude``. Returns sorted indices; ``n >= len`` returns every eligible index."""
    targets = np.asarray(targets)
    ok = np.ones(len(targets), bool)
    ok[list(exclude)] = False
    eligible = np.flatnonzero(ok)
    if n >= len(eligible):
        return eligible.tolist()
    classes, counts = np.unique(targets[eligible], return_counts=True)
    quota = counts / counts.sum() * n
    take = np.floor(quota).astype(int)
    for k in np.argsort(-(quota - take), kind="stable")[: n - take.sum()]:
        take[k] += 1
    out = []
    for c, t in zip(classes, take):
        idx = eligible[targets[eligible] == c]
        out.extend(rng.permutation(idx)[:t].tolist())
    return sorted(out)


def vtab_task(name: str, seed: int = 0, **settings) -> Splits:
    """One VTAB-1k-style task: ``n_train`` (800) + ``n_val`` (200) labelled images drawn with ``seed``
    (stratified) and a test set (``n_test`` images drawn with a fixed seed, or all when 0). ``n_train=0`` /
    ``n_val=0`` take the whole training / validation split (FGVC's protocol).

    ``name``: a registered dataset (``aid``, ``fashion_mnist``, ``clevr_count``, ...), ``vtab1k:<task>`` (the
    standard lists are used as they are; ``n_train``/``n_val`` smaller than 800/200 draw stratified subsets)
    or ``fgvc:<task>`` (VPT's own train / val / test json splits, whole: the sizes do not apply). ``settings``
    (keyword arguments; unknown names are an error) override the defaults: ``n_train=800, n_val=200, n_test=0,
    size=64`` (render size of the procedural tasks),
    ``bins=16`` (dSprites tasks), ``generator_seed=0``, ``vtab1k_root=""``, ``fgvc_root=""`` (folders of the
    VTAB-1k / FGVC collections; "" searches $VITADAPT_VTAB1K_ROOT, data/vtab1k, ../shared/data/vtab1k, and
    likewise for fgvc). Other sources are found where their own builders look (AID: ../shared/data/aid).
    """
    defaults = dict(n_train=800, n_val=200, n_test=0, size=64, bins=16, generator_seed=0, vtab1k_root="",
                    fgvc_root="")
    opts = {**defaults, **settings}
    unknown = set(settings) - set(defaults)
    if unknown:
        raise ValueError(f"unknown vtab_task setting(s) {sorted(unknown)}; valid: {', '.join(defaults)}")
    if ":" in name:
        kind, task = name.split(":", 1)
        if kind not in ("vtab1k", "fgvc"):
            raise ValueError(f"task {name!r}: the prefix must be vtab1k: or fgvc:")
        src = get_dataset(kind, root=opts[f"{kind}_root"], task=task)
    else:
        src = get_dataset(name, size=opts["size"], bins=opts["bins"], seed=opts["generator_seed"])
    n_tr = opts["n_train"] or len(src.train)    # 0: all of the split
    n_va = opts["n_val"] or len(src.val)
    n_te = opts["n_test"]
    rng = np.random.default_rng([seed, 800])
    fixed = bool(src.info.get("fixed_split"))
    if name.startswith("fgvc:"):    # FGVC: VPT's own train / val / test splits, whole (never the 800/200 draw)
        return Splits(src.name, src.train, src.val, src.test, src.classes, src.source,
                      {**src.info, "split": "VPT json", **{f"n_{k}": v for k, v in src.counts().items()}})
    if fixed and n_tr >= len(src.train) and n_va >= len(src.val):
        train, val = src.train, src.val
    elif len(src.val) >= n_va:
        train = Subset(src.train, stratified_sample(src.train.targets, n_tr, rng))
        val = Subset(src.val, stratified_sample(src.val.targets, n_va, rng))
    else:   # no usable validation pool: both from the training pool, disjoint
        tr_idx = stratified_sample(src.train.targets, n_tr, rng)
        train = Subset(src.train, tr_idx)
        val = Subset(src.train, stratified_sample(src.train.targets, n_va, rng, exclude=tr_idx))
    test = src.test if not n_te else Subset(src.test, stratified_sample(src.test.targets, n_te,
                                                                          np.random.default_rng([10_009, 800])))
    counts = {"train": len(train), "val": len(val), "test": len(test)}
    return Splits(src.name, train, val, test, src.classes, src.source,
                  {**src.info, "split_seed": seed, **{f"n_{k}": v for k, v in counts.items()}})
