"""20_upstep and 21_upstep_ablations: UpStep (source-free, self-supervised, parameter-efficient
post-pretraining) against the frozen base model, on several labelled target domains.

Protocol for every (domain, seed):

1. the **base** backbone is evaluated frozen (linear probe and kNN, :mod:`vitadapt.protocol.probe`) on the target
   and on an out-of-domain labelled set (the *forgetting set*);
2. **UpStep** adapts a copy of the backbone on the domain's *unlabelled* training images only
   (:class:`vitadapt.data.unlabelled.Unlabelled` drops the labels before anything else sees an item): an online
   stream trained against the codes of an offline stream (``offline_stream``: by default an EMA copy of the online
   one, LoRA included, updated after every optimizer step through ``fit``'s ``on_step``), with centre vector
   regularisation (``cvr``: by default the squared norm of the centre vector, weight 1) and the gate;
3. the adapted backbone, and the **ensembles** of base and adapted features (concatenated or averaged,
   :func:`vitadapt.ssl.upstep.ensemble_features`), are evaluated the same way;
4. **forgetting** is the change of accuracy on the forgetting set, ``adapted - base`` (negative: forgotten); the
   cost (backward passes, skipped iterations, wall time, peak memory, trainable parameters) and the centre-vector
   statistics of every step are kept.

An adaptation (domain, seed, settings) is a product shared by notebooks 20, 21 and reruns
(:mod:`vitadapt.protocol.products`): the adapted backbone, the loop's result (backward passes, skips, wall time,
per-step statistics) and the trainable counts are stored under ``$VITADAPT_CACHE/upstep/``, keyed by
:func:`adaptation_key`; a second run with the same key loads them (:func:`adapt_or_load`). Its record keeps the cost
measured when it was trained, with ``cached: True`` and ``cache_key``. ``VITADAPT_UPSTEP_CACHE=0`` turns the cache
off; under torchrun/SLURM (world size > 1) it is off.

Everything the public record leaves open is a named choice in ``vitadapt.papers.CHOICES["UpStep"]`` (rendered by
the notebooks) with a config switch where reasonable alternatives exist. No UpStep result from the paper is printed
anywhere: its tables are not public.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Callable, Literal

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from vitadapt import papers
from vitadapt.config import ExperimentConfig, _dataset_names, literal_values, opt
from vitadapt.data import Splits
from vitadapt.data.unlabelled import Unlabelled, draw
from vitadapt.eval import eval_transform, loader_options
from vitadapt.jobs import checkpoint_every_s
from vitadapt.peft.common import count_total, count_trainable
from vitadapt.protocol import effects, figures, grid, probe, products, report, tables
from vitadapt.protocol.setup import backbone, chance, check_dataset, dataset, labelled, record_sources
from vitadapt.ssl.upstep import (ENSEMBLE_MODES, UpStepAugment, UpStepGate, UpStepObjective, build_objective,
                                 ensemble_features, upstep_loss_fn)

#: domains seen from above: vertical flips are a label-preserving augmentation there (``aug_vflip="overhead"``)
OVERHEAD_DOMAINS = ("aid", "eurosat", "resisc45", "ucmerced", "fmow", "sentinel2_tiles", "synthetic")
#: per-step statistics the objective logs (valid ``gate_signal`` values, columns of the history)
LOG_KEYS = ("loss", "loss_cluster", "loss_cvr", "cv_norm", "cv_norm_base", "cv_drift", "cv_cos", "cv_norm_ema",
            "clusters_used")
FEATURE_KINDS = ("base", "upstep", "ensemble-concat", "ensemble-average")
#: the cost of a run kept in metrics.json (the cost table adds the images and the evaluation time)
COST = ("steps", "backward_passes", "skipped", "skip_fraction", "wall_time_s", "s_per_step", "peak_memory_mb",
        "trainable_params", "trainable_backbone")


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
    cvr: Literal["drift", "norm", "both", "none"] = opt("norm", "Centre vector regularisation: norm = ||c_adapted||^2 (the centre vector's magnitude), drift = ||c_adapted - c_base||^2, both, or none.")
    cvr_weight: float = opt(1.0, "Weight of the CVR term (norm: ||c||^2 is in [0, 1]; drift: the squared drift is ~1e-3 after a few iterations, so use ~100).", min=0.0)
    offline_stream: Literal["ema", "stop_grad", "symmetric"] = opt("ema", "The offline stream (its view's codes are the targets): an EMA copy of the online stream (LoRA and head), the online weights without gradient, or none (symmetric: both views back-propagate).")
    offline_momentum: float = opt(0.99, "EMA momentum of the ema offline stream (updated after every optimizer step).", min=0.0, max=0.9999)
    center_estimate: Literal["batch", "ema"] = opt("batch", "Centre vectors of the current batch, or an exponential moving average over batches.")
    gate: Literal["none", "alternate", "cv_signal"] = opt("alternate", "Which iterations back-propagate: all, even ones, or those whose centre-vector signal moved (cv_signal).")
    gate_signal: str = opt("cv_drift", "Logged statistic the cv_signal gate reads.", choices=lambda: list(LOG_KEYS))
    gate_target_skip: float = opt(0.5, "Fraction of iterations the cv_signal gate aims to skip.", min=0.0, max=0.95)
    gate_warmup: int = opt(4, "First iterations the cv_signal gate always back-propagates.", min=0)
    aug_scale_min: float = opt(0.25, "Smallest area fraction of the random resized crops.", min=0.01, max=1.0)
    aug_vflip: Literal["overhead", "always", "never"] = opt("overhead", "Vertical flips (p 0.5): on overhead domains only, always, or never.")
    ensemble_modes: tuple = opt(("concat", "average"), "Ensembles of base and adapted features to evaluate (concat, "
                                "average; empty: none).", choices=lambda: ENSEMBLE_MODES)
    probe_Cs: tuple = opt((0.01, 0.1, 1.0, 10.0), "Inverse regularisation strengths of the linear probe; chosen on val.", min=1e-6, max=1e6)
    knn_ks: tuple = opt((10, 20), "k values of the weighted kNN classifier; chosen on val.", min=1, max=1000)
    probe_max_iter: int = opt(300, "L-BFGS iterations per C of the linear probe.", min=1, max=100000)
    ablation_domain: str = opt("", "Domain of the ablations (21); '' = the first of domains.")
    ablate_cvr: tuple = opt(("none",), "CVR modes tried against the default (21).",
                            choices=lambda: literal_values(UpStepConfig, "cvr"))
    ablate_gate: tuple = opt(("none", "cv_signal"), "Gate rules tried against the default (21).",
                             choices=lambda: literal_values(UpStepConfig, "gate"))
    ablate_rank: tuple = opt((32,), "LoRA ranks tried against the default (21).", min=1, max=1024)
    ablate_cvr_weight: tuple = opt((), "CVR weights tried against the default (21).", min=0.0)
    ablate_offline: tuple = opt((), "Offline streams tried against the default (21).",
                                choices=lambda: literal_values(UpStepConfig, "offline_stream"))

    def check(self) -> None:
        if not self.domains:
            raise ValueError("domains=() is empty; give at least one target domain, e.g. domains=['aid']")
        check_dataset("domains", *self.domains)
        for name in ("forgetting_dataset", "forgetting_fallback", "ablation_domain")[:3 if self.ablation_domain else 2]:
            check_dataset(name, getattr(self, name))
        if self.forgetting_fallback == self.forgetting_dataset:
            raise ValueError(f"forgetting_fallback={self.forgetting_fallback!r} equals forgetting_dataset; choose "
                             f"another labelled set (valid: {', '.join(_dataset_names())})")
        if any(isinstance(r, bool) or not isinstance(r, int) for r in self.ablate_rank):
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


def forgetting_dataset_for(cfg, domain: str) -> str:
    """The out-of-domain labelled set of ``domain``: ``forgetting_dataset`` unless that is the domain itself."""
    return cfg.forgetting_fallback if domain == cfg.forgetting_dataset else cfg.forgetting_dataset


def domain_splits(cfg, domain: str, seed: int, forgetting: bool = False) -> Splits:
    """The labelled splits of ``domain`` (``forgetting``: of its forgetting set, forgetting_n_* per class) for
    ``seed``: the source's default pool (``sized=False``) subsampled per class; train varies with the seed."""
    n = (cfg.forgetting_n_train_per_class, cfg.forgetting_n_val_per_class, cfg.forgetting_n_test_per_class)
    return labelled(cfg, seed, forgetting_dataset_for(cfg, domain), n, sized=False) if forgetting else \
        labelled(cfg, seed, domain, sized=False)


def adaptation_pool(cfg, domain: str, seed: int, labelled_train: Dataset | None = None) -> tuple[Dataset, list[int]]:
    """The unlabelled images UpStep adapts on, as (dataset, indices): the seed's labelled-training subset
    (``n_adapt_images=0``) or ``n_adapt_images`` from the training pool (:func:`~vitadapt.data.unlabelled.draw`)."""
    if cfg.n_adapt_images == 0:
        sub = labelled_train if labelled_train is not None else domain_splits(cfg, domain, seed).train
        return sub.base, list(sub.indices)
    pool = dataset(cfg, domain, sized=False).train
    return pool, draw(cfg.n_adapt_images, len(pool), 10_000 + seed)


def vflip_for(cfg, domain: str) -> float:
    """Probability of a vertical flip of ``domain``'s adaptation views (``aug_vflip``)."""
    return {"always": 0.5, "never": 0.0}.get(cfg.aug_vflip, 0.5 if domain.split(":")[-1] in OVERHEAD_DOMAINS else 0.0)


def augment_for(cfg, domain: str) -> UpStepAugment:
    return UpStepAugment(size=cfg.img_size, scale=(cfg.aug_scale_min, 1.0), vflip=vflip_for(cfg, domain))


def adapt(cfg, base_model: torch.nn.Module, images: tuple[Dataset, list[int]], seed: int, domain: str = "",
          fabric=None, progress: bool = False, ckpt=None) -> tuple[UpStepObjective, object]:
    """UpStep on a copy of ``base_model`` (left untouched) over the unlabelled ``images`` (dataset, indices) for
    ``cfg.steps`` iterations. Returns the objective (``.model``: the adapted backbone) and the loop's result."""
    from vitadapt.train import fabric_from_config, fit, seed_everything
    views = Unlabelled(*images, augment_for(cfg, domain))
    if len(views) < cfg.adapt_batch_size:
        raise ValueError(f"{len(views)} adaptation images for domain {domain!r} but adapt_batch_size="
                         f"{cfg.adapt_batch_size}; lower adapt_batch_size or raise n_adapt_images / n_train_per_class")
    seed_everything(seed)
    init = torch.stack([eval_transform(cfg.img_size)(views.image(i)) for i in range(len(views))]) \
        if cfg.prototype_init == "base_kmeans" else None        # the objective checks there are enough
    objective = build_objective(cfg, copy.deepcopy(base_model), seed, init)
    gate = UpStepGate(cfg.gate, signal=cfg.gate_signal, target_skip=cfg.gate_target_skip, warmup=cfg.gate_warmup)
    loader = DataLoader(views, batch_size=cfg.adapt_batch_size, shuffle=True, drop_last=True, generator=torch.Generator(
        ).manual_seed(seed), **loader_options(cfg.num_workers, cfg.pin_memory, cfg.persistent_workers))
    result = fit(fabric or fabric_from_config(cfg), objective, upstep_loss_fn(objective), loader, steps=cfg.steps,
                 lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup_steps, should_backward=gate,
                 on_step=objective.on_step, progress=progress, ckpt_path=ckpt,
                 ckpt_every_s=checkpoint_every_s() if ckpt else None,
                 config={"domain": domain, "seed": seed})
    return objective.eval(), result


#: UpStepConfig fields that only choose what is evaluated (or which jobs run): never part of an adaptation's key
EVAL_ONLY = ("domains", "forgetting_dataset", "forgetting_fallback", "forgetting_n_train_per_class",
             "forgetting_n_val_per_class", "forgetting_n_test_per_class", "ensemble_modes", "probe_Cs", "knn_ks",
             "probe_max_iter", "ablation_domain", "ablate_cvr", "ablate_gate", "ablate_rank", "ablate_cvr_weight",
             "ablate_offline")
#: library sources an adapted backbone depends on (relative to lib/vitadapt)
UPSTEP_SOURCES = (*products.COMMON_SOURCES, "experiments/upstep.py")


def adaptation_key(cfg, base_model: torch.nn.Module, images: tuple[Dataset, list[int]], seed: int,
                   domain: str = "") -> dict:
    """Everything that determines :func:`adapt`'s result: every field of the config's own class beyond
    :class:`~vitadapt.config.ExperimentConfig` except :data:`EVAL_ONLY` (steps, batch, optimiser, LoRA, head,
    prototypes, CVR, offline stream, gate, augmentation, ``n_adapt_images``, and any field added later), the domain
    and its resolved vertical flip, a digest of the adaptation images' identities (``images``), the seed, the base
    weights' fingerprint, the numerics (:data:`vitadapt.protocol.products.NUMERICS`), library versions and a digest
    of :data:`UPSTEP_SOURCES`."""
    from vitadapt.eval import model_fingerprint
    base = {f.name for f in dataclasses.fields(ExperimentConfig)}
    own = [f.name for f in dataclasses.fields(cfg) if f.name not in base and f.name not in EVAL_ONLY]
    return {"product": "upstep adaptation", "settings": products.settings(cfg, own), "seed": int(seed),
            "domain": domain, "vflip": vflip_for(cfg, domain), "items": products.items_digest(images),
            "base": model_fingerprint(base_model), "numerics": products.settings(cfg, products.NUMERICS),
            "sources": products.source_digest(UPSTEP_SOURCES), "env": products.environment()}


@dataclass
class Adapted:
    """One UpStep adaptation: ``model`` the adapted backbone (LoRA in place), ``result`` the loop's
    :class:`~vitadapt.train.FitResult` (as measured when it was trained), the trainable counts (objective: LoRA and
    head; backbone: LoRA), and whether it was loaded from the cache (``cache_key``: its file; None: cache off)."""
    model: torch.nn.Module
    result: object
    trainable_params: int
    trainable_backbone: int
    cached: bool = False
    cache_key: str | None = None


def adapt_or_load(cfg, base_model: torch.nn.Module, images: tuple[Dataset, list[int]], seed: int, domain: str = "",
                  fabric=None, progress: bool = False, ckpt=None) -> Adapted:
    """:func:`adapt`, or its stored result when an earlier finished run had the same :func:`adaptation_key` (then
    ``ckpt`` goes unused); a finished run is stored (a diverged one raises before)."""
    from vitadapt.train import FitResult
    store = products.ProductCache("upstep", adaptation_key(cfg, base_model, images, seed, domain)
                                  if products.enabled("upstep") else {})
    if (hit := store.load()) is not None:
        shell = copy.copy(cfg)                       # the structure only: random prototypes, no k-means
        object.__setattr__(shell, "prototype_init", "random")
        model = build_objective(shell, copy.deepcopy(base_model), seed).model
        try:
            model.load_state_dict(hit["state"], strict=True)
        except (RuntimeError, KeyError) as e:
            import warnings
            warnings.warn(f"ignoring the UpStep cache {store.path} ({str(e)[:120]}); adapting again", stacklevel=2)
        else:
            return Adapted(model.eval(), FitResult(**hit["result"]), hit["trainable_params"],
                           hit["trainable_backbone"], True, store.digest)
    objective, result = adapt(cfg, base_model, images, seed, domain, fabric, progress, ckpt=ckpt)
    out = Adapted(objective.model, result, count_trainable(objective), count_trainable(objective.model), False,
                  store.digest if store.on else None)
    store.save({"state": {k: v.detach().cpu() for k, v in objective.model.state_dict().items()},
                "result": dataclasses.asdict(result), "trainable_params": out.trainable_params,
                "trainable_backbone": out.trainable_backbone})
    return out


def evaluate_features(cfg, base: Callable, adapted: Callable | None, splits: Splits, seed: int) -> dict[str, dict]:
    """Probe scores {feature kind: {eval: {test_acc, val_acc, selected}}} of the base, adapted (None: base only)
    and ensemble features on ``splits``; ``base``/``adapted``: :func:`vitadapt.protocol.probe.features`."""
    if adapted is None:
        return probe.score_sets(cfg, {"base": base}, splits, seed)
    ensemble = lambda m: lambda b, a: ensemble_features(torch.from_numpy(b), torch.from_numpy(a), m).numpy()
    return probe.score_sets(cfg, {"base": base, "upstep": adapted}, splits, seed,
                            {f"ensemble-{m}": ("base", "upstep", ensemble(m)) for m in cfg.ensemble_modes})


def _eval_rows(cfg, base, adapted, splits: Splits, domain: str, seed: int, variant: str, diverged=None) -> list[dict]:
    """A row per (feature kind, eval) on the target ``splits`` and the forgetting set
    (:func:`~vitadapt.protocol.probe.forgetting_rows`); with ``diverged`` (the run's error) every adapted and
    ensemble row is NaN with a ``diverged`` note, and the base rows stand."""
    ood = domain_splits(cfg, domain, seed, forgetting=True)
    target, forgetting = (evaluate_features(cfg, base, adapted, s, seed) for s in (splits, ood))
    lost = ("upstep", *(f"ensemble-{m}" for m in cfg.ensemble_modes)) if diverged is not None else ()
    return probe.forgetting_rows({"domain": domain, "seed": seed, "variant": variant}, target, forgetting,
                                 forgetting_dataset_for(cfg, domain), diverged={k: diverged.short for k in lost},
                                 chance=chance(splits))


def run_domain_seed(cfg, base_model, info: dict, domain: str, seed: int, variant: str = "UpStep",
                    fabric=None, include_base: bool = True, progress: bool = False, ckpt=None) -> dict:
    """Steps 1-4 of the protocol: {"evals": rows, "runs": run record, "history": per-step rows, "log": a line}."""
    from vitadapt.distributed import on_rank0, work_device
    from vitadapt.train import Diverged, job
    device = work_device(fabric)
    base, keys = probe.features(cfg, base_model, info, device), {"domain": domain, "seed": seed, "variant": variant}
    splits, t0 = domain_splits(cfg, domain, seed), time.perf_counter()
    try:
        with job(domain=domain, variant=variant, seed=seed):
            images, t1 = adaptation_pool(cfg, domain, seed, splits.train), time.perf_counter()
            ad = adapt_or_load(cfg, base_model, images, seed, domain, fabric, progress, ckpt=ckpt)
            result = ad.result
            spent = time.perf_counter() - t1 if ad.cached else result.wall_time_s   # training, or loading
    except Diverged as e:
        rows = on_rank0(fabric, functools.partial(_eval_rows, cfg, base, None, splits, domain, seed, variant, e))
        record, history, line = {**keys, "diverged": str(e)}, [], str(e)
    else:
        rows = on_rank0(fabric, lambda: _eval_rows(cfg, base, probe.features(cfg, ad.model, info, device),
                                                   splits, domain, seed, variant))
        last = result.history[-1] if result.history else {}         # the run's cost and final statistics
        record = {**keys, **result.record(), "adapt_images": len(images[1]),
                  "trainable_params": ad.trainable_params, "trainable_backbone": ad.trainable_backbone,
                  **{f"final_{k}": last.get(k) for k in ("loss_cluster", "cv_norm", "cv_drift")},
                  "eval_wall_time_s": round(time.perf_counter() - t0 - spent, 2),
                  **({"cached": ad.cached, "cache_key": ad.cache_key} if ad.cache_key else {})}
        history = [{**keys, **{k: h[k] for k in ("step", "backward", *LOG_KEYS, "lr") if k in h}} for h in result.history]
        trained = f"cached ({record['wall_time_s']:.1f} s when trained)" if ad.cached else \
            f"{record['wall_time_s']:.1f} s training"
        line = (f"{variant if variant != 'UpStep' else domain} seed {seed}: {record['backward_passes']}/{record['steps']} "
                f"backward, {trained}, {record['eval_wall_time_s']:.1f} s evaluation")
    rows = rows if include_base else [r for r in rows if r["features"] != "base"]
    return {"evals": rows, "runs": record, "history": history, "log": line}


def _start(cfg, run, domains: list[str]) -> tuple:
    """The base model, its info and the fabric; the weights, every domain and forgetting set recorded in ``run``."""
    from vitadapt.train import fabric_from_config
    base_model, info = backbone(cfg)
    if run is not None:
        forgetting = list(dict.fromkeys(forgetting_dataset_for(cfg, d) for d in domains))
        data = {d: dataset(cfg, d, sized=False) for d in domains}
        record_sources(run, info, {**{f"data[{d}]": s for d, s in data.items()},
                                   **{f"forgetting[{o}]": dataset(cfg, o, sized=False) for o in forgetting}},
                       {"dataset": ", ".join(domains), "source": " | ".join(s.source for s in data.values()),
                        "forgetting": ", ".join(sorted(forgetting))})
    return base_model, info, fabric_from_config(cfg)


def run_upstep(cfg: UpStepConfig, run=None, progress: bool = False, log: Callable[[str], None] | None = print) -> grid.Results:
    """Notebook 20: base vs UpStep (and ensembles) on every domain and seed."""
    base_model, info, fabric = _start(cfg, run, list(cfg.domains))
    outs = grid.run_jobs(run, grid.product(domain=cfg.domains, seed=cfg.seeds), lambda j, ckpt: run_domain_seed(
        cfg, base_model, info, j["domain"], j["seed"], fabric=fabric, progress=progress, ckpt=ckpt), log)
    return grid.Results.of(outs)


def ablation_variants(cfg: UpStepConfig) -> list[tuple[str, dict]]:
    """One-factor-at-a-time variants around the configured default: (name, config overrides)."""
    axes = [(f, getattr(cfg, a), lambda v, f=f: f"{f}={v}") for f, a in (
        ("offline_stream", "ablate_offline"), ("cvr", "ablate_cvr"), ("cvr_weight", "ablate_cvr_weight"),
        ("gate", "ablate_gate"), ("lora_rank", "ablate_rank"))]
    return [(f"default (offline={cfg.offline_stream}, cvr={cfg.cvr}, gate={cfg.gate}, r={cfg.lora_rank})", {})] + \
        grid.one_factor(cfg, axes)


def run_ablations(cfg: UpStepConfig, run=None, progress: bool = False, log: Callable[[str], None] | None = print) -> grid.Results:
    """Notebook 21: every variant of :func:`ablation_variants` on the ablation domain, every seed; the base rows
    once per seed, last (variant ``"base"``). Each variant's ensemble rows are the ensemble on/off ablation."""
    domain, variants = cfg.target_for_ablations, dict(ablation_variants(cfg))
    base_model, info, fabric = _start(cfg, run, [domain])
    outs = grid.run_jobs(run, grid.product(variant=list(variants), seed=cfg.seeds), lambda j, ckpt: run_domain_seed(
        dataclasses.replace(cfg, **variants[j["variant"]]), base_model, info, domain, j["seed"], j["variant"],
        fabric, include_base=False, progress=progress, ckpt=ckpt), log)
    from vitadapt.distributed import on_rank0, work_device
    base = probe.features(cfg, base_model, info, work_device(fabric))
    outs += [{"evals": on_rank0(fabric, lambda s=s: _eval_rows(cfg, base, None, domain_splits(cfg, domain, s), domain,
                                                               s, "base"))} for s in cfg.seeds]
    return grid.Results.of(outs)


def run_single(cfg: UpStepConfig, seed: int | None = None, domain: str = "", base=None, **overrides) -> pd.DataFrame:
    """The widget panel's action: test accuracy and forgetting per feature kind of one configuration (``overrides``:
    config fields) on one domain and seed; ``base``: an optional (model, info)."""
    vcfg = dataclasses.replace(cfg, **overrides) if overrides else cfg
    model, info = base or backbone(vcfg, verbose=False)
    out = run_domain_seed(vcfg, model, info, domain or cfg.target_for_ablations,
                          cfg.seeds[0] if seed is None else int(seed), variant="panel")
    df = pd.DataFrame(out["evals"])[["features", "eval", "test_acc", "delta_vs_base", "ood_test_acc", "ood_delta"]]
    df.attrs["run"] = out["runs"]
    return df


def choices_table(cfg: UpStepConfig | None = None) -> pd.DataFrame:
    """``papers.CHOICES["UpStep"]`` as a table; with ``cfg``, the values of the switches in this run."""
    return papers.choices_table("UpStep", cfg).rename(columns={"switch": "switch (alternatives)"})


def accuracy_table(evals: pd.DataFrame, by: str = "domain") -> pd.DataFrame:
    """Target test accuracy, mean ± std over seeds: rows (``by``, eval), one column per feature kind (the base rows
    of notebook 21, run once, serve every variant)."""
    out = tables.mean_std(tables.with_shared(evals, by, evals["features"] == "base"), [by, "eval"], "features")
    out = out[[c for c in FEATURE_KINDS if c in out.columns]]
    out["chance"] = evals.groupby([by, "eval"], sort=False)["chance"].first().reindex(out.index).round(3)
    return out


def forgetting_table(evals: pd.DataFrame, by: str = "domain") -> pd.DataFrame:
    """Forgetting (OOD test accuracy, adapted - base), mean ± std over seeds; the base OOD accuracy for scale."""
    return tables.forgetting(evals, by, FEATURE_KINDS)


#: the direction the UpStep paper reports on its target domains (arXiv 2502.21313; no public numbers)
PAPER_DIRECTION = {"linear probe": "+ (UpStep improves the target domains; no public numbers)",
                   "kNN": "+ (UpStep improves the target domains; no public numbers)"}


def _adapted_vs_base(evals: pd.DataFrame, by: str) -> pd.DataFrame:
    """The adapted features' rows (labelled by ``by``) and the base rows (labelled "base"), one frame to pair."""
    up = evals[evals["features"] == "upstep"]
    base = evals[evals["features"] == "base"].drop_duplicates([c for c in ("domain", "seed", "eval") if c in evals])
    return pd.concat([base.assign(**{by: "base"}), up], ignore_index=True)


def gate_saving(runs: pd.DataFrame, gated: str, ungated: str) -> str:
    """One sentence: backward passes and training time of the ``gated`` variant against the ``ungated`` one (the same
    seeds; the times measured when each was trained)."""
    r = runs.set_index(["variant", "seed"])
    seeds = sorted(set(r.loc[gated].index) & set(r.loc[ungated].index))
    if not seeds or "wall_time_s" not in r:
        return ""
    ratio = [r.loc[(gated, s), "wall_time_s"] / r.loc[(ungated, s), "wall_time_s"] for s in seeds]
    bw = [int(r.loc[(gated, s), "backward_passes"]) for s in seeds]
    return (f"- **The gate's saving**: {gated} back-propagated {min(bw)}-{max(bw)} of {int(r.loc[(gated, seeds[0]), 'steps'])} "
            f"iterations; its training time was {sum(ratio) / len(ratio):.2f} x that of {ungated} (per seed "
            + ", ".join(f"{x:.2f}" for x in ratio) + ").")


def findings(cfg: UpStepConfig, res: grid.Results, by: str = "domain") -> tuple[str, pd.DataFrame]:
    """``(markdown, effects table)``: UpStep's adapted features against the base on the target and on the forgetting
    set, paired per seed, per ``by`` value (20: each domain; 21: each variant, then each against the default, and the
    gate's saving), with the paper's direction where it states one."""
    ev, texts, parts = res.evals, [], []
    if by == "domain":
        for d in dict.fromkeys(ev["domain"]):
            sub = _adapted_vs_base(ev[ev["domain"] == d], "domain").replace({"domain": {d: "UpStep"}})
            ood = sub["ood_dataset"].dropna().iloc[0] if sub["ood_dataset"].notna().any() else "the forgetting set"
            for value, what, paper in (("test_acc", f"{d} (target)", PAPER_DIRECTION), ("ood_test_acc", f"{ood} "
                                       f"(forgetting, adapted to {d})", None)):
                e = effects.paired_effects(sub, "domain", "base", value=value).assign(on=what)
                parts.append(e)
                texts.append(effects.effect_text(e, "domain", "base", paper=paper, label=f"{what}: "))
    else:
        pairs = _adapted_vs_base(ev, "variant")
        default = next(v for v in dict.fromkeys(ev["variant"]) if str(v).startswith("default"))
        for value, what in (("test_acc", f"{cfg.target_for_ablations} (target)"), ("ood_test_acc", "forgetting set")):
            e = effects.paired_effects(pairs, "variant", "base", value=value).assign(on=what)
            d = effects.paired_effects(pairs[pairs["variant"] != "base"], "variant", default, value=value).assign(on=what)
            parts += [e, d]
            texts += [effects.effect_text(e, "variant", "base", paper=PAPER_DIRECTION if value == "test_acc" else None,
                                          paper_rows=[default], label=f"{what}: "), effects.effect_text(d, "variant", "default", label=f"{what}: ")]
        if "gate=none" in set(res.runs.get("variant", [])):
            texts.append(gate_saving(res.runs, default, "gate=none"))
    return ("**What this run shows** (paired per seed; forgetting: the change on the out-of-domain set, negative = "
            "forgotten):\n\n" + "\n".join(t for t in texts if t), pd.concat(parts, ignore_index=True))


def ensemble_table(evals: pd.DataFrame, by: str = "variant") -> pd.DataFrame:
    """Ensemble on/off: test accuracy of the adapted features alone ("off") and of each ensemble with the base
    features, and the ensemble's gain over "off" on the target and on the forgetting set (means over seeds)."""
    ensembles = {kind.split("-", 1)[1]: kind for kind in FEATURE_KINDS[2:]}
    return tables.gains(evals[evals["features"] != "base"], by, "upstep", ensembles)


def cost_table(runs: pd.DataFrame, by: str = "domain") -> pd.DataFrame:
    """Training cost per ``by``: means over seeds (runs loaded from the product cache keep the cost measured when
    they were trained; their number per ``by`` is a last column when there are some)."""
    return products.with_loaded(tables.means(runs, by, COST + ("adapt_images", "eval_wall_time_s")).assign(
        n_seeds=runs.groupby(by, sort=False).size()), runs, by)


def plot_accuracy(evals: pd.DataFrame, by: str = "domain", title: str = "", value: str = "test_acc"):
    """Bars of target test accuracy (``value="ood_delta"``: the forgetting) per ``by`` and feature kind, a panel per eval."""
    change = value == "ood_delta"
    d = evals[evals["features"] != "base"] if change else evals
    return figures.bars(d, x=by, y=value, hue="features", hue_order=[k for k in FEATURE_KINDS if k in set(d["features"])],
                        title=title, ylabel="OOD accuracy change (adapted - base)" if change else "target test accuracy",
                        ylim=None if change else (0, 1), rotation=15)


def plot_center_vector(history: pd.DataFrame, by: str = "variant", smooth: int = 1):
    """Centre-vector norm (dashed: base model on the same batches), drift and clustering loss over training per ``by``."""
    titles = {"cv_norm": "centre-vector norm ||c|| (dashed: base model)", "loss_cluster": "clustering loss",
              "cv_drift": "centre-vector drift ||c_adapted - c_base||²"}
    return figures.curves(history, by, ["cv_norm", "cv_drift", "loss_cluster"], smooth=smooth, symlog=["cv_drift"],
                          dashed={"cv_norm": "cv_norm_base"}, titles=titles)


def summary(res: grid.Results, by: str = "domain") -> dict:
    """metrics.json content: mean/std/n of test accuracy and OOD change per (by, features, eval); costs."""
    keys, adapted = [by, "features", "eval"], res.evals[res.evals["features"] != "base"]
    return {"test_acc": report.summary(res.evals, keys), "ood_delta": report.summary(adapted, keys, "ood_delta"),
            "cost": report.mean_per_key(res.runs, by, COST)}


def result_rows(res: grid.Results, by: str = "domain", notebook: str = "20") -> list[dict]:
    """Result rows per (``by``, features, eval): "<label>: target top-1" and "<label>: forgetting" (OOD change,
    adapted - base), with trainable parameters and wall time. UpStep has no public numbers to sit beside them."""
    label, ev = "UpStep" if notebook == "20" else "UpStep ablations", res.evals
    metric = {f"{label}: target top-1": "top-1 (%)", f"{label}: forgetting": "OOD top-1 change (pp)"}
    # both tables in one frame, each group's forgetting row right after its accuracy row
    rows = pd.concat([ev.assign(table=f"{label}: target top-1", value=ev["test_acc"]),
                      ev[ev["features"] != "base"].assign(table=f"{label}: forgetting", value=ev["ood_delta"])])
    none, cost = {"trainable": 0, "wall_time_s": 0.0}, report.row_costs(res.runs, by)
    extra = lambda d: {"metric": metric[d["table"].iloc[0]],
                       **(none if d["features"].iloc[0] == "base" else cost.get(str(d[by].iloc[0]), none))}
    return report.result_rows(rows.sort_index(kind="stable"), lambda *k: k[3], [by, "features", "eval", "table"],
                              "value", method=lambda k, f, e, _: f"{f} / {e}" if k == "base" else f"{k} / {f} / {e}",
                              extra=extra)


def plan_table(cfg: UpStepConfig, ranks=None) -> pd.DataFrame:
    """Trainable-parameter counts of UpStep's LoRA and head for each rank of ``ranks`` (default: ``lora_rank``) on
    the configured architecture, on the meta device (:mod:`vitadapt.protocol.counts`)."""
    from vitadapt.vit import meta_vit
    rows = []
    for r in dict.fromkeys(ranks or (cfg.lora_rank,)):
        total = count_total(model := meta_vit(cfg.arch, cfg.img_size, **cfg.arch_kwargs))
        lora = count_trainable((obj := build_objective(dataclasses.replace(cfg, lora_rank=r), model, seed=0)).model)
        rows.append({"arch": cfg.arch, "img_size": cfg.img_size, "lora_rank": r, "backbone_params": total,
                     "trainable_lora": lora, "trainable_head": count_trainable(obj.head),
                     "trainable_total": count_trainable(obj), "trainable_fraction_of_backbone": round(lora / total, 5)})
    return pd.DataFrame(rows).set_index("lora_rank")


def panel_fields(cfg: UpStepConfig) -> dict:
    """The knobs of the ablation panel: {name: (default, options or None)}; see :func:`vitadapt.widgets.ablation_panel`."""
    ranks = sorted({1, 2, 4, 8, 16, 32, 64, cfg.lora_rank, *cfg.ablate_rank})
    streams, cvrs, gates = (list(literal_values(UpStepConfig, f)) for f in ("offline_stream", "cvr", "gate"))
    return {"offline_stream": (cfg.offline_stream, streams), "cvr": (cfg.cvr, cvrs),
            "cvr_weight": (float(cfg.cvr_weight), None),
            "gate": (cfg.gate, gates), "lora_rank": (cfg.lora_rank, ranks), "steps": (cfg.steps, None),
            "lr": (float(cfg.lr), None), "seed": (cfg.seeds[0], list(cfg.seeds)),
            "domain": (cfg.target_for_ablations, list(dict.fromkeys([cfg.target_for_ablations, *cfg.domains])))}
