"""Pieces every experiment uses: torch set-up, data and backbone from a config, the dry-run decision,
and frozen-feature evaluation over seeds."""

from __future__ import annotations

import os

import torch

from vitadapt.data import DataMissingError, Splits, get_dataset, subsample
from vitadapt.eval import FeatureCache, knn_eval, linear_probe, model_fingerprint
from vitadapt.jobs import summarize  # noqa: F401  (mean, std, n over seeds, diverged ones counted apart)
from vitadapt.models import WEIGHTS, WeightsMissingError, create_backbone


def setup_torch(threads: int | None = None) -> None:
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.use_deterministic_algorithms(False)


def load_splits(cfg, name: str | None = None, seed: int = 0, subset: bool = True) -> Splits:
    """The dataset of ``cfg`` (or ``name``), subsampled per class for ``seed`` when the config says so."""
    name = name or cfg.dataset
    splits = get_dataset(name, root=cfg.data_root if name == cfg.dataset else "", size=max(cfg.img_size, 32),
                         seed=0, n_train_per_class=cfg.n_train_per_class, n_val_per_class=cfg.n_val_per_class,
                         n_test_per_class=cfg.n_test_per_class)
    if subset and splits.classes:
        splits = subsample(splits, seed, cfg.n_train_per_class, cfg.n_val_per_class, cfg.n_test_per_class)
    return splits


def load_backbone(cfg, weights: str | None = None, **kw):
    return create_backbone(weights or cfg.weights, cfg.arch, cfg.img_size, cfg.arch_kwargs, **kw)


def brief(err, limit: int = 160) -> str:
    """An error's first clause (up to ';'), cut at ``limit`` characters with a visible '…' (a dry-run reason)."""
    text = str(err).split(";")[0].strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def dry_run_reason(cfg) -> str | None:
    """Why this run should stop after building and validating (None: run for real)."""
    if cfg.dry_run == "yes":
        return "dry_run='yes'"
    if cfg.dry_run == "no":
        return None
    try:
        get_dataset(cfg.dataset, root=cfg.data_root, download=False)
    except (DataMissingError, FileNotFoundError) as e:
        return f"dataset {cfg.dataset!r} is not available here ({brief(e)})"
    src = WEIGHTS.get(cfg.weights)
    if src is not None and src.kind == "hub":
        from vitadapt.models import hub_reachable
        if not hub_reachable():
            return f"weights {cfg.weights!r} need the timm hub, which is not reachable from here"
    return None


def frozen_eval(cfg, model, info: dict, splits: Splits, seed: int, Cs=(0.01, 0.1, 1.0, 10.0),
                ks=(10, 20), progress: bool = False) -> list[dict]:
    """Linear probe and kNN on frozen features of ``model`` for one seed; features cached per item."""
    cache = FeatureCache({"weights": info.get("weights_used"), "arch": info.get("arch"), "img_size": cfg.img_size,
                          "feature": cfg.feature, "arch_kwargs": cfg.arch_kwargs, "fingerprint": model_fingerprint(model)})
    get = lambda ds: cache.features(model, ds, cfg.img_size, cfg.batch_size, cfg.feature, cfg.num_workers,
                                    progress=progress)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = get(splits.train), get(splits.val), get(splits.test)
    lp = linear_probe(Xtr, ytr, Xva, yva, Xte, yte, Cs=Cs, seed=seed)
    kn = knn_eval(Xtr, ytr, Xva, yva, Xte, yte, ks=ks)
    return [{"seed": seed, "eval": "linear probe", "test_acc": lp["test_acc"], "val_acc": lp["val_acc"],
             "selected": f"C={lp['C']}"},
            {"seed": seed, "eval": "kNN", "test_acc": kn["test_acc"], "val_acc": kn["val_acc"],
             "selected": f"k={kn['k']}"}]


def chance(splits: Splits) -> float:
    return 1.0 / max(1, len(splits.classes))

