"""DINOv2's optimisation recipe around a :class:`vitadapt.ssl.dinov2.DinoV2Objective`, as small pure functions for the
hooks of :func:`vitadapt.train.fit` (ExPLoRA's extended pre-training runs DINOv2's own training loop).

What the official code does (facebookresearch/dinov2: ``dinov2/utils/param_groups.py``, ``dinov2/train/train.py``,
``dinov2/train/ssl_meta_arch.py``), and what each function here reproduces:

- optimizer groups per student submodule (backbone, DINO head, iBOT head): a backbone parameter of block ``i``
  (0-based) has layer id ``i + 1``; ``cls_token``, ``pos_embed``, ``patch_embed``, ``mask_token`` (and register
  tokens) layer id 0; anything else in the backbone (the final norm) ``L + 1``; its LR multiplier is
  ``layer_decay ** (L + 1 - layer_id)``, times ``patch_embed_lr_mult`` for the patch embedding. The heads have no
  blocks, so their multiplier is 1 (the last layer's rate). Weight decay multiplier 0 for names ending ``.bias`` or
  containing ``norm`` or ``gamma`` (LayerScale), else 1 (:func:`dinov2_param_groups`);
- the learning rate: linear warm-up from 0, then cosine to ``min_lr`` (:func:`dinov2_lr`); the weight decay: cosine
  from ``weight_decay`` to ``weight_decay_end`` over the whole run (:func:`cosine_value`);
- the prototype (last) layer of the heads gets LR 0 for the first ``freeze_last_layer_epochs`` (here: its gradients
  are dropped for ``freeze_last_layer_steps`` optimizer steps, :func:`drop_last_layer_grads`);
- gradient clipping: each student submodule clipped to the norm on its own (:func:`clip_per_module`).
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch
from torch import nn

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_LAYER0 = ("pos_embed", "patch_embed", "mask_token", "cls_token", "reg_token", "register_tokens")


def layer_id(name: str, n_blocks: int) -> int:
    """DINOv2's layer id of backbone parameter ``name`` (``get_vit_lr_decay_rate``): 0 for the embeddings and tokens,
    ``i + 1`` for block ``i`` (LoRA names included: ``blocks.3.attn.q.lora_A...``), ``n_blocks + 1`` for the rest."""
    if any(k in name for k in _LAYER0):
        return 0
    m = _BLOCK.search(name)
    return int(m.group(1)) + 1 if m else n_blocks + 1


def lr_multiplier(name: str, n_blocks: int, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0) -> float:
    """The LR multiplier of backbone parameter ``name``: ``layer_decay ** (n_blocks + 1 - layer_id)``, times
    ``patch_embed_lr_mult`` for the patch embedding (DINOv2's ``get_params_groups_with_decay``)."""
    rate = layer_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
    return rate * patch_embed_lr_mult if "patch_embed" in name else rate


def wd_multiplier(name: str) -> float:
    """DINOv2's weight-decay multiplier: 0 for biases, norms and LayerScale (``gamma``), else 1."""
    return 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0


def dinov2_param_groups(objective: nn.Module, layer_decay: float = 1.0,
                        patch_embed_lr_mult: float = 1.0) -> Callable[[nn.Module], list[dict]]:
    """``param_groups`` for :func:`vitadapt.train.fit` over a ``DinoV2Objective``: every trainable parameter of the
    student backbone (with the objective's mask token, which DINOv2 keeps in the backbone: layer 0), the DINO head
    and the iBOT head, grouped by (LR multiplier, weight-decay multiplier) by DINOv2's rules (module docstring)."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay={layer_decay} must be in (0, 1] (1 = no layer-wise decay; DINOv2: 0.9)")
    if patch_embed_lr_mult < 0:
        raise ValueError(f"patch_embed_lr_mult={patch_embed_lr_mult} must be >= 0 (DINOv2: 0.2)")
    from vitadapt.ssl.dinov2 import find_vit
    n_blocks = len(find_vit(objective.student).blocks)

    def groups(_module: nn.Module) -> list[dict]:
        named = [(n, p, lr_multiplier(n, n_blocks, layer_decay, patch_embed_lr_mult))
                 for n, p in objective.student.named_parameters()]
        named.append(("mask_token", objective.mask_token, lr_multiplier("mask_token", n_blocks, layer_decay)))
        for head in (objective.dino_head, objective.ibot_head):
            if head is not None:
                named += [(n, p, 1.0) for n, p in head.named_parameters()]
        fused: dict[tuple[float, float], list] = {}
        for n, p, lr in named:
            if p.requires_grad:
                fused.setdefault((lr, wd_multiplier(n)), []).append(p)
        return [{"params": ps, "lr_scale": lr, "wd_scale": wd} for (lr, wd), ps in fused.items()]
    return groups


def cosine_value(step: int, total: int, start: float, end: float) -> float:
    """A value on a cosine from ``start`` (step 0) to ``end`` (step ``total``), DINOv2's ``CosineScheduler`` without
    warm-up (its weight decay 0.04 -> 0.4 and teacher momentum 0.992 -> 1)."""
    t = min(max(step, 0), total) / max(1, total)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


def dinov2_lr(total: int, warmup: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """``lr_schedule`` (multiplier of the peak LR) of DINOv2's ``CosineScheduler``: linear from 0 over ``warmup``
    steps (``step / warmup``), then a cosine from 1 to ``min_ratio`` over the remaining steps."""
    if warmup < 0 or warmup > total:
        raise ValueError(f"warmup={warmup} must be in [0, total={total}]")

    def schedule(step: int) -> float:
        if step < warmup:
            return step / warmup
        return cosine_value(step - warmup, total - warmup, 1.0, min_ratio)
    return schedule


def last_layers(objective: nn.Module) -> list[nn.Parameter]:
    """The prototype-layer parameters of the student heads (``last_layer.*``: DINOv2's ``is_last_layer`` group)."""
    return [p for head in (objective.dino_head, objective.ibot_head) if head is not None
            for n, p in head.named_parameters() if n.startswith("last_layer.") or ".last_layer." in n]


def drop_last_layer_grads(objective: nn.Module, step: int, freeze_steps: int) -> bool:
    """Inside the freeze window (``step < freeze_steps``) drop the gradients of the student heads' prototype layers,
    so AdamW leaves them untouched (DINOv2 sets their LR to 0 for ``freeze_last_layer_epochs``). True when dropped."""
    if step >= freeze_steps:
        return False
    for p in last_layers(objective):
        p.grad = None
    return True


def student_parts(objective: nn.Module) -> list[list[nn.Parameter]]:
    """The parameters of each student submodule as DINOv2 clips them: the backbone (with the mask token, which DINOv2
    keeps in the backbone), the DINO head, the iBOT head (when separate)."""
    parts = [[*objective.student.parameters(), objective.mask_token], list(objective.dino_head.parameters())]
    return parts + ([list(objective.ibot_head.parameters())] if objective.ibot_head is not None else [])


def clip_per_module(parts: list[list[nn.Parameter]], max_norm: float) -> list[float]:
    """Clip the gradients of each part (a list of parameters, e.g. :func:`student_parts`) to ``max_norm`` on its own
    (DINOv2 clips the student backbone, DINO head and iBOT head separately); returns each part's norm before clipping
    (a non-finite norm is returned, not raised: the caller decides)."""
    if max_norm <= 0:
        raise ValueError(f"max_norm={max_norm} must be > 0")
    norms = []
    for params in parts:
        params = [p for p in params if p.grad is not None]
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0)
    return norms
