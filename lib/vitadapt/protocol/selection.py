"""Two selection protocols, side by side: ours (``clean``) and the authors' (``official``).

- ``clean``: every choice (probe C, kNN k, fine-tune grid point) is made on validation; test is scored once, on the
  last epoch of a fine-tune.
- ``official``: the authors' public code chooses on test: ExPLoRA's linear probe keeps the best of 28 classifiers on
  the test set (:mod:`vitadapt.protocol.official_probe`), its kNN the best k on test, and the fine-tunes of ExPLoRA
  and RLRR report their best test epoch (:func:`vitadapt.finetune.best_epoch`).
- ``both``: both, from the same runs where they share one (a fine-tune trains once; its test curve gives the
  official number and its last point the clean one), and :func:`compare` shows each pair and its difference: the
  optimism of test-set selection, which no public implementation reports.

An official evaluation's rows carry the eval name of its clean twin plus :data:`OFFICIAL` (``"kNN (official)"``);
:func:`family` maps either back to the shared name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from vitadapt.config import opt

PROTOCOLS = ("clean", "official", "both")
OFFICIAL = " (official)"
VAL = "official, chosen on val"


@dataclass
class ProtocolSettings:
    """The selection protocol, as a config field (a mixin of an experiment's config)."""

    protocol: Literal["clean", "official", "both"] = opt("clean", "Selection protocol: clean (choices on validation, test scored once, last epoch), official (the authors' code: best of the official probe's classifiers on test, best k on test, best test epoch of a fine-tune), or both side by side with their difference.")


def clean(cfg) -> bool:
    """Whether the clean protocol's numbers are wanted (``protocol`` clean or both; configs without the field: yes)."""
    return getattr(cfg, "protocol", "clean") in ("clean", "both")


def official(cfg) -> bool:
    """Whether the official protocol's numbers are wanted (``protocol`` official or both)."""
    return getattr(cfg, "protocol", "clean") in ("official", "both")


def official_name(name: str) -> str:
    """The eval name of the official twin of the clean evaluation ``name``."""
    return name + OFFICIAL


def family(name: str) -> str:
    """The shared name of an evaluation, clean or official (``"kNN (official)"`` -> ``"kNN"``, ``"linear probe
    (official harness, chosen on val)"`` -> ``"linear probe"``)."""
    return name.split(" (official", 1)[0]


def kind(name: str) -> str:
    """``"official"`` (the authors' choice on test), ``"official, chosen on val"`` (the official evaluator with our
    rule) or ``"clean"``."""
    if name.endswith(OFFICIAL):
        return "official"
    return VAL if " (official" in name else "clean"


def fine_tune_rows(cfg, row: dict, best: float | None, best_note: str = "") -> list[dict]:
    """The rows of one fine-tune under ``cfg.protocol``: ``row`` (its ``test_acc`` the last epoch's) when clean is
    wanted, and its official twin (``test_acc`` = ``best``, the best test epoch; ``selected`` says where) when
    official is."""
    out = [row] if clean(cfg) else []
    if official(cfg):
        if best is None:
            raise ValueError("protocol official/both needs the fine-tune's test tracked every epoch (track_test=True)")
        out.append({**row, "eval": official_name(row["eval"]), "test_acc": best, "val_acc": None,
                    "selected": f"best test epoch{(': ' + best_note) if best_note else ''}; {row.get('selected', '')}"})
    return out


def _pairs(df: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame | None:
    """(``by``, family, seed) x {clean, official} values of the evaluations that have both; None when none has."""
    if df is None or not len(df) or "eval" not in df:
        return None
    d = df.assign(family=df["eval"].map(family), kind=df["eval"].map(kind))
    wide = d.pivot_table(index=[*by, "family", "seed"], columns="kind", values=value, aggfunc="first", dropna=False)
    if not {"clean", "official"} <= set(wide.columns):
        return None
    wide = wide.dropna(subset=["clean", "official"])
    return wide if len(wide) else None


def as_protocol(cfg, df: pd.DataFrame) -> pd.DataFrame:
    """Fine-tune rows (one per run, ``test_acc`` the last epoch's, ``test_acc_best_epoch`` the best test epoch's) as
    ``cfg.protocol`` reports them: clean keeps ``test_acc``; official makes the best test epoch the ``test_acc``
    (the last epoch's stays as ``test_acc_last_epoch``); both keeps the two columns side by side."""
    if cfg.protocol != "official" or not len(df) or "test_acc_best_epoch" not in df:
        return df
    return df.assign(test_acc_last_epoch=df["test_acc"], test_acc=df["test_acc_best_epoch"])


def pairs_of(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """Rows with one accuracy per run and its best-test-epoch twin in ``test_acc_best_epoch`` (RLRR's runs) as eval
    rows: ``name`` (the last epoch, clean) and ``name (official)`` (the best test epoch), for :func:`compare`."""
    if "test_acc_best_epoch" not in df:
        return df.assign(eval=name)
    return pd.concat([df.assign(eval=name), df.assign(eval=official_name(name), test_acc=df["test_acc_best_epoch"])],
                     ignore_index=True)


def compare(df: pd.DataFrame, by: str | list[str], value: str = "test_acc", scale: float = 100.0) -> pd.DataFrame:
    """Clean beside official for every (``by``, evaluation) that has both, mean ± std over seeds (points), and their
    paired difference official - clean per seed (mean ± std): how much choosing on test inflates the number. Where
    the official evaluator was also scored with its choice made on val (``"... (official harness, chosen on val)"``),
    that column and official - it: the inflation from test selection alone, with the evaluator held fixed. Rows
    whose value is NaN (diverged) drop out of their pair. Empty when no evaluation has both."""
    by = [by] if isinstance(by, str) else list(by)
    wide = _pairs(df, by, value)
    if wide is None:
        return pd.DataFrame()
    wide = wide * scale
    wide["official - clean"] = wide["official"] - wide["clean"]
    cols = ["clean", "official", "official - clean"]
    if VAL in wide:                  # the official evaluator with its choice made on val: test selection alone
        wide["official - official on val"] = wide["official"] - wide[VAL]
        cols[2:2] = [VAL]
        cols.append("official - official on val")
    g = wide.groupby(level=[*by, "family"], sort=False)
    fmt = lambda m, s, n: "-" if n == 0 else f"{m:.1f} ± {s:.1f}" if n > 1 else f"{m:.1f}"  # noqa: E731
    out = pd.DataFrame({col: [fmt(m, s, n) for m, s, n in zip(g[col].mean(), g[col].std().fillna(0), g[col].count())]
                        for col in cols}, index=g.size().index)
    out["seeds"] = g.size().values
    seen = list(dict.fromkeys(zip(*[df[c] for c in by], df["eval"].map(family))))   # the rows' order in df
    out = out.reindex([k for k in seen if k in out.index])
    out.index = out.index.rename([*by, "evaluation"])
    return out


def gap_summary(df: pd.DataFrame, by: str | list[str], value: str = "test_acc") -> dict:
    """metrics.json content for :func:`compare`: {"<by values> | <evaluation>": {clean, official, difference} means
    (fractions, like every accuracy in metrics.json), n}."""
    by = [by] if isinstance(by, str) else list(by)
    wide = _pairs(df, by, value)
    if wide is None:
        return {}
    out = {}
    for key, grp in wide.groupby(level=[*by, "family"], sort=False):
        key = key if isinstance(key, tuple) else (key,)
        out[" | ".join(map(str, key))] = {"clean": float(grp["clean"].mean()), "official": float(grp["official"].mean()),
                                          "difference": float((grp["official"] - grp["clean"]).mean()),
                                          "n": int(len(grp)),
                                          **({"official_on_val": float(grp[VAL].mean())} if VAL in grp else {})}
    return out


def figure(df: pd.DataFrame, by: str, title: str = "", chance=None):
    """Clean and official side by side (one panel per evaluation that has both; error bars: std over seeds), or None
    when no evaluation has both."""
    from vitadapt.protocol.figures import bars
    if _pairs(df, [by], "test_acc") is None:
        return None
    d = df[df["eval"].map(kind) != VAL]
    d = d.assign(evaluation=d["eval"].map(family),
                 protocol=np.where(d["eval"].str.endswith(OFFICIAL), "official (chosen on test)", "clean (chosen on val)"))
    both = d.groupby("evaluation")["protocol"].nunique()
    d = d[d["evaluation"].isin(both[both == 2].index)]
    fig = bars(d, by, panels="evaluation", hue="protocol", hue_order=["clean (chosen on val)",
                                                                     "official (chosen on test)"],
               chance=chance, title=title)
    return fig
