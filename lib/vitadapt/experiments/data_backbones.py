"""00_data_and_backbones: which sources are available, sample grids, class counts, backbone sanity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from vitadapt.config import ExperimentConfig, _dataset_names, opt
from vitadapt.data import DATASETS, DataMissingError, get_dataset
from vitadapt.models import WEIGHTS, count_params
from vitadapt.protocol.probe import frozen_eval
from vitadapt.protocol.setup import chance


@dataclass
class DataBackboneConfig(ExperimentConfig):
    show: tuple = opt(("synthetic_source", "synthetic", "aid", "sentinel2_tiles"), "Datasets to draw sample grids of (those not available here are listed, not drawn).")
    n_samples: int = opt(8, "Images per dataset in the sample grid.", min=1, max=32)

    def check(self):
        bad = [d for d in self.show if d not in DATASETS]
        if bad:
            raise ValueError(f"show={list(self.show)!r}: unknown dataset(s) {bad}; valid values: {', '.join(_dataset_names())}")


def availability(size: int = 64) -> pd.DataFrame:
    """Every registered dataset: available here or not, split sizes, and where it comes from."""
    rows = []
    for name in sorted(DATASETS):
        try:
            s = get_dataset(name, size=size, download=False)
            rows.append({"dataset": name, "available": True, "classes": len(s.classes) or "unlabelled",
                         **s.counts(), "source": s.source})
        except (DataMissingError, FileNotFoundError) as e:
            rows.append({"dataset": name, "available": False, "classes": "", "train": "", "val": "", "test": "",
                         "source": str(e).split(";")[0][:140]})
    return pd.DataFrame(rows).set_index("dataset")


def weight_sources() -> pd.DataFrame:
    return pd.DataFrame([{"weights": w.name, "arch": w.arch or "(config arch)", "offline": w.offline,
                          "licence": w.licence, "description": w.description} for w in WEIGHTS.values()]).set_index("weights")


def sample_grid(names, n: int = 8, size: int = 64, seed: int = 0):
    """A figure with one row of ``n`` training images per available dataset; returns (fig, shown)."""
    import matplotlib.pyplot as plt
    shown = []
    for name in names:
        try:
            shown.append((name, get_dataset(name, size=size, download=False)))
        except (DataMissingError, FileNotFoundError):
            continue
    fig, axes = plt.subplots(max(1, len(shown)), n, figsize=(1.3 * n, 1.45 * max(1, len(shown))), squeeze=False)
    rng = np.random.default_rng(seed)
    for row, (name, s) in enumerate(shown):
        idx = rng.choice(len(s.train), size=min(n, len(s.train)), replace=False)
        for col, ax in enumerate(axes[row]):
            ax.axis("off")
            if col < len(idx):
                img, y = s.train[int(idx[col])]
                ax.imshow(img)
                ax.set_title(s.classes[y][:12] if y >= 0 else "unlabelled", fontsize=7)
        axes[row][0].text(-0.15, 0.5, name, transform=axes[row][0].transAxes, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    return fig, [n for n, _ in shown]


def class_counts(splits) -> pd.DataFrame:
    """Images per class in each split."""
    data = {}
    for part in ("train", "val", "test"):
        t = np.asarray(getattr(splits, part).targets)
        data[part] = [int((t == c).sum()) for c in range(len(splits.classes))]
    return pd.DataFrame(data, index=pd.Index(splits.classes, name="class"))


def plot_class_counts(counts: pd.DataFrame, name: str):
    ax = counts.plot.bar(stacked=True, figsize=(10, 3), width=0.8)
    ax.set_ylabel("images")
    ax.set_title(f"{name}: images per class and split")
    return ax.figure


def sanity(cfg, models: dict, splits, seed: int) -> tuple[pd.DataFrame, list[dict]]:
    """Linear probe and kNN test accuracy of each backbone of ``models`` ({name: (model, info)}) on frozen
    features, beside chance; and the rows."""
    rows = [{"backbone": f"{name}: {info['weights_used']}", **r}
            for name, (model, info) in models.items() for r in frozen_eval(cfg, model, info, splits, seed)]
    table = pd.DataFrame(rows).pivot(index="backbone", columns="eval", values="test_acc").round(3)
    table["chance"] = round(chance(splits), 3)
    return table, rows


def parameter_table(models: dict) -> pd.DataFrame:
    return pd.DataFrame([{"backbone": k, "arch": info["arch"], "parameters": count_params(m),
                          "img_size": info["img_size"]} for k, (m, info) in models.items()]).set_index("backbone")
