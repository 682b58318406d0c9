"""Baseline adaptation methods as a registry of small builders: ``BASELINES[name](model, **kw) -> model``.

Every builder adapts a timm ViT in place, sets ``requires_grad`` exactly (the method's parameters plus
the classifier head, when the head is not Identity) and returns the model.

=============  ===============================================================  ======================
name           what trains                                                      ViT-B/16, no head
=============  ===============================================================  ======================
linear         the head only                                                    0
full           everything                                                       85,798,656
bitfit         every bias (Zaken et al. 2022)                                   102,912
lora           LoRA r=8, alpha=r on the fused qkv (peft)                        294,912
ia3            IA3 on qkv (output) and fc2 (input, feed-forward) (peft)         64,512
ln_tuning      a trainable copy of every block/final LayerNorm (peft)           38,400
ssf            SSF after patch embed, LayerNorms, qkv/proj/fc1/fc2              205,824
rlrr           RLRR + SSF (official setting)                                    288,768
=============  ===============================================================  ======================

The peft tuners are injected with ``peft.inject_adapter_in_model`` on the plain timm module (no
PeftModel wrapper; LoRA through :func:`vitadapt.peft.lora.inject_lora`), so the model keeps its timm
interface. Merging: :func:`vitadapt.peft.rlrr.merge_rlrr` for rlrr/ssf; the peft layers have their own
``merge()``.
"""

from __future__ import annotations

import re
import warnings
from typing import Callable, Sequence

from torch import nn

from vitadapt.peft.common import freeze
from vitadapt.peft.rlrr import _head_params, _norm_targets, apply_rlrr, apply_ssf


def _train_head(model: nn.Module, train_head: bool) -> nn.Module:
    if train_head:
        for p in _head_params(model):
            p.requires_grad_(True)
    return model


def _only(model: nn.Module, marker: str, train_head: bool) -> nn.Module:
    freeze(model)
    n = 0
    for name, p in model.named_parameters():
        if marker in name:
            p.requires_grad_(True)
            n += 1
    if n == 0:
        raise RuntimeError(f"no parameter named *{marker}* after injection: the peft tuner matched nothing")
    return _train_head(model, train_head)


def linear(model: nn.Module, train_head: bool = True) -> nn.Module:
    """Linear probe: frozen backbone, only the head trains."""
    return _train_head(freeze(model), train_head)


def full(model: nn.Module) -> nn.Module:
    """Full fine-tuning: every parameter trains."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def bitfit(model: nn.Module, train_head: bool = True) -> nn.Module:
    """BitFit: only the bias terms (and the head) train."""
    freeze(model)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.requires_grad_(True)
    return _train_head(model, train_head)


def lora(model: nn.Module, r: int = 8, alpha: float | None = None, target_modules: Sequence[str] = ("qkv",),
         dropout: float = 0.0, train_head: bool = True) -> nn.Module:
    """LoRA (peft): ``W x + (alpha / r) B A x`` on each target Linear, ``A`` (r x in), ``B`` (out x r) = 0.

    Default: r = 8, alpha = r, the fused qkv Linear only (one A/B pair for q, k and v together). Injected by
    :func:`vitadapt.peft.lora.inject_lora` (``target_modules`` matched by name suffix, as peft does).
    """
    from vitadapt.peft.lora import inject_lora

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r={r!r} is not valid; choose an integer >= 1")
    inject_lora(model, target_modules, r, r if alpha is None else alpha, dropout)
    return _only(model, "lora_", train_head)


def ia3(model: nn.Module, target_modules: Sequence[str] = ("qkv", "fc2"),
        feedforward_modules: Sequence[str] = ("fc2",), train_head: bool = True) -> nn.Module:
    """IA3 (peft): learned vectors rescale the qkv outputs and the fc2 inputs (feed-forward), init 1."""
    from peft import IA3Config, inject_adapter_in_model

    cfg = IA3Config(target_modules=list(target_modules), feedforward_modules=list(feedforward_modules))
    inject_adapter_in_model(cfg, model)
    return _only(model, "ia3_", train_head)


def ln_tuning(model: nn.Module, train_head: bool = True) -> nn.Module:
    """LN tuning (peft LNTuningConfig): a trainable copy of every LayerNorm outside attn/mlp (norm1,
    norm2, final norm) replaces it in the forward pass; the original stays frozen.

    The targets are passed as an exact regex of their full names: peft's plain name matching would also
    hit timm's Identity placeholders called ``norm`` (``attn.norm``, ``mlp.norm``, ``patch_embed.norm``).
    """
    from peft import LNTuningConfig, inject_adapter_in_model

    ids = {id(ln) for _, _, ln in _norm_targets(model)}
    names = [name for name, m in model.named_modules() if id(m) in ids]
    if not names:
        raise ValueError("ln_tuning: the model has no LayerNorm outside attn/mlp")
    with warnings.catch_warnings():  # peft warns about timm's LayerNorm subclass; it is handled as nn.LayerNorm
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        inject_adapter_in_model(LNTuningConfig(target_modules="|".join(map(re.escape, names))), model)
    return _only(model, "ln_tuning_layers", train_head)


def ssf(model: nn.Module, **kw) -> nn.Module:
    """SSF baseline: :func:`vitadapt.peft.rlrr.apply_ssf`."""
    return apply_ssf(model, **kw)


def rlrr(model: nn.Module, **kw) -> nn.Module:
    """RLRR: :func:`vitadapt.peft.rlrr.apply_rlrr` (official defaults)."""
    return apply_rlrr(model, **kw)


BASELINES: dict[str, Callable[..., nn.Module]] = {
    "linear": linear,
    "full": full,
    "bitfit": bitfit,
    "lora": lora,
    "ia3": ia3,
    "ln_tuning": ln_tuning,
    "ssf": ssf,
    "rlrr": rlrr,
}


def build(name: str, model: nn.Module, **kw) -> nn.Module:
    """``BASELINES[name](model, **kw)``; an unknown name raises ValueError naming the valid ones."""
    if name not in BASELINES:
        raise ValueError(f"baseline {name!r} is not valid; choose one of {', '.join(map(repr, BASELINES))}")
    return BASELINES[name](model, **kw)
