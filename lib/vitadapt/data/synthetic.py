"""Procedural images, deterministic by seed, in two styles of the same classes.

``style="source"`` draws each class as a flat, upright shape in natural colours on a plain background
(a stand-in for object-centric natural images). ``style="target"`` draws the same shape seen from above:
rotated at random, filled with a noisy texture, on a cluttered terrain-like background in another
palette (a stand-in for the satellite domain). So domain shift exists even in the smoke profile.

Every image is a pure function of (seed, split, index, style): no state, no files.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

CLASSES = ("disk", "square", "triangle", "ring", "cross", "h_stripes", "v_stripes", "checker", "dots", "diamond")
STYLES = ("source", "target")
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
# natural-ish object colours and sky/wall backgrounds for the source style
_SRC_FG = np.array([[200, 40, 40], [40, 120, 200], [230, 190, 40], [60, 160, 70], [150, 70, 170], [240, 120, 30]], float)
_SRC_BG = np.array([[235, 235, 230], [180, 210, 240], [250, 245, 225], [210, 210, 210]], float)
# earthy / false-colour terrain palette for the target style
_TGT_FG = np.array([[90, 200, 210], [240, 240, 250], [200, 60, 120], [250, 200, 150]], float)
_TGT_BG = np.array([[70, 90, 50], [120, 100, 70], [60, 70, 90], [150, 140, 110]], float)


def _mask(cls: int, u: np.ndarray, v: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of class ``cls`` on centred coordinates u, v in [-1, 1]."""
    r = np.sqrt(u ** 2 + v ** 2)
    s = scale
    name = CLASSES[cls]
    if name == "disk":
        return r < s
    if name == "square":
        return (np.abs(u) < s * 0.85) & (np.abs(v) < s * 0.85)
    if name == "triangle":
        return (v < s * 0.7) & (v > -s * 0.9 + 1.8 * np.abs(u))
    if name == "ring":
        return (r < s) & (r > s * 0.6)
    if name == "cross":
        return ((np.abs(u) < s * 0.25) | (np.abs(v) < s * 0.25)) & (np.abs(u) < s) & (np.abs(v) < s)
    if name == "h_stripes":
        return (np.sin(v * np.pi * 4 / s) > 0) & (r < s * 1.2)
    if name == "v_stripes":
        return (np.sin(u * np.pi * 4 / s) > 0) & (r < s * 1.2)
    if name == "checker":
        return ((np.floor(u * 3 / s) + np.floor(v * 3 / s)) % 2 == 0) & (np.abs(u) < s) & (np.abs(v) < s)
    if name == "dots":
        m = np.zeros_like(u, dtype=bool)
        for cx, cy in rng.uniform(-s, s, size=(6, 2)):
            m |= (u - cx) ** 2 + (v - cy) ** 2 < (0.14 * s) ** 2 + 0.004
        return m
    if name == "diamond":
        return np.abs(u) + np.abs(v) < s
    raise AssertionError(name)


def render(cls: int, size: int, style: str, rng: np.random.Generator) -> np.ndarray:
    """One HxWx3 uint8 image of class ``cls`` in ``style``."""
    if style not in STYLES:
        raise ValueError(f"style={style!r} is not valid; valid values: {', '.join(STYLES)}")
    if not 0 <= cls < len(CLASSES):
        raise ValueError(f"class index {cls} out of range 0..{len(CLASSES) - 1}")
    y, x = np.mgrid[0:size, 0:size].astype(float)
    y = (y + 0.5) / size * 2 - 1
    x = (x + 0.5) / size * 2 - 1
    cx, cy = rng.uniform(-0.2, 0.2, size=2)
    scale = rng.uniform(0.45, 0.7)
    angle = rng.uniform(0, 2 * np.pi) if style == "target" else rng.uniform(-0.15, 0.15)
    ca, sa = np.cos(angle), np.sin(angle)
    u = ca * (x - cx) + sa * (y - cy)
    v = -sa * (x - cx) + ca * (y - cy)
    mask = _mask(cls, u, v, scale, rng)[..., None]
    if style == "source":
        bg = _SRC_BG[rng.integers(len(_SRC_BG))] + rng.normal(0, 6, 3)
        fg = _SRC_FG[rng.integers(len(_SRC_FG))] + rng.normal(0, 12, 3)
        vertical = np.linspace(-12, 12, size)[:, None, None]           # soft lighting gradient
        img = np.where(mask, fg, bg + vertical) + rng.normal(0, 3, (size, size, 3))
    else:
        bg = _TGT_BG[rng.integers(len(_TGT_BG))]
        coarse = rng.normal(0, 1, (max(2, size // 8), max(2, size // 8), 3))
        coarse = np.kron(coarse, np.ones((size // coarse.shape[0] + 1, size // coarse.shape[1] + 1, 1)))[:size, :size]
        terrain = bg + 25 * coarse + rng.normal(0, 14, (size, size, 3))    # fields, fine grain
        fg = _TGT_FG[rng.integers(len(_TGT_FG))] + rng.normal(0, 10, 3)
        texture = fg + rng.normal(0, 22, (size, size, 3))
        img = np.where(mask, texture, terrain)
    return np.clip(img, 0, 255).astype(np.uint8)


class SyntheticShapes(Dataset):
    """``n_per_class`` images per class, class-balanced, deterministic by (seed, split, style)."""

    classes = list(CLASSES)

    def __init__(self, n_per_class: int, size: int = 32, style: str = "target", split: str = "train",
                 seed: int = 0, n_classes: int = len(CLASSES)):
        if split not in _SPLIT_IDS:
            raise ValueError(f"split={split!r} is not valid; valid values: {', '.join(_SPLIT_IDS)}")
        if style not in STYLES:
            raise ValueError(f"style={style!r} is not valid; valid values: {', '.join(STYLES)}")
        if not 2 <= n_classes <= len(CLASSES):
            raise ValueError(f"n_classes={n_classes} out of range; valid: 2..{len(CLASSES)}")
        self.n_per_class, self.size, self.style, self.split, self.seed = n_per_class, size, style, split, seed
        self.n_classes = n_classes
        self.classes = list(CLASSES[:n_classes])
        self.targets = [i % n_classes for i in range(n_per_class * n_classes)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        label = self.targets[index]
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], STYLES.index(self.style), index])
        return Image.fromarray(render(label, self.size, self.style, rng)), label
