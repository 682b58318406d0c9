"""Continued self-supervised pre-training with the source model's own objective (ExPLoRA's extended pre-training):
the objective around a student whose trainable set is already chosen, its augmentation, and what is kept after.

- DinoV2: DINO + iBOT + KoLeo with an EMA teacher (:mod:`vitadapt.ssl.dinov2`), multi-crop views; the teacher (or
  the student) is kept.
- MAE: masked reconstruction (:mod:`vitadapt.ssl.mae`); a pre-trained decoder (an official MAE checkpoint) gets LoRA,
  a fresh one trains in full, optionally warmed up alone first (its weights passed as ``decoder_state``).

The functions take a :class:`PretrainSettings` (the fields they read; an experiment's config inherits it) and, apart,
what an experiment config holds anyway (image size, workers).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from vitadapt.config import opt
from vitadapt.data import DataMissingError
from vitadapt.data.unlabelled import Unlabelled
from vitadapt.paths import resolve

DECODER_PREFIXES = ("decoder_embed.", "decoder.", "decoder_pred.")


@dataclass
class PretrainSettings:
    """What a continued pre-training reads: the objective, its optimisation and its views, as config fields (a
    mixin of an experiment's config; the functions below take such a config)."""

    objective: Literal["dinov2", "mae"] = opt("dinov2", "Self-supervised objective of the extended pre-training: the source model's own (dinov2 for DinoV2 weights, mae for MAE weights).")
    pretrain_steps: int = opt(10, "Extended pre-training steps per (variant, seed).", min=1)
    pretrain_batch_size: int = opt(8, "Images per pre-training step (DinoV2: each gives 2 global + n_local_crops local crops).", min=2, max=65536)
    pretrain_lr: float = opt(1e-3, "Peak AdamW learning rate of the extended pre-training (the same for every variant).", min=0.0, max=10.0)
    pretrain_weight_decay: float = opt(0.04, "AdamW weight decay of matrices (DinoV2: 0.04; MAE: 0).", min=0.0, max=1.0)
    pretrain_beta2: float = opt(0.0, "AdamW beta2; 0 = the objective's (DinoV2 0.999, MAE 0.95).", min=0.0, max=0.99999)
    pretrain_warmup: int = opt(1, "Linear warm-up steps, then cosine decay to 0.", min=0)
    grad_clip: float = opt(3.0, "Gradient-norm clipping (DinoV2: 3.0); 0 = none.", min=0.0)
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


def backbone_kwargs(s: PretrainSettings, arch_kwargs: dict) -> dict:
    """DinoV2's local crops need a ViT that takes other input sizes: ``dynamic_img_size=True`` (same outputs at the
    configured size, so the frozen-feature cache is shared)."""
    return {**arch_kwargs, "dynamic_img_size": True} if s.objective == "dinov2" else dict(arch_kwargs)


def starting_point(s: PretrainSettings, weights_used: str, arch: str) -> str:
    """One plain sentence on what the pre-training starts from, so an MAE run from DinoV2 weights is never mistaken
    for MAE-pretrained ExPLoRA."""
    used = str(weights_used)
    if s.objective == "dinov2":
        return (f"DinoV2 continued pre-training from {used} ({arch}); DINO/iBOT heads freshly initialised "
                f"(DinoV2 checkpoints have none, as in the paper)")
    kind = "a DinoV2 encoder" if "dinov2" in used or used == "auto" else "an encoder"   # auto: DinoV2 ViT-S/14
    enc = (f"the MAE encoder {used}" if used.startswith("mae_") else
           "a randomly initialised encoder (a smoke test of the code path, not of the method)" if used == "random" else
           f"{used}, {kind} that is NOT an MAE encoder (no MAE weights are available offline): this is MAE "
           f"continued pre-training of {kind}, not ExPLoRA on MAE weights")
    dec = (f"the pre-trained MAE decoder from {s.mae_decoder} with LoRA rank {s.decoder_lora_rank}" if s.mae_decoder
           else f"a freshly initialised decoder ({s.decoder_dim}-d, {s.decoder_depth} blocks) trained alone for "
                f"{s.decoder_warmup_steps} steps (encoder frozen), then in full with every variant")
    return f"MAE continued pre-training from {enc}; decoder: {dec}"


def augmentation(s: PretrainSettings, img_size: int):
    """DinoV2: multi-crop (2 global crops at ``img_size``, ``n_local_crops`` at ``local_size``); MAE: random resized
    crop (scale 0.2-1) + horizontal flip (MAE's pre-training transform); both ImageNet-normalised."""
    if s.objective == "dinov2":
        from vitadapt.ssl.dinov2 import DinoV2Augment
        return DinoV2Augment(global_size=img_size, local_size=s.local_size, n_local=s.n_local_crops,
                             global_scale=(s.global_scale_min, 1.0), local_scale=(0.05, s.local_scale_max))
    from torchvision import transforms as T

    from vitadapt.eval import IMAGENET_MEAN, IMAGENET_STD
    return T.Compose([T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC,
                                          antialias=True),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def loader(s: PretrainSettings, images: tuple, img_size: int, seed: int, num_workers: int = 0,
           pin_memory: bool = False, persistent_workers: bool = False) -> DataLoader:
    """Batches of ``pretrain_batch_size`` augmented views of ``images`` = (dataset, indices), labels dropped unread,
    shuffled with ``seed``; loader settings as :func:`vitadapt.eval.loader_options` reads them."""
    data = Unlabelled(*images, augmentation(s, img_size))
    if len(data) < s.pretrain_batch_size:
        raise ValueError(f"{len(data)} pre-training images but pretrain_batch_size={s.pretrain_batch_size}; lower the "
                         f"batch size or raise n_pretrain_images")
    from vitadapt.eval import loader_options
    return DataLoader(data, batch_size=s.pretrain_batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed),
                      **loader_options(num_workers, pin_memory, persistent_workers))


def optim(s: PretrainSettings) -> dict:
    """The AdamW settings of :func:`vitadapt.train.fit` (beta2: the objective's, DinoV2 0.999, MAE 0.95, unless set)."""
    return dict(weight_decay=s.pretrain_weight_decay, warmup=s.pretrain_warmup, grad_clip=s.grad_clip or None,
                betas=(0.9, s.pretrain_beta2 or (0.999 if s.objective == "dinov2" else 0.95)))


def decoder_path(mae_decoder: str):
    """The local official MAE checkpoint holding the decoder; DataMissingError naming it when it is not there."""
    path = resolve(mae_decoder)
    if not path.is_file():
        raise DataMissingError(f"mae_decoder={mae_decoder!r} not found ({path}); get the official MAE "
                               f"checkpoint with its decoder with `make data DATASET=mae_decoder`, or set mae_decoder=''")
    return path


def build_objective(s: PretrainSettings, student: nn.Module, seed: int, steps: int | None = None,
                    decoder_state: dict | None = None):
    """The objective around ``student`` (its trainable set already chosen), for ``steps`` (default
    ``pretrain_steps``); returns ``(objective, loss_fn, on_step)`` for :func:`vitadapt.train.fit`. MAE:
    ``decoder_state`` (decoder weights in the objective's names) wins over ``mae_decoder``; a warmed-up decoder
    trains in full, a checkpoint decoder gets LoRA of rank ``decoder_lora_rank``."""
    if s.objective == "dinov2":
        from vitadapt.ssl.dinov2 import DinoV2Objective, dinov2_loss_fn
        obj = DinoV2Objective(student, total_steps=steps or s.pretrain_steps, n_prototypes=s.n_prototypes,
                              hidden_dim=s.head_hidden_dim, bottleneck_dim=s.head_bottleneck_dim,
                              momentum=s.teacher_momentum, teacher_temp_warmup_steps=s.teacher_temp_warmup_steps,
                              centering=s.centering, seed=seed)
        return (obj, *dinov2_loss_fn(obj))
    from vitadapt.ssl.mae import MAEObjective, mae_decoder_state_dict, mae_loss_fn
    ckpt = None
    if decoder_state is None and s.mae_decoder:
        ckpt = mae_decoder_state_dict(torch.load(decoder_path(s.mae_decoder), map_location="cpu", weights_only=False))
    obj = MAEObjective(student, mask_ratio=s.mask_ratio, decoder_dim=s.decoder_dim, decoder_depth=s.decoder_depth,
                       decoder_heads=s.decoder_heads, decoder_state_dict=decoder_state if decoder_state is not None
                       else ckpt, decoder_lora_rank=s.decoder_lora_rank if ckpt is not None else 0, seed=seed)
    return obj, mae_loss_fn(obj), None


def warm_decoder(s: PretrainSettings, base_model: nn.Module, images: tuple, img_size: int, seed: int, fabric,
                 num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False) -> dict | None:
    """MAE without decoder weights: a fresh decoder trained alone (the encoder, a copy of ``base_model``, frozen) for
    ``decoder_warmup_steps`` on ``images``; returns its weights, to be shared by every variant of the seed. ``None``
    when there is nothing to warm (DinoV2, a checkpoint, or 0 steps)."""
    if s.objective != "mae" or s.mae_decoder or s.decoder_warmup_steps == 0:
        return None
    import copy

    from vitadapt.peft.common import freeze
    from vitadapt.train import fit, seed_everything
    seed_everything(seed)
    obj, loss_fn, _ = build_objective(s, freeze(copy.deepcopy(base_model)), seed, s.decoder_warmup_steps)
    fit(fabric, obj, loss_fn, loader(s, images, img_size, 30_000 + seed, num_workers, pin_memory, persistent_workers),
        steps=s.decoder_warmup_steps, lr=s.decoder_warmup_lr or s.pretrain_lr, **optim(s))
    return {k: v.detach().clone() for k, v in obj.state_dict().items() if k.startswith(DECODER_PREFIXES)}


def objective_trainable(s: PretrainSettings, student: nn.Module) -> int:
    """Parameters the objective adds that train (DinoV2: DINO/iBOT heads + mask token; MAE: the decoder, or its LoRA
    when a pre-trained decoder is configured), counted on the meta device (``student`` built there too)."""
    from vitadapt.peft.common import count_trainable
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if s.objective == "mae":
            from vitadapt.ssl.mae import MAEObjective
            obj = MAEObjective(student, mask_ratio=s.mask_ratio, decoder_dim=s.decoder_dim,
                               decoder_depth=s.decoder_depth, decoder_heads=s.decoder_heads,
                               decoder_lora_rank=s.decoder_lora_rank if s.mae_decoder else 0)
        else:
            obj = build_objective(s, student, 0, 1)[0]
    return count_trainable(obj) - count_trainable(student)


def kept_backbone(objective: nn.Module, s: PretrainSettings) -> nn.Module:
    """The backbone kept after pre-training (DinoV2: the EMA teacher or the student, ``eval_weights``; MAE: the
    encoder), LoRA merged and qkv fused: a plain timm ViT on the CPU, every parameter trainable again, in eval mode."""
    from vitadapt.peft.explora import merge_explora
    from vitadapt.peft.lora import has_lora
    objective.eval()
    kept = objective.encoder if s.objective == "mae" else \
        objective.teacher if s.eval_weights == "teacher" else objective.student
    if getattr(kept, "explora_config", None) is not None or has_lora(kept):
        merge_explora(kept)
    return kept.requires_grad_(True).cpu().eval()
