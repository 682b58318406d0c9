"""scikit-learn's bundled handwritten digits (UCI "optdigits" test set: 1,797 images, 8x8, 10 classes), as an
offline labelled target domain far from natural images.

The 8x8 grey images (ink 0-16) are scaled to 0-255 (white ink on black, like MNIST), upsampled to ``size`` px
(bicubic by default) and returned as PIL RGB. Splits are stratified and seeded (the data ``seed``, fixed at 0 by
default, so every run sees the same pools): 60 % train, 10 % validation, 30 % test, every class in every split.
The data ship inside scikit-learn (BSD-3-Clause; the UCI data: CC BY 4.0), so no download is needed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vitadapt.data import DataMissingError, Splits, register, stratified_split

__all__ = ["DigitsImages", "digits", "DIGITS_FRACTIONS", "load_digits_arrays"]

DIGITS_FRACTIONS = {"train": 0.6, "val": 0.1, "test": 0.3}
_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
_ARRAYS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, 8, 8] in 0-255, labels int64 [1797]) from scikit-learn, loaded once per process."""
    if "digits" not in _ARRAYS:
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover - scikit-learn is a core dependency
            raise DataMissingError("the digits dataset needs scikit-learn; run `make setup`") from e
        d = load_digits()
        imgs = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        _ARRAYS["digits"] = (imgs, d.target.astype(np.int64))
    return _ARRAYS["digits"]


class DigitsImages(Dataset):
    """Items ``indices`` of the digits arrays as ``(PIL RGB of size x size, label)``.

    ``split``, ``seed`` and ``size`` are attributes so the feature cache (which keys items of array-backed
    datasets by these attributes and the index) never confuses two splits or two resolutions.
    """

    def __init__(self, indices, split: str, size: int = 32, seed: int = 0, resample: str = "bicubic"):
        if resample not in _RESAMPLE:
            raise ValueError(f"resample={resample!r} is not valid; valid values: {', '.join(_RESAMPLE)}")
        if int(size) < 8:
            raise ValueError(f"size={size!r} is not valid; it must be >= 8 pixels")
        imgs, labels = load_digits_arrays()
        self.indices = [int(i) for i in indices]
        self.split, self.size, self.seed, self.resample = split, int(size), int(seed), resample
        self.style = f"digits-{resample}"   # part of the feature-cache key of each item (see eval._item_keys)
        self.targets = [int(labels[i]) for i in self.indices]
        self.classes = [str(c) for c in range(10)]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        imgs, _ = load_digits_arrays()
        im = Image.fromarray(imgs[self.indices[i]])
        if self.size != 8:
            im = im.resize((self.size, self.size), _RESAMPLE[self.resample])
        return im.convert("RGB"), self.targets[i]


@register("digits")
def digits(size: int = 32, seed: int = 0, resample: str = "bicubic", **_) -> Splits:
    """scikit-learn digits (10 classes, 8x8 -> ``size`` px RGB), stratified 60/10/30 train/val/test pools
    drawn with the data seed ``seed`` (0 in every profile, as for the synthetic sets); per-seed subsets come
    from :func:`vitadapt.data.subsample`."""
    data_seed = int(seed)
    _, labels = load_digits_arrays()
    parts = stratified_split(labels.tolist(), DIGITS_FRACTIONS, seed=data_seed)
    mk = lambda split: DigitsImages(parts[split], split, size, data_seed, resample)
    return Splits("digits", mk("train"), mk("val"), mk("test"), [str(c) for c in range(10)],
                  f"scikit-learn digits (UCI optdigits, 1,797 images of 8x8 px, BSD-3 / CC BY 4.0) upsampled "
                  f"{resample} to {int(size)} px, stratified 60/10/30 split (seed {data_seed})",
                  {"size": int(size), "data_seed": int(data_seed), "licence": "BSD-3-Clause (scikit-learn), CC BY 4.0 (UCI)"})
