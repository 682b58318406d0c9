"""20_upstep and 21_upstep_ablations: UpStep (source-free, self-supervised, parameter-efficient
post-pretraining) against the frozen base model, on several labelled target domains.

Protocol for every (domain, seed):

1. the **base** backbone is evaluated frozen on the target (linear probe with C chosen on val, kNN with k
   chosen on val; :mod:`vitadapt.protocol.probe` and its per-item feature cache) and on an out-of-domain
   labelled set (the *forgetting set*);
2. **UpStep** adapts a copy of the backbone on the domain's *unlabelled* training images only
   (:class:`vitadapt.data.unlabelled.Unlabelled` drops the labels before anything else sees an item; labels are
   never read);
3. the adapted backbone, and the **ensembles** of base and adapted features (concatenated or averaged,
   :func:`vitadapt.ssl.upstep.ensemble_features`), are evaluated the same way;
4. **forgetting** is the change of accuracy on the forgetting set, ``adapted - base`` (negative: forgotten);
   the cost is counted: backward passes, skipped iterations, wall time, peak memory, trainable parameters;
   the centre-vector statistics of every step are kept for the figures.

Everything the public record leaves open is a named choice in ``vitadapt.papers.CHOICES["UpStep"]`` (rendered by
the notebooks) with a config switch where reasonable alternatives exist. No UpStep result from the paper is printed
anywhere: its tables are not public.

Data: every domain and forgetting set is the source's default pool (``sized=False`` in
:func:`vitadapt.protocol.setup.labelled`), subsampled per class and seed.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import typing
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from vitadapt import papers
from vitadapt.config import ExperimentConfig, _dataset_names, opt
from vitadapt.data import DATASETS, Splits
from vitadapt.data.unlabelled import Unlabelled
from vitadapt.eval import eval_transform
from vitadapt.jobs import checkpoint_every_s
from vitadapt.peft.common import count_total, count_trainable
from vitadapt.protocol import figures, grid, probe, report, tables
from vitadapt.protocol.setup import backbone, chance, dataset, labelled
from vitadapt.ssl.upstep import (ENSEMBLE_MODES, UpStepAugment, UpStepGate, UpStepObjective, ensemble_features,
                                 upstep_loss_fn)

#: domains seen from above: vertical flips are a label-preserving augmentation there (``aug_vflip="overhead"``)
OVERHEAD_DOMAINS = ("aid", "eurosat", "resisc45", "ucmerced", "fmow", "sentinel2_tiles", "synthetic")
#: per-step statistics the objective logs (valid ``gate_signal`` values, columns of the history)
LOG_KEYS = ("loss", "loss_cluster", "loss_cvr", "cv_norm", "cv_norm_base", "cv_drift", "cv_cos", "cv_norm_ema",
            "clusters_used")
FEATURE_KINDS = ("base", "upstep", "ensemble-concat", "ensemble-average")
#: the cost of a run kept in metrics.json (the cost table adds the images and the evaluation time)
COST = ("steps", "backward_passes", "skipped", "skip_fraction", "wall_time_s", "s_per_step", "peak_memory_mb",
        "trainable_params", "trainable_backbone")


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

    def needs(self) -> dict[str, Callable]:
        """What a real run reads (every domain and forgetting set), as probes for the dry-run decision."""
        names = [*self.domains, *sorted({forgetting_dataset_for(self, d) for d in self.domains})]
        return {n: (lambda n=n: dataset(self, n, download=False, sized=False)) for n in names}

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


# ---- data ------------------------------------------------------------------------------------------

def domain_splits(cfg, name: str, seed: int) -> Splits:
    """The labelled splits of domain ``name`` for ``seed`` (training subset varies with the seed, val/test do not)."""
    return labelled(cfg, seed, name, sized=False)


def forgetting_dataset_for(cfg, domain: str) -> str:
    """The out-of-domain labelled set of ``domain``: ``forgetting_dataset`` unless that is the domain itself."""
    return cfg.forgetting_fallback if domain == cfg.forgetting_dataset else cfg.forgetting_dataset


def forgetting_splits(cfg, domain: str, seed: int) -> Splits:
    return labelled(cfg, seed, forgetting_dataset_for(cfg, domain), (cfg.forgetting_n_train_per_class,
                    cfg.forgetting_n_val_per_class, cfg.forgetting_n_test_per_class), sized=False)


def adaptation_pool(cfg, domain: str, seed: int, labelled_train: Dataset | None = None) -> tuple[Dataset, list[int]]:
    """The unlabelled images UpStep adapts on, as (dataset, indices): the seed's labelled-training subset
    (``n_adapt_images=0``; a :class:`vitadapt.data.Subset`, taken apart without reading labels) or
    ``n_adapt_images`` drawn uniformly with ``seed`` from the training pool. Labels are not read, so the draw
    cannot be stratified."""
    if cfg.n_adapt_images == 0:
        sub = labelled_train if labelled_train is not None else domain_splits(cfg, domain, seed).train
        return sub.base, list(sub.indices)
    pool = dataset(cfg, domain, sized=False).train
    n = min(cfg.n_adapt_images, len(pool))
    rng = np.random.default_rng(10_000 + seed)
    return pool, sorted(rng.choice(len(pool), size=n, replace=False).tolist())


def augment_for(cfg, domain: str) -> UpStepAugment:
    vflip = {"always": 0.5, "never": 0.0}.get(cfg.aug_vflip, 0.5 if domain.split(":")[-1] in OVERHEAD_DOMAINS else 0.0)
    return UpStepAugment(size=cfg.img_size, scale=(cfg.aug_scale_min, 1.0), vflip=vflip)


# ---- adaptation ------------------------------------------------------------------------------------

def build_objective(cfg, backbone: torch.nn.Module, seed: int, init_images: torch.Tensor | None = None) -> UpStepObjective:
    """UpStep objective around ``backbone`` (mutated in place: LoRA is injected; a frozen copy is the base)."""
    return UpStepObjective(backbone, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha or None, head=cfg.head,
                           head_hidden_dim=cfg.head_hidden_dim, head_out_dim=cfg.head_out_dim,
                           n_prototypes=cfg.n_prototypes, prototype_init=cfg.prototype_init, init_images=init_images,
                           temperature=cfg.temperature, cvr=cfg.cvr, cvr_weight=cfg.cvr_weight,
                           center_estimate=cfg.center_estimate, seed=seed)


@dataclass
class Adapted:
    """One UpStep run: the objective (``.model`` is the adapted backbone), the loop's result and the gate."""
    objective: UpStepObjective
    fit: typing.Any
    gate: UpStepGate
    n_images: int

    @property
    def model(self) -> torch.nn.Module:
        return self.objective.model

    @property
    def trainable_backbone(self) -> int:
        return count_trainable(self.objective.model)

    def record(self) -> dict:
        s, hist = self.fit.summary(), self.fit.history
        last = lambda k: hist[-1].get(k) if hist else None
        return {**{k: s[k] for k in ("steps", "backward_passes", "skipped", "skip_fraction", "wall_time_s")},
                "s_per_step": s["wall_time_s"] / max(1, s["steps"]), "peak_memory_mb": s["peak_memory_mb"],
                "adapt_images": self.n_images, "trainable_params": count_trainable(self.objective),
                "trainable_backbone": self.trainable_backbone, "final_loss_cluster": last("loss_cluster"),
                "final_cv_norm": last("cv_norm"), "final_cv_drift": last("cv_drift")}


def adapt(cfg, base_model: torch.nn.Module, images: tuple[Dataset, list[int]], seed: int, domain: str = "",
          fabric=None, progress: bool = False, ckpt=None) -> Adapted:
    """Adapt a copy of ``base_model`` with UpStep on the unlabelled ``images`` (dataset, indices) for ``cfg.steps``
    iterations; items are ``(view1, view2)``, the batch format of :class:`~vitadapt.ssl.upstep.UpStepObjective`.
    ``base_model`` itself is left untouched."""
    from vitadapt.train import fabric_from_config, fit, seed_everything

    views = Unlabelled(*images, augment_for(cfg, domain))
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
    gate = UpStepGate(cfg.gate, signal=cfg.gate_signal, target_skip=cfg.gate_target_skip, warmup=cfg.gate_warmup)
    loader = DataLoader(views, batch_size=cfg.adapt_batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(seed))
    result = fit(fabric or fabric_from_config(cfg), objective, upstep_loss_fn(objective), loader, steps=cfg.steps,
                 lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup_steps, should_backward=gate,
                 progress=progress, ckpt_path=ckpt, ckpt_every_s=checkpoint_every_s() if ckpt else None,
                 config={"domain": domain, "seed": seed})
    objective.eval()
    return Adapted(objective, result, gate, len(views))


# ---- evaluation ------------------------------------------------------------------------------------

def evaluate_features(cfg, base: Callable, adapted: Callable | None, splits: Splits, seed: int,
                      kinds: tuple[str, ...] | None = None) -> dict[str, dict[str, dict]]:
    """Scores {feature kind: {eval: {test_acc, val_acc, selected}}} of the base features, the adapted ones and
    the configured ensembles on ``splits`` (``adapted=None``: base only); ``base`` and ``adapted`` map a dataset
    to its features (:func:`vitadapt.protocol.probe.features`)."""
    fb = probe.split_features(base, splits)
    out = {"base": probe.score(cfg, fb, seed)}
    if adapted is None:
        return out
    fa = probe.split_features(adapted, splits)
    wanted = kinds or ("upstep",) + tuple(f"ensemble-{m}" for m in cfg.ensemble_modes)
    if "upstep" in wanted:
        out["upstep"] = probe.score(cfg, fa, seed)
    for mode in cfg.ensemble_modes:
        if f"ensemble-{mode}" in wanted:
            fe = {p: (ensemble_features(torch.from_numpy(fb[p][0]), torch.from_numpy(fa[p][0]), mode).numpy(), fb[p][1])
                  for p in fb}
            out[f"ensemble-{mode}"] = probe.score(cfg, fe, seed)
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


def run_domain_seed(cfg, base_model, info: dict, domain: str, seed: int, variant: str = "UpStep",
                    fabric=None, include_base: bool = True, progress: bool = False, ckpt=None) -> dict:
    """Base eval, UpStep adaptation on the unlabelled training images, adapted + ensemble eval, forgetting.
    Returns {"evals": rows, "runs": run record, "history": per-step rows, "log": a line}. A run that diverges keeps
    its base rows; every adapted and ensemble row is NaN with a ``diverged`` note."""
    from vitadapt.train import Diverged, job
    device = fabric.device if fabric is not None else "cpu"
    splits, ood = domain_splits(cfg, domain, seed), forgetting_splits(cfg, domain, seed)
    base = probe.features(cfg, base_model, info, device)
    keys = {"domain": domain, "seed": seed, "variant": variant}
    t0 = time.perf_counter()
    try:
        with job(domain=domain, variant=variant, seed=seed):
            ad = adapt(cfg, base_model, adaptation_pool(cfg, domain, seed, splits.train), seed, domain, fabric,
                       progress, ckpt=ckpt)
    except Diverged as e:
        target, forgetting = evaluate_features(cfg, base, None, splits, seed), evaluate_features(cfg, base, None, ood, seed)
        lost = {ev: {"test_acc": float("nan"), "val_acc": float("nan"), "selected": ""} for ev in target["base"]}
        for kind in ("upstep", *(f"ensemble-{m}" for m in cfg.ensemble_modes)):
            target[kind] = forgetting[kind] = lost
        rows = [{**r, "diverged": e.short} if r["features"] != "base" else r for r in
                _rows(domain, seed, variant, target, forgetting, forgetting_dataset_for(cfg, domain), chance(splits))]
        record, history, line = {**keys, "diverged": str(e)}, [], str(e)
    else:
        adapted = probe.features(cfg, ad.model, info, device)
        rows = _rows(domain, seed, variant, evaluate_features(cfg, base, adapted, splits, seed),
                     evaluate_features(cfg, base, adapted, ood, seed), forgetting_dataset_for(cfg, domain),
                     chance(splits))
        record = {**keys, **ad.record(), "eval_wall_time_s": round(time.perf_counter() - t0 - ad.fit.wall_time_s, 2)}
        history = [{**keys, **{k: h[k] for k in ("step", "backward", *LOG_KEYS, "lr") if k in h}} for h in ad.fit.history]
        line = (f"{variant if variant != 'UpStep' else domain} seed {seed}: {record['backward_passes']}/"
                f"{record['steps']} backward, {record['wall_time_s']:.1f} s training, "
                f"{record['eval_wall_time_s']:.1f} s evaluation")
    rows = rows if include_base else [r for r in rows if r["features"] != "base"]
    return {"evals": rows, "runs": record, "history": history, "log": line}


@dataclass
class UpStepResults:
    evals: pd.DataFrame      # one row per (domain, seed, variant, features, eval)
    runs: pd.DataFrame       # one row per UpStep run: cost and final statistics
    history: pd.DataFrame    # one row per (run, step): loss and centre-vector statistics


def _start(cfg, run, domains) -> tuple:
    """The base model and the fabric; the weights, every domain and forgetting set recorded in ``run``."""
    from vitadapt.train import fabric_from_config
    base_model, info = backbone(cfg)
    if run is not None:
        run.use("weights", info)
        sources = []
        for d in domains:
            s = dataset(cfg, d, sized=False)
            run.use(f"data[{d}]", s.record())
            sources.append(s.source)
        for o in dict.fromkeys(forgetting_dataset_for(cfg, d) for d in domains):
            run.use(f"forgetting[{o}]", dataset(cfg, o, sized=False).record())
        # one summary record under the key every notebook uses, for the results notebook
        run.use("data", {"dataset": ", ".join(domains), "source": " | ".join(sources),
                         "forgetting": ", ".join(sorted({forgetting_dataset_for(cfg, d) for d in domains}))})
    return base_model, info, fabric_from_config(cfg)


def run_upstep(cfg: UpStepConfig, run=None, progress: bool = False, log: Callable[[str], None] | None = print) -> UpStepResults:
    """Notebook 20: base vs UpStep (and ensembles) on every domain and seed."""
    base_model, info, fabric = _start(cfg, run, list(cfg.domains))
    outs = grid.run_jobs(run, grid.product(domain=cfg.domains, seed=cfg.seeds), lambda j, ckpt: run_domain_seed(
        cfg, base_model, info, j["domain"], j["seed"], fabric=fabric, progress=progress, ckpt=ckpt), log)
    return UpStepResults(*grid.frames(outs, "evals", "runs", "history"))


def ablation_variants(cfg: UpStepConfig) -> list[tuple[str, dict]]:
    """One-factor-at-a-time variants around the configured default: (name, config overrides)."""
    axes = [(f, getattr(cfg, a), lambda v, f=f: f"{f}={v}") for f, a in (
        ("cvr", "ablate_cvr"), ("cvr_weight", "ablate_cvr_weight"), ("gate", "ablate_gate"), ("lora_rank", "ablate_rank"))]
    return [(f"default (cvr={cfg.cvr}, gate={cfg.gate}, r={cfg.lora_rank})", {})] + grid.one_factor(cfg, axes)


def run_ablations(cfg: UpStepConfig, run=None, progress: bool = False,
                  log: Callable[[str], None] | None = print) -> UpStepResults:
    """Notebook 21: every variant of :func:`ablation_variants` on the ablation domain, every seed. The base rows
    appear once per seed (variant ``"base"``, last); the ensemble rows of each variant are the ensemble on/off
    ablation."""
    domain = cfg.target_for_ablations
    base_model, info, fabric = _start(cfg, run, [domain])
    variants = dict(ablation_variants(cfg))
    outs = grid.run_jobs(run, grid.product(variant=list(variants), seed=cfg.seeds), lambda j, ckpt: run_domain_seed(
        dataclasses.replace(cfg, **variants[j["variant"]]), base_model, info, domain, j["seed"], j["variant"],
        fabric, include_base=False, progress=progress, ckpt=ckpt), log)
    base, ood_name, rows = probe.features(cfg, base_model, info, fabric.device), forgetting_dataset_for(cfg, domain), []
    for seed in cfg.seeds:          # the base rows (the same for every variant): once per seed
        splits, ood = domain_splits(cfg, domain, seed), forgetting_splits(cfg, domain, seed)
        rows += _rows(domain, seed, "base", evaluate_features(cfg, base, None, splits, seed),
                      evaluate_features(cfg, base, None, ood, seed), ood_name, chance(splits))
    return UpStepResults(*grid.frames(outs + [{"evals": rows}], "evals", "runs", "history"))


def run_single(cfg: UpStepConfig, seed: int | None = None, domain: str = "", base=None, **overrides) -> pd.DataFrame:
    """One configuration on one domain and seed (the widget panel's action): a small table of test accuracy
    and forgetting per feature kind. ``overrides`` are config fields; ``base`` an optional (model, info)."""
    vcfg = dataclasses.replace(cfg, **overrides) if overrides else cfg
    model, info = base or backbone(vcfg, verbose=False)
    out = run_domain_seed(vcfg, model, info, domain or cfg.target_for_ablations,
                          cfg.seeds[0] if seed is None else int(seed), variant="panel")
    df = pd.DataFrame(out["evals"])[["features", "eval", "test_acc", "delta_vs_base", "ood_test_acc", "ood_delta"]]
    df.attrs["run"] = out["runs"]
    return df


# ---- tables, figures, metrics ----------------------------------------------------------------------

def choices_table(cfg: UpStepConfig | None = None) -> pd.DataFrame:
    """``papers.CHOICES["UpStep"]`` as a table; with ``cfg``, the values of the switches in this run."""
    return papers.choices_table("UpStep", cfg).rename(columns={"switch": "switch (alternatives)"})


def _kinds(table: pd.DataFrame) -> list[str]:
    return [c for c in FEATURE_KINDS if c in table.columns]


def accuracy_table(evals: pd.DataFrame, by: str = "domain") -> pd.DataFrame:
    """Target test accuracy, mean ± std over seeds: rows (``by``, eval), one column per feature kind."""
    base = evals[evals["features"] == "base"]
    shared_base = by in evals and len(base) and not (set(base[by]) & set(evals.loc[evals["features"] != "base", by]))
    out = tables.mean_std(evals[evals["features"] != "base"] if shared_base else evals, [by, "eval"], "features")
    if shared_base:     # one base for every variant (notebook 21): its column repeats the base rows
        b = tables.mean_std(base, "eval", "features")["base"]
        out["base"] = [b[ev] for _, ev in out.index]
    out = out[_kinds(out)]
    out["chance"] = evals.groupby([by, "eval"], sort=False)["chance"].first().reindex(out.index).round(3)
    return out


def forgetting_table(evals: pd.DataFrame, by: str = "domain") -> pd.DataFrame:
    """Forgetting: change of the out-of-domain test accuracy (adapted - base), mean ± std over seeds."""
    df = evals[evals["features"] != "base"]
    out = tables.mean_std(df, [by, "eval"], "features", "ood_delta", signed=True)
    out = out[_kinds(out)]
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
    return out.groupby(level=[0, 1], sort=False).mean().round(3).reindex(tables.order(df, by), level=0)


def cost_table(runs: pd.DataFrame, by: str = "domain") -> pd.DataFrame:
    """Training cost per ``by``: means over seeds."""
    out = tables.means(runs, by, COST + ("adapt_images", "eval_wall_time_s"))
    out["n_seeds"] = runs.groupby(by, sort=False).size()
    return out


def plot_accuracy(evals: pd.DataFrame, by: str = "domain", title: str = "", value: str = "test_acc"):
    """Bars of target test accuracy (``value="ood_delta"``: the forgetting-set change, adapted - base) per ``by``
    and feature kind, one panel per evaluation (error bars: std over seeds)."""
    change = value == "ood_delta"
    d = evals[evals["features"] != "base"] if change else evals
    return figures.bars(d, x=by, y=value, hue="features", hue_order=[k for k in FEATURE_KINDS if k in set(d["features"])],
                        title=title, ylabel="OOD accuracy change (adapted - base)" if change else "target test accuracy",
                        ylim=None if change else (0, 1), rotation=15)


def plot_center_vector(history: pd.DataFrame, by: str = "variant", smooth: int = 1):
    """Centre-vector statistics over training, mean over seeds per ``by``: the norm of the adapted centre
    (dashed: the frozen base model on the same batches), its drift from the base centre, and the
    clustering loss."""
    return figures.curves(history, by, ["cv_norm", "cv_drift", "loss_cluster"], smooth=smooth, symlog=["cv_drift"],
                          dashed={"cv_norm": "cv_norm_base"},
                          titles={"cv_norm": "centre-vector norm ||c|| (dashed: base model)",
                                  "cv_drift": "centre-vector drift ||c_adapted - c_base||²",
                                  "loss_cluster": "clustering loss"})


def summary(res: UpStepResults, by: str = "domain") -> dict:
    """metrics.json content: mean/std/n of test accuracy and OOD change per (by, features, eval); costs."""
    keys, adapted = [by, "features", "eval"], res.evals[res.evals["features"] != "base"]
    cost = {str(k): {c: (float(g[c].mean()) if c in g and g[c].notna().any() else None) for c in COST}
            for k, g in res.runs.groupby(by, sort=False)} if len(res.runs) else {}
    return {"test_acc": report.summary(res.evals, keys), "ood_delta": report.summary(adapted, keys, "ood_delta"),
            "cost": cost}


def result_rows(res: UpStepResults, by: str = "domain", notebook: str = "20") -> list[dict]:
    """Rows of the shared results schema for the results notebook: target test accuracy ("<label>: target top-1")
    and the change of out-of-domain accuracy, adapted - base ("<label>: forgetting"), per (``by``, features, eval),
    with the trainable parameters and the mean training wall time. UpStep has no public numbers to sit beside
    them."""
    label, ev = "UpStep" if notebook == "20" else "UpStep ablations", res.evals
    # both tables in one frame, each group's forgetting row right after its accuracy row
    rows = pd.concat([ev.assign(table=f"{label}: target top-1", value=ev["test_acc"]),
                      ev[ev["features"] != "base"].assign(table=f"{label}: forgetting", value=ev["ood_delta"])])
    cost = res.runs.groupby(by, sort=False)[["trainable_params", "wall_time_s"]].mean() \
        if len(res.runs) and "trainable_params" in res.runs else None

    def extra(d: pd.DataFrame) -> dict:
        k, f, t = d[by].iloc[0], d["features"].iloc[0], d["table"].iloc[0]
        out = {"metric": "OOD top-1 change (pp)" if t.endswith("forgetting") else "top-1 (%)",
               "trainable": 0, "wall_time_s": 0.0}
        if f != "base" and cost is not None and k in cost.index and cost.loc[k].notna().all():
            out.update(trainable=int(cost.loc[k, "trainable_params"]), wall_time_s=float(cost.loc[k, "wall_time_s"]))
        return out
    return report.result_rows(rows.sort_index(kind="stable"), lambda *k: k[3], [by, "features", "eval", "table"],
                              "value", method=lambda k, f, e, _: f"{f} / {e}" if k == "base" else f"{k} / {f} / {e}",
                              extra=extra)


# ---- the plan (counted on the meta device) and the widget panel ------------------------------------

def plan_table(cfg: UpStepConfig, ranks=None) -> pd.DataFrame:
    """The configured architecture built on the meta device (shapes only: nothing is downloaded or allocated) with
    UpStep's LoRA and head for each rank of ``ranks`` (default: ``lora_rank``); trainable-parameter counts."""
    from vitadapt.vit import meta_vit
    rows = []
    for r in dict.fromkeys(ranks or (cfg.lora_rank,)):
        model = meta_vit(cfg.arch, cfg.img_size, **cfg.arch_kwargs)
        total = count_total(model)
        obj = build_objective(dataclasses.replace(cfg, lora_rank=r), model, seed=0)
        rows.append({"arch": cfg.arch, "img_size": cfg.img_size, "lora_rank": r, "backbone_params": total,
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
