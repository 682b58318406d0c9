"""The LoRA fine-tune evaluation of a backbone (ExPLoRA's downstream protocol, REFERENCE.md section 1): LoRA of rank
``ft_rank`` on ``ft_targets`` of every block (alpha = rank), a new head (fresh, or LP-FT: the linear probe's), drop-path
``ft_drop_path``; one (lr, weight decay) point is trained on train and tested once, a grid is chosen on val, retrained
on train + val and tested once (:func:`vitadapt.finetune.train_then_test`).

An experiment's config inherits :class:`LoraFinetuneSettings` (the fields read here) next to the shared fields of
:class:`vitadapt.config.ExperimentConfig` (image size, batch size, feature, probe grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from vitadapt.config import opt
from vitadapt.data import Splits
from vitadapt.peft.explora import parse_targets
from vitadapt.protocol import probe, selection


@dataclass
class LoraFinetuneSettings:
    """The fine-tune's settings, as config fields (a mixin of an experiment's config)."""

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


def decoded_splits(cfg, splits: Splits) -> Splits:
    """The labelled splits decoded once (the training images stay PIL when ``ft_augment`` needs them; val only when
    a grid reads it)."""
    from vitadapt.finetune import decoded
    return decoded(splits, cfg.img_size, train=not cfg.ft_augment, val=len(cfg.ft_lrs) * len(cfg.ft_weight_decays) > 1)


def lora_finetune(cfg, model: nn.Module, splits: Splits, seed: int, fabric=None,
                  ft_splits: Splits | None = None, info: dict | None = None) -> dict:
    """LoRA fine-tune (rank ``ft_rank`` on ``ft_targets`` of every block, alpha = rank, drop-path ``ft_drop_path``, a
    fresh head or, with ``ft_head_init="probe"``, the probe's :func:`~vitadapt.protocol.probe.probe_head`) of a copy
    of ``model``, through :mod:`vitadapt.finetune`. One (lr, weight decay) point: trained on train, scored once on
    test (no val pass); several: chosen on val, retrained on train + val, test once. Returns an evaluation row."""
    from vitadapt.finetune import lora_classifier, train_then_test
    data, n_cls = ft_splits or decoded_splits(cfg, splits), len(splits.classes)
    head = probe.probe_head(cfg, model, info or {}, splits, seed) if cfg.ft_head_init == "probe" else None
    points = [{"lr": float(lr), "weight_decay": float(wd)} for lr in cfg.ft_lrs for wd in cfg.ft_weight_decays]
    r = train_then_test(lambda **_: lora_classifier(model, n_cls, cfg.ft_rank, parse_targets(cfg.ft_targets),
                                                    cfg.ft_drop_path, head), data, points, seed=seed, num_classes=n_cls,
                        img_size=cfg.img_size, batch_size=cfg.ft_batch_size, warmup=cfg.ft_warmup, fabric=fabric,
                        label_smoothing=cfg.ft_label_smoothing, augment=cfg.ft_augment,
                        track_test=selection.official(cfg),
                        **({"epochs": cfg.ft_epochs} if cfg.ft_epochs else {"steps": cfg.ft_steps}))
    return {"seed": seed, "eval": f"LoRA-r{cfg.ft_rank} fine-tune", "test_acc": r["test_acc"], "val_acc": r["val_acc"],
            "selected": f"lr={r['point']['lr']:g}, wd={r['point']['weight_decay']:g} ({r['chosen']})"
                        + (f"; head from probe C={head[2]:g}" if head is not None else ""),
            "ft_trainable": r["trainable"], "ft_wall_time_s": r["wall_time_s"], "ft_steps": r["steps"],
            **({"test_acc_best_epoch": r["test_acc_best_epoch"], "best_step": r["best_step"]}
               if "test_acc_best_epoch" in r else {})}
