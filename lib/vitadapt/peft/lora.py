"""LoRA on timm ViTs through peft, on the split Q/K/V, attention-out and MLP Linears.

LoRA (Hu et al. 2021): a frozen Linear ``W`` becomes ``W + (alpha / r) * B A`` with ``A`` (r x in,
Kaiming-uniform) and ``B`` (out x r, zeros) trainable, so the adapted model equals the source model at init.
The layers are peft's (``LoraConfig`` + ``inject_adapter_in_model`` on the plain timm module: the model keeps
its class and methods); here is only the ViT-specific part: which Linears (``targets`` by short name, Q/K/V
after :func:`vitadapt.peft.qkv.split_qkv`), which blocks, the trainable set, and merging back into plain
weights (then fusing qkv, so the result is a plain timm model).

:func:`inject_lora` is the one place in the package that builds a peft ``LoraConfig`` and injects it: every
LoRA (:func:`apply_lora`, ExPLoRA, the ``lora`` baseline on the fused qkv, UpStep, the MAE decoder) goes
through it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from vitadapt.peft.common import count_trainable, freeze
from vitadapt.peft.qkv import fuse_qkv, split_qkv

__all__ = ["LORA_TARGETS", "apply_lora", "merge_lora", "has_lora", "lora_target_names", "inject_lora"]

#: short target name -> module path inside a timm ``Block`` (after ``split_qkv``)
LORA_TARGETS: dict[str, str] = {
    "q": "attn.qkv.q",
    "k": "attn.qkv.k",
    "v": "attn.qkv.v",
    "proj": "attn.proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}
_MLP_TARGETS = ("fc1", "fc2")


# ----------------------------------------------------------------------------------------------- validation
def _check_targets(targets: Sequence[str], allow_empty: bool = False) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad:
        raise ValueError(f"unknown LoRA target(s) {bad}; valid targets: {list(LORA_TARGETS)}")
    if not targets and not allow_empty:
        raise ValueError(f"targets is empty; choose among {list(LORA_TARGETS)}")
    return tuple(dict.fromkeys(targets))  # dedupe, keep order


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def _check_positive_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}={value!r} must be a positive number")


def _check_vit(model: nn.Module) -> int:
    """Number of blocks of a timm VisionTransformer-like model (``model.blocks``)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise ValueError(
            f"{type(model).__name__} has no `blocks` sequence; expected a timm VisionTransformer "
            "(e.g. timm.create_model('vit_small_patch14_dinov2'))"
        )
    if has_lora(model):
        raise ValueError("model already carries LoRA layers: merge them (merge_lora / merge_explora) first")
    return len(blocks)


# ----------------------------------------------------------------------------------------------- helpers
def has_lora(model: nn.Module) -> bool:
    """True if any peft tuner layer is present."""
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def lora_target_names(model: nn.Module, targets: Sequence[str], blocks: Sequence[int] | None = None) -> list[str]:
    """Full module names ``blocks.{i}.{path}`` for the short ``targets`` in ``blocks`` (default: all).

    The model must already be split (:func:`split_qkv`) if q/k/v are named. Raises ValueError if a named
    module is missing or is not an ``nn.Linear`` (e.g. a SwiGLU MLP has no ``fc1``).
    """
    targets = _check_targets(targets, allow_empty=True)
    n = len(model.blocks)
    blocks = range(n) if blocks is None else blocks
    names = []
    for i in blocks:
        for t in targets:
            name = f"blocks.{i}.{LORA_TARGETS[t]}"
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                mod = None
            if not isinstance(mod, nn.Linear):
                raise ValueError(
                    f"target {t!r} -> {name} is {type(mod).__name__ if mod is not None else 'missing'}, "
                    "not an nn.Linear (for q/k/v call split_qkv first)"
                )
            names.append(name)
    return names


def inject_lora(
    model: nn.Module,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> nn.Module:
    """Wrap the ``nn.Linear`` modules ``targets`` of ``model`` with peft LoRA layers, in place; returns ``model``.

    ``targets`` are matched as peft does: a module whose full name equals a target or ends with ``"." + target``
    (``"qkv"`` hits every ``*.qkv``; ``"blocks.0.attn.qkv"`` that one). Each gets ``A`` (rank x in,
    Kaiming-uniform, drawn from the torch RNG in module order) and ``B`` (out x rank, zeros): the model is
    unchanged at init; scaling ``alpha / rank``. ``rank_pattern`` / ``alpha_pattern`` override rank / alpha for
    the modules their (regex) keys match. peft leaves only the LoRA matrices with ``requires_grad``; the caller
    then sets its own trainable set. Raises ValueError (peft's) when no module matches.
    """
    if isinstance(targets, str):
        targets = (targets,)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        bias="none",
        init_lora_weights=True,  # A Kaiming-uniform, B = 0: identity at init
    )
    return inject_adapter_in_model(config, model)


def _inject(
    model: nn.Module,
    names: list[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    mlp_rank: int | None = None,
    mlp_alpha: float | None = None,
) -> nn.Module:
    """Wrap exactly the Linears ``names`` with peft LoRA (rank / alpha per layer, MLP overrides)."""
    rank_pattern, alpha_pattern = {}, {}
    present = [t for t in _MLP_TARGETS if any(n.endswith("." + LORA_TARGETS[t]) for n in names)]
    for t in present:  # only targeted ones (peft warns about patterns that match nothing)
        key = re.escape(LORA_TARGETS[t])  # peft matches keys as r"(.*\.)?(key)$"
        if mlp_rank is not None:
            rank_pattern[key] = mlp_rank
        if mlp_alpha is not None:
            alpha_pattern[key] = mlp_alpha
    # exact full names: peft matches `key == name or key.endswith("." + name)`
    return inject_lora(model, names, rank, alpha, dropout, rank_pattern, alpha_pattern)


def _lora_params(model: nn.Module):
    for n, p in model.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            yield n, p


# ----------------------------------------------------------------------------------------------- public API
def apply_lora(
    model: nn.Module,
    rank: int = 8,
    targets: Sequence[str] = ("q", "v"),
    alpha: float | None = None,
    dropout: float = 0.0,
    train_head: bool = True,
) -> nn.Module:
    """LoRA on ``targets`` of every block of a timm ViT, in place; everything else frozen.

    ``W' = W + (alpha / rank) B A`` on each targeted Linear (``alpha=None`` means ``alpha = rank``, scaling 1).
    Trainable: the LoRA ``A`` and ``B`` of each targeted Linear, plus the classifier head when ``train_head``
    and the model has a non-Identity head. Q/K/V targets split the fused qkv first (:func:`split_qkv`).
    Trainable count: ``rank * (in + out)`` per targeted Linear (ViT-L, r=8, Q,V of 24 blocks: 786,432).
    The settings are stored as ``model.lora_config`` (a dict). Returns ``model``.
    """
    targets = _check_targets(targets)
    _check_positive_int("rank", rank)
    if alpha is not None:
        _check_positive_float("alpha", alpha)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} must be a number in [0, 1)")
    _check_vit(model)

    if any(t in ("q", "k", "v") for t in targets):
        split_qkv(model)
    names = lora_target_names(model, targets)
    _inject(model, names, rank, float(rank if alpha is None else alpha), float(dropout))
    freeze(model)
    for _, p in _lora_params(model):
        p.requires_grad_(True)
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    head_trains = bool(train_head and isinstance(head, nn.Module) and not isinstance(head, nn.Identity))
    if head_trains:
        for p in head.parameters():
            p.requires_grad_(True)
    model.lora_config = {
        "rank": rank,
        "targets": list(targets),
        "alpha": float(rank if alpha is None else alpha),
        "scaling": float(rank if alpha is None else alpha) / rank,
        "dropout": float(dropout),
        "train_head": head_trains,
        "lora_modules": names,
        "trainable": count_trainable(model),
    }
    return model


def merge_lora(model: nn.Module, fuse: bool = True) -> nn.Module:
    """Merge every peft LoRA layer into its Linear (``W <- W + scaling * B A``) and remove the adapters.

    In place. With ``fuse`` (default) split qkv projections are fused back (:func:`fuse_qkv`), so a timm
    model comes back with the state-dict keys of an untouched one. All parameters get ``requires_grad=True``
    again (as a freshly created timm model); ``lora_config`` / ``peft_config`` attributes are removed.
    Returns ``model``.
    """
    tuner_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    # outermost tuner layers only (peft layers hold their base layer as a child)
    top = [(n, m) for n, m in tuner_layers if not any(n.startswith(o + ".") for o, _ in tuner_layers if o != n)]
    for name, layer in top:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    if fuse:
        fuse_qkv(model)
    for attr in ("lora_config", "peft_config"):
        if attr in model.__dict__:
            delattr(model, attr)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
