"""The papers' published numbers, in one place (REFERENCE.md sections 1 and 3).

Every number is a :class:`Number` keyed by (paper, table, method). ``table`` and ``method`` are the names our own
result rows use (:func:`vitadapt.protocol.report.result_rows`), so ``90_results`` joins the two exactly; ``label``
is how the paper names the entry and ``setting`` what it was measured on. UpStep publishes no table: it has no
entry here, on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Number:
    paper: str
    table: str
    method: str
    value: float
    label: str
    setting: str
    metric: str = "top-1 (%)"


_FMOW = "ViT-L/14, fMoW-RGB, 224 px, full data"
_VTAB = "ViT-B/16 IN-21k, VTAB-1k"
_FGVC = "FGVC mean, ViT-B/16 IN-21k"

#: ExPLoRA, fMoW-RGB top-1, ViT-L (methods are our variant names where we run the same thing)
EXPLORA = [
    Number("ExPLoRA", "Frozen baselines", "linear probe", 69.00, "DinoV2 ViT-L/14 linear probe", _FMOW),
    Number("ExPLoRA", "ExPLoRA: linear probe", "frozen", 69.00, "DinoV2 ViT-L/14 (frozen source)", _FMOW),
    Number("ExPLoRA", "ExPLoRA: linear probe", "explora", 77.48, "ExPLoRA D-[L]-r64", _FMOW),
    Number("ExPLoRA", "ExPLoRA: linear probe", "block_only", 74.83, "[L] unfrozen, no LoRA", _FMOW),
    Number("ExPLoRA", "ExPLoRA: linear probe", "full", 54.29, "full pre-training from scratch", _FMOW),
    Number("ExPLoRA", "ExPLoRA: linear probe", "[1,L-1,L] + r64", 78.04, "[1,L-1,L] + r64", _FMOW),
    Number("ExPLoRA", "ExPLoRA: linear probe", "SatMAE", 65.94, "SatMAE ViT-L", _FMOW),
    Number("ExPLoRA", "ExPLoRA: linear probe", "ScaleMAE", 67.30, "ScaleMAE ViT-L", _FMOW),
    Number("ExPLoRA", "ExPLoRA: LoRA-r8 fine-tune", "frozen", 78.08, "DinoV2 ViT-L/14 + LoRA-r8", _FMOW),
    Number("ExPLoRA", "ExPLoRA: LoRA-r8 fine-tune", "explora", 79.28, "ExPLoRA D-[L]-r64 + LoRA-r8", _FMOW),
    Number("ExPLoRA", "ExPLoRA: LoRA-r8 fine-tune", "ScaleMAE", 77.80, "ScaleMAE (full fine-tune, 303M)", _FMOW),
    Number("ExPLoRA", "ExPLoRA: LoRA-r8 fine-tune", "SatMAE", 77.78, "SatMAE (full fine-tune, 303M)", _FMOW),
    Number("ExPLoRA", "ExPLoRA ablations: linear probe", "U=[1,L-1,L]", 78.04, "[1,L-1,L] + r64", _FMOW),
]

#: RLRR, VTAB-1k top-1 per group and the mean over the 19 tasks; FGVC Table 6 (sides x residual)
_VTAB_ROWS = {"rlrr": (82.7, 85.8, 61.8, 74.5), "lora": (79.5, 84.6, 59.8, 72.3), "full": (75.9, 83.4, 47.6, 65.6),
              "linear": (68.9, 77.2, 26.9, 52.9), "ssf": (81.6, 86.6, 59.0, 73.1)}
RLRR = [Number("RLRR", f"RLRR: VTAB-1k {g}", m, v, m if m != "ssf" else "SSF (AugReg backbone, as quoted by RLRR)",
               _VTAB + (" (mean over the 19 tasks)" if g == "group mean" else ""))
        for m, vals in _VTAB_ROWS.items()
        for g, v in zip(("natural", "specialized", "structured", "group mean"), vals)]
RLRR += [Number("RLRR", "RLRR ablations: sides_residual", f"{side}, {res}", v, f"{side}, {res}", _FGVC)
         for res, row in (("no residual", (89.2, 89.3, 88.9)), ("residual", (89.5, 89.7, 90.4)))
         for side, v in zip(("left", "right", "both"), row)]

#: trainable parameters, like for like (same architecture, same counting rule); method "<method> | <arch>"
COUNTS = [
    Number("ExPLoRA", "Trainable parameters", "ExPLoRA D-[L]-r64 (pre-training) | ViT-L/14 (DinoV2)", 18.7e6,
           "18.7M", "ExPLoRA: 18.7M", "parameters"),
    Number("ExPLoRA", "Trainable parameters", "LoRA r8 q,v (fine-tune, no head) | ViT-L/14 (DinoV2)", 786_432,
           "786,432 + head", "ExPLoRA recipe (REFERENCE.md)", "parameters"),
    Number("RLRR", "Trainable parameters", "RLRR (no head) | ViT-B/16", 0.33e6, "0.33M",
           "RLRR VTAB-1k: 0.33M incl. heads (averaged over tasks)", "parameters"),
    Number("RLRR", "Trainable parameters", "LoRA r8 qkv (no head) | ViT-B/16", 0.29e6, "0.29M", "RLRR VTAB-1k table",
           "parameters"),
    Number("RLRR", "Trainable parameters", "SSF (no head) | ViT-B/16", 0.24e6, "0.24M",
           "RLRR VTAB-1k table (incl. heads)", "parameters"),
    Number("RLRR", "Trainable parameters", "full fine-tune (no head) | ViT-B/16", 85.8e6, "85.8M",
           "RLRR VTAB-1k table", "parameters"),
]

#: exact counts the code must reproduce (asserted by the budget notebooks and tests)
EXACT_COUNTS = {"explora_vitl14_L_r64_qv": 18_724_864, "finetune_lora_r8_qv_vitl14": 786_432,
                "rlrr_vitb16_no_head": 288_768}

#: the VTAB-1k trainable parameters (M, with the task heads) per method
RLRR_PARAMS_M = {"rlrr": 0.33, "lora": 0.29, "full": 85.8, "linear": 0.04, "ssf": 0.24}

NOTES = {
    "RLRR": ("SSF's row is its AugReg-backbone number as quoted by the RLRR paper; 'mean' is over the 19 tasks (not "
             "the mean of the three group means). Per task, RLRR: EuroSAT 95.2, Resisc45 85.3. FGVC mean: RLRR 90.4, "
             "LoRA 89.5, full 88.5."),
    "RLRR init": "paper: normal / zero / constant / uniform initialisations all within about 1 point of Kaiming",
    "RLRR label": f"paper: {_VTAB}",
}

ALL = EXPLORA + RLRR + COUNTS

#: the published recipes' choices our code reproduces (REFERENCE.md): ExPLoRA's pre-training trainable set and
#: fine-tune, RLRR's official adapter
EXPLORA_RECIPE = {"arch": "vit_large_patch14_dinov2", "unfreeze": "L", "rank": 64, "targets": "q,v", "ft_rank": 8,
                  "ft_targets": "q,v"}
RLRR_OFFICIAL = {"sides": "both", "residual": True, "rank": 1, "init": "kaiming", "layers": "all", "ssf": True}


def numbers(paper: str | None = None, table: str | None = None) -> pd.DataFrame:
    """The published numbers as a table (paper, table, method, paper, label, setting, metric), filtered."""
    rows = [n for n in ALL if (paper is None or n.paper == paper) and (table is None or n.table == table)]
    return pd.DataFrame([{"paper_name": n.paper, "table": n.table, "method": n.method, "paper": n.value,
                          "paper label": n.label, "paper setting": n.setting, "metric": n.metric} for n in rows])


def value(table: str, method: str) -> float | None:
    """One published number, or None when the paper has none for (table, method)."""
    return next((n.value for n in ALL if n.table == table and n.method == method), None)


def explora_table() -> pd.DataFrame:
    """ExPLoRA's fMoW-RGB ViT-L numbers by evaluation, as the paper names them."""
    rows = [n for n in ALL if n.table in ("ExPLoRA: linear probe", "ExPLoRA: LoRA-r8 fine-tune")]
    return pd.DataFrame([{"evaluation": n.table.split(": ", 1)[1], "model": n.label, "fMoW-RGB top-1 (%)": n.value}
                         for n in rows]).set_index(["evaluation", "model"])


def rlrr_vtab() -> pd.DataFrame:
    """RLRR's VTAB-1k table: method x (natural, specialized, structured, mean, params_M)."""
    out = pd.DataFrame({g: {m: value(f"RLRR: VTAB-1k {g}", m) for m in _VTAB_ROWS}
                        for g in ("natural", "specialized", "structured", "group mean")})
    out = out.rename(columns={"group mean": "mean"})
    out["params_M"] = pd.Series(RLRR_PARAMS_M)
    out.index.name = "method"
    out.attrs["label"] = NOTES["RLRR label"]
    return out


def rlrr_sides() -> pd.DataFrame:
    """RLRR Table 6 (FGVC mean): rows no residual / residual, columns left / right / both."""
    t = "RLRR ablations: sides_residual"
    return pd.DataFrame({s: [value(t, f"{s}, {r}") for r in ("no residual", "residual")]
                         for s in ("left", "right", "both")},
                        index=pd.Index(["no residual", "residual"], name=f"paper: {_FGVC}"))


#: where the public record is silent or differs from what we run: {paper: [(choice, public record, our choice,
#: config switch)]}, rendered by the notebooks' "choices" tables
CHOICES: dict[str, list[tuple[str, str, str, str]]] = {}


def choices_table(paper: str) -> pd.DataFrame:
    return pd.DataFrame(CHOICES[paper], columns=["choice", "public record", "our choice", "switch"]).set_index("choice")
