"""The LoRA fine-tune evaluation of a backbone (ExPLoRA's downstream protocol, REFERENCE.md section 1): LoRA of rank
``ft_rank`` on ``ft_targets`` of every block (alpha ``ft_lora_alpha``; 0 = rank), a new head (fresh, std
``ft_head_init_std``, or LP-FT: a probe fitted on the features the head reads) on the CLS token or, with
``ft_pool="avg"``, on the mean patch token through a fresh frozen ``fc_norm`` (the official fine-tune), drop-path
``ft_drop_path``, warm-up ``ft_warmup`` (steps or a fraction) or ``ft_warmup_epochs``; one (lr, weight decay) point is
trained on train and tested once, a grid is chosen on val, retrained on train + val and tested once
(:func:`vitadapt.finetune.train_then_test`).

The official recipe (samar-khanna/ExPLoRA scripts/finetune.sh with finetune/finetune.py, as read in the code index):
alpha 1 (scale 1/8), global average pooling with fc_norm, head truncated-normal std 2e-5, weight decay 0, 5 warm-up
epochs, 120 epochs, effective batch 128, lr = blr 1e-3 x 128 / 256 = 5e-4, drop-path 0.2, label smoothing 0.1, no
mixup/cutmix/random erasing, layer decay 1.0; ``papers.RECIPES["ExPLoRA"]`` part "LoRA fine-tune" lists each value.

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
    ft_warmup: float = opt(0.1, "Fine-tune warm-up: a fraction of the steps (< 1) or a number of steps (used when ft_warmup_epochs is 0).", min=0.0)
    ft_warmup_epochs: float = opt(0.0, "Fine-tune warm-up in epochs of the training set (official 5); 0 = use ft_warmup.", min=0.0)
    ft_label_smoothing: float = opt(0.1, "Fine-tune label smoothing (paper 0.1).", min=0.0, max=0.99)
    ft_drop_path: float = opt(0.2, "Fine-tune drop-path rate, rising linearly over the blocks (paper 0.2).", min=0.0, max=0.9)
    ft_augment: bool = opt(True, "Fine-tune with random resized crops and flips (off: images are decoded once).")
    ft_head_init: Literal["fresh", "probe"] = opt("fresh", "Head of the fine-tune: fresh (paper: random init) or probe (LP-FT: a logistic-regression probe on the features the head reads, C chosen on val; for budgets far too short to train a fresh head).")
    ft_head_init_std: float = opt(0.02, "Std of the fresh head's truncated-normal weights (timm 0.02; official ExPLoRA/MAE fine-tune 2e-5).", min=1e-8, max=1.0)
    ft_lora_alpha: float = opt(0.0, "LoRA alpha of the fine-tune (scale alpha / ft_rank); 0 = ft_rank (scale 1); official ExPLoRA 1 (scale 1/8).", min=0.0, max=4096.0)
    ft_pool: Literal["cls", "avg"] = opt("cls", "What the fine-tune's head reads: cls (the CLS token after the final norm) or avg (the mean patch token through a fresh, frozen fc_norm, timm global_pool='avg'; official ExPLoRA/MAE fine-tune).")


def decoded_splits(cfg, splits: Splits) -> Splits:
    """The labelled splits decoded once (the training images stay PIL when ``ft_augment`` needs them; val only when
    a grid reads it)."""
    from vitadapt.finetune import decoded
    return decoded(splits, cfg.img_size, train=not cfg.ft_augment, val=len(cfg.ft_lrs) * len(cfg.ft_weight_decays) > 1)


def classifier(cfg, model: nn.Module, num_classes: int, head: tuple | None = None) -> nn.Module:
    """The model the fine-tune trains, from the config: :func:`vitadapt.finetune.lora_classifier` of a copy of
    ``model`` with ``ft_rank``, ``ft_targets``, ``ft_lora_alpha`` (0 = rank), ``ft_pool``, ``ft_head_init_std``,
    ``ft_drop_path`` and ``head`` (weight, bias) when given."""
    from vitadapt.finetune import lora_classifier
    return lora_classifier(model, num_classes, cfg.ft_rank, parse_targets(cfg.ft_targets), cfg.ft_drop_path, head,
                           alpha=cfg.ft_lora_alpha or None, pool=cfg.ft_pool, head_std=cfg.ft_head_init_std)


def warmup(cfg, n_train: int, fabric=None) -> float:
    """The ``warmup`` :func:`vitadapt.finetune.finetune_classifier` takes: ``ft_warmup`` when ``ft_warmup_epochs`` is
    0; else that many epochs as a fraction of the run (``ft_warmup_epochs / ft_epochs``, or with ``ft_steps`` the
    epochs' steps over ``n_train`` images divided by ``ft_steps``), so a retrain on train + val warms up over the same
    epochs. ValueError when the warm-up would not end before the run does."""
    if not cfg.ft_warmup_epochs:
        return cfg.ft_warmup
    if cfg.ft_epochs:
        frac = cfg.ft_warmup_epochs / cfg.ft_epochs
    else:
        from vitadapt.finetune import _steps
        frac = _steps(n_train, cfg.ft_batch_size, None, cfg.ft_warmup_epochs, fabric) / cfg.ft_steps
    if not frac < 1:
        raise ValueError(f"ft_warmup_epochs={cfg.ft_warmup_epochs} is not shorter than the run (ft_epochs="
                         f"{cfg.ft_epochs}, ft_steps={cfg.ft_steps}, {n_train} training images): lower it or set 0")
    return float(frac)


def pooled_probe_head(cfg, model: nn.Module, splits: Splits, seed: int, device=None) -> tuple:
    """LP-FT with ``ft_pool="avg"``: the probe fitted on the features the fine-tune's head reads at step 0 (the mean
    patch token through the fresh ``fc_norm``; LoRA starts at zero and drop-path is off in eval), not on the cached
    CLS/avg features of :func:`~vitadapt.protocol.probe.probe_head` (those are after the final norm, which the avg
    head drops). Same fit: logistic regression on standardised training features, C among ``probe_Cs`` chosen on
    val, the standardisation folded into the weights. Returns ``(weight [C, D], bias [C], C)`` on the CPU."""
    import copy

    from vitadapt.eval import extract_features
    from vitadapt.vit import PreLogits, avg_pool_head
    device = probe._device(cfg, device)
    pooled = PreLogits(avg_pool_head(copy.deepcopy(model)))
    get = lambda ds: extract_features(pooled, ds, cfg.img_size, cfg.batch_size, "cls", cfg.num_workers, device,
                                      precision=cfg.precision)
    (Xtr, ytr), (Xva, yva) = get(splits.train), get(splits.val)
    return probe.folded_probe(Xtr, ytr, Xva, yva, len(splits.classes), getattr(cfg, "probe_Cs", probe.DEFAULT_CS),
                              seed, device)


def lora_finetune(cfg, model: nn.Module, splits: Splits, seed: int, fabric=None,
                  ft_splits: Splits | None = None, info: dict | None = None) -> dict:
    """LoRA fine-tune of a copy of ``model`` (:func:`classifier`: rank ``ft_rank`` on ``ft_targets`` of every block,
    alpha ``ft_lora_alpha``, pooling ``ft_pool``, drop-path ``ft_drop_path``, a fresh head of std ``ft_head_init_std``
    or, with ``ft_head_init="probe"``, a probe on the features that head reads), through :mod:`vitadapt.finetune`,
    warm-up :func:`warmup`. One (lr, weight decay) point: trained on train, scored once on test (no val pass);
    several: chosen on val, retrained on train + val, test once. Returns an evaluation row."""
    from vitadapt.finetune import train_then_test
    data, n_cls = ft_splits or decoded_splits(cfg, splits), len(splits.classes)
    head = None
    if cfg.ft_head_init == "probe":
        head = pooled_probe_head(cfg, model, splits, seed) if cfg.ft_pool == "avg" else \
            probe.probe_head(cfg, model, info or {}, splits, seed)
    points = [{"lr": float(lr), "weight_decay": float(wd)} for lr in cfg.ft_lrs for wd in cfg.ft_weight_decays]
    r = train_then_test(lambda **_: classifier(cfg, model, n_cls, head), data, points, seed=seed, num_classes=n_cls,
                        img_size=cfg.img_size, batch_size=cfg.ft_batch_size, warmup=warmup(cfg, len(data.train), fabric),
                        fabric=fabric, label_smoothing=cfg.ft_label_smoothing, augment=cfg.ft_augment,
                        track_test=selection.official(cfg),
                        **({"epochs": cfg.ft_epochs} if cfg.ft_epochs else {"steps": cfg.ft_steps}))
    return {"seed": seed, "eval": f"LoRA-r{cfg.ft_rank} fine-tune", "test_acc": r["test_acc"], "val_acc": r["val_acc"],
            "selected": f"lr={r['point']['lr']:g}, wd={r['point']['weight_decay']:g} ({r['chosen']})"
                        + (f"; head from probe C={head[2]:g}" if head is not None else ""),
            "ft_trainable": r["trainable"], "ft_wall_time_s": r["wall_time_s"], "ft_steps": r["steps"],
            **({"test_acc_best_epoch": r["test_acc_best_epoch"], "best_step": r["best_step"]}
               if "test_acc_best_epoch" in r else {})}


def evaluate_backbone(cfg, model: nn.Module, info: dict, seed: int, splits: Splits, fabric=None, finetune: bool = True,
                      ft_splits: Splits | None = None) -> list[dict]:
    """A backbone's evaluation under ``cfg.protocol`` (:mod:`vitadapt.protocol.selection`): clean, the linear probe
    and kNN with C and k chosen on val; official, the official harness and kNN
    (:func:`vitadapt.protocol.official_probe.official_rows`); with ``finetune``, the LoRA fine-tune, its last epoch
    (clean) and best test epoch (official). Probes on rank 0; a diverged fine-tune gives rows marked diverged. Rows:
    seed, eval, test_acc, val_acc, selected."""
    from vitadapt.distributed import on_rank0
    from vitadapt.jobs import diverged_row
    from vitadapt.protocol.official_probe import official_rows
    from vitadapt.train import Diverged, job
    rows = on_rank0(fabric, lambda: probe.frozen_eval(cfg, model, info, splits, seed)) if selection.clean(cfg) else []
    if selection.official(cfg):
        rows += on_rank0(fabric, lambda: official_rows(cfg, model, info, splits, seed))
    if finetune:
        try:
            with job(eval="fine-tune"):
                r = lora_finetune(cfg, model, splits, seed, fabric, ft_splits, info)
            best, step = r.pop("test_acc_best_epoch", None), r.pop("best_step", None)
            rows += selection.fine_tune_rows(cfg, r, best, f"step {step} of {r['ft_steps']}" if step else "")
        except Diverged as e:
            rows += [diverged_row(seed, ev, e) for ev in eval_names(cfg, frozen=False)]
    return rows


def eval_names(cfg, frozen: bool = True) -> list[str]:
    """The evaluations of a backbone under ``cfg.protocol``: the frozen-feature ones (``frozen``), then the fine-tune's
    (when ``cfg.finetune``)."""
    from vitadapt.protocol import official_probe as op
    ft, out = f"LoRA-r{cfg.ft_rank} fine-tune", []
    if frozen and selection.clean(cfg):
        out += ["linear probe", "kNN"]
    if frozen and selection.official(cfg):
        out += [op.OFFICIAL_LP, op.OFFICIAL_LP_VAL, op.OFFICIAL_KNN, op.OFFICIAL_KNN_VAL]
    if getattr(cfg, "finetune", True):
        out += ([ft] if selection.clean(cfg) else []) + ([selection.official_name(ft)] if selection.official(cfg) else [])
    return out
