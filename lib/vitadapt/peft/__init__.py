"""Parameter-efficient adaptation of timm ViTs: qkv splitting, LoRA (peft), ExPLoRA trainable sets,
RLRR + SSF, counting and merging. One module per method (peft style); the public names are here::

    from vitadapt.peft import apply_explora, merge_explora, count_trainable
    apply_explora(vit, unfreeze_blocks=(-1,), rank=64)   # in place; ... train ...
    merge_explora(vit)                                   # a plain timm ViT again

Every ``apply_*`` adapts a timm ViT in place, sets ``requires_grad`` exactly and returns it; the matching
``merge_*`` folds the adapters into plain weights, so the state dict is an untouched timm model's again.

The names are loaded on first use (PEP 562): ``import vitadapt.peft`` (or ``vitadapt.peft.common``) does not
import timm or the peft library. Submodules import each other by their full path (``vitadapt.peft.lora``),
never through this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from vitadapt.peft.common import count_total, count_trainable, freeze, trainable_names

#: public name -> submodule of vitadapt.peft that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "split_qkv": "qkv", "fuse_qkv": "qkv", "SplitQKV": "qkv",
    "apply_lora": "lora", "merge_lora": "lora", "has_lora": "lora", "inject_lora": "lora", "LORA_TARGETS": "lora",
    "apply_explora": "explora", "merge_explora": "explora",
    "apply_rlrr": "rlrr", "merge_rlrr": "rlrr", "apply_ssf": "rlrr", "merge_ssf": "rlrr",
}

__all__ = ["count_trainable", "count_total", "freeze", "trainable_names", *_LAZY]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from vitadapt.peft.explora import apply_explora, merge_explora
    from vitadapt.peft.lora import LORA_TARGETS, apply_lora, has_lora, inject_lora, merge_lora
    from vitadapt.peft.qkv import SplitQKV, fuse_qkv, split_qkv
    from vitadapt.peft.rlrr import apply_rlrr, apply_ssf, merge_rlrr, merge_ssf


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value   # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
