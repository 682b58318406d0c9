"""RLRR's official VTAB-1k recipe (zstarN70/RLRR: train_vtab.py, RLRRDatasets/VTABConfig.py, VTABDataLoader.py,
models/networks.py) as data and the few pieces 30/31 need to follow it.

- :data:`RLRR_VTAB_TASKS`: the fixed per-task settings of ``VTABConfig.py`` (learning rate, weight decay, the
  dropout rate of the residual branches, horizontal flip); ``hparams="official"`` uses them instead of a grid.
- :func:`lr_schedule`: timm's ``CosineLRScheduler`` as ``create_scheduler`` builds it from the official arguments
  (warm-up from ``warmup_lr``, cosine over ``epochs`` to ``min_lr``, then ``cooldown_epochs`` at ``min_lr``),
  stepped once per epoch the way the official loop does (``lr_step="epoch"``), as a
  :func:`vitadapt.finetune.finetune_classifier` ``lr_schedule``.
- :func:`set_branch_dropout`: the official blocks put an element-wise ``nn.Dropout`` (not stochastic depth) on
  the output of the attention and of the MLP branch, before each residual sum, its rate rising linearly from 0
  in the first block to the task's rate in the last (``torch.linspace(0, drop_path, depth)``).
- :func:`zero_head`: the official model starts from a zero head (``zero_head=True``).
"""

from __future__ import annotations

import math
from functools import partial
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from vitadapt import papers
from vitadapt.config import opt
from vitadapt.data.vtab import VTAB1K_TASKS
from vitadapt.peft.baselines import build
from vitadapt.protocol import counts

__all__ = ["OfficialTask", "RLRR_VTAB_TASKS", "official_task", "lr_schedule", "set_branch_dropout", "zero_head",
           "LR_STEPS", "RecipeSettings", "trainable_counts", "paper_count_table"]

LR_STEPS = ("step", "epoch")


class OfficialTask(NamedTuple):
    """One task's row of the official ``VTABConfig.py``: ``lr``, ``weight_decay``, ``dropout`` (its field
    ``drop_path``: the last block's branch-dropout rate) and ``flip`` (its field ``simple_aug``: a random
    horizontal flip of the training images)."""
    lr: float
    weight_decay: float
    dropout: float
    flip: bool


#: VTAB-1k task (folder name) -> its official setting (zstarN70/RLRR: RLRRDatasets/VTABConfig.py); every task also
#: has batch 32, warmup_lr 1e-7 and min_lr 1e-8 there
RLRR_VTAB_TASKS: dict[str, OfficialTask] = {
    "cifar": OfficialTask(3e-3, 5e-5, 0.1, False),
    "caltech101": OfficialTask(1e-3, 5e-5, 0.1, False),
    "dtd": OfficialTask(2e-3, 5e-5, 0.1, True),
    "oxford_flowers102": OfficialTask(3e-3, 5e-2, 0.3, False),
    "oxford_iiit_pet": OfficialTask(1e-3, 5e-5, 0.1, True),
    "svhn": OfficialTask(5e-3, 5e-5, 0.3, False),
    "sun397": OfficialTask(1e-3, 5e-5, 0.1, False),
    "patch_camelyon": OfficialTask(3e-3, 5e-2, 0.3, True),
    "eurosat": OfficialTask(1e-3, 5e-5, 0.1, True),
    "resisc45": OfficialTask(3e-3, 5e-5, 0.0, False),
    "diabetic_retinopathy": OfficialTask(5e-3, 5e-5, 0.1, True),
    "clevr_count": OfficialTask(5e-3, 5e-5, 0.5, True),
    "clevr_dist": OfficialTask(1e-2, 5e-5, 0.2, True),
    "dmlab": OfficialTask(5e-3, 5e-5, 0.3, True),
    "kitti": OfficialTask(3e-3, 5e-2, 0.3, True),
    "dsprites_loc": OfficialTask(1e-2, 5e-5, 0.1, False),
    "dsprites_ori": OfficialTask(5e-3, 5e-5, 0.1, False),
    "smallnorb_azi": OfficialTask(5e-3, 5e-2, 0.3, False),
    "smallnorb_ele": OfficialTask(1e-3, 5e-5, 0.3, True),
}


def task_table(tasks=None) -> pd.DataFrame:
    """The official per-task settings (:data:`RLRR_VTAB_TASKS`) as a table, for ``tasks`` (names or ``vtab1k:<name>``;
    default all 19), with the source file."""
    names = [t.split(":", 1)[-1] for t in (tasks or RLRR_VTAB_TASKS)]
    rows = {n: RLRR_VTAB_TASKS[n]._asdict() for n in names if n in RLRR_VTAB_TASKS}
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "task (zstarN70/RLRR: RLRRDatasets/VTABConfig.py)"
    return out


def official_task(task: str) -> OfficialTask:
    """The official setting of ``task`` (``vtab1k:<name>`` or ``<name>``, a VTAB-1k folder name)."""
    name = task.split(":", 1)[1] if task.startswith("vtab1k:") else task
    if name not in RLRR_VTAB_TASKS:
        raise ValueError(f"task {task!r} has no official RLRR VTAB-1k setting; valid: "
                         f"{', '.join('vtab1k:' + t for t in RLRR_VTAB_TASKS)} (FGVC's recipe, train_fgvc.py, is "
                         f"not implemented: use hparams='grid' for other tasks)")
    return RLRR_VTAB_TASKS[name]


def lr_schedule(*, epochs: float, warmup_epochs: float, cooldown_epochs: float = 0.0, warmup_lr: float = 0.0,
                min_lr: float = 0.0, lr_step: str = "epoch") -> Callable[[int, int, float], Callable[[int], float]]:
    """A :func:`vitadapt.finetune.finetune_classifier` ``lr_schedule``: ``(steps, steps_per_epoch, lr)`` -> (step
    -> multiplier of ``lr``), timm's ``CosineLRScheduler(t_initial=epochs, warmup_t=warmup_epochs,
    warmup_lr_init=warmup_lr, lr_min=min_lr, cycle_limit=1)`` (warm-up is not a prefix: the cosine runs over all of
    ``epochs``, from where the warm-up ends) followed by ``cooldown_epochs`` at ``min_lr``.

    ``lr_step="epoch"``: the rate changes once per epoch as in the official loop, which sets it after epoch ``e``
    with ``scheduler.step(e)``: epoch 0 runs at ``warmup_lr`` (set when the scheduler is built) and epoch ``e >= 1``
    at the schedule's value of ``e - 1``. ``"step"``: the same curve at every optimizer step (fractional epochs,
    no lag)."""
    if lr_step not in LR_STEPS:
        raise ValueError(f"lr_step={lr_step!r} is not valid; valid values: {', '.join(map(repr, LR_STEPS))}")
    if epochs <= 0 or warmup_epochs < 0 or cooldown_epochs < 0 or warmup_epochs >= epochs:
        raise ValueError(f"epochs={epochs}, warmup_epochs={warmup_epochs}, cooldown_epochs={cooldown_epochs}: need "
                         f"epochs > warmup_epochs >= 0 and cooldown_epochs >= 0")

    def at(t: float, lr: float) -> float:          # timm's CosineLRScheduler._get_lr at (fractional) epoch t
        if t < warmup_epochs:
            return warmup_lr + t * (lr - warmup_lr) / warmup_epochs
        if t >= epochs:
            return min_lr
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / epochs))

    def make(steps: int, steps_per_epoch: int, lr: float) -> Callable[[int], float]:
        if steps_per_epoch < 1 or lr <= 0:
            raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1 and lr={lr} > 0")
        if lr_step == "epoch":
            return lambda step: at(max(step // steps_per_epoch - 1, 0), lr) / lr
        return lambda step: at(step / steps_per_epoch, lr) / lr
    return make


def set_branch_dropout(model: nn.Module, rate: float, depth: int | None = None) -> nn.Module:
    """Put the official residual-branch dropout in place of timm's ``drop_path1`` / ``drop_path2`` (stochastic
    depth) in every block of ``model``: ``nn.Dropout(p)`` on the attention and MLP outputs, ``p`` rising linearly
    from 0 (first block) to ``rate`` (last); ``depth``: the whole ViT's blocks when ``model.blocks`` are its last
    ones (a :class:`~vitadapt.vit.TailViT`). Active in ``train()`` only."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate={rate} must lie in [0, 1)")
    blocks = list(model.blocks)
    depth = depth or len(blocks)
    if depth < len(blocks):
        raise ValueError(f"depth={depth} is below the model's {len(blocks)} blocks")
    rates = torch.linspace(0, rate, depth).tolist()[depth - len(blocks):]
    for block, p in zip(blocks, rates):
        for name in ("drop_path1", "drop_path2"):
            if not hasattr(block, name):
                raise ValueError(f"block {type(block).__name__} has no {name}: not a timm ViT block")
            setattr(block, name, nn.Dropout(p))
    return model


@torch.no_grad()
def zero_head(model: nn.Module) -> nn.Module:
    """Set the classification head (``get_classifier()`` or ``head``) to zero, weight and bias, as the official
    model's ``zero_head=True``."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"zero_head needs a linear head; the model's is {type(head).__name__}")
    head.weight.zero_()
    if head.bias is not None:
        head.bias.zero_()
    return model


# ---- what trains, counted (30's parameter table) ------------------------------------------------------------------

def trainable_counts(arch: str, methods, img_size: int = 224, arch_kwargs: dict | None = None,
                     adapt_blocks: int = 0, lora_rank: int = 8) -> pd.DataFrame:
    """Trainable parameters (no head) per method on ``arch`` (built on the meta device: no memory, no weights)."""
    return counts.table(arch, {m: partial(build, m, **method_kwargs(m, lora_rank)) for m in methods}, img_size,
                        arch_kwargs, adapt_blocks)


def method_kwargs(method: str, lora_rank: int = 8) -> dict:
    """The :func:`~vitadapt.peft.baselines.build` kwargs of a baseline (LoRA: its rank)."""
    return {"r": lora_rank} if method == "lora" else {}


def paper_count_table(methods) -> pd.DataFrame:
    """ViT-B/16 counts: ours without head, + the mean VTAB-1k head (768 C + C over the 19 tasks), the paper's."""
    head = float(np.mean([769 * c for c in VTAB1K_TASKS.values()]))
    n = trainable_counts("vit_base_patch16_224", methods, 224)["trainable"]
    return pd.DataFrame([{"method": m, "ours: no head": int(n[m]), "ours: + mean VTAB head": int(n[m] + head),
                          "ours (M)": round((n[m] + head) / 1e6, 2), "paper (M)": papers.RLRR_PARAMS_M.get(m, float("nan"))}
                         for m in methods]).set_index("method")


@dataclass
class RecipeSettings:
    """Where 30/31 may follow the official VTAB-1k recipe, as config fields (a mixin of
    :class:`~vitadapt.experiments.rlrr.RLRRConfig`); the defaults are our recipe, the paper profile sets the
    official values."""

    hparams: Literal["grid", "official"] = opt("grid", "grid: RLRR's lr and weight decay chosen on val from the grid; official: the fixed per-task lr, weight decay, branch dropout and flip of the official VTAB-1k code (experiments.rlrr_recipe.RLRR_VTAB_TASKS), trained on train+val, nothing selected (other methods keep their lr grid; dropout and flip apply to all).")
    normalize: Literal["imagenet", "half", "weights"] = opt("imagenet", "Input normalisation: imagenet statistics, half (mean = std = 0.5: the official RLRR code) or weights (the timm pretrained_cfg of the backbone).")
    head_init: Literal["random", "zero"] = opt("random", "The new head: timm's random init, or zero (the official RLRR code's zero_head).")
    dropout: float = opt(0.0, "Element-wise dropout on the attention and MLP branch outputs (the official RLRR blocks' 'drop_path'), rising linearly to this rate in the last block; replaces drop_path (hparams=official: per task).", min=0.0, max=0.9)
    lr_step: Literal["step", "epoch"] = opt("step", "step: warm-up + cosine at every step (ours); epoch: the rate changes once per epoch, as timm's scheduler in the official loop.")
    warmup_lr: float = opt(0.0, "Learning rate the warm-up starts from (official: 1e-7; 0 with lr_step=step, min_lr=0 and no cool-down: our default schedule).", min=0.0, max=1.0)
    min_lr: float = opt(0.0, "Learning rate the cosine ends at (official: 1e-8).", min=0.0, max=1.0)
    cooldown_epochs: float = opt(0.0, "Epochs at min_lr after the cosine (official: 10, after 100).", min=0.0)

    def check_recipe(self) -> None:
        """ValueErrors of these fields (called by the config's ``check``)."""
        if self.hparams == "official":
            for t in self.tasks:
                official_task(t)                 # a ValueError names a task without an official setting
            if self.adapt_blocks:
                raise ValueError("hparams='official' flips images per task, so adapt_blocks must be 0")
            if self.drop_path:
                raise ValueError(f"hparams='official' puts the task's branch dropout where drop_path acts; set "
                                 f"drop_path=0 (not {self.drop_path})")
        if self.dropout and self.drop_path:
            raise ValueError(f"dropout={self.dropout} replaces drop_path={self.drop_path} in the same place; set one "
                             f"to 0")

    def lr_schedule(self):
        """The fine-tune's ``lr_schedule`` (:func:`~vitadapt.experiments.rlrr_recipe.lr_schedule`: warm-up from
        ``warmup_lr`` over ``warmup`` x ``epochs``, cosine to ``min_lr``, ``cooldown_epochs``, stepped per
        ``lr_step``); None keeps :func:`vitadapt.train.fit`'s warm-up + cosine to 0."""
        if self.lr_step == "step" and not (self.warmup_lr or self.min_lr or self.cooldown_epochs):
            return None
        return lr_schedule(epochs=self.epochs, warmup_epochs=self.warmup * self.epochs,
                           cooldown_epochs=self.cooldown_epochs, warmup_lr=self.warmup_lr, min_lr=self.min_lr,
                           lr_step=self.lr_step)

    def points(self, task: str, method: str = "rlrr") -> list[dict]:
        """The (lr, weight decay) points ``method`` trains with on ``task``: RLRR's official one under
        ``hparams='official'`` (nothing to select), else the config's ``grid(method)``."""
        if self.hparams == "official" and method == "rlrr":
            o = official_task(task)
            return [{"lr": o.lr, "weight_decay": o.weight_decay}]
        return self.grid(method)

    def grid_searches(self, runs: int, ablations: bool = False) -> int:
        """Grid searches per task of ``runs`` runs, as :func:`vitadapt.experiments.rlrr._run` makes them: 30's runs
        are ``methods``, each searching its grid but RLRR under ``hparams='official'`` (its fixed point); 31's
        (``ablations``) are RLRR variants, one shared search per task (``ablation_grid='shared'``), one each, or
        none under ``hparams='official'``. A one-point grid is scored on val only where nothing else fixes it."""
        n_grid = len(self.lr_multipliers) * len(self.weight_decays)
        shared, fixed = ablations and self.ablation_grid == "shared", self.hparams == "official"
        searched = n_grid > 1 or not (shared or fixed)
        if ablations:
            return 0 if fixed or not searched else 1 if shared else runs
        return sum(searched and not (fixed and m == "rlrr") for m in self.methods)

    def task_augment(self, task: str) -> bool | str:
        """The fine-tune's ``augment`` on ``task``: under ``hparams='official'`` "flip" where the official code
        flips (its ``simple_aug``), else nothing; otherwise the config's ``augment``."""
        if self.hparams == "official":
            return "flip" if official_task(task).flip else False
        return self.augment

    def recipe_model(self, model: nn.Module, task: str, depth: int) -> nn.Module:
        """``model`` (a fresh copy with its new head) with the recipe's branch dropout (``dropout``, or the task's
        official rate; a model without blocks, a bare head, has none) and head initialisation."""
        rate = official_task(task).dropout if self.hparams == "official" else self.dropout
        if hasattr(model, "blocks") and (rate or self.hparams == "official"):
            set_branch_dropout(model, rate, depth=depth)
        return zero_head(model) if self.head_init == "zero" else model
