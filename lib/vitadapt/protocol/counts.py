"""Trainable parameters counted on ViTs built on the ``meta`` device: shapes only, no weights and no memory, so a
ViT-H count takes a second and nothing is downloaded."""

from __future__ import annotations

from typing import Callable

from torch import nn

from vitadapt import papers
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


def table(arch: str, adapts: dict, img_size: int | None = None, arch_kwargs: dict | None = None,
          tail_blocks: int = 0, index: str | list[str] = "method", column: str = "trainable"):
    """A DataFrame of the :func:`trainable` count (no head) of each ``{name: adapt}`` on ``arch``, indexed by
    ``index`` (a list of names when the keys are tuples, e.g. (ablation, variant))."""
    import pandas as pd
    names = [index] if isinstance(index, str) else list(index)
    return pd.DataFrame([{**dict(zip(names, k if isinstance(k, tuple) else (k,))),
                          column: trainable(arch, adapt, img_size, arch_kwargs, tail_blocks)[0]}
                         for k, adapt in adapts.items()]).set_index(index)


def explora_recipe(arch: str | None = None, check: bool = True, **changes) -> dict:
    """Trainable parameters of the published setting (:data:`vitadapt.papers.EXPLORA_RECIPE`, with ``changes``) on a
    ViT built on the meta device: ExPLoRA (U = [L], r = 64, Q,V + norms + CLS) and the LoRA-r8 fine-tune (Q,V of every
    block, without the head). With ``check`` and the recipe unchanged, asserts :data:`vitadapt.papers.EXACT_COUNTS`."""
    from vitadapt.peft.explora import apply_explora, parse_targets, parse_unfreeze, targets_label, unfreeze_label
    from vitadapt.peft.lora import apply_lora
    from vitadapt.vit import meta_vit
    r = {**papers.EXPLORA_RECIPE, **({"arch": arch} if arch else {}), **changes}
    m = meta_vit(r["arch"])
    total = count_total(m)
    apply_explora(m, unfreeze_blocks=parse_unfreeze(r["unfreeze"], len(m.blocks)), rank=r["rank"],
                  targets=parse_targets(r["targets"]))
    explora, groups = count_trainable(m), dict(m.explora_config["counts"])
    ft = count_trainable(apply_lora(meta_vit(r["arch"]), rank=r["ft_rank"], targets=parse_targets(r["ft_targets"]),
                                    train_head=False))
    if check and r == papers.EXPLORA_RECIPE:
        assert explora == papers.EXACT_COUNTS["explora_vitl14_L_r64_qv"], explora
        assert ft == papers.EXACT_COUNTS["finetune_lora_r8_qv_vitl14"], ft
    return {"arch": r["arch"], "unfreeze": unfreeze_label(r["unfreeze"]), "rank": r["rank"],
            "targets": targets_label(r["targets"]), "backbone_params": total, "explora_trainable": explora,
            "explora_groups": groups, "finetune_lora_trainable": ft}
