"""Trainable parameters counted on ViTs built on the ``meta`` device: shapes only, no weights and no memory, so a
ViT-H count takes a second and nothing is downloaded."""

from __future__ import annotations

from typing import Callable

from torch import nn

from vitadapt.peft.common import count_total, count_trainable


def trainable(arch: str, adapt: Callable[[nn.Module], object], img_size: int | None = None,
              arch_kwargs: dict | None = None, tail_blocks: int = 0) -> tuple[int, int]:
    """``(trainable, total)`` parameters of ``arch`` (no head) after ``adapt(model)``; with ``tail_blocks`` only the
    last blocks, the final norm and the head are adapted (:class:`vitadapt.vit.TailViT`)."""
    from vitadapt.vit import TailViT, meta_vit
    model = meta_vit(arch, img_size, **(arch_kwargs or {}))
    if tail_blocks:
        model = TailViT(model, len(model.blocks) - tail_blocks)
    adapt(model)
    return count_trainable(model), count_total(model)
