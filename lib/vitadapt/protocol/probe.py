"""Frozen-feature evaluation: a linear probe (C chosen on val) and kNN (k chosen on val), test scored once.

- :func:`frozen_eval`: the rows of one model; :func:`score_sets` several feature sets (and combinations, such as an
  ensemble of two models) on the same splits; :func:`forgetting_rows` their changes over a reference set, on the
  target and on an out-of-domain set;
- :func:`probe_head`: the probe as the starting head of a fine-tune (LP-FT).

Features come from the per-item cache :class:`vitadapt.eval.FeatureCache`, keyed by the weights, architecture, size,
feature kind and the model's fingerprint (and the precision where it is not fp32), so every notebook evaluating the
same model shares it.

Where it runs: ``device`` where a caller gives one, else :func:`vitadapt.eval.eval_device` of ``cfg.accelerator`` (the
CPU in the smoke and cpu profiles); features in ``cfg.precision``, loaders with the config's ``num_workers``,
``pin_memory`` and ``persistent_workers``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from vitadapt.eval import FeatureCache, autocast_dtype, eval_device, knn_eval, linear_probe, model_fingerprint

DEFAULT_CS = (0.01, 0.1, 1.0, 10.0)
DEFAULT_KS = (10, 20)


def _device(cfg, device):
    """``device``, or where ``cfg.accelerator`` puts evaluation when it is None (with several devices: where this
    process evaluates, :func:`vitadapt.distributed.work_device`)."""
    if device is not None:
        return device
    if cfg.devices * cfg.num_nodes > 1:
        from vitadapt.distributed import fabric_for, work_device
        return work_device(fabric_for(cfg))
    return eval_device(cfg.accelerator)


def features(cfg, model, info: dict, device=None, feature: str | None = None,
             progress: bool = False) -> Callable[[object], tuple[np.ndarray, np.ndarray]]:
    """``get(dataset) -> (X, y)``: cached features of ``model`` (``feature`` default ``cfg.feature``), computed on
    ``device`` (None: :func:`vitadapt.eval.eval_device` of ``cfg.accelerator``) in ``cfg.precision``."""
    feature, device = feature or cfg.feature, _device(cfg, device)
    key = {"weights": info.get("weights_used"), "arch": info.get("arch"), "img_size": cfg.img_size,
           "feature": feature, "arch_kwargs": cfg.arch_kwargs, "fingerprint": model_fingerprint(model)}
    if autocast_dtype(device, cfg.precision) is not None:     # bf16/fp16 features never mix with fp32 ones
        key["precision"] = cfg.precision
    cache = FeatureCache(key)
    return lambda ds: cache.features(model, ds, cfg.img_size, cfg.batch_size, feature, cfg.num_workers, device,
                                     progress, cfg.precision, cfg.pin_memory, cfg.persistent_workers)


def score(cfg, feats: dict, seed: int, device=None) -> dict[str, dict]:
    """Linear probe and kNN of ``feats`` = {"train"|"val"|"test": (X, y)} with the config's grids (``probe_Cs``,
    ``knn_ks``, ``probe_max_iter`` where it has them), both on ``device`` (None: ``cfg.accelerator``'s):
    {"linear probe": {test_acc, val_acc, selected}, "kNN": ...}."""
    (Xtr, ytr), (Xva, yva), (Xte, yte) = feats["train"], feats["val"], feats["test"]
    device = _device(cfg, device)
    lp = linear_probe(Xtr, ytr, Xva, yva, Xte, yte, Cs=getattr(cfg, "probe_Cs", DEFAULT_CS),
                      max_iter=getattr(cfg, "probe_max_iter", 100), seed=seed, device=device)
    kn = knn_eval(Xtr, ytr, Xva, yva, Xte, yte, ks=getattr(cfg, "knn_ks", DEFAULT_KS), device=device)
    return {"linear probe": {"test_acc": lp["test_acc"], "val_acc": lp["val_acc"], "selected": f"C={lp['C']}"},
            "kNN": {"test_acc": kn["test_acc"], "val_acc": kn["val_acc"], "selected": f"k={kn['k']}"}}


def split_features(get: Callable, splits) -> dict:
    return {part: get(getattr(splits, part)) for part in ("train", "val", "test")}


def score_sets(cfg, gets: dict[str, Callable], splits, seed: int,
               combos: dict[str, tuple[str, str, Callable]] | None = None, device=None) -> dict[str, dict]:
    """:func:`score` of several feature sets on the same ``splits``: {name: {eval: scores}} for each of ``gets``
    ({name: features getter, :func:`features`}) and of ``combos`` ({name: (a, b, fn)}: the features of sets ``a``
    and ``b`` combined item by item by ``fn(Xa, Xb)``, the labels of ``a``; e.g. an ensemble of two models); the probes
    run on ``device`` (None: ``cfg.accelerator``'s)."""
    feats = {name: split_features(get, splits) for name, get in gets.items()}
    for name, (a, b, fn) in (combos or {}).items():
        feats[name] = {p: (fn(feats[a][p][0], feats[b][p][0]), feats[a][p][1]) for p in feats[a]}
    return {name: score(cfg, f, seed, device) for name, f in feats.items()}


def forgetting_rows(keys: dict, target: dict, ood: dict, ood_name: str, reference: str = "base",
                    diverged: dict[str, str] | None = None, **extra) -> list[dict]:
    """One row per (feature set, eval) of :func:`score_sets` scores: ``keys``, the ``target`` scores and their change
    over the ``reference`` set (``delta_vs_base``), then the set's test accuracy on the out-of-domain set ``ood_name``
    (``ood`` scores; ``ood_test_acc``) and its change over the reference there (``ood_delta``; negative: forgotten;
    None where ``ood`` lacks the set), then ``extra``. ``diverged`` = {set: note}: sets of a run that diverged, after
    the scored ones: NaN rows (shown "diverged") with the note in a ``diverged`` column."""
    diverged = diverged or {}
    lost = dict.fromkeys(diverged, {ev: {"test_acc": float("nan"), "val_acc": float("nan"), "selected": ""}
                                    for ev in target[reference]})
    target, ood, rows = {**target, **lost}, {**ood, **lost}, []
    for kind, evals in target.items():
        for ev, r in evals.items():
            o, ref = ood.get(kind, {}).get(ev, {}), ood[reference][ev]["test_acc"]
            rows.append({**keys, "features": kind, "eval": ev, "test_acc": r["test_acc"], "val_acc": r["val_acc"],
                         "selected": r["selected"], "delta_vs_base": r["test_acc"] - target[reference][ev]["test_acc"],
                         "ood_dataset": ood_name, "ood_test_acc": o.get("test_acc"),
                         "ood_delta": (o["test_acc"] - ref) if o else None, **extra,
                         **({"diverged": diverged[kind]} if kind in diverged else {})})
    return rows


def frozen_eval(cfg, model, info: dict, splits, seed: int, device=None, progress: bool = False) -> list[dict]:
    """Rows ``{seed, eval, test_acc, val_acc, selected}`` of the linear probe and kNN on frozen features, features
    and probes on ``device`` (None: ``cfg.accelerator``'s)."""
    device = _device(cfg, device)
    scores = score(cfg, split_features(features(cfg, model, info, device, progress=progress), splits), seed, device)
    return [{"seed": seed, "eval": ev, **r} for ev, r in scores.items()]


def probe_head(cfg, model, info: dict, splits, seed: int, device=None):
    """A linear head for a fine-tune that starts from the probe (LP-FT, Kumar et al. 2022), fitted on the features
    the model's head sees (the CLS token after the final norm): multinomial logistic regression on standardised
    training features, C among ``probe_Cs`` chosen on val, the standardisation folded into the weights. Features
    come from the per-item cache :func:`frozen_eval` fills (``feature="cls+avg"``: its first ``embed_dim``
    columns); features and solver on ``device`` (None: ``cfg.accelerator``'s). Returns ``(weight [C, D], bias [C], C)``
    on the CPU."""
    if getattr(model, "global_pool", "token") != "token":
        raise ValueError(f"ft_head_init='probe' needs a ViT whose head reads the CLS token (global_pool='token'), got "
                         f"global_pool={model.global_pool!r}; use ft_head_init='fresh'")
    device = _device(cfg, device)
    get = features(cfg, model, info, device, feature=cfg.feature if cfg.feature in ("cls", "cls+avg") else "cls")
    D = model.embed_dim
    (Xtr, ytr), (Xva, yva) = get(splits.train), get(splits.val)
    return folded_probe(Xtr[:, :D], ytr, Xva[:, :D], yva, len(splits.classes), getattr(cfg, "probe_Cs", DEFAULT_CS),
                        seed, device)


def folded_probe(Xtr, ytr, Xva, yva, n_classes: int, Cs, seed: int, device="cpu"):
    """Multinomial logistic regression on standardised training features, C among ``Cs`` chosen on val, the
    standardisation folded into the weights (so it applies to raw features): ``(weight [C, D], bias [C], C)`` on the
    CPU."""
    import torch
    from sklearn.preprocessing import StandardScaler

    from vitadapt.eval import fit_logistic
    scaler = StandardScaler().fit(Xtr)
    mu, sd = (torch.as_tensor(a, dtype=torch.float32) for a in (scaler.mean_, scaler.scale_))
    tr, va = (torch.as_tensor(scaler.transform(X), dtype=torch.float32).to(device) for X in (Xtr, Xva))
    torch.manual_seed(seed)
    best, Wb = None, None
    for C in sorted(Cs):
        Wb = fit_logistic(tr, torch.as_tensor(ytr, dtype=torch.long), n_classes, C, 100, Wb)
        acc = float(((va @ Wb[0] + Wb[1]).argmax(1).cpu().numpy() == yva).mean())
        if best is None or acc > best[0]:
            best = (acc, C, Wb)
    _, C, (W, b) = best
    W, b = W.cpu(), b.cpu()
    W_raw = W / sd[:, None]                                  # ((x - mu) / sd) W + b = x (W / sd) + (b - (mu / sd) W)
    return W_raw.T.contiguous(), b - (mu / sd) @ W, C
