"""40_parameter_budgets: the papers' trainable-parameter counts reproduced from our own code.

Models are built on the ``meta`` device (shapes only, no memory, no weights), so ViT-H counts take a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from vitadapt.config import ExperimentConfig, opt
from vitadapt.papers import COUNTS as PUBLISHED, EXPLORA_RECIPE
from vitadapt.peft.baselines import build
from vitadapt.peft.explora import apply_explora
from vitadapt.peft.lora import apply_lora
from vitadapt.peft.rlrr import apply_rlrr
from vitadapt.protocol import counts

ARCHS = {  # label: (timm name, kwargs)
    "ViT-B/16": ("vit_base_patch16_224", {}),
    "ViT-L/14 (DinoV2)": ("vit_large_patch14_dinov2", {}),
    "ViT-L/16": ("vit_large_patch16_224", {}),
    "ViT-H/14": ("vit_huge_patch14_224", {}),
}
TABLE = "Trainable parameters"     # the published counts: vitadapt.papers, method "<method> | <architecture>"
RANK = EXPLORA_RECIPE["rank"]      # ExPLoRA's published pre-training rank (64)


def _explora(unfreeze: tuple, **kw):
    return lambda m: apply_explora(m, unfreeze_blocks=unfreeze, rank=RANK, **kw)


METHODS = {
    f"ExPLoRA D-[L]-r{RANK} (pre-training)": _explora((-1,)),
    "ExPLoRA [L] only, no LoRA": _explora((-1,), targets=()),
    f"ExPLoRA [1,L]-r{RANK}": _explora((0, -1)),
    f"ExPLoRA [1,L-1,L]-r{RANK}": _explora((0, -2, -1)),
    f"ExPLoRA LoRA-r{RANK} only (no block)": _explora(()),
    f"ExPLoRA [L]-r{RANK} + MLP (r/4)": _explora((-1,), targets=("q", "v", "fc1", "fc2")),
    "LoRA r8 q,v (fine-tune, no head)": lambda m: apply_lora(m, rank=8, targets=("q", "v"), train_head=False),
    "LoRA r8 qkv (no head)": lambda m: build("lora", m),
    "RLRR (no head)": lambda m: apply_rlrr(m),
    "SSF (no head)": lambda m: build("ssf", m),
    "full fine-tune (no head)": lambda m: build("full", m),
}


@dataclass
class BudgetConfig(ExperimentConfig):
    archs: tuple = opt(tuple(ARCHS), "Architectures to count (labels of vitadapt.experiments.budgets.ARCHS).")
    methods: tuple = opt(tuple(METHODS), "Methods to count (keys of vitadapt.experiments.budgets.METHODS).")

    def check(self):
        for name, valid, values in (("archs", ARCHS, self.archs), ("methods", METHODS, self.methods)):
            bad = [v for v in values if v not in valid]
            if bad:
                raise ValueError(f"{name}: unknown {bad}; valid values: {', '.join(valid)}")


def count(method: str, arch: str) -> tuple[int, int]:
    """(trainable, total) parameters of ``method`` on ``arch`` without a head, built on the meta device."""
    name, kw = ARCHS[arch]
    return counts.trainable(name, METHODS[method], arch_kwargs=kw)


def budget_table(archs, methods) -> pd.DataFrame:
    rows = []
    for arch in archs:
        for method in methods:
            trainable, total = count(method, arch)
            pub = next((n for n in PUBLISHED if n.method == f"{method} | {arch}"), None)
            rows.append({"architecture": arch, "method": method, "trainable (ours)": trainable,
                         "share of model": trainable / total,
                         "published": pub.value if pub else None, "published where": pub.setting if pub else ""})
    return pd.DataFrame(rows)


def result_rows(table: pd.DataFrame) -> list[dict]:
    """Exact counts (n = 1, no spread) as rows of the shared results schema."""
    return [{"table": TABLE, "method": f"{r['method']} | {r['architecture']}", "metric": "parameters",
             "mean": r["trainable (ours)"], "std": 0.0, "n": 1, "trainable": r["trainable (ours)"]}
            for _, r in table.iterrows()]
