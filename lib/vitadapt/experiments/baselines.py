"""01_baselines: frozen-backbone linear probe (C chosen on val) and kNN (k chosen on val) on the target."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from vitadapt.config import ExperimentConfig, opt
from vitadapt.experiments.common import chance, frozen_eval, load_backbone, load_splits, summarize


@dataclass
class BaselineConfig(ExperimentConfig):
    probe_Cs: tuple = opt((0.01, 0.1, 1.0, 10.0), "Inverse regularisation strengths of the logistic-regression probe; chosen on val.", min=1e-6, max=1e6)
    knn_ks: tuple = opt((10, 20), "k values of the weighted kNN classifier; chosen on val.", min=1, max=1000)
    compare_random: bool = opt(True, "Also evaluate a randomly initialised backbone of the same architecture (the floor).")


def run_baselines(cfg: BaselineConfig, run=None, progress: bool = False) -> pd.DataFrame:
    """One row per (backbone, seed, evaluation)."""
    rows = []
    backbones = [cfg.weights] + (["random"] if cfg.compare_random and cfg.weights != "random" else [])
    for weights in backbones:
        model, info = load_backbone(cfg, weights)
        if run is not None:
            run.use("weights" if weights == cfg.weights else f"weights[{weights}]", info)
        for seed in cfg.seeds:
            splits = load_splits(cfg, seed=seed)
            if run is not None and "data" not in run.sources:
                run.use("data", splits.record())
            for r in frozen_eval(cfg, model, info, splits, seed, cfg.probe_Cs, cfg.knn_ks, progress):
                rows.append({"backbone": info["weights_used"], **r, "chance": chance(splits)})
    return pd.DataFrame(rows)


def result_rows(df: pd.DataFrame, configured: str) -> list[dict]:
    """Rows for the results notebook: the configured backbone as "linear probe" / "kNN", the random
    backbone as "... (random init)"."""
    from vitadapt.results import result_row
    rows = []
    for (bb, ev), g in df.groupby(["backbone", "eval"], sort=False):
        method = ev if bb == configured else f"{ev} (random init)"
        rows.append(result_row("Frozen baselines", method, g["test_acc"], backbone=bb))
    return rows


def summary(df: pd.DataFrame) -> dict:
    out = {}
    for (bb, ev), g in df.groupby(["backbone", "eval"], sort=False):
        out[f"{bb}/{ev}"] = summarize(g["test_acc"])
    return out
