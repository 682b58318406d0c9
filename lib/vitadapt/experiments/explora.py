"""10_explora_dinov2, 11_explora_mae, 12_explora_ablations: ExPLoRA's extended pre-training, then evaluation.

Protocol for every (variant, seed) (REFERENCE.md section 1):

1. a copy of the source backbone gets the variant's trainable set (:func:`apply_variant`);
2. it continues the *source* self-supervised objective (DinoV2: DINO + iBOT + KoLeo with an EMA teacher; MAE:
   masked reconstruction) on **unlabelled** target images (:class:`Unlabelled` drops each label unread) for
   ``pretrain_steps`` steps of ``pretrain_batch_size`` images (:func:`pretrain_variant`);
3. the LoRA updates are merged and qkv fused back: a plain timm ViT (:func:`vitadapt.peft.explora.merge_explora`);
4. it is evaluated on the labelled target (:func:`evaluate_variant`): a linear probe (C chosen on val) and kNN (k
   chosen on val) on frozen features (:func:`vitadapt.experiments.common.frozen_eval`), and a LoRA-r8 fine-tune
   (:func:`lora_finetune`, through :mod:`vitadapt.finetune`: learning rate and weight decay chosen on val when a grid
   is given, test scored once).

Variants (:data:`VARIANTS`): the frozen source model; ExPLoRA (unfrozen blocks U + LoRA on the other blocks + every
LayerNorm + the CLS token); LoRA only (no unfrozen block); unfrozen block only (no LoRA); full-parameter continued
pre-training. Every pre-training variant sees the same images in the same order with the same objective, steps and
learning rate (a controlled comparison, not a per-variant tuned one). Each run records its trainable parameters,
wall time and peak memory (on CPU: the process's resident-set high-water mark, reset before each run).

The ablations (notebook 12) change one knob at a time around the configured ExPLoRA default: unfrozen blocks
(``none``, ``L``, ``1,L``, ``1,L-1,L``), LoRA rank, LoRA targets (``q,v``, ``q,k,v``, ``+proj``, ``+mlp``) and
whether the LayerNorms train.

Named choices where the public record is silent (:data:`CHOICES`, rendered by the notebooks) carry a config switch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vitadapt.config import ExperimentConfig, _dataset_names, opt
from vitadapt.data import DATASETS, DataMissingError, Splits, get_dataset
from vitadapt.experiments.common import brief, chance, frozen_eval, load_splits, summarize
from vitadapt.jobs import checkpoint_every_s, diverged_row, mark_diverged, mean_std_text
from vitadapt.models import count_params, create_backbone
from vitadapt.paths import resolve
from vitadapt.peft.common import count_trainable, freeze
from vitadapt.peft.explora import apply_explora, merge_explora, normalize_block_indices
from vitadapt.peft.lora import LORA_TARGETS, apply_lora, has_lora

__all__ = ["VARIANTS", "CHOICES", "PAPER_COUNTS", "PAPER_RESULTS", "ExploraConfig", "parse_unfreeze",
           "unfreeze_label", "parse_targets", "starting_point", "delta_table", "targets_label", "variant_settings", "apply_variant", "load_base",
           "pretrain_pool", "Unlabelled", "pretrain_transform", "build_objective", "warm_decoder", "Pretrained",
           "pretrain_variant", "probe_head", "lora_finetune", "evaluate_variant", "ExploraResults", "run_comparison",
           "ablation_variants", "run_ablations", "run_single", "paper_counts", "plan_table", "accuracy_table",
           "cost_table", "paper_table", "choices_table", "plot_accuracy", "plot_losses", "summary", "dry_run_reason",
           "panel_fields", "set_drop_path", "reset_peak_memory"]

#: variant name -> what trains during the extended pre-training
VARIANTS: dict[str, str] = {
    "frozen": "the source model as it is: no extended pre-training",
    "explora": "ExPLoRA: the unfrozen blocks U in full + LoRA on the targets of every other block + every LayerNorm + CLS",
    "lora_only": "LoRA on the targets of every block + every LayerNorm + CLS; no unfrozen block",
    "block_only": "the unfrozen blocks U in full + every LayerNorm + CLS; no LoRA",
    "full": "every backbone parameter (full-parameter continued pre-training)",
}
EVALS = ("linear probe", "kNN", "LoRA-r8 fine-tune")


def _eval_order(names) -> list[str]:
    """Evaluations in a fixed order: linear probe, kNN, then the fine-tune(s)."""
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda e: (EVALS.index(e) if e in EVALS else len(EVALS), e))
#: short target-set names of the ablation ("mlp" stands for fc1 and fc2)
TARGET_ALIASES = {"mlp": ("fc1", "fc2")}
#: the published counts (REFERENCE.md section 1), asserted by :func:`paper_counts`
PAPER_COUNTS = {"explora_vitl14_L_r64_qv": 18_724_864, "finetune_lora_r8_qv_vitl14": 786_432}
#: published fMoW-RGB top-1 (ViT-L), REFERENCE.md section 1: (what, number)
PAPER_RESULTS = {
    "linear probe": [("DinoV2 ViT-L/14 (frozen source)", 69.00), ("ExPLoRA D-[L]-r64 ViT-L", 77.48),
                     ("[L] unfrozen, no LoRA", 74.83), ("[1,L-1,L] + r64", 78.04),
                     ("full pre-training from scratch", 54.29), ("SatMAE", 65.94), ("ScaleMAE", 67.30)],
    "LoRA-r8 fine-tune": [("DinoV2 ViT-L/14 + LoRA-r8", 78.08), ("ExPLoRA D-[L]-r64 + LoRA-r8", 79.28),
                          ("ScaleMAE (full fine-tune, 303M)", 77.80), ("SatMAE (full fine-tune, 303M)", 77.78)],
}

#: every place the public record is silent, with our choice and its switch
CHOICES: list[tuple[str, str, str, str]] = [
    ("LoRA-only / block-only variants", "named in the paper's ablations; their exact trainable sets are not spelt out",
     "both keep ExPLoRA's LayerNorms and CLS token; LoRA-only puts LoRA on every block, block-only drops LoRA",
     "variants; train_norms"),
    ("weights kept after DinoV2 pre-training", "official evaluation loads the EMA teacher",
     "the teacher (paper profile); the cpu/smoke profiles keep the student, because after a few steps the EMA "
     "teacher (momentum 0.992 -> 1) has moved only a few percent of the way from the source model to the student",
     "eval_weights: teacher | student"),
    ("optimiser", "AdamW; DinoV2: base LR 1e-3 at batch 1024, weight decay 0.04, clip 3.0; MAE: betas (0.9, 0.95), "
     "weight decay 0, LR 1.8e-3",
     "AdamW with linear warm-up then cosine to 0; constant weight decay (no 0.04 -> 0.4 schedule, no layer-wise "
     "decay, no patch-embed LR multiplier); the same LR for every variant",
     "pretrain_lr, pretrain_weight_decay, pretrain_beta2, pretrain_warmup, grad_clip"),
    ("prototype layer freezing", "DINOv2 freezes it for the first epoch", "not done (the shared loop has no hook)",
     "-"),
    ("MAE decoder offline", "ExPLoRA keeps the pre-trained MAE decoder and puts LoRA r8 on it",
     "with a checkpoint (mae_decoder): loaded, LoRA rank decoder_lora_rank; without one (offline): a freshly "
     "initialised decoder, first trained alone for decoder_warmup_steps on the target images with the encoder "
     "frozen, then trained in full alongside the variant's trainable set",
     "mae_decoder, decoder_lora_rank, decoder_warmup_steps"),
    ("fine-tune LoRA", "LoRA r8 on Q,V of every block + head; 120 epochs, LR 5e-4, batch 128, label smoothing 0.1, "
     "drop-path 0.2; alpha and weight decay not stated",
     "alpha = rank (scale 1), weight decay from ft_weight_decays; a single grid point trains on train and is "
     "tested once (nothing to select); a grid is chosen on val, retrained on train + val, tested once",
     "ft_rank, ft_lrs, ft_weight_decays, ft_steps / ft_epochs, ft_augment"),
    ("fine-tune head", "a new classification head (random init)",
     "paper profile: a fresh head; cpu/smoke: the head starts from a logistic-regression probe on the model's own CLS "
     "features (C chosen on val; LP-FT, Kumar et al. 2022), because a few steps cannot train a fresh 30-way head (8 "
     "steps from a fresh head reached 7 % on AID, chance 3 %)", "ft_head_init: fresh | probe"),
    ("evaluation", "DinoV2 linear-probe harness selects on test", "C and k chosen on validation, test scored once",
     "feature, probe_Cs, knn_ks"),
]


# ---------------------------------------------------------------------------------------------------
# Specs: unfrozen blocks and LoRA targets as short strings (flat papermill scalars)
# ---------------------------------------------------------------------------------------------------

def parse_unfreeze(spec, depth: int) -> tuple[int, ...]:
    """Block indices (0-based, sorted) of an unfrozen-block spec in the paper's 1-based notation: ``"none"``,
    ``"L"`` (last block), ``"1,L"``, ``"1,L-1,L"``, ``"L-2"``, or plain numbers ``"1,12"``; an int or a list of
    ints (0-based, negative from the end, as :func:`~vitadapt.peft.explora.apply_explora`) is also accepted."""
    if isinstance(spec, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        return normalize_block_indices(tuple(spec), depth)
    if isinstance(spec, int) and not isinstance(spec, bool):
        return normalize_block_indices((spec,), depth)
    if not isinstance(spec, str):
        raise ValueError(f"unfreeze spec {spec!r} must be a string such as 'none', 'L', '1,L', '1,L-1,L'")
    s = spec.replace(" ", "").replace("[", "").replace("]", "")
    if s.lower() in ("", "none", "-"):
        return ()
    out = []
    for tok in s.split(","):
        t = tok.upper()
        try:
            i = depth if t == "L" else depth - int(t[2:]) if t.startswith("L-") else int(t)
        except ValueError:
            raise ValueError(f"unfreeze spec {spec!r}: cannot read {tok!r}; valid: 'none', or comma-separated 1-based "
                             f"block numbers and L / L-k, e.g. 'L', '1,L', '1,L-1,L'") from None
        if not 1 <= i <= depth:
            raise ValueError(f"unfreeze spec {spec!r}: block {tok!r} = {i} is outside 1..{depth} for a {depth}-block model")
        out.append(i - 1)
    return tuple(sorted(set(out)))


def unfreeze_label(spec, depth: int | None = None) -> str:
    """The paper's notation of a spec: ``[L]``, ``[1,L]``, ``none``."""
    if isinstance(spec, str):
        s = spec.replace(" ", "").replace("[", "").replace("]", "")
        return "none" if s.lower() in ("", "none", "-") else f"[{s}]"
    idx = parse_unfreeze(spec, depth or 0) if depth else tuple(spec)
    return "[" + ",".join(str(i + 1) for i in idx) + "]" if idx else "none"


def parse_targets(spec) -> tuple[str, ...]:
    """LoRA targets of a spec ``"q,v"``, ``"q,k,v"``, ``"q,k,v,proj"``, ``"q,k,v,proj,mlp"`` (``mlp`` = fc1 + fc2),
    ``"none"`` (no LoRA), or a list of names among ``q, k, v, proj, fc1, fc2``."""
    if isinstance(spec, str):
        s = spec.replace(" ", "").replace("+", ",")
        toks = [] if s.lower() in ("", "none", "-") else s.split(",")
    elif isinstance(spec, (list, tuple)):
        toks = list(spec)
    else:
        raise ValueError(f"targets spec {spec!r} must be a string such as 'q,v' or a list of names")
    out = []
    for t in toks:
        for name in TARGET_ALIASES.get(t, (t,)):
            if name not in LORA_TARGETS:
                raise ValueError(f"targets spec {spec!r}: unknown target {t!r}; valid: "
                                 f"{', '.join([*LORA_TARGETS, *TARGET_ALIASES])} or 'none'")
            if name not in out:
                out.append(name)
    return tuple(out)


def targets_label(spec) -> str:
    t = parse_targets(spec)
    if not t:
        return "none"
    s = ",".join(t)
    return s.replace("fc1,fc2", "mlp")


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------

@dataclass
class ExploraConfig(ExperimentConfig):
    """ExPLoRA's extended pre-training and its comparisons (notebooks 10, 11) and ablations (notebook 12)."""

    objective: Literal["dinov2", "mae"] = opt("dinov2", "Self-supervised objective of the extended pre-training: the source model's own (dinov2 for DinoV2 weights, mae for MAE weights).")
    variants: tuple = opt(tuple(VARIANTS), "Variants compared (10, 11): frozen, explora, lora_only, block_only, full.")
    pretrain_dataset: str = opt("", "Unlabelled pre-training images: '' = the training split of `dataset` with its labels dropped; or a dataset name (e.g. sentinel2_tiles).")
    n_pretrain_images: int = opt(0, "Images drawn (per seed, uniformly, labels unread) from the pre-training pool; 0 = the whole pool.", min=0)
    pretrain_steps: int = opt(10, "Extended pre-training steps per (variant, seed).", min=1)
    pretrain_batch_size: int = opt(8, "Images per pre-training step (DinoV2: each gives 2 global + n_local_crops local crops).", min=2, max=65536)
    pretrain_lr: float = opt(1e-3, "Peak AdamW learning rate of the extended pre-training (the same for every variant).", min=0.0, max=10.0)
    pretrain_weight_decay: float = opt(0.04, "AdamW weight decay of matrices (DinoV2: 0.04; MAE: 0).", min=0.0, max=1.0)
    pretrain_beta2: float = opt(0.0, "AdamW beta2; 0 = the objective's (DinoV2 0.999, MAE 0.95).", min=0.0, max=0.99999)
    pretrain_warmup: int = opt(1, "Linear warm-up steps, then cosine decay to 0.", min=0)
    grad_clip: float = opt(3.0, "Gradient-norm clipping (DinoV2: 3.0); 0 = none.", min=0.0)
    # trainable set (ExPLoRA)
    unfreeze: str = opt("L", "Blocks trained in full, paper notation: 'none', 'L', '1,L', '1,L-1,L' (1-based, L = last).")
    rank: int = opt(64, "LoRA rank of the extended pre-training (paper: 64).", min=1, max=4096)
    lora_alpha: float = opt(1.0, "LoRA alpha; scaling alpha / rank (official code: alpha = 1).", min=1e-6)
    targets: str = opt("q,v", "LoRA targets in the other blocks: 'q,v' (paper), 'q,k,v', 'q,k,v,proj', 'q,k,v,proj,mlp' (MLP at rank / 4).")
    train_norms: bool = opt(True, "Train every LayerNorm weight and bias (ExPLoRA: yes).")
    # DinoV2 objective
    n_prototypes: int = opt(65536, "Prototypes of the DINO/iBOT head (paper 65,536).", min=2, max=1_000_000)
    head_hidden_dim: int = opt(2048, "Hidden width of the DINO/iBOT head MLP (paper 2048).", min=1)
    head_bottleneck_dim: int = opt(256, "Bottleneck width of the DINO/iBOT head (paper 256).", min=1)
    n_local_crops: int = opt(8, "Local crops per image (DinoV2: 8).", min=0, max=64)
    local_size: int = opt(98, "Local crop size in pixels (DinoV2: 96; 98 for patch 14 so the grid is whole).", min=8, max=1024)
    global_scale_min: float = opt(0.32, "Smallest area fraction of a global crop (DinoV2 0.32).", min=0.01, max=1.0)
    local_scale_max: float = opt(0.32, "Largest area fraction of a local crop (DinoV2: 0.05 to 0.32).", min=0.05, max=1.0)
    teacher_momentum: float = opt(0.992, "EMA momentum of the teacher at the start (cosine to 1).", min=0.0, max=1.0)
    teacher_temp_warmup_steps: int = opt(0, "Teacher temperature warm-up 0.04 -> 0.07 (steps).", min=0)
    centering: Literal["centering", "sinkhorn"] = opt("centering", "Teacher normalisation: centering (ExPLoRA default) or sinkhorn.")
    eval_weights: Literal["teacher", "student"] = opt("teacher", "DinoV2: which backbone is kept after pre-training (official evaluation: teacher).")
    # MAE objective
    mask_ratio: float = opt(0.75, "MAE: fraction of patches masked.", min=0.05, max=0.95)
    decoder_dim: int = opt(512, "MAE decoder width (paper 512).", min=8)
    decoder_depth: int = opt(8, "MAE decoder depth (paper 8).", min=1)
    decoder_heads: int = opt(16, "MAE decoder heads (paper 16).", min=1)
    mae_decoder: str = opt("", "MAE: a local official MAE checkpoint that includes the decoder (facebookresearch/mae); '' = none: a fresh decoder (see decoder_warmup_steps).")
    decoder_lora_rank: int = opt(8, "MAE: LoRA rank on the pre-trained decoder (paper 8); used only with mae_decoder.", min=0)
    decoder_warmup_steps: int = opt(0, "MAE without mae_decoder: steps training the fresh decoder alone (encoder frozen) before the variants; once per seed, shared by every variant.", min=0)
    decoder_warmup_lr: float = opt(0.0, "Learning rate of the decoder warm-up; 0 = pretrain_lr.", min=0.0, max=10.0)
    # evaluation
    probe_Cs: tuple = opt((0.01, 0.1, 1.0, 10.0), "Inverse regularisation strengths of the linear probe; chosen on val.", min=1e-6, max=1e6)
    knn_ks: tuple = opt((10, 20), "k values of the weighted kNN classifier; chosen on val.", min=1, max=1000)
    finetune: bool = opt(True, "Also run the LoRA-r8 fine-tune on the labelled target (10, 11).")
    ft_rank: int = opt(8, "LoRA rank of the fine-tune (paper 8).", min=1, max=4096)
    ft_targets: str = opt("q,v", "LoRA targets of the fine-tune (paper: q,v of every block).")
    ft_steps: int = opt(20, "Fine-tune steps (used when ft_epochs is 0).", min=1)
    ft_epochs: float = opt(0.0, "Fine-tune epochs (paper 120); 0 = use ft_steps.", min=0.0)
    ft_batch_size: int = opt(16, "Fine-tune batch size (paper 128).", min=1, max=65536)
    ft_lrs: tuple = opt((5e-4,), "Fine-tune learning rates; more than one grid point is chosen on val.", min=1e-8, max=10.0)
    ft_weight_decays: tuple = opt((0.05,), "Fine-tune weight decays (grid with ft_lrs).", min=0.0, max=10.0)
    ft_warmup: float = opt(0.1, "Fine-tune warm-up: a fraction of the steps (< 1) or a number of steps.", min=0.0)
    ft_label_smoothing: float = opt(0.1, "Fine-tune label smoothing (paper 0.1).", min=0.0, max=0.99)
    ft_drop_path: float = opt(0.2, "Fine-tune drop-path rate, rising linearly over the blocks (paper 0.2).", min=0.0, max=0.9)
    ft_augment: bool = opt(True, "Fine-tune with random resized crops and flips (off: images are decoded once).")
    ft_head_init: Literal["fresh", "probe"] = opt("fresh", "Head of the fine-tune: fresh (paper: random init) or probe (LP-FT: the logistic-regression probe on the model's CLS features, C chosen on val; for budgets far too short to train a fresh head).")
    # ablations (12)
    ablate_unfreeze: tuple = opt(("none", "1,L", "1,L-1,L"), "Unfrozen-block specs tried against the default (12).")
    ablate_rank: tuple = opt((8, 16), "LoRA ranks tried against the default (12).", min=1, max=4096)
    ablate_targets: tuple = opt(("q,k,v", "q,k,v,proj", "q,k,v,proj,mlp"), "LoRA target sets tried against the default (12).")
    ablate_norms: tuple = opt((False,), "train_norms values tried against the default (12).")
    interactive: bool = opt(False, "Show the ipywidgets panel that re-runs one configuration (needs a live kernel).")

    def check(self) -> None:
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ValueError(f"variants={list(self.variants)!r}: {bad or 'empty'} not valid; valid values: "
                             f"{', '.join(VARIANTS)}")
        if self.pretrain_dataset and self.pretrain_dataset not in DATASETS:
            raise ValueError(f"pretrain_dataset={self.pretrain_dataset!r} is not valid; valid values: '' (the training "
                             f"split of dataset, unlabelled) or {', '.join(_dataset_names())}")
        for name in ("unfreeze",):
            _check_unfreeze(name, getattr(self, name))
        for s in self.ablate_unfreeze:
            _check_unfreeze("ablate_unfreeze", s)
        for name in ("targets", "ft_targets"):
            _check_targets(name, getattr(self, name))
        if not parse_targets(self.ft_targets):
            raise ValueError(f"ft_targets={self.ft_targets!r} is empty; the fine-tune needs LoRA targets, e.g. 'q,v'")
        for s in self.ablate_targets:
            _check_targets("ablate_targets", s)
        for r in self.ablate_rank:
            if isinstance(r, bool) or not isinstance(r, int):
                raise ValueError(f"ablate_rank={list(self.ablate_rank)!r}: every rank must be an integer >= 1")
        for b in self.ablate_norms:
            if not isinstance(b, bool):
                raise ValueError(f"ablate_norms={list(self.ablate_norms)!r}: every value must be True or False")
        if self.objective == "dinov2" and self.local_size >= self.img_size and self.n_local_crops:
            raise ValueError(f"local_size={self.local_size} must be smaller than img_size={self.img_size} (local crops "
                             f"are the small views); lower local_size or set n_local_crops=0")
        if self.mae_decoder and not resolve(self.mae_decoder).is_file() and self.dry_run == "no":
            raise ValueError(f"mae_decoder={self.mae_decoder!r} is not a file; give the path of an official MAE "
                             f"checkpoint with its decoder, or '' for a fresh decoder")


def _check_unfreeze(name: str, spec) -> None:
    try:
        parse_unfreeze(spec, 10_000)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _check_targets(name: str, spec) -> None:
    try:
        parse_targets(spec)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


# ---------------------------------------------------------------------------------------------------
# Trainable sets
# ---------------------------------------------------------------------------------------------------

def variant_settings(cfg: ExploraConfig, variant: str) -> dict:
    """How ``variant`` sets the trainable set: ``{"kind": frozen|peft|full, "unfreeze": spec, "targets": spec,
    "rank", "train_norms"}`` (peft variants go through :func:`~vitadapt.peft.explora.apply_explora`)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not valid; valid values: {', '.join(VARIANTS)}")
    if variant in ("frozen", "full"):
        return {"kind": variant}
    unfreeze = {"explora": cfg.unfreeze, "lora_only": "none", "block_only": cfg.unfreeze}[variant]
    targets = "none" if variant == "block_only" else cfg.targets
    if variant == "block_only" and not parse_unfreeze(cfg.unfreeze, 10_000):
        raise ValueError("variant 'block_only' needs unfrozen blocks; unfreeze='none' leaves nothing but the norms")
    return {"kind": "peft", "unfreeze": unfreeze, "targets": targets, "rank": cfg.rank,
            "train_norms": cfg.train_norms}


def apply_variant(cfg: ExploraConfig, model: nn.Module, variant: str) -> nn.Module:
    """Set the trainable set of ``variant`` on ``model`` (a timm ViT), in place; returns it."""
    s = variant_settings(cfg, variant)
    if s["kind"] == "frozen":
        return freeze(model)
    if s["kind"] == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    depth = len(model.blocks)
    return apply_explora(model, unfreeze_blocks=parse_unfreeze(s["unfreeze"], depth), rank=s["rank"],
                         targets=parse_targets(s["targets"]), alpha=cfg.lora_alpha, train_norms=s["train_norms"],
                         train_cls=True)


# ---------------------------------------------------------------------------------------------------
# Backbone and data
# ---------------------------------------------------------------------------------------------------

def _arch_kwargs(cfg: ExploraConfig) -> dict:
    """DinoV2's local crops need a ViT that accepts other input sizes (it resamples its position embedding)."""
    return {**cfg.arch_kwargs, "dynamic_img_size": True} if cfg.objective == "dinov2" else dict(cfg.arch_kwargs)


def starting_point(cfg: ExploraConfig, info: dict | None = None) -> str:
    """One plain sentence on what the extended pre-training starts from (printed by the notebooks, kept in
    metrics.json), so an MAE run from DinoV2 weights is never mistaken for MAE-pretrained ExPLoRA."""
    used = (info or {}).get("weights_used", cfg.weights)
    if cfg.objective == "dinov2":
        return (f"DinoV2 continued pre-training from {used} ({cfg.arch}); DINO/iBOT heads freshly initialised "
                f"(DinoV2 checkpoints have none, as in the paper)")
    used = str(used)
    if used.startswith("mae_"):
        enc = f"the MAE encoder {used}"
    elif used == "random":
        enc = "a randomly initialised encoder (a smoke test of the code path, not of the method)"
    else:
        kind = "a DinoV2 encoder" if "dinov2" in used or used == "auto" else "an encoder"   # auto: DinoV2 ViT-S/14
        enc = (f"{used}, {kind} that is NOT an MAE encoder (no MAE weights are available offline): this is MAE "
               f"continued pre-training of {kind}, not ExPLoRA on MAE weights")
    if cfg.mae_decoder:
        dec = f"the pre-trained MAE decoder from {cfg.mae_decoder} with LoRA rank {cfg.decoder_lora_rank}"
    else:
        dec = (f"a freshly initialised decoder ({cfg.decoder_dim}-d, {cfg.decoder_depth} blocks) trained alone for "
               f"{cfg.decoder_warmup_steps} steps (encoder frozen), then in full with every variant")
    return f"MAE continued pre-training from {enc}; decoder: {dec}"


def load_base(cfg: ExploraConfig, weights: str | None = None, verbose: bool = True) -> tuple[nn.Module, dict]:
    """The source backbone ``(model, info)`` (DinoV2: created with ``dynamic_img_size=True``; same outputs at
    ``img_size``, so it shares the frozen-feature cache of the other notebooks)."""
    model, info = create_backbone(weights or cfg.weights, cfg.arch, cfg.img_size, _arch_kwargs(cfg), verbose=verbose)
    return model.eval(), info


def _get(cfg, name: str, download: bool = True) -> Splits:
    return get_dataset(name, root=cfg.data_root if name == cfg.dataset else "", size=max(cfg.img_size, 32), seed=0,
                       n_train_per_class=cfg.n_train_per_class, n_val_per_class=cfg.n_val_per_class,
                       n_test_per_class=cfg.n_test_per_class, download=download)


def pretrain_pool(cfg: ExploraConfig, seed: int) -> tuple[Dataset, list[int]]:
    """The unlabelled pre-training images as (dataset, indices): the training split of ``pretrain_dataset`` (default:
    of ``dataset``), ``n_pretrain_images`` of them drawn uniformly with ``seed`` (labels are not read, so the draw is
    not stratified)."""
    pool = _get(cfg, cfg.pretrain_dataset or cfg.dataset).train
    n = len(pool) if cfg.n_pretrain_images == 0 else min(cfg.n_pretrain_images, len(pool))
    rng = np.random.default_rng(20_000 + seed)
    return pool, sorted(rng.choice(len(pool), size=n, replace=False).tolist())


class Unlabelled(Dataset):
    """``transform(image)`` for the images ``indices`` of ``base``, **without labels**: ``base[i]`` yields
    ``(image, label)`` and the label is dropped unread (never converted, compared or collated)."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable):
        self.base, self.indices, self.transform = base, [int(i) for i in indices], transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.transform(self.base[self.indices[i]][0])


def pretrain_transform(cfg: ExploraConfig):
    """DinoV2: multi-crop (2 global crops at ``img_size``, ``n_local_crops`` at ``local_size``); MAE: random resized
    crop (scale 0.2-1) + horizontal flip (MAE's pre-training transform); both ImageNet-normalised."""
    if cfg.objective == "dinov2":
        from vitadapt.ssl.dinov2 import DinoV2Augment
        return DinoV2Augment(global_size=cfg.img_size, local_size=cfg.local_size, n_local=cfg.n_local_crops,
                             global_scale=(cfg.global_scale_min, 1.0), local_scale=(0.05, cfg.local_scale_max))
    from torchvision import transforms as T

    from vitadapt.eval import IMAGENET_MEAN, IMAGENET_STD
    return T.Compose([T.RandomResizedCrop(cfg.img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC,
                                          antialias=True),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _loader(cfg: ExploraConfig, seed: int, batch_size: int | None = None) -> DataLoader:
    ds, idx = pretrain_pool(cfg, seed)
    data = Unlabelled(ds, idx, pretrain_transform(cfg))
    bs = batch_size or cfg.pretrain_batch_size
    if len(data) < bs:
        raise ValueError(f"{len(data)} pre-training images but pretrain_batch_size={bs}; lower the batch size or "
                         f"raise n_pretrain_images")
    return DataLoader(data, batch_size=bs, shuffle=True, drop_last=True, num_workers=cfg.num_workers,
                      generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------------

def _beta2(cfg: ExploraConfig) -> float:
    return cfg.pretrain_beta2 or (0.999 if cfg.objective == "dinov2" else 0.95)


def _decoder_checkpoint(cfg: ExploraConfig) -> dict | None:
    if not cfg.mae_decoder:
        return None
    from vitadapt.ssl.mae import mae_decoder_state_dict
    path = resolve(cfg.mae_decoder)
    if not path.is_file():
        raise DataMissingError(f"mae_decoder={cfg.mae_decoder!r} not found ({path}); download an official MAE "
                               f"checkpoint with its decoder (facebookresearch/mae) or set mae_decoder=''")
    return mae_decoder_state_dict(torch.load(path, map_location="cpu", weights_only=False))


def build_objective(cfg: ExploraConfig, student: nn.Module, seed: int, decoder_state: dict | None = None):
    """The objective around ``student`` (its trainable set already chosen). Returns ``(objective, loss_fn,
    on_step)`` for :func:`vitadapt.train.fit`. MAE: ``decoder_state`` (decoder weights in the objective's names)
    overrides ``mae_decoder``; a warmed-up decoder trains in full, a checkpoint decoder gets LoRA."""
    if cfg.objective == "dinov2":
        from vitadapt.ssl.dinov2 import DinoV2Objective, dinov2_loss_fn
        obj = DinoV2Objective(student, total_steps=cfg.pretrain_steps, n_prototypes=cfg.n_prototypes,
                              hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim,
                              momentum=cfg.teacher_momentum, teacher_temp_warmup_steps=cfg.teacher_temp_warmup_steps,
                              centering=cfg.centering, seed=seed)
        loss_fn, on_step = dinov2_loss_fn(obj)
        return obj, loss_fn, on_step
    from vitadapt.ssl.mae import MAEObjective, mae_loss_fn
    ckpt = _decoder_checkpoint(cfg) if decoder_state is None else None
    obj = MAEObjective(student, mask_ratio=cfg.mask_ratio, decoder_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                       decoder_heads=cfg.decoder_heads, decoder_state_dict=decoder_state if decoder_state is not None
                       else ckpt, decoder_lora_rank=cfg.decoder_lora_rank if ckpt is not None else 0, seed=seed)
    return obj, mae_loss_fn(obj), None


def warm_decoder(cfg: ExploraConfig, base_model: nn.Module, seed: int, fabric=None) -> dict | None:
    """MAE without decoder weights: train a fresh decoder alone (encoder frozen) for ``decoder_warmup_steps`` on the
    unlabelled target images; returns its state (``decoder_embed.*``, ``decoder.*``, ``decoder_pred.*``), shared by
    every variant of this seed. ``None`` when there is nothing to warm (DinoV2, a checkpoint, or 0 steps)."""
    if cfg.objective != "mae" or cfg.mae_decoder or cfg.decoder_warmup_steps == 0:
        return None
    from vitadapt.train import fabric_from_config, fit, seed_everything
    seed_everything(seed)
    wcfg = dataclasses.replace(cfg, pretrain_steps=cfg.decoder_warmup_steps)
    obj, loss_fn, _ = build_objective(wcfg, freeze(copy.deepcopy(base_model)), seed)
    fit(fabric or fabric_from_config(cfg), obj, loss_fn, _loader(cfg, 30_000 + seed), steps=cfg.decoder_warmup_steps,
        lr=cfg.decoder_warmup_lr or cfg.pretrain_lr, weight_decay=cfg.pretrain_weight_decay, warmup=cfg.pretrain_warmup,
        betas=(0.9, _beta2(cfg)), grad_clip=cfg.grad_clip or None)
    return {k: v.detach().clone() for k, v in obj.state_dict().items()
            if k.startswith(("decoder_embed.", "decoder.", "decoder_pred."))}


# ---------------------------------------------------------------------------------------------------
# Memory on CPU: the resident-set high-water mark, reset before each run
# ---------------------------------------------------------------------------------------------------

def _status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device=None) -> float:
    """Reset the peak-memory counter before a run; returns the current level in MB. CUDA: allocated memory (``fit``
    resets the CUDA peak itself). CPU (Linux): free memory goes back to the OS (``malloc_trim``), then the process's
    resident-set high-water mark (``VmHWM``, which ``fit`` reads through ``getrusage``) is reset to the current
    resident set by writing 5 to ``/proc/self/clear_refs``; elsewhere nothing is reset (then the peak of a run is the
    process's peak so far)."""
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS") or 0.0


# ---------------------------------------------------------------------------------------------------
# Extended pre-training of one variant
# ---------------------------------------------------------------------------------------------------

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
    given; never modified), then merge. ``frozen`` returns the base model itself, untrained.

    The record holds the variant, the seed, the trainable backbone parameters (and the objective's own: heads, mask
    token, decoder), steps, images seen, wall time, seconds per step, peak memory and the increment over the level
    before the run, and the final losses; ``history`` the per-step logs."""
    from vitadapt.train import fabric_from_config, fit, seed_everything
    base_model, info = base or load_base(cfg, verbose=False)
    total = count_params(base_model)
    label = label or variant
    rec = {"variant": label, "seed": seed, "objective": cfg.objective, "backbone_params": total}
    if variant == "frozen":
        rec.update(trainable_backbone=0, trainable_fraction=0.0, trainable_objective=0, steps=0, images_seen=0,
                   wall_time_s=0.0, s_per_step=None, peak_memory_mb=None, memory_increment_mb=None, final_loss=None)
        return Pretrained(label, seed, base_model, rec, [])
    fabric = fabric or fabric_from_config(cfg)
    seed_everything(seed)
    student = apply_variant(cfg, copy.deepcopy(base_model), variant)
    n_bb = count_trainable(student)
    objective, loss_fn, on_step = build_objective(cfg, student, seed, decoder_state)
    n_obj = count_trainable(objective) - n_bb          # heads, mask token, decoder (before merging frees everything)
    seed_everything(seed)   # the initialisations above draw differently per variant: reseed, so every variant of a
    loader = _loader(cfg, seed)                        # seed sees the same images with the same crops, in order
    level = reset_peak_memory(fabric.device)
    res = fit(fabric, objective, loss_fn, loader, steps=cfg.pretrain_steps, lr=cfg.pretrain_lr,
              weight_decay=cfg.pretrain_weight_decay, warmup=cfg.pretrain_warmup, betas=(0.9, _beta2(cfg)),
              grad_clip=cfg.grad_clip or None, on_step=on_step, progress=progress,
              ckpt_path=ckpt, ckpt_every_s=checkpoint_every_s() if ckpt else None, config={"variant": label, "seed": seed})
    objective.eval()
    if cfg.objective == "dinov2":
        kept = objective.teacher if cfg.eval_weights == "teacher" else objective.student
    else:
        kept = objective.encoder
    if getattr(kept, "explora_config", None) is not None or has_lora(kept):
        merge_explora(kept)
    for p in kept.parameters():
        p.requires_grad_(True)
    kept = kept.cpu().eval() if fabric.device.type != "cpu" else kept.eval()
    last = res.history[-1] if res.history else {}
    rec.update(trainable_backbone=n_bb, trainable_fraction=n_bb / total,
               trainable_objective=n_obj, steps=res.steps,
               images_seen=res.steps * cfg.pretrain_batch_size, wall_time_s=res.wall_time_s,
               s_per_step=res.wall_time_s / max(1, res.steps), peak_memory_mb=res.peak_memory_mb,
               memory_increment_mb=max(0.0, res.peak_memory_mb - level), final_loss=last.get("loss"))
    for k in ("dino", "ibot", "koleo", "mse"):
        if k in last:
            rec[f"final_{k}"] = last[k]
    hist = [{"variant": label, "seed": seed, **{k: h[k] for k in ("step", "loss", "dino", "ibot", "koleo", "mse", "lr")
                                                  if k in h}} for h in res.history]
    del objective
    return Pretrained(label, seed, kept, rec, hist)


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------

def set_drop_path(model: nn.Module, rate: float) -> nn.Module:
    """Stochastic depth on the blocks of a timm ViT, rising linearly from 0 to ``rate`` (timm's rule), in place."""
    from timm.layers import DropPath
    n = len(model.blocks)
    for i, blk in enumerate(model.blocks):
        p = rate * i / max(1, n - 1)
        for name in ("drop_path1", "drop_path2"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(p) if p > 0 else nn.Identity())
    return model


def _ft_splits(cfg: ExploraConfig, splits: Splits) -> Splits:
    """The labelled splits for the fine-tune: decoded once into tensors (except the training images when
    ``ft_augment`` needs them as PIL)."""
    from vitadapt.finetune import materialize
    tr = splits.train if cfg.ft_augment else materialize(splits.train, cfg.img_size)
    grid = len(cfg.ft_lrs) * len(cfg.ft_weight_decays) > 1            # a single point never reads val
    va = materialize(splits.val, cfg.img_size) if grid else splits.val
    return Splits(splits.name, tr, va, materialize(splits.test, cfg.img_size), splits.classes, splits.source,
                  dict(splits.info))


def probe_head(cfg: ExploraConfig, model: nn.Module, info: dict, splits: Splits, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A linear head fitted on the features the model's head sees (the CLS token after the final norm): multinomial
    logistic regression on standardised training features, C among ``probe_Cs`` chosen on val, the standardisation
    folded into the weights. Features come from the per-item cache :func:`~vitadapt.experiments.common.frozen_eval`
    fills (``feature="cls+avg"``: its first ``embed_dim`` columns). Returns ``(weight [C, D], bias [C], C)``."""
    from sklearn.preprocessing import StandardScaler

    from vitadapt.eval import FeatureCache, fit_logistic, model_fingerprint
    if getattr(model, "global_pool", "token") != "token":
        raise ValueError(f"ft_head_init='probe' needs a ViT whose head reads the CLS token (global_pool='token'), got "
                         f"global_pool={model.global_pool!r}; use ft_head_init='fresh'")
    feature = cfg.feature if cfg.feature in ("cls", "cls+avg") else "cls"
    cache = FeatureCache({"weights": info.get("weights_used"), "arch": info.get("arch"), "img_size": cfg.img_size,
                          "feature": feature, "arch_kwargs": cfg.arch_kwargs, "fingerprint": model_fingerprint(model)})
    D = model.embed_dim

    def get(ds):
        X, y = cache.features(model, ds, cfg.img_size, cfg.batch_size, feature, cfg.num_workers)
        return X[:, :D], y
    (Xtr, ytr), (Xva, yva) = get(splits.train), get(splits.val)
    scaler = StandardScaler().fit(Xtr)
    mu, sd = (torch.as_tensor(a, dtype=torch.float32) for a in (scaler.mean_, scaler.scale_))
    tr = torch.as_tensor(scaler.transform(Xtr), dtype=torch.float32)
    va = torch.as_tensor(scaler.transform(Xva), dtype=torch.float32)
    n_cls = len(splits.classes)
    torch.manual_seed(seed)
    best, Wb = None, None
    for C in sorted(cfg.probe_Cs):
        Wb = fit_logistic(tr, torch.as_tensor(ytr, dtype=torch.long), n_cls, C, 100, Wb)
        acc = float(((va @ Wb[0] + Wb[1]).argmax(1).numpy() == yva).mean())
        if best is None or acc > best[0]:
            best = (acc, C, Wb)
    _, C, (W, b) = best
    W_raw = W / sd[:, None]                                  # ((x - mu) / sd) W + b = x (W / sd) + (b - (mu / sd) W)
    return W_raw.T.contiguous(), b - (mu / sd) @ W, C


def lora_finetune(cfg: ExploraConfig, model: nn.Module, splits: Splits, seed: int, fabric=None,
                  ft_splits: Splits | None = None, info: dict | None = None) -> dict:
    """LoRA fine-tune (rank ``ft_rank`` on ``ft_targets`` of every block, alpha = rank, a fresh head, drop-path
    ``ft_drop_path``) of a copy of ``model`` on the labelled target, through :mod:`vitadapt.finetune`.

    One (lr, weight decay) point: nothing to select, so trained on train and scored once on test (no val pass). Several: chosen on val, retrained
    on train + val, test once (:func:`vitadapt.finetune.select_then_test`). Returns an evaluation row."""
    from vitadapt.finetune import finetune_classifier, fresh_head, select_then_test
    from vitadapt.train import seed_everything
    data = ft_splits or _ft_splits(cfg, splits)
    n_cls = len(splits.classes)
    targets = parse_targets(cfg.ft_targets)

    head = probe_head(cfg, model, info or {}, splits, seed) if cfg.ft_head_init == "probe" else None

    def make_model(**_):
        m = fresh_head(copy.deepcopy(model).cpu(), n_cls)
        if head is not None:
            with torch.no_grad():
                m.head.weight.copy_(head[0])
                m.head.bias.copy_(head[1])
        set_drop_path(m, cfg.ft_drop_path)
        return apply_lora(m, rank=cfg.ft_rank, targets=targets, train_head=True)

    length = {"epochs": cfg.ft_epochs} if cfg.ft_epochs else {"steps": cfg.ft_steps}
    common = dict(img_size=cfg.img_size, batch_size=cfg.ft_batch_size, warmup=cfg.ft_warmup,
                  label_smoothing=cfg.ft_label_smoothing, augment=cfg.ft_augment, fabric=fabric, **length)
    grid = [{"lr": float(lr), "weight_decay": float(wd)} for lr in cfg.ft_lrs for wd in cfg.ft_weight_decays]
    hs = f"; head from probe C={head[2]:g}" if head is not None else ""
    if len(grid) == 1:
        seed_everything(seed)
        r = finetune_classifier(make_model(), data.train, {"test": data.test}, num_classes=n_cls,
                                lr=grid[0]["lr"], weight_decay=grid[0]["weight_decay"], seed=seed, **common)
        return {"seed": seed, "eval": f"LoRA-r{cfg.ft_rank} fine-tune", "test_acc": r["acc"]["test"], "val_acc": None,
                "selected": f"lr={grid[0]['lr']:g}, wd={grid[0]['weight_decay']:g} (fixed)" + hs,
                "ft_trainable": r["trainable"], "ft_wall_time_s": r["wall_time_s"], "ft_steps": r["steps"]}
    r = select_then_test(make_model, data, grid, num_classes=n_cls, seeds=(seed,), **common)
    sel = r["selected"][seed]
    return {"seed": seed, "eval": f"LoRA-r{cfg.ft_rank} fine-tune", "test_acc": r["test"][0]["test_acc"], "val_acc": r["val_acc"],
            "selected": f"lr={sel['lr']:g}, wd={sel['weight_decay']:g} (on val)" + hs, "ft_trainable": r["trainable"],
            "ft_wall_time_s": r["wall_time_s"], "ft_steps": r["test"][0]["steps"]}


def evaluate_variant(cfg: ExploraConfig, model: nn.Module, info: dict, seed: int, splits: Splits | None = None,
                     fabric=None, finetune: bool | None = None, ft_splits: Splits | None = None) -> list[dict]:
    """Linear probe and kNN on frozen features (:func:`~vitadapt.experiments.common.frozen_eval`, per-item cache
    keyed by the model's fingerprint) and, when ``finetune`` (default: ``cfg.finetune``), the LoRA fine-tune.
    Rows: seed, eval, test_acc, val_acc, selected (+ fine-tune cost)."""
    splits = splits or load_splits(cfg, seed=seed)
    rows = frozen_eval(cfg, model, info, splits, seed, cfg.probe_Cs, cfg.knn_ks)
    if cfg.finetune if finetune is None else finetune:
        from vitadapt.train import Diverged, job
        try:
            with job(eval="fine-tune"):
                rows.append(lora_finetune(cfg, model, splits, seed, fabric, ft_splits, info))
        except Diverged as e:
            rows.append(diverged_row(seed, f"LoRA-r{cfg.ft_rank} fine-tune", e))
    return rows


# ---------------------------------------------------------------------------------------------------
# Whole experiments
# ---------------------------------------------------------------------------------------------------

@dataclass
class ExploraResults:
    evals: pd.DataFrame     # one row per (variant, seed, eval)
    runs: pd.DataFrame      # one row per (variant, seed): cost of the extended pre-training
    history: pd.DataFrame   # one row per (variant, seed, step): losses


def _record_sources(run, cfg: ExploraConfig, info: dict) -> None:
    if run is None:
        return
    run.use("weights", info)
    run.use("labelled data", _get(cfg, cfg.dataset).record())
    pre = _get(cfg, cfg.pretrain_dataset or cfg.dataset)
    run.use("pre-training data", {**pre.record(), "split": "train", "labels": "dropped (never read)",
                                  "n_pretrain_images": cfg.n_pretrain_images or len(pre.train)})
    run.use("starting point", {"description": starting_point(cfg, info)})


def _run_grid(cfg: ExploraConfig, jobs: list[tuple[str, str, dict]], run=None, progress: bool = False,
              log: Callable[[str], None] | None = print, finetune: bool | None = None) -> ExploraResults:
    """``jobs`` = [(label, variant, config overrides)], each pre-trained and evaluated on every seed."""
    from vitadapt.train import fabric_from_config
    base = load_base(cfg)
    _record_sources(run, cfg, base[1])
    fabric = fabric_from_config(cfg)
    do_ft = cfg.finetune if finetune is None else finetune
    evals, runs, history = [], [], []
    gc.collect()
    gc.freeze()      # what exists now lives on: later collections (before each memory measurement) skip it
    try:
        _grid_loop(cfg, jobs, base, fabric, do_ft, evals, runs, history, progress, log,
                   getattr(run, "jobs", None))
    finally:
        gc.unfreeze()
    return ExploraResults(pd.DataFrame(evals), pd.DataFrame(runs), pd.DataFrame(history))


def _grid_loop(cfg, jobs, base, fabric, do_ft, evals, runs, history, progress, log, store=None) -> None:
    from vitadapt.jobs import JobStore
    store = store or JobStore(None)
    for seed in cfg.seeds:
        per_seed: dict = {}

        def seed_data(seed=seed, per_seed=per_seed) -> dict:      # only when a job of this seed really runs
            if not per_seed:
                splits = load_splits(cfg, seed=seed)
                per_seed.update(splits=splits, ft=_ft_splits(cfg, splits) if do_ft else None,
                                dec=warm_decoder(cfg, base[0], seed, fabric))
            return per_seed
        for label, variant, over in jobs:
            vcfg = dataclasses.replace(cfg, **over) if over else cfg
            out = store.run({"variant": label, "seed": seed},
                            lambda ckpt, vcfg=vcfg, label=label, variant=variant:
                            _job(vcfg, label, variant, seed, base, fabric, do_ft, seed_data, progress, ckpt))
            evals += out["evals"]
            runs.append(out["run"])
            history += out["history"]
            if log:
                log(out["log"])


def _job(cfg, label, variant, seed, base, fabric, do_ft, seed_data, progress, ckpt) -> dict:
    """One (variant, seed): extended pre-training (resumed from ``ckpt`` when it exists), then evaluation. A diverged
    pre-training gives rows marked diverged for every evaluation."""
    from vitadapt.train import Diverged, job
    with job(variant=label, seed=seed):
        data = seed_data()
        t0 = time.perf_counter()
        try:
            pre = pretrain_variant(cfg, variant, seed, base, fabric, data["dec"], progress, label, ckpt=ckpt)
        except Diverged as e:
            evs = ["linear probe", "kNN"] + ([f"LoRA-r{cfg.ft_rank} fine-tune"] if do_ft else [])
            rows = [diverged_row(seed, ev, e) for ev in evs]
            return {"evals": [{"variant": label, **r, "chance": chance(data["splits"])} for r in rows],
                    "run": {"variant": label, "seed": seed, "objective": cfg.objective, "diverged": e.short},
                    "history": [], "log": f"seed {seed} | {label:<22} | {e}"}
        t1 = time.perf_counter()
        rows = evaluate_variant(cfg, pre.model, base[1], seed, data["splits"], fabric, do_ft, data["ft"])
        t2 = time.perf_counter()
    accs = ", ".join(f"{r['eval']} " + (f"{r['test_acc']:.3f}" if not r.get("diverged") else "DIVERGED") for r in rows)
    return {"evals": [{"variant": label, **r, "chance": chance(data["splits"])} for r in rows],
            "run": {**pre.record, "eval_wall_time_s": t2 - t1}, "history": pre.history,
            "log": f"seed {seed} | {label:<22} | trainable {pre.record['trainable_backbone']:>11,} | "
                   f"pre-train {t1 - t0:5.1f} s | eval {t2 - t1:5.1f} s | {accs}"}


def run_comparison(cfg: ExploraConfig, run=None, progress: bool = False,
                   log: Callable[[str], None] | None = print) -> ExploraResults:
    """Notebooks 10 and 11: every variant of ``cfg.variants`` on every seed (same data, steps, learning rate)."""
    return _run_grid(cfg, [(v, v, {}) for v in cfg.variants], run, progress, log)


def ablation_variants(cfg: ExploraConfig) -> list[tuple[str, str, dict]]:
    """One factor at a time around the configured ExPLoRA default: [(label, variant, overrides)], the frozen source
    model first."""
    default = (f"default U={unfreeze_label(cfg.unfreeze)} r={cfg.rank} {targets_label(cfg.targets)} "
               f"norms={'on' if cfg.train_norms else 'off'}")
    out = [("frozen (source)", "frozen", {}), (default, "explora", {})]
    seen = set()
    for fld, values, fmt in (("unfreeze", cfg.ablate_unfreeze, lambda v: f"U={unfreeze_label(v)}"),
                             ("rank", cfg.ablate_rank, lambda v: f"r={v}"),
                             ("targets", cfg.ablate_targets, lambda v: f"LoRA on {targets_label(v)}"
                              + (" (MLP r/4)" if "mlp" in targets_label(v) else "")),
                             ("train_norms", cfg.ablate_norms, lambda v: f"norms {'trained' if v else 'frozen'}")):
        for v in values:
            key = (fld, targets_label(v) if fld == "targets" else unfreeze_label(v) if fld == "unfreeze" else v)
            cur = (fld, targets_label(getattr(cfg, fld)) if fld == "targets" else
                   unfreeze_label(getattr(cfg, fld)) if fld == "unfreeze" else getattr(cfg, fld))
            if key == cur or key in seen:
                continue
            seen.add(key)
            out.append((fmt(v), "explora", {fld: v}))
    return out


def run_ablations(cfg: ExploraConfig, run=None, progress: bool = False,
                  log: Callable[[str], None] | None = print) -> ExploraResults:
    """Notebook 12: every variant of :func:`ablation_variants` on every seed."""
    return _run_grid(cfg, ablation_variants(cfg), run, progress, log)


def run_single(cfg: ExploraConfig, seed: int | None = None, base: tuple[nn.Module, dict] | None = None,
               **overrides) -> pd.DataFrame:
    """One ExPLoRA configuration on one seed (the widget panel's action): a small table of test accuracy, with the
    trainable count and the pre-training wall time in ``df.attrs["run"]``. ``overrides`` are config fields
    (unfreeze, rank, targets, train_norms, pretrain_steps, pretrain_lr, ...)."""
    vcfg = dataclasses.replace(cfg, **overrides) if overrides else cfg   # validated again
    seed = vcfg.seeds[0] if seed is None else int(seed)
    base = base or load_base(vcfg, verbose=False)
    pre = pretrain_variant(vcfg, "explora", seed, base)
    rows = evaluate_variant(vcfg, pre.model, base[1], seed)
    df = pd.DataFrame(rows)[["eval", "test_acc", "val_acc", "selected"]].set_index("eval")
    df["trainable"] = pre.record["trainable_backbone"]
    df["pretrain_s"] = round(pre.record["wall_time_s"], 1)
    df.attrs["run"] = pre.record
    return df


# ---------------------------------------------------------------------------------------------------
# Counts without weights (meta device): the paper dry run and the plan
# ---------------------------------------------------------------------------------------------------

def _meta_vit(arch: str, img_size: int | None = None, **kw) -> nn.Module:
    import timm
    extra = {"img_size": img_size} if img_size else {}
    with torch.device("meta"):     # weight_init="skip": random init on meta tensors is slow and pointless
        try:
            return timm.create_model(arch, pretrained=False, num_classes=0, weight_init="skip", **extra, **kw)
        except TypeError:          # an architecture without that argument
            return timm.create_model(arch, pretrained=False, num_classes=0, **extra, **kw)


def paper_counts(arch: str = "vit_large_patch14_dinov2", unfreeze: str = "L", rank: int = 64, targets: str = "q,v",
                 ft_rank: int = 8, ft_targets: str = "q,v", check: bool = True) -> dict:
    """Trainable parameters of the published setting, computed on a ViT built on ``torch.device('meta')`` (shapes
    only, no weights, a second): ExPLoRA (U = [L], r = 64, Q,V + norms + CLS) and the LoRA-r8 fine-tune (Q,V of every
    block, without the head). With ``check`` and the default arguments, asserts REFERENCE.md's 18,724,864 and 786,432.
    """
    m = _meta_vit(arch)
    depth, total = len(m.blocks), count_params(m)
    apply_explora(m, unfreeze_blocks=parse_unfreeze(unfreeze, depth), rank=rank, targets=parse_targets(targets))
    explora = count_trainable(m)
    groups = dict(m.explora_config["counts"])
    m = _meta_vit(arch)
    apply_lora(m, rank=ft_rank, targets=parse_targets(ft_targets), train_head=False)
    ft = count_trainable(m)
    out = {"arch": arch, "unfreeze": unfreeze_label(unfreeze), "rank": rank, "targets": targets_label(targets),
           "backbone_params": total, "explora_trainable": explora, "explora_groups": groups,
           "finetune_lora_trainable": ft}
    if check and (arch, unfreeze, rank, targets, ft_rank, ft_targets) == ("vit_large_patch14_dinov2", "L", 64, "q,v",
                                                                          8, "q,v"):
        assert explora == PAPER_COUNTS["explora_vitl14_L_r64_qv"], explora
        assert ft == PAPER_COUNTS["finetune_lora_r8_qv_vitl14"], ft
    return out


def _objective_trainable(cfg: ExploraConfig, student: nn.Module) -> int:
    """Parameters the objective adds that train (DinoV2: DINO/iBOT head + mask token; MAE: the decoder, or its LoRA
    when a pre-trained decoder is configured), counted on the meta device."""
    import warnings
    n = count_trainable(student)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cfg.objective == "mae":
            from vitadapt.ssl.mae import MAEObjective
            obj = MAEObjective(student, mask_ratio=cfg.mask_ratio, decoder_dim=cfg.decoder_dim,
                               decoder_depth=cfg.decoder_depth, decoder_heads=cfg.decoder_heads,
                               decoder_lora_rank=cfg.decoder_lora_rank if cfg.mae_decoder else 0)
        else:
            obj, _, _ = build_objective(cfg, student, 0)
    return count_trainable(obj) - n


def plan_table(cfg: ExploraConfig, jobs: list[tuple[str, str, dict]] | None = None) -> pd.DataFrame:
    """Trainable parameters of every variant (``jobs`` as :func:`ablation_variants`; default: ``cfg.variants``) on
    the configured architecture, built on the meta device (nothing is downloaded or allocated)."""
    jobs = jobs or [(v, v, {}) for v in cfg.variants]
    rows, extra_of = [], {}
    for label, variant, over in jobs:
        vcfg = dataclasses.replace(cfg, **over) if over else cfg
        m = _meta_vit(cfg.arch, cfg.img_size, **cfg.arch_kwargs)
        total = count_params(m)
        apply_variant(vcfg, m, variant)
        n = count_trainable(m)
        if variant != "frozen" and "n" not in extra_of:    # the objective's part is the same for every variant
            extra_of["n"] = _objective_trainable(vcfg, m)
        extra = 0 if variant == "frozen" else extra_of["n"]
        rows.append({"variant": label, "what trains": VARIANTS[variant] if not over else
                     ", ".join(f"{k}={v}" for k, v in over.items()),
                     "trainable backbone": n, "fraction of backbone": round(n / total, 5),
                     "objective (heads/decoder)": extra, "backbone params": total})
    return pd.DataFrame(rows).set_index("variant")


# ---------------------------------------------------------------------------------------------------
# Tables and figures
# ---------------------------------------------------------------------------------------------------

def _order(df: pd.DataFrame, col: str) -> list:
    return list(dict.fromkeys(df[col]))


def accuracy_table(evals: pd.DataFrame, by: str = "variant", digits: int = 3) -> pd.DataFrame:
    """Test accuracy ``mean ± std`` over seeds: rows ``by``, one column per evaluation; plus seeds and chance."""
    g = evals.groupby([by, "eval"], sort=False)["test_acc"]
    txt = g.apply(lambda v: mean_std_text(v, digits)).unstack("eval")          # "diverged" where every seed did
    txt = txt.reindex(_order(evals, by))[_eval_order(evals["eval"])]
    txt["seeds"] = evals.groupby(by, sort=False)["seed"].nunique().reindex(txt.index)
    txt["chance"] = round(float(evals["chance"].iloc[0]), 3)
    return txt


def delta_table(evals: pd.DataFrame, by: str = "variant", reference: str | None = None, digits: int = 3) -> pd.DataFrame:
    """Per-seed difference of test accuracy to ``reference`` (default: the first row, the frozen model), then
    ``mean ± std`` over seeds: paired, so seed-to-seed variation of the probe data cancels."""
    ref = reference or _order(evals, by)[0]
    wide = evals.pivot_table(index=[by, "seed"], columns="eval", values="test_acc", dropna=False)
    base = wide.xs(ref, level=0)
    d = wide.sub(base, level=1)          # a diverged seed (NaN) on either side is lost from the pair
    out = d.groupby(level=0, sort=False).agg(lambda v: mean_std_text(v, digits, signed=True))
    out.columns.name = None
    out = out.reindex([v for v in _order(evals, by) if v != ref])
    return out[_eval_order(out.columns)]


def cost_table(runs: pd.DataFrame, by: str = "variant") -> pd.DataFrame:
    """Cost of the extended pre-training per ``by``, means over seeds: trainable parameters (backbone; objective's
    heads or decoder), fraction of the backbone, steps, images, wall time, seconds per step, peak memory and its
    increment over the level before the run."""
    cols = ["trainable_backbone", "trainable_fraction", "trainable_objective", "steps", "images_seen", "wall_time_s",
            "s_per_step", "peak_memory_mb", "memory_increment_mb", "final_loss"]
    df = runs[[by] + [c for c in cols if c in runs]].copy()
    for c in df.columns[1:]:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    out = df.groupby(by, sort=False).mean()
    for c in ("trainable_backbone", "trainable_objective", "steps", "images_seen"):
        if c in out:
            out[c] = out[c].round().astype("Int64")
    return out.round({"trainable_fraction": 5, "wall_time_s": 1, "s_per_step": 2, "peak_memory_mb": 0,
                      "memory_increment_mb": 0, "final_loss": 4})


def paper_table() -> pd.DataFrame:
    """The published fMoW-RGB ViT-L numbers (top-1, %), for reference only: another model size, data set and
    budget than any profile but ``paper``."""
    return pd.DataFrame([{"evaluation": ev, "model": what, "fMoW-RGB top-1 (%)": acc}
                         for ev, rows in PAPER_RESULTS.items() for what, acc in rows]).set_index(["evaluation", "model"])


def choices_table() -> pd.DataFrame:
    return pd.DataFrame(CHOICES, columns=["choice", "public record", "our choice", "switch"]).set_index("choice")


def plot_accuracy(evals: pd.DataFrame, by: str = "variant", title: str = ""):
    """Test accuracy per ``by``, one panel per evaluation; bars are means, error bars the std over seeds."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    evs = _eval_order(evals["eval"])
    order = _order(evals, by)
    fig, axes = plt.subplots(1, len(evs), figsize=(max(4.0, 0.55 * len(order) + 2) * len(evs) ** 0.8 + 1, 3.6),
                             squeeze=False)
    for ax, ev in zip(axes[0], evs):
        sns.barplot(evals[evals["eval"] == ev], x=by, y="test_acc", order=order, errorbar="sd", capsize=0.1, ax=ax,
                    color="tab:blue")
        ax.axhline(float(evals["chance"].iloc[0]), ls="--", c="gray", lw=0.8)
        mark_diverged(ax, evals[evals["eval"] == ev], by, "test_acc", order)
        ax.set_title(f"{ev}{(' · ' + title) if title else ''}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_ylabel("test accuracy")
        ax.set_xlabel("")
        ax.tick_params(axis="x", labelsize=7, rotation=30)
        for lab in ax.get_xticklabels():
            lab.set_horizontalalignment("right")
    fig.tight_layout()
    return fig


def plot_losses(history: pd.DataFrame, by: str = "variant"):
    """Pre-training losses per ``by`` (mean over seeds): the total, and its parts (DINO, iBOT, KoLeo or MSE)."""
    import matplotlib.pyplot as plt
    parts = [c for c in ("loss", "dino", "ibot", "koleo", "mse") if c in history and history[c].notna().any()]
    parts = parts if parts != ["loss", "mse"] else ["loss"]
    fig, axes = plt.subplots(1, len(parts), figsize=(3.6 * len(parts), 3.0), squeeze=False)
    for ax, c in zip(axes[0], parts):
        for g in _order(history, by):
            h = history[history[by] == g].groupby("step")[c].mean()
            ax.plot(h.index, h.values, label=str(g), lw=1.2)
        ax.set_title(c if c != "loss" else "total loss", fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def summary(res: ExploraResults, by: str = "variant") -> dict:
    """metrics.json content: mean/std/n of test accuracy per (by, eval) and the mean cost per ``by``."""
    out: dict = {"test_acc": {}, "cost": {}}
    for (k, ev), g in res.evals.groupby([by, "eval"], sort=False):
        out["test_acc"][f"{k}/{ev}"] = summarize(g["test_acc"])
    if len(res.runs):
        cost = cost_table(res.runs, by)
        out["cost"] = {str(k): {c: (None if pd.isna(v) else float(v)) for c, v in row.items()}
                       for k, row in cost.iterrows()}
    return out


# ---------------------------------------------------------------------------------------------------
# Dry run and the widget panel
# ---------------------------------------------------------------------------------------------------

def dry_run_reason(cfg: ExploraConfig) -> str | None:
    """Why the run stops after building (None: run for real). ``auto`` checks, without downloading, the labelled
    dataset, the pre-training dataset, the weights and (MAE) the decoder checkpoint."""
    from vitadapt.models import WEIGHTS
    if cfg.dry_run == "yes":
        return "dry_run='yes'"
    if cfg.dry_run == "no":
        return None
    missing = []
    for name in dict.fromkeys([cfg.dataset, cfg.pretrain_dataset or cfg.dataset]):
        try:
            _get(cfg, name, download=False)
        except (DataMissingError, FileNotFoundError) as e:
            missing.append(f"dataset {name!r} ({brief(e, 140)})")
    src = WEIGHTS.get(cfg.weights)
    if src is not None and src.kind == "hub":
        from vitadapt.models import hub_reachable
        if not hub_reachable():
            missing.append(f"weights {cfg.weights!r} (need the timm hub, not reachable from here)")
    if cfg.objective == "mae" and cfg.mae_decoder and not resolve(cfg.mae_decoder).is_file():
        missing.append(f"MAE decoder checkpoint {cfg.mae_decoder!r}")
    return ("not available here: " + "; ".join(missing)) if missing else None


def panel_fields(cfg: ExploraConfig) -> dict:
    """The knobs of the ablation panel: {name: (default, options or None)}; see :func:`vitadapt.widgets.ablation_panel`."""
    unf = list(dict.fromkeys([cfg.unfreeze, "none", "L", "1,L", "1,L-1,L", *cfg.ablate_unfreeze]))
    tg = list(dict.fromkeys([cfg.targets, "q,v", "q,k,v", "q,k,v,proj", "q,k,v,proj,mlp", *cfg.ablate_targets]))
    ranks = sorted({1, 2, 4, 8, 16, 32, 64, cfg.rank, *cfg.ablate_rank})
    return {"unfreeze": (cfg.unfreeze, unf), "rank": (cfg.rank, ranks), "targets": (cfg.targets, tg),
            "train_norms": (cfg.train_norms, None), "pretrain_steps": (cfg.pretrain_steps, None),
            "pretrain_lr": (float(cfg.pretrain_lr), None), "seed": (cfg.seeds[0], list(cfg.seeds))}
