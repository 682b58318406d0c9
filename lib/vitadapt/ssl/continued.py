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

import functools
import math
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
    # DINOv2's optimisation recipe (vitadapt.ssl.recipe); the defaults keep the plain loop
    pretrain_min_lr: float = opt(0.0, "Learning rate at the end of the cosine (DINOv2: 1e-6); with layer_decay < 1 the schedule is DINOv2's (warm-up from 0).", min=0.0, max=10.0)
    pretrain_weight_decay_end: float = opt(0.0, "Weight decay at the last step, cosine from pretrain_weight_decay (DINOv2: 0.04 -> 0.4); 0 or equal = constant.", min=0.0, max=1.0)
    layer_decay: float = opt(1.0, "DinoV2: layer-wise LR decay, block i gets layer_decay ** (L - i) (DINOv2: 0.9); 1 = none; below 1 (or with patch_embed_lr_mult) DINOv2's groups: no weight decay on biases, norms, LayerScale.", min=0.01, max=1.0)
    patch_embed_lr_mult: float = opt(1.0, "DinoV2: LR multiplier of the patch embedding on top of layer_decay (DINOv2: 0.2).", min=0.0, max=10.0)
    freeze_last_layer_steps: int = opt(0, "DinoV2: optimizer steps during which the heads' prototype (last) layer does not move (DINOv2: freeze_last_layer_epochs).", min=0)
    mask_token: Literal["trainable", "frozen"] = opt("trainable", "DinoV2: the iBOT mask token trains (new, zeros) or stays frozen (ExPLoRA: the checkpoint's, frozen; loaded when weights is a local .pth holding mask_token, else zeros).")
    pretrain_drop_path: float = opt(0.0, "DinoV2: student drop-path rate during the extended pre-training, the same in every block (DINOv2: 0.3, drop_path_uniform); the teacher runs without.", min=0.0, max=0.9)
    pretrain_accumulate: int = opt(0, "Batches per optimizer step of the extended pre-training only (official DinoV2 run: accum_iter 32); 0 = the run's accumulate_grad_batches. The fine-tune and probes do not accumulate with it.", min=0, max=4096)
    grad_clip_mode: Literal["global", "per_module"] = opt("global", "DinoV2: one norm over every trainable parameter, or each student part (backbone, DINO head, iBOT head) clipped to grad_clip on its own (DINOv2).")
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
    koleo_weight: float = opt(0.1, "DinoV2: weight of the KoLeo regulariser that spreads the CLS features (DINOv2: 0.1); 0 = none (which part of the loss drives an effect).", min=0.0, max=100.0)
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
        src = mask_token_source(getattr(s, "weights", ""))
        tok = (f"the checkpoint's mask token ({src})" if src is not None else
               "a new mask token (zeros: the weights carry none, timm drops DINOv2's)")
        return (f"DinoV2 continued pre-training from {used} ({arch}); DINO/iBOT heads freshly initialised "
                f"(DinoV2 checkpoints have none, as in the paper); {tok}, {s.mask_token}")
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


def fit_hooks(s: PretrainSettings, objective: nn.Module, steps: int | None = None) -> dict:
    """Everything :func:`vitadapt.train.fit` takes besides the data for this objective: :func:`optim`, the
    weight-decay schedule and minimum LR and, for DinoV2, DINOv2's recipe (:mod:`vitadapt.ssl.recipe`): layer-wise LR
    groups, the prototype layer frozen for ``freeze_last_layer_steps``, per-module clipping. A non-finite per-module
    gradient norm raises :class:`vitadapt.train.Diverged`."""
    from vitadapt.ssl import recipe
    from vitadapt.train import Diverged
    steps = steps or s.pretrain_steps
    kw = {**optim(s), **({"accumulate": s.pretrain_accumulate} if s.pretrain_accumulate else {})}
    if s.pretrain_weight_decay_end and s.pretrain_weight_decay_end != s.pretrain_weight_decay:
        kw["wd_schedule"] = lambda step: recipe.cosine_value(step, steps, s.pretrain_weight_decay,
                                                             s.pretrain_weight_decay_end)
    ratio = s.pretrain_min_lr / s.pretrain_lr if s.pretrain_lr else 0.0
    if s.objective != "dinov2":
        return {**kw, "min_lr_ratio": ratio}
    if s.layer_decay != 1.0 or s.patch_embed_lr_mult != 1.0:
        kw["param_groups"] = recipe.dinov2_param_groups(objective, s.layer_decay, s.patch_embed_lr_mult)
        kw["lr_schedule"] = recipe.dinov2_lr(steps, min(s.pretrain_warmup, steps), ratio)
    else:
        kw["min_lr_ratio"] = ratio
    per_module = s.grad_clip_mode == "per_module" and s.grad_clip > 0
    if per_module and getattr(s, "precision", "") == "16-mixed":
        raise ValueError("grad_clip_mode='per_module' clips the gradients as they are, and 16-mixed scales them; valid: "
                         "precision 32-true, bf16-mixed or bf16-true, or grad_clip_mode='global'")
    if per_module:
        kw["grad_clip"] = None
    if not per_module and not s.freeze_last_layer_steps:
        return kw
    lr_at = kw.get("lr_schedule") or (lambda step: 1.0)

    def before_step(step: int, _module) -> None:
        recipe.drop_last_layer_grads(objective, step, s.freeze_last_layer_steps)
        if per_module:
            norms = recipe.clip_per_module(recipe.student_parts(objective), s.grad_clip)
            if not all(map(math.isfinite, norms)):
                raise Diverged(f"non-finite gradient norm per module ({norms})", step, s.pretrain_lr * lr_at(step),
                               s.pretrain_lr)
    return {**kw, "before_step": before_step}


def mask_token_source(weights: str) -> str | None:
    """The local checkpoint ``weights`` names when it is a file holding DINOv2's ``mask_token`` (the official
    DINOv2 .pth has one; timm's conversion drops it), else None."""
    return str(resolve(weights)) if _mask_token(str(weights)) is not None else None


@functools.lru_cache(maxsize=2)
def _mask_token(weights: str) -> torch.Tensor | None:
    path = resolve(weights) if weights else None
    if path is None or path.suffix not in (".pth", ".pt") or not path.is_file():
        return None
    sd = torch.load(path, map_location="cpu", weights_only=False)
    sd = sd.get("model", sd) if isinstance(sd, dict) else {}
    tok = sd.get("mask_token") if isinstance(sd, dict) else None
    return tok.detach().float().flatten() if torch.is_tensor(tok) else None


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
        from vitadapt.ssl.dinov2 import DinoV2Objective, dinov2_loss_fn, find_vit
        from vitadapt.vit import set_drop_path
        on_meta = any(p.is_meta for p in student.parameters())
        if s.pretrain_drop_path:     # the teacher copies the modules, but runs in eval mode: no drop-path
            set_drop_path(find_vit(student), s.pretrain_drop_path, uniform=True)   # DINOv2: drop_path_uniform
        obj = DinoV2Objective(student, total_steps=steps or s.pretrain_steps, n_prototypes=s.n_prototypes,
                              hidden_dim=s.head_hidden_dim, bottleneck_dim=s.head_bottleneck_dim,
                              momentum=s.teacher_momentum, teacher_temp_warmup_steps=s.teacher_temp_warmup_steps,
                              centering=s.centering, koleo_weight=s.koleo_weight, seed=seed, train_mask_token=s.mask_token == "trainable",
                              mask_token_init=None if on_meta else _mask_token(str(getattr(s, "weights", ""))))
        return (obj, *dinov2_loss_fn(obj))
    from vitadapt.ssl.mae import MAEObjective, mae_decoder_state_dict, mae_loss_fn
    ckpt = None
    if decoder_state is None and s.mae_decoder:
        ckpt = mae_decoder_state_dict(torch.load(decoder_path(s.mae_decoder), map_location="cpu", weights_only=False))
    obj = MAEObjective(student, mask_ratio=s.mask_ratio, decoder_dim=s.decoder_dim, decoder_depth=s.decoder_depth,
                       decoder_heads=s.decoder_heads, decoder_state_dict=decoder_state if decoder_state is not None
                       else ckpt, decoder_lora_rank=s.decoder_lora_rank if ckpt is not None else 0, seed=seed)
    return obj, mae_loss_fn(obj), None


def decoder_warmup_needed(s: PretrainSettings) -> bool:
    """Whether :func:`warm_decoder` trains anything: MAE without a decoder checkpoint and ``decoder_warmup_steps`` > 0."""
    return s.objective == "mae" and not s.mae_decoder and s.decoder_warmup_steps > 0


def warm_decoder(s: PretrainSettings, base_model: nn.Module, images: tuple, img_size: int, seed: int, fabric,
                 num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False) -> dict | None:
    """MAE without decoder weights: a fresh decoder trained alone (the encoder, a copy of ``base_model``, frozen) for
    ``decoder_warmup_steps`` on ``images``; returns its weights, to be shared by every variant of the seed. ``None``
    when there is nothing to warm (DinoV2, a checkpoint, or 0 steps)."""
    if not decoder_warmup_needed(s):
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
    if s.objective == "dinov2" and s.pretrain_drop_path:
        from vitadapt.ssl.dinov2 import find_vit
        from vitadapt.vit import set_drop_path
        set_drop_path(find_vit(kept), 0.0)      # the source model's (none): a fine-tune sets its own
    return kept.requires_grad_(True).cpu().eval()
