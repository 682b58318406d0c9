"""Continued self-supervised pre-training with the source model's own objective (ExPLoRA's extended pre-training):
the objective around a student whose trainable set is already chosen, its augmentation, and what is kept after.

- DinoV2: DINO + iBOT + KoLeo with an EMA teacher (:mod:`vitadapt.ssl.dinov2`), multi-crop views; the teacher (or
  the student) is kept.
- MAE: masked reconstruction (:mod:`vitadapt.ssl.mae`); a pre-trained decoder (an official MAE checkpoint) gets LoRA,
  a fresh one trains in full, optionally warmed up alone first (its weights passed as ``decoder_state``).

The functions take the settings they read by name (:data:`OBJECTIVE_FIELDS`, :data:`AUGMENT_FIELDS`), so a config
with those fields passes them as they are.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vitadapt.config import opt
from vitadapt.data import DataMissingError
from vitadapt.paths import resolve

OBJECTIVE_FIELDS = ("n_prototypes", "head_hidden_dim", "head_bottleneck_dim", "teacher_momentum",
                    "teacher_temp_warmup_steps", "centering", "mask_ratio", "decoder_dim", "decoder_depth",
                    "decoder_heads", "decoder_lora_rank", "mae_decoder")
AUGMENT_FIELDS = ("img_size", "local_size", "n_local_crops", "global_scale_min", "local_scale_max")
DECODER_PREFIXES = ("decoder_embed.", "decoder.", "decoder_pred.")


@dataclass
class ObjectiveSettings:
    """The objectives' settings, as config fields (a mixin of an experiment's config)."""

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


def augmentation(kind: str, img_size: int, local_size: int, n_local_crops: int, global_scale_min: float,
                 local_scale_max: float):
    """DinoV2: multi-crop (2 global crops at ``img_size``, ``n_local_crops`` at ``local_size``); MAE: random resized
    crop (scale 0.2-1) + horizontal flip (MAE's pre-training transform); both ImageNet-normalised."""
    if kind == "dinov2":
        from vitadapt.ssl.dinov2 import DinoV2Augment
        return DinoV2Augment(global_size=img_size, local_size=local_size, n_local=n_local_crops,
                             global_scale=(global_scale_min, 1.0), local_scale=(0.05, local_scale_max))
    from torchvision import transforms as T

    from vitadapt.eval import IMAGENET_MEAN, IMAGENET_STD
    return T.Compose([T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC,
                                          antialias=True),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def betas(kind: str, beta2: float = 0.0) -> tuple[float, float]:
    """AdamW betas: ``beta2`` when given, else the objective's (DinoV2 0.999, MAE 0.95)."""
    return 0.9, beta2 or (0.999 if kind == "dinov2" else 0.95)


def decoder_path(mae_decoder: str):
    """The local official MAE checkpoint holding the decoder; DataMissingError naming it when it is not there."""
    path = resolve(mae_decoder)
    if not path.is_file():
        raise DataMissingError(f"mae_decoder={mae_decoder!r} not found ({path}); download an official MAE "
                               f"checkpoint with its decoder (facebookresearch/mae) or set mae_decoder=''")
    return path


def build_objective(kind: str, student: nn.Module, seed: int, steps: int, decoder_state: dict | None = None, *,
                    n_prototypes, head_hidden_dim, head_bottleneck_dim, teacher_momentum, teacher_temp_warmup_steps,
                    centering, mask_ratio, decoder_dim, decoder_depth, decoder_heads, decoder_lora_rank,
                    mae_decoder: str = ""):
    """The objective around ``student``; returns ``(objective, loss_fn, on_step)`` for :func:`vitadapt.train.fit`.
    MAE: ``decoder_state`` (decoder weights in the objective's names) wins over ``mae_decoder``; a warmed-up decoder
    trains in full, a checkpoint decoder gets LoRA of rank ``decoder_lora_rank``."""
    if kind == "dinov2":
        from vitadapt.ssl.dinov2 import DinoV2Objective, dinov2_loss_fn
        obj = DinoV2Objective(student, total_steps=steps, n_prototypes=n_prototypes, hidden_dim=head_hidden_dim,
                              bottleneck_dim=head_bottleneck_dim, momentum=teacher_momentum,
                              teacher_temp_warmup_steps=teacher_temp_warmup_steps, centering=centering, seed=seed)
        return (obj, *dinov2_loss_fn(obj))
    from vitadapt.ssl.mae import MAEObjective, mae_decoder_state_dict, mae_loss_fn
    ckpt = None
    if decoder_state is None and mae_decoder:
        ckpt = mae_decoder_state_dict(torch.load(decoder_path(mae_decoder), map_location="cpu", weights_only=False))
    obj = MAEObjective(student, mask_ratio=mask_ratio, decoder_dim=decoder_dim, decoder_depth=decoder_depth,
                       decoder_heads=decoder_heads, decoder_state_dict=decoder_state if decoder_state is not None
                       else ckpt, decoder_lora_rank=decoder_lora_rank if ckpt is not None else 0, seed=seed)
    return obj, mae_loss_fn(obj), None


def objective_trainable(kind: str, student: nn.Module, **settings) -> int:
    """Parameters the objective adds that train (DinoV2: DINO/iBOT heads + mask token; MAE: the decoder, or its LoRA
    when a pre-trained decoder is configured), counted on the meta device (``student`` built there too)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "mae":
            from vitadapt.ssl.mae import MAEObjective
            s = settings
            obj = MAEObjective(student, mask_ratio=s["mask_ratio"], decoder_dim=s["decoder_dim"],
                               decoder_depth=s["decoder_depth"], decoder_heads=s["decoder_heads"],
                               decoder_lora_rank=s["decoder_lora_rank"] if s.get("mae_decoder") else 0)
        else:
            obj = build_objective(kind, student, 0, 1, **settings)[0]
    from vitadapt.peft.common import count_trainable
    return count_trainable(obj) - count_trainable(student)


def kept_backbone(objective: nn.Module, kind: str, eval_weights: str = "teacher") -> nn.Module:
    """The backbone kept after pre-training (DinoV2: the EMA teacher or the student; MAE: the encoder), LoRA merged
    and qkv fused: a plain timm ViT on the CPU, every parameter trainable again, in eval mode."""
    from vitadapt.peft.explora import merge_explora
    from vitadapt.peft.lora import has_lora
    objective.eval()
    kept = objective.encoder if kind == "mae" else objective.teacher if eval_weights == "teacher" else objective.student
    if getattr(kept, "explora_config", None) is not None or has_lora(kept):
        merge_explora(kept)
    return kept.requires_grad_(True).cpu().eval()


def decoder_weights(objective: nn.Module) -> dict:
    """The MAE decoder's weights (``decoder_embed.*``, ``decoder.*``, ``decoder_pred.*``), detached copies."""
    return {k: v.detach().clone() for k, v in objective.state_dict().items() if k.startswith(DECODER_PREFIXES)}
