"""ExPLoRA's trainable set for extended pre-training of a timm ViT (Khanna et al., arXiv 2406.10973).

Rule (official code, REFERENCE.md section 1), for a ViT with blocks ``1..L`` and unfrozen set ``U``:

- every parameter of the blocks in ``U`` trains (default: the last block);
- every other block gets LoRA, ``W' = W + (alpha / r) B A`` with ``alpha = 1`` (peft ``lora_alpha=alpha``),
  on the **Q and V** projections by default (the fused qkv is split first, so Q and V are adapted alone);
  ablations add K, the attention output ``proj``, or the MLP ``fc1``/``fc2`` (MLP rank ``r / 4``). LoRA always
  wraps the pre-trained Linear (the official code creates new random layers for proj/MLP: a bug we avoid);
- all LayerNorm weights and biases train (norm1, norm2 of every block, the final norm, fc_norm), and the CLS
  token (and register tokens where present);
- nothing else: not the patch embedding, the position embedding, the biases of the LoRA'd projections,
  the layer-scale of LoRA'd blocks, nor a classifier head.

ViT-L/14 DinoV2, ``U = [L]``, r = 64, Q,V: 12,598,272 (block 24) + 23 * 2 * 64 * 2048 (LoRA) + 23 * 4096 (norms)
+ 2048 (final norm) + 1024 (CLS) = 18,724,864 trainable parameters.

:func:`merge_explora` merges LoRA into the weights and fuses qkv back: a plain timm ViT again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vitadapt.peft.common import count_trainable, freeze
from vitadapt.peft.lora import (
    LORA_TARGETS,
    _check_positive_float,
    _check_positive_int,
    _check_targets,
    _check_vit,
    _inject,
    _lora_params,
    lora_target_names,
    merge_lora,
)
from vitadapt.peft.qkv import split_qkv

__all__ = ["apply_explora", "merge_explora", "normalize_block_indices", "parse_unfreeze", "unfreeze_label",
           "parse_targets", "targets_label"]

_TOKENS = ("cls_token", "reg_token")


def normalize_block_indices(indices: Sequence[int], depth: int) -> tuple[int, ...]:
    """Map block indices (negative ones count from the end) into ``0..depth-1``, sorted and deduplicated.

    Raises ValueError naming the bad value and the valid range ``[-depth, depth - 1]``.
    """
    if isinstance(indices, int):
        indices = (indices,)
    out = set()
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not -depth <= i < depth:
            raise ValueError(
                f"unfreeze block index {i!r} is out of range for a {depth}-block model; "
                f"valid indices: integers in [{-depth}, {depth - 1}]"
            )
        out.add(i % depth)
    return tuple(sorted(out))


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm)


def apply_explora(
    model: nn.Module,
    unfreeze_blocks: Sequence[int] = (-1,),
    rank: int = 64,
    targets: Sequence[str] = ("q", "v"),
    alpha: float = 1.0,
    train_norms: bool = True,
    train_cls: bool = True,
    mlp_rank: int | None = None,
    mlp_alpha: float | None = None,
) -> nn.Module:
    """Put ExPLoRA's trainable set on a timm VisionTransformer, in place (see the module docstring).

    Args:
        unfreeze_blocks: blocks trained fully (negative counts from the end; ``()`` for none).
        rank: LoRA rank ``r`` of the attention targets.
        targets: LoRA targets in the other blocks, among ``q, k, v, proj, fc1, fc2`` (``()``: no LoRA).
        alpha: LoRA alpha; scaling ``alpha / r`` (official code: ``alpha = 1``).
        train_norms: train every LayerNorm's weight and bias.
        train_cls: train the CLS token (and register tokens).
        mlp_rank: rank of ``fc1``/``fc2`` LoRA; ``None`` means ``max(1, rank // 4)`` (the paper's r/4).
        mlp_alpha: alpha of ``fc1``/``fc2`` LoRA; ``None`` means ``alpha`` (so MLP scaling is
            ``alpha / mlp_rank``; the paper does not state it: our interpretation).

    Exactly these parameters end with ``requires_grad=True``. The settings and a per-group count are stored
    as ``model.explora_config`` (a dict). Returns ``model``.
    """
    targets = _check_targets(targets, allow_empty=True)
    _check_positive_int("rank", rank)
    _check_positive_float("alpha", alpha)
    if mlp_rank is not None:
        _check_positive_int("mlp_rank", mlp_rank)
    if mlp_alpha is not None:
        _check_positive_float("mlp_alpha", mlp_alpha)
    depth = _check_vit(model)
    unfrozen = normalize_block_indices(unfreeze_blocks, depth)
    if getattr(model, "explora_config", None) is not None:
        raise ValueError("apply_explora was already applied to this model; merge_explora it first")
    mlp_r = max(1, rank // 4) if mlp_rank is None else mlp_rank

    split_qkv(model)
    lora_blocks = [i for i in range(depth) if i not in unfrozen]
    names = lora_target_names(model, targets, lora_blocks) if targets else []
    if names:
        _inject(model, names, rank, float(alpha), 0.0, mlp_rank=mlp_r, mlp_alpha=mlp_alpha)

    freeze(model)
    groups: dict[str, list[torch.nn.Parameter]] = {"lora": [], "unfrozen_blocks": [], "norms": [], "tokens": []}
    groups["lora"] = [p for _, p in _lora_params(model)]
    for i in unfrozen:
        groups["unfrozen_blocks"] += list(model.blocks[i].parameters())
    if train_norms:
        unfrozen_ids = {id(p) for p in groups["unfrozen_blocks"]}
        groups["norms"] = [
            p for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False) if id(p) not in unfrozen_ids
        ]
    if train_cls:
        groups["tokens"] = [getattr(model, t) for t in _TOKENS if isinstance(getattr(model, t, None), nn.Parameter)]
    for ps in groups.values():
        for p in ps:
            p.requires_grad_(True)

    model.explora_config = {
        "unfreeze_blocks": list(unfrozen),
        "lora_blocks": lora_blocks if names else [],
        "rank": rank,
        "targets": list(targets),
        "alpha": float(alpha),
        "scaling": float(alpha) / rank,
        "mlp_rank": mlp_r if any(t in ("fc1", "fc2") for t in targets) else None,
        "mlp_alpha": (float(alpha if mlp_alpha is None else mlp_alpha)
                      if any(t in ("fc1", "fc2") for t in targets) else None),
        "train_norms": train_norms,
        "train_cls": train_cls,
        "lora_modules": names,
        "counts": {k: sum(p.numel() for p in v) for k, v in groups.items()},
        "trainable": count_trainable(model),
    }
    return model


def merge_explora(model: nn.Module) -> nn.Module:
    """Merge the LoRA updates into the weights and fuse qkv back, in place.

    The result is a plain timm ViT (same function as the adapted model; its ``state_dict`` loads with
    ``strict=True`` into ``timm.create_model`` of the same architecture; all parameters ``requires_grad``
    again); ``explora_config`` is removed. Returns ``model``.
    """
    merge_lora(model, fuse=True)
    if "explora_config" in model.__dict__:
        del model.explora_config
    return model


# ---- specs: unfrozen blocks and LoRA targets in the paper's short notation (flat notebook parameters) ----------

#: short target-set names of the ablation ("mlp" stands for fc1 and fc2)
TARGET_ALIASES = {"mlp": ("fc1", "fc2")}


def _bare(spec: str) -> str:
    return spec.replace(" ", "").replace("[", "").replace("]", "")


def parse_unfreeze(spec, depth: int) -> tuple[int, ...]:
    """Block indices (0-based, sorted) of an unfrozen-block spec in the paper's 1-based notation: ``"none"``,
    ``"L"`` (last block), ``"1,L"``, ``"1,L-1,L"``, ``"L-2"``, or plain numbers ``"1,12"``; an int or a list of
    ints (0-based, negative from the end, as :func:`~vitadapt.peft.explora.apply_explora`) is also accepted."""
    spec = (spec,) if isinstance(spec, int) and not isinstance(spec, bool) else spec
    if isinstance(spec, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        return normalize_block_indices(tuple(spec), depth)
    if not isinstance(spec, str):
        raise ValueError(f"unfreeze spec {spec!r} must be a string such as 'none', 'L', '1,L', '1,L-1,L'")
    s, out = _bare(spec), set()
    for tok in [] if s.lower() in ("", "none", "-") else s.split(","):
        t = tok.upper()
        try:
            i = depth if t == "L" else depth - int(t[2:]) if t.startswith("L-") else int(t)
        except ValueError:
            raise ValueError(f"unfreeze spec {spec!r}: cannot read {tok!r}; valid: 'none', or comma-separated 1-based "
                             f"block numbers and L / L-k, e.g. 'L', '1,L', '1,L-1,L'") from None
        if not 1 <= i <= depth:
            raise ValueError(f"unfreeze spec {spec!r}: block {tok!r} = {i} is outside 1..{depth} for a {depth}-block model")
        out.add(i - 1)
    return tuple(sorted(out))


def unfreeze_label(spec, depth: int | None = None) -> str:
    """The paper's notation of a spec: ``[L]``, ``[1,L]``, ``none``."""
    if isinstance(spec, str):
        s = _bare(spec)
        return "none" if s.lower() in ("", "none", "-") else f"[{s}]"
    idx = parse_unfreeze(spec, depth) if depth else tuple(spec)
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
            out += [name] if name not in out else []
    return tuple(out)


def targets_label(spec) -> str:
    return ",".join(parse_targets(spec)).replace("fc1,fc2", "mlp") or "none"
