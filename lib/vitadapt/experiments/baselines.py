"""01_baselines: frozen-backbone linear probe (C chosen on val) and kNN (k chosen on val) on the target, for the
configured backbone and (the floor) a randomly initialised one of the same architecture."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from vitadapt.config import ExperimentConfig, opt
from vitadapt.protocol import figures, report, tables
from vitadapt.protocol.probe import frozen_eval
from vitadapt.protocol.setup import backbone, chance, labelled


@dataclass
class BaselineConfig(ExperimentConfig):
    probe_Cs: tuple = opt((0.01, 0.1, 1.0, 10.0), "Inverse regularisation strengths of the logistic-regression probe; chosen on val.", min=1e-6, max=1e6)
    knn_ks: tuple = opt((10, 20), "k values of the weighted kNN classifier; chosen on val.", min=1, max=1000)
    compare_random: bool = opt(True, "Also evaluate a randomly initialised backbone of the same architecture (the floor).")


def run_baselines(cfg: BaselineConfig, setup=None, progress: bool = False) -> pd.DataFrame:
    """One row per (backbone, seed, evaluation)."""
    rows = []
    for weights in [cfg.weights] + (["random"] if cfg.compare_random and cfg.weights != "random" else []):
        model, info = backbone(cfg, weights)
        if setup is not None:
            setup.use("weights" if weights == cfg.weights else f"weights[{weights}]", info)
        for seed in cfg.seeds:
            splits = labelled(cfg, seed)
            if setup is not None and not setup.source("data"):
                setup.use("data", splits.record())
            for r in frozen_eval(cfg, model, info, splits, seed, progress=progress):
                rows.append({"backbone": info["weights_used"], **r, "chance": chance(splits)})
    return pd.DataFrame(rows)


def accuracy_table(df: pd.DataFrame) -> pd.DataFrame:
    """Test and validation accuracy, mean ± std over seeds, per (backbone, eval); seeds; chance."""
    out = tables.mean_std(df, ["backbone", "eval"], value="test_acc")
    out["val_acc"] = tables.mean_std(df, ["backbone", "eval"], value="val_acc")["val_acc"]
    out["n_seeds"] = df.groupby(["backbone", "eval"], sort=False).size()
    out["chance"] = round(df["chance"].iloc[0], 3)
    return out


def plot_accuracy(df: pd.DataFrame, title: str = ""):
    return figures.bars(df, x="eval", panels=None, hue="backbone", chance=float(df["chance"].iloc[0]), title=title,
                        rotation=0)


def result_rows(df: pd.DataFrame, configured: str) -> list[dict]:
    """The configured backbone as "linear probe" / "kNN", the random one as "... (random init)"."""
    return report.result_rows(df, "Frozen baselines", ["backbone", "eval"],
                              method=lambda bb, ev: ev if bb == configured else f"{ev} (random init)",
                              extra=lambda d: {"backbone": d["backbone"].iloc[0]})


def summary(df: pd.DataFrame) -> dict:
    return report.summary(df, ["backbone", "eval"])
