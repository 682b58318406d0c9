"""Images without their labels, for self-supervised training on a labelled dataset's images."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset


def draw(n_images: int, pool_len: int, seed: int) -> list[int]:
    """``n_images`` indices (at most ``pool_len``) drawn uniformly without replacement with ``seed``, sorted: the
    unlabelled images a self-supervised run trains on (labels are not read, so the draw cannot be stratified)."""
    pick = np.random.default_rng(seed).choice(pool_len, size=min(n_images, pool_len), replace=False)
    return sorted(pick.tolist())


class Unlabelled(Dataset):
    """``transform(image)`` for the images ``indices`` of ``base``, **without labels**: ``base[i]`` yields
    ``(image, label)`` and the label is dropped unread (never converted, compared or collated); ``base.targets``
    is never touched."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable):
        self.base, self.indices, self.transform = base, [int(i) for i in indices], transform

    def __len__(self):
        return len(self.indices)

    def image(self, i: int):
        """The ``i``-th image, untransformed."""
        return self.base[self.indices[i]][0]

    def __getitem__(self, i):
        return self.transform(self.image(i))
