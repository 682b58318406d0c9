"""10_explora_dinov2, 11_explora_mae, 12_explora_ablations: ExPLoRA's extended pre-training, then evaluation.

Protocol for every (variant, seed) (REFERENCE.md section 1):

1. a copy of the source backbone gets the variant's trainable set (:func:`apply_variant`);
2. it continues the *source* self-supervised objective (DinoV2: DINO + iBOT + KoLeo with an EMA teacher; MAE:
   masked reconstruction) on **unlabelled** target images (:class:`vitadapt.data.unlabelled.Unlabelled` drops each
   label unread) for ``pretrain_steps`` steps of ``pretrain_batch_size`` images (:func:`pretrain_variant`);
3. the LoRA updates are merged and qkv fused back: a plain timm ViT (:func:`vitadapt.peft.explora.merge_explora`);
4. it is evaluated on the labelled target (:func:`evaluate_variant`): a linear probe and kNN on frozen features
   (:mod:`vitadapt.protocol.probe`) and a LoRA-r8 fine-tune (:mod:`vitadapt.protocol.lora_eval`); whatever is
   chosen is chosen on val, and test is scored once.

Variants (:data:`VARIANTS`): the frozen source model; ExPLoRA (unfrozen blocks U + LoRA on the other blocks + every
LayerNorm + the CLS token); LoRA only (no unfrozen block); unfrozen block only (no LoRA); full-parameter continued
pre-training. Every pre-training variant sees the same images in the same order with the same objective, steps and
learning rate (a controlled comparison, not a per-variant tuned one). Each run records its trainable parameters,
wall time and peak memory (on CPU: the process's resident-set high-water mark, reset before each run).

A pre-trained (variant, seed) is a product shared by notebooks 10, 11, 12 and reruns (:mod:`vitadapt.protocol.products`):
the merged backbone, its record and history are stored under ``$VITADAPT_CACHE/pretrained/``, keyed by
:func:`pretrain_key` (every pre-training setting, the trainable set, variant, seed, the drawn images, the base
weights, the MAE decoder, the numerics and the sources); a second run with the same key loads them. Its record keeps
the wall time, steps and memory measured when it was trained, with ``cached: True`` and ``cache_key``.
``VITADAPT_PRETRAIN_CACHE=0`` turns the cache off; under torchrun/SLURM (world size > 1) it is off.

The ablations (notebook 12) change one knob at a time around the configured ExPLoRA default: unfrozen blocks
(``none``, ``L``, ``1,L``, ``1,L-1,L``), LoRA rank, LoRA targets (``q,v``, ``q,k,v``, ``+proj``, ``+mlp``) and
whether the LayerNorms train. Published numbers and the named choices live in :mod:`vitadapt.papers`.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd
from torch import nn

from vitadapt.config import ExperimentConfig, _dataset_names, opt
from vitadapt.data import DATASETS, Splits
from vitadapt.data.unlabelled import draw
from vitadapt.jobs import checkpoint_every_s, diverged_row
from vitadapt.paths import resolve
from vitadapt.peft.common import count_total, count_trainable
from vitadapt.peft.explora import apply_explora, parse_targets, parse_unfreeze, targets_label, unfreeze_label
from vitadapt.protocol import (counts, effects, grid, lora_eval, official_probe, products, report, selection, setup,
                               tables)
from vitadapt.protocol.counts import explora_recipe as paper_counts  # noqa: F401  (the notebooks' name)
from vitadapt.ssl import continued
from vitadapt.vit import meta_vit

#: variant name -> what trains during the extended pre-training
VARIANTS: dict[str, str] = {
    "frozen": "the source model as it is: no extended pre-training",
    "explora": "ExPLoRA: the unfrozen blocks U in full + LoRA on the targets of every other block + every LayerNorm + CLS",
    "lora_only": "LoRA on the targets of every block + every LayerNorm + CLS; no unfrozen block",
    "block_only": "the unfrozen blocks U in full + every LayerNorm + CLS; no LoRA",
    "full": "every backbone parameter (full-parameter continued pre-training)",
}
LOSSES = ("loss", "dino", "ibot", "koleo", "mse")


# ---- configuration ------------------------------------------------------------------------------------------------

@dataclass
class ExploraConfig(ExperimentConfig, continued.PretrainSettings, lora_eval.LoraFinetuneSettings,
                    selection.ProtocolSettings, official_probe.OfficialProbeSettings):
    """ExPLoRA's extended pre-training and its comparisons (notebooks 10, 11) and ablations (notebook 12)."""

    variants: tuple = opt(tuple(VARIANTS), "Variants compared (10, 11): frozen, explora, lora_only, block_only, full.",
                          choices=lambda: list(VARIANTS))
    pretrain_dataset: str = opt("", "Unlabelled pre-training images: '' = the training split of `dataset` with its labels dropped; or a dataset name (e.g. sentinel2_tiles).")
    n_pretrain_images: int = opt(0, "Images drawn (per seed, uniformly, labels unread) from the pre-training pool; 0 = the whole pool.", min=0)
    # trainable set (ExPLoRA)
    unfreeze: str = opt("L", "Blocks trained in full, paper notation: 'none', 'L', '1,L', '1,L-1,L' (1-based, L = last).")
    rank: int = opt(64, "LoRA rank of the extended pre-training (paper: 64).", min=1, max=4096)
    lora_alpha: float = opt(1.0, "LoRA alpha; scaling alpha / rank (official code: alpha = 1).", min=1e-6)
    targets: str = opt("q,v", "LoRA targets in the other blocks: 'q,v' (paper), 'q,k,v', 'q,k,v,proj', 'q,k,v,proj,mlp' (MLP at rank / 4).")
    train_norms: bool = opt(True, "Train every LayerNorm weight and bias (ExPLoRA: yes).")
    # evaluation
    probe_Cs: tuple = opt((0.01, 0.1, 1.0, 10.0), "Inverse regularisation strengths of the linear probe; chosen on val.", min=1e-6, max=1e6)
    knn_ks: tuple = opt((10, 20), "k values of the weighted kNN classifier; chosen on val.", min=1, max=1000)
    finetune: bool = opt(True, "Also run the LoRA-r8 fine-tune on the labelled target (10, 11).")
    # ablations (12)
    ablate_unfreeze: tuple = opt(("none", "1,L", "1,L-1,L"), "Unfrozen-block specs tried against the default (12).")
    ablate_rank: tuple = opt((8, 16), "LoRA ranks tried against the default (12).", min=1, max=4096)
    ablate_targets: tuple = opt(("q,k,v", "q,k,v,proj", "q,k,v,proj,mlp"), "LoRA target sets tried against the default (12).")
    ablate_norms: tuple = opt((False,), "train_norms values tried against the default (12).")
    ablate_koleo_weight: tuple = opt((), "DinoV2: koleo_weight values tried against the default (12); 0 = without KoLeo, which tests what drives an effect.", min=0.0, max=100.0)
    interactive: bool = opt(False, "Show the ipywidgets panel that re-runs one configuration (needs a live kernel).")

    def check(self) -> None:
        if not self.variants:
            raise ValueError(f"variants=[] is empty; valid values: {', '.join(VARIANTS)}")
        if self.pretrain_dataset and self.pretrain_dataset not in DATASETS:
            raise ValueError(f"pretrain_dataset={self.pretrain_dataset!r} is not valid; valid values: '' (the training "
                             f"split of dataset, unlabelled) or {', '.join(_dataset_names())}")
        for name in ("unfreeze", "ablate_unfreeze", "targets", "ft_targets", "ablate_targets"):    # specs parse
            for spec in v if isinstance(v := getattr(self, name), tuple) else (v,):
                try:
                    parse_targets(spec) if "targets" in name else parse_unfreeze(spec, 10_000)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
        if not parse_targets(self.ft_targets):
            raise ValueError(f"ft_targets={self.ft_targets!r} is empty; the fine-tune needs LoRA targets, e.g. 'q,v'")
        for name, kind, what in (("ablate_rank", int, "an integer >= 1"), ("ablate_norms", bool, "True or False")):
            if any(not isinstance(v, kind) or isinstance(v, bool) != (kind is bool) for v in getattr(self, name)):
                raise ValueError(f"{name}={list(getattr(self, name))!r}: every value must be {what}")
        if self.objective == "dinov2" and self.local_size >= self.img_size and self.n_local_crops:
            raise ValueError(f"local_size={self.local_size} must be smaller than img_size={self.img_size} (local crops "
                             f"are the small views); lower local_size or set n_local_crops=0")
        if self.mae_decoder and not resolve(self.mae_decoder).is_file() and self.dry_run == "no":
            raise ValueError(f"mae_decoder={self.mae_decoder!r} is not a file; give the path of an official MAE "
                             f"checkpoint with its decoder, or '' for a fresh decoder")

    def needs(self) -> dict[str, Callable[[], object]]:
        """What a real run reads, as probes for the dry-run decision: the labelled and the pre-training datasets and
        (MAE) the decoder checkpoint."""
        out = {f"dataset {n!r}": lambda n=n: setup.dataset(self, n, download=False)
               for n in dict.fromkeys([self.dataset, self.pretrain_dataset or self.dataset])}
        if self.objective == "mae" and self.mae_decoder:
            out[f"MAE decoder checkpoint {self.mae_decoder!r}"] = lambda: continued.decoder_path(self.mae_decoder)
        return out


# ---- trainable sets ---------------------------------------------------------------------------------------------

def apply_variant(cfg: ExploraConfig, model: nn.Module, variant: str) -> nn.Module:
    """Set the trainable set of ``variant`` on ``model`` (a timm ViT), in place; returns it. ``frozen``: nothing
    trains; ``full``: everything; the others go through :func:`~vitadapt.peft.explora.apply_explora` (``lora_only``:
    no unfrozen block; ``block_only``: no LoRA)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not valid; valid values: {', '.join(VARIANTS)}")
    if variant in ("frozen", "full"):
        return model.requires_grad_(variant == "full")
    if variant == "block_only" and not parse_unfreeze(cfg.unfreeze, 10_000):
        raise ValueError("variant 'block_only' needs unfrozen blocks; unfreeze='none' leaves nothing but the norms")
    unfreeze = parse_unfreeze("none" if variant == "lora_only" else cfg.unfreeze, len(model.blocks))
    return apply_explora(model, unfreeze_blocks=unfreeze, rank=cfg.rank, train_cls=True, alpha=cfg.lora_alpha,
                         targets=parse_targets("none" if variant == "block_only" else cfg.targets),
                         train_norms=cfg.train_norms)


# ---- backbone, unlabelled images, objectives -------------------------------------------------------------------

def starting_point(cfg: ExploraConfig, info: dict | None = None) -> str:
    """What the extended pre-training starts from, in one sentence (:func:`vitadapt.ssl.continued.starting_point`)."""
    return continued.starting_point(cfg, (info or {}).get("weights_used", cfg.weights), cfg.arch)


def load_base(cfg: ExploraConfig, weights: str | None = None, verbose: bool = True) -> tuple[nn.Module, dict]:
    """The source backbone ``(model, info)``, in eval mode (DinoV2: one that takes the local crops' sizes too)."""
    model, info = setup.backbone(cfg, weights, arch_kwargs=continued.backbone_kwargs(cfg, cfg.arch_kwargs),
                                 verbose=verbose)
    return model.eval(), info


def pretrain_pool(cfg: ExploraConfig, seed: int):
    """The unlabelled pre-training images as (dataset, indices): the training split of ``pretrain_dataset`` (default:
    of ``dataset``), ``n_pretrain_images`` of them drawn uniformly with ``seed`` (labels are not read, so the draw is
    not stratified)."""
    pool = setup.dataset(cfg, cfg.pretrain_dataset or cfg.dataset).train
    return pool, draw(cfg.n_pretrain_images or len(pool), len(pool), 20_000 + seed)


def build_objective(cfg: ExploraConfig, student: nn.Module, seed: int, decoder_state: dict | None = None):
    """``(objective, loss_fn, on_step)`` around ``student`` (:func:`vitadapt.ssl.continued.build_objective`)."""
    return continued.build_objective(cfg, student, seed, decoder_state=decoder_state)


def warm_decoder(cfg: ExploraConfig, base_model: nn.Module, seed: int, fabric=None) -> dict | None:
    """MAE without decoder weights: the fresh decoder trained alone on this seed's images, shared by every variant;
    a product like the pre-trainings (:func:`decoder_key`, kind ``pretrained``), so reruns load it."""
    from vitadapt.train import fabric_from_config
    if not continued.decoder_warmup_needed(cfg):
        return None
    pool = pretrain_pool(cfg, seed)
    store = products.ProductCache("pretrained", decoder_key(cfg, seed, base_model, pool)
                                  if products.enabled("pretrained") else {})
    if (hit := store.load()) is not None:
        return hit["state"]
    state = continued.warm_decoder(cfg, base_model, pool, cfg.img_size, seed, fabric or fabric_from_config(cfg),
                                   cfg.num_workers, cfg.pin_memory, cfg.persistent_workers)
    store.save({"state": state})
    return state


def decoder_key(cfg: ExploraConfig, seed: int, base_model: nn.Module, pool: tuple) -> dict:
    """Everything that determines :func:`warm_decoder`'s result: :func:`pretrain_key` without the variant, its
    trainable set and a decoder (the encoder is frozen, whatever the variant)."""
    return {"product": "mae decoder warm-up", **_pretraining_key(cfg, seed, base_model, pool)}


def _pretraining_key(cfg: ExploraConfig, seed: int, base_model: nn.Module, pool: tuple) -> dict:
    """The part of every pre-training product's key that any variant shares: the seed, every
    :class:`~vitadapt.ssl.continued.PretrainSettings` field, the numerics, the drawn images, the base weights'
    fingerprint, the sources and library versions."""
    from vitadapt.eval import model_fingerprint
    return {"seed": int(seed), "pretrain": products.settings(cfg, cls=continued.PretrainSettings),
            "numerics": products.settings(cfg, products.NUMERICS),
            "data": {"dataset": cfg.pretrain_dataset or cfg.dataset, "n_pretrain_images": cfg.n_pretrain_images,
                     "items": products.items_digest(pool)},
            "base": model_fingerprint(base_model), "sources": products.source_digest(PRETRAIN_SOURCES),
            "env": products.environment()}


# ---- one (variant, seed): extended pre-training, merge, evaluation ----------------------------------------------

@dataclass
class Pretrained:
    """One variant after extended pre-training: ``model`` is a plain timm ViT (LoRA merged, qkv fused)."""
    variant: str
    seed: int
    model: nn.Module
    record: dict
    history: list[dict] = field(default_factory=list)


def pretrain_variant(cfg: ExploraConfig, variant: str, seed: int, base: tuple[nn.Module, dict] | None = None,
                     fabric=None, decoder_state: dict | None = None, progress: bool = False,
                     label: str | None = None, ckpt=None) -> Pretrained:
    """Extended pre-training of ``variant`` on a copy of the base model (``base`` = (model, info); loaded when not
    given; never modified), then merge. ``frozen`` returns the base model itself, untrained. The record holds the
    trainable backbone parameters (and the objective's own: heads, mask token, decoder), steps, images seen, wall
    time, seconds per step, peak memory and its increment over the level before the run, and the final losses.
    With the same :func:`pretrain_key` as an earlier finished run, the stored result is loaded instead of training
    (record: the measured cost of that run, ``cached: True``, ``cache_key``); ``ckpt`` then goes unused."""
    from vitadapt.train import fabric_from_config, fit, reset_peak_memory, seed_everything
    base_model, _ = base or load_base(cfg, verbose=False)
    label, total = label or variant, count_total(base_model)
    rec = {"variant": label, "seed": seed, "objective": cfg.objective, "backbone_params": total}
    if variant == "frozen":
        rec.update(dict.fromkeys(COSTS), trainable_backbone=0, trainable_fraction=0.0, trainable_objective=0, steps=0,
                   images_seen=0, wall_time_s=0.0)
        return Pretrained(label, seed, base_model, rec, [])
    pool = pretrain_pool(cfg, seed)
    store = products.ProductCache("pretrained", pretrain_key(cfg, variant, seed, base_model, decoder_state, pool)
                                  if products.enabled("pretrained") else {})
    if (hit := _cached(store, base_model, rec)) is not None:
        return hit
    fabric = fabric or fabric_from_config(cfg)
    seed_everything(seed)
    student = apply_variant(cfg, copy.deepcopy(base_model), variant)
    n_bb = count_trainable(student)
    objective, loss_fn, on_step = build_objective(cfg, student, seed, decoder_state)
    n_obj = count_trainable(objective) - n_bb          # heads, mask token, decoder (before merging frees everything)
    # reseed (the initialisations above draw differently per variant): every variant sees the same images and crops
    seed_everything(seed)
    loader = continued.loader(cfg, pool, cfg.img_size, seed, cfg.num_workers, cfg.pin_memory, cfg.persistent_workers)
    level = reset_peak_memory(fabric.device)
    res = fit(fabric, objective, loss_fn, loader, steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, on_step=on_step,
              progress=progress, ckpt_path=ckpt, ckpt_every_s=checkpoint_every_s() if ckpt else None,
              config={"variant": label, "seed": seed}, **continued.fit_hooks(cfg, objective))
    kept = continued.kept_backbone(objective, cfg)
    rec.update(trainable_backbone=n_bb, trainable_fraction=n_bb / total, trainable_objective=n_obj,
               **res.cost(cfg.pretrain_batch_size, level), **res.final(LOSSES[:1], LOSSES[1:]))
    del objective
    history = res.curves(("step", *LOSSES, "lr"), variant=label, seed=seed)
    if store.on:
        rec.update(cached=False, cache_key=store.digest)
        store.save({"state": {k: v.detach().cpu() for k, v in kept.state_dict().items()}, "record": rec,
                    "history": history})
    return Pretrained(label, seed, kept, rec, history)


#: the trainable-set fields of the config that enter a pre-training's key (with every PretrainSettings field)
TRAINABLE_SET = ("unfreeze", "rank", "lora_alpha", "targets", "train_norms")
#: library sources a pre-trained backbone depends on (relative to lib/vitadapt)
PRETRAIN_SOURCES = (*products.COMMON_SOURCES, "experiments/explora.py")


def pretrain_key(cfg: ExploraConfig, variant: str, seed: int, base_model: nn.Module, decoder_state: dict | None = None,
                 pool: tuple | None = None) -> dict:
    """Everything that determines :func:`pretrain_variant`'s result: every field of
    :class:`~vitadapt.ssl.continued.PretrainSettings`, the trainable set (:data:`TRAINABLE_SET`), the variant (not
    its label), the seed, the pre-training data (name, ``n_pretrain_images`` and a digest of the drawn images'
    identities, ``pool``: :func:`pretrain_pool`), the base weights' fingerprint, the MAE decoder (the warmed state's
    digest; the checkpoint file's), the numerics (:data:`vitadapt.protocol.products.NUMERICS`), library versions
    and a digest of :data:`PRETRAIN_SOURCES`. Evaluation fields (probes, fine-tune, protocol, labelled-set sizes,
    variants and ablation lists) do not enter."""
    return {"product": "explora pre-training", "variant": variant,
            **_pretraining_key(cfg, seed, base_model, pool or pretrain_pool(cfg, seed)),
            "trainable_set": products.settings(cfg, TRAINABLE_SET), "decoder_state": products.state_digest(decoder_state),
            "decoder_file": products.file_digest(resolve(cfg.mae_decoder)) if cfg.mae_decoder else None}


def _cached(store: products.ProductCache, base_model: nn.Module, rec: dict) -> Pretrained | None:
    """The stored pre-training of ``store``'s key as a :class:`Pretrained` named as ``rec`` (label, seed), or None.
    The record keeps the measured cost of the run that trained it, with ``cached: True``."""
    import warnings
    if (hit := store.load()) is None:
        return None
    model = copy.deepcopy(base_model)
    try:
        model.load_state_dict(hit["state"], strict=True)
    except (RuntimeError, KeyError) as e:
        warnings.warn(f"ignoring the pre-training cache {store.path} ({str(e)[:120]}); training again", stacklevel=3)
        return None
    history = [{**h, "variant": rec["variant"], "seed": rec["seed"]} for h in hit["history"]]
    return Pretrained(rec["variant"], rec["seed"], model.requires_grad_(True).cpu().eval(),
                      {**hit["record"], **rec, "cached": True, "cache_key": store.digest}, history)


def evaluate_variant(cfg: ExploraConfig, model: nn.Module, info: dict, seed: int, splits: Splits | None = None,
                     fabric=None, finetune: bool | None = None, ft_splits: Splits | None = None) -> list[dict]:
    """The frozen-feature probes and, when ``finetune`` (default: ``cfg.finetune``), the LoRA fine-tune of a variant,
    under ``cfg.protocol`` (:func:`vitadapt.protocol.lora_eval.evaluate_backbone`). Rows: seed, eval, test_acc,
    val_acc, selected."""
    return lora_eval.evaluate_backbone(cfg, model, info, seed, splits or setup.labelled(cfg, seed), fabric,
                                       cfg.finetune if finetune is None else finetune, ft_splits)


# ---- whole experiments: jobs (label, variant, config overrides) x seeds through the job store ----------------

#: evals: a row per (variant, seed, eval); runs: per (variant, seed), the pre-training's cost; history: its losses
ExploraResults = grid.Results


def _run_grid(cfg: ExploraConfig, jobs: list[tuple[str, str, dict]], run=None, progress: bool = False,
              log: Callable[[str], None] | None = print) -> ExploraResults:
    """Every job pre-trained and evaluated on every seed; a seed's data (labelled splits, fine-tune tensors, MAE
    decoder warm-up) is built once, when a job of that seed really runs (not when every job comes from the store)."""
    from vitadapt.train import Diverged, fabric_from_config, job
    base = load_base(cfg)
    if run is not None:
        pre = setup.dataset(cfg, cfg.pretrain_dataset or cfg.dataset)
        setup.record_sources(run, base[1], {"labelled data": setup.dataset(cfg), "pre-training data": {
            **pre.record(), "split": "train", "labels": "dropped (never read)",
            "n_pretrain_images": cfg.n_pretrain_images or len(pre.train)},
            "starting point": {"description": starting_point(cfg, base[1])}})
    fabric, byl, cache = fabric_from_config(cfg), {label: (v, over) for label, v, over in jobs}, {}

    def seed_data(seed: int) -> dict:
        if seed not in cache:
            cache.clear()
            splits = setup.labelled(cfg, seed)
            cache[seed] = dict(splits=splits, ft=lora_eval.decoded_splits(cfg, splits) if cfg.finetune else None,
                               dec=warm_decoder(cfg, base[0], seed, fabric))
        return cache[seed]

    def work(j: dict, ckpt) -> dict:
        """Extended pre-training (resumed from ``ckpt``), then evaluation; a diverged pre-training gives rows
        marked diverged for every evaluation."""
        label, seed = j["variant"], j["seed"]
        variant, over = byl[label]
        vcfg = dataclasses.replace(cfg, **over) if over else cfg
        tag = lambda rows: [{"variant": label, **r, "chance": setup.chance(data["splits"])} for r in rows]  # noqa: E731
        with job(variant=label, seed=seed):
            data, t0 = seed_data(seed), time.perf_counter()
            try:
                pre = pretrain_variant(vcfg, variant, seed, base, fabric, data["dec"], progress, label, ckpt=ckpt)
            except Diverged as e:
                return {"evals": tag([diverged_row(seed, ev, e) for ev in lora_eval.eval_names(vcfg)]),
                        "log": f"seed {seed} | {label:<22} | {e}",
                        "runs": {"variant": label, "seed": seed, "objective": vcfg.objective, "diverged": e.short}}
            t1 = time.perf_counter()
            rows = evaluate_variant(vcfg, pre.model, base[1], seed, data["splits"], fabric, cfg.finetune, data["ft"])
            t2 = time.perf_counter()
        accs = ", ".join(f"{r['eval']} " + ("DIVERGED" if r.get("diverged") else f"{r['test_acc']:.3f}") for r in rows)
        took = f"cached ({pre.record['wall_time_s']:.1f} s when trained)" if pre.record.get("cached") else \
            f"{t1 - t0:5.1f} s"
        return {"evals": tag(rows), "runs": {**pre.record, "eval_wall_time_s": t2 - t1}, "history": pre.history,
                "log": f"seed {seed} | {label:<22} | trainable {pre.record['trainable_backbone']:>11,} | "
                       f"pre-train {took} | eval {t2 - t1:5.1f} s | {accs}"}
    gc.collect()
    gc.freeze()      # what exists now lives on: later collections (before each memory measurement) skip it
    try:
        outs = grid.run_jobs(run, [{"variant": label, "seed": s} for s in cfg.seeds for label in byl], work, log)
    finally:
        gc.unfreeze()
    return grid.Results.of(outs)


def run_comparison(cfg: ExploraConfig, run=None, progress: bool = False,
                   log: Callable[[str], None] | None = print) -> ExploraResults:
    """Notebooks 10 and 11: every variant of ``cfg.variants`` on every seed (same data, steps, learning rate)."""
    return _run_grid(cfg, [(v, v, {}) for v in cfg.variants], run, progress, log)


def ablation_variants(cfg: ExploraConfig) -> list[tuple[str, str, dict]]:
    """One factor at a time around the configured ExPLoRA default: [(label, variant, overrides)], the frozen source
    model first."""
    default = (f"default U={unfreeze_label(cfg.unfreeze)} r={cfg.rank} {targets_label(cfg.targets)} "
               f"norms={'on' if cfg.train_norms else 'off'}")
    canon = {"unfreeze": unfreeze_label, "targets": targets_label}
    axes = [("unfreeze", cfg.ablate_unfreeze, lambda v: f"U={unfreeze_label(v)}"),
            ("rank", cfg.ablate_rank, lambda v: f"r={v}"),
            ("targets", cfg.ablate_targets, lambda v: f"LoRA on {targets_label(v)}"
             + (" (MLP r/4)" if "mlp" in targets_label(v) else "")),
            ("train_norms", cfg.ablate_norms, lambda v: f"norms {'trained' if v else 'frozen'}"),
            ("koleo_weight", cfg.ablate_koleo_weight, lambda v: "without KoLeo" if v == 0 else f"KoLeo weight {v:g}")]
    return [("frozen (source)", "frozen", {}), (default, "explora", {})] + [
        (label, "explora", over) for label, over in grid.one_factor(cfg, axes, lambda f, v: canon.get(f, str)(v))]


def run_ablations(cfg: ExploraConfig, run=None, progress: bool = False,
                  log: Callable[[str], None] | None = print) -> ExploraResults:
    """Notebook 12: every variant of :func:`ablation_variants` on every seed."""
    return _run_grid(cfg, ablation_variants(cfg), run, progress, log)


def run_single(cfg: ExploraConfig, seed: int | None = None, base: tuple[nn.Module, dict] | None = None,
               **overrides) -> pd.DataFrame:
    """One ExPLoRA configuration on one seed (the widget panel's action): test accuracy per evaluation with the
    trainable count and the pre-training wall time; the run record in ``df.attrs["run"]``. ``overrides`` are
    config fields (unfreeze, rank, targets, train_norms, pretrain_steps, pretrain_lr, ...)."""
    vcfg = dataclasses.replace(cfg, **overrides) if overrides else cfg   # validated again
    seed = vcfg.seeds[0] if seed is None else int(seed)
    base = base or load_base(vcfg, verbose=False)
    pre = pretrain_variant(vcfg, "explora", seed, base)
    df = pd.DataFrame(evaluate_variant(vcfg, pre.model, base[1], seed))[["eval", "test_acc", "val_acc", "selected"]]
    df = df.set_index("eval").assign(trainable=pre.record["trainable_backbone"],
                                     pretrain_s=round(pre.record["wall_time_s"], 1))
    df.attrs["run"] = pre.record
    return df


def panel_fields(cfg: ExploraConfig) -> dict:
    """The knobs of the ablation panel: {name: (default, options or None)}; see :func:`vitadapt.widgets.ablation_panel`."""
    unf = list(dict.fromkeys([cfg.unfreeze, "none", "L", "1,L", "1,L-1,L", *cfg.ablate_unfreeze]))
    tg = list(dict.fromkeys([cfg.targets, "q,v", "q,k,v", "q,k,v,proj", "q,k,v,proj,mlp", *cfg.ablate_targets]))
    return {"unfreeze": (cfg.unfreeze, unf), "rank": (cfg.rank, sorted({1, 2, 4, 8, 16, 32, 64, cfg.rank, *cfg.ablate_rank})),
            "targets": (cfg.targets, tg), "train_norms": (cfg.train_norms, None),
            "pretrain_steps": (cfg.pretrain_steps, None), "pretrain_lr": (float(cfg.pretrain_lr), None),
            "seed": (cfg.seeds[0], list(cfg.seeds))}


# ---- counts on the meta device (no weights, no memory): the published setting and the plan ----------------------

def plan_table(cfg: ExploraConfig, jobs: list[tuple[str, str, dict]] | None = None) -> pd.DataFrame:
    """Trainable parameters of every job (as :func:`ablation_variants`; default: ``cfg.variants``) on the configured
    architecture, and the objective's own (the same for every variant), built on the meta device."""
    m = meta_vit(cfg.arch, cfg.img_size, **cfg.arch_kwargs)
    total, extra, rows = count_total(m), continued.objective_trainable(cfg, m), []
    for label, variant, over in jobs or [(v, v, {}) for v in cfg.variants]:
        vcfg = dataclasses.replace(cfg, **over) if over else cfg
        n = counts.trainable(cfg.arch, lambda m: apply_variant(vcfg, m, variant), cfg.img_size, cfg.arch_kwargs)[0]
        rows.append({"variant": label, "what trains": ", ".join(f"{k}={v}" for k, v in over.items()) if over else
                     VARIANTS[variant], "trainable backbone": n, "fraction of backbone": round(n / total, 5),
                     "objective (heads/decoder)": 0 if variant == "frozen" else extra, "backbone params": total})
    return pd.DataFrame(rows).set_index("variant")


# ---- tables, summary and result rows -------------------------------------------------------------------------------

COSTS = {"trainable_backbone": 0, "trainable_fraction": 5, "trainable_objective": 0, "steps": 0, "images_seen": 0,
         "wall_time_s": 1, "s_per_step": 2, "peak_memory_mb": 0, "memory_increment_mb": 0, "final_loss": 4}


def accuracy_table(evals: pd.DataFrame, by: str = "variant") -> pd.DataFrame:
    """Test accuracy ``mean ± std`` over seeds: rows ``by``, one column per evaluation; plus seeds and chance."""
    out = tables.mean_std(evals, by, "eval").reindex(tables.order(evals, by))[tables.order(evals, "eval")]
    out.columns.name = None
    return out.assign(seeds=evals.groupby(by, sort=False)["seed"].nunique(), chance=round(float(evals["chance"].iloc[0]), 3))


def cost_table(runs: pd.DataFrame, by: str = "variant") -> pd.DataFrame:
    """Cost of the extended pre-training per ``by``, means over seeds: trainable parameters (backbone; objective's
    heads or decoder), fraction of the backbone, steps, images, wall time, seconds per step, peak memory and its
    increment over the level before the run, final loss; runs loaded from the product cache keep the cost measured
    when they were trained, and their number per ``by`` is a last column when there are some."""
    return products.with_loaded(tables.means(runs, by, list(COSTS), ints=(
        "trainable_backbone", "trainable_objective", "steps", "images_seen"), digits=COSTS), runs, by)


#: the published direction of ExPLoRA's effect over its frozen source (REFERENCE.md section 1), by evaluation
PAPER_DIRECTION = {"linear probe": "+8.5 points on fMoW-RGB with ViT-L (DinoV2 69.00 -> ExPLoRA 77.48)"}


def loss_notes(cfg: ExploraConfig) -> dict[str, dict[str, str]]:
    """What each trend of each pre-training loss means ({loss: {"falls"|"rises"|"flat": sentence}}), for
    :func:`vitadapt.protocol.effects.trend_text`."""
    if cfg.objective == "mae":
        return {"mse": {"falls": "The reconstruction error fell: the encoder and decoder learned to fill in the target's "
                                 "patches.",
                        "flat": "The reconstruction error stayed flat: the encoder learned little from it at this budget."}}
    log_k = math.log(cfg.n_prototypes)
    return {"koleo": {"falls": "KoLeo fell: the CLS features of a batch spread apart, which a kNN classifier sees at once.",
                      "rises": "KoLeo rose: the CLS features of a batch drew together (with koleo_weight 0 it is logged, "
                               "not trained)."},
            "dino": {"falls": "DINO fell: the heads' prototypes began to sort the images.",
                     "flat": f"DINO stayed near log({cfg.n_prototypes}) = {log_k:.2f}: the fresh heads still predict "
                             f"almost uniformly, so DINO is not what changes the backbone at this budget."},
            "ibot": {"falls": "iBOT fell: the patch heads began to sort the patches."}}


def findings(cfg: ExploraConfig, res: ExploraResults, reference: str | None = None) -> tuple[str, pd.DataFrame]:
    """``(markdown, effects table)``: every variant against ``reference`` (default: the frozen source) paired per seed,
    whether each effect points the paper's way (ExPLoRA's own row), and how each trained variant's losses moved
    (:func:`vitadapt.protocol.effects.findings`)."""
    labels = list(dict.fromkeys(res.evals["variant"]))
    reference = reference or next((v for v in labels if v.startswith("frozen")), labels[0])
    ours = [v for v in labels if v == "explora" or v.startswith("default")]
    trained = [v for v in labels if not v.startswith("frozen")]
    losses = ("mse",) if cfg.objective == "mae" else ("dino", "ibot", "koleo")
    frozen = reference.startswith("frozen")
    return effects.findings(res.evals, "variant", reference, rows=None if frozen else trained,
                            paper=PAPER_DIRECTION if frozen else None, paper_rows=ours,
                            history=res.history if frozen and len(res.history) else None, losses=losses,
                            notes=loss_notes(cfg), trend_rows=trained)


def summary(res: ExploraResults, by: str = "variant") -> dict:
    """metrics.json content: mean/std/n of test accuracy per (by, eval) and the mean cost per ``by``."""
    cost = cost_table(res.runs, by).drop(columns=products.LOADED, errors="ignore") if len(res.runs) else pd.DataFrame()
    return {"test_acc": report.summary(res.evals, [by, "eval"]),
            "cost": {str(k): {c: None if pd.isna(v) else float(v) for c, v in row.items()} for k, row in cost.iterrows()}}


def result_rows(res: ExploraResults, table: str) -> list[dict]:
    """Rows of the shared results schema, one per (variant, eval), in table ``"<table>: <eval>"`` (``"ExPLoRA"``,
    ``"ExPLoRA (MAE)"``, ``"ExPLoRA ablations"``), with the pre-training's trainable backbone parameters and its wall
    time (mean over seeds)."""
    costs = report.row_costs(res.runs, "variant", "trainable_backbone")
    return report.result_rows(res.evals, lambda v, ev: f"{table}: {ev}", ["variant", "eval"], method=lambda v, ev: v,
                              extra=lambda d: costs.get(str(d["variant"].iloc[0]), {}))
