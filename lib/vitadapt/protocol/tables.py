"""Tables over seeds: ``mean ± std`` (a group where every seed diverged reads "diverged", one where some did says
how many), paired deltas to a reference, and mean costs."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from vitadapt.jobs import DIVERGED, mean_std_text


def order(df: pd.DataFrame, col: str) -> list:
    """The values of ``col`` in order of first appearance."""
    return list(dict.fromkeys(df[col]))


def mean_std(df: pd.DataFrame, index: str | list[str], columns: str | None = None, value: str = "test_acc",
             digits: int = 3, signed: bool = False) -> pd.DataFrame:
    """``mean ± std`` of ``value`` over the seeds of each ``index`` group, one column per value of ``columns`` (as
    pandas' ``unstack`` orders them; reorder with :func:`order`)."""
    index = [index] if isinstance(index, str) else list(index)
    keys = index + ([columns] if columns else [])
    out = df.groupby(keys, sort=False)[value].apply(lambda v: mean_std_text(v, digits, signed))
    if not columns:
        return out.to_frame(value)
    return out.unstack(columns)


def with_shared(df: pd.DataFrame, by: str, shared: pd.Series) -> pd.DataFrame:
    """``df`` with its ``shared`` rows (one reference, e.g. a base model, that serves every variant) repeated under
    every ``by`` value of the other rows; unchanged where they already share a ``by`` value, or none is shared."""
    ref, rest = df[shared], df[~shared]
    if not len(ref) or by not in df or set(ref[by]) & set(rest[by]):
        return df
    return pd.concat([rest, *(ref.assign(**{by: k}) for k in order(rest, by))])


def forgetting(rows: pd.DataFrame, by: str, kinds: Sequence[str], reference: str = "base") -> pd.DataFrame:
    """Of :func:`vitadapt.protocol.probe.forgetting_rows` rows: the OOD change (``ood_delta``) of each feature set
    but ``reference``, ``mean ± std`` over seeds per (``by``, eval), columns ``kinds`` in order (those present); the
    reference's OOD accuracy for scale (its rows shared over ``by``, :func:`with_shared`) and the forgetting set."""
    df, every = rows[rows["features"] != reference], with_shared(rows, by, rows["features"] == reference)
    out = mean_std(df, [by, "eval"], "features", "ood_delta", signed=True)
    out, ref = out[[c for c in kinds if c in out.columns]], every[every["features"] == reference]
    if len(ref):
        out[f"{reference} OOD acc"] = ref.groupby([by, "eval"], sort=False)["ood_test_acc"].mean().reindex(
            out.index).round(3)
    out["forgetting set"] = df.groupby([by, "eval"], sort=False)["ood_dataset"].first()
    return out


def gains(rows: pd.DataFrame, by: str, alone: str, combined: dict[str, str]) -> pd.DataFrame:
    """Of :func:`vitadapt.protocol.probe.forgetting_rows` rows: test accuracy of the feature set ``alone`` ("off")
    on the target and the forgetting set, and the gain of each ``combined`` set ({label: feature set}, those
    present) over it there, paired per seed; means over seeds per (``by``, eval), ``by`` in order of appearance."""
    parts = (("test_acc", "target"), ("ood_test_acc", "OOD"))
    wide = rows.pivot_table(index=[by, "eval", "seed"], columns="features", values=["test_acc", "ood_test_acc"])
    out = pd.DataFrame({f"off: {name}": wide[(v, alone)] for v, name in parts})
    for label, kind in [(k, v) for k, v in combined.items() if ("test_acc", v) in wide.columns]:
        for v, name in parts:
            out[f"{label}: {name} gain"] = wide[(v, kind)] - wide[(v, alone)]
    return out.groupby(level=[0, 1], sort=False).mean().round(3).reindex(order(rows, by), level=0)


def paired_delta(df: pd.DataFrame, by: str, reference: str | None = None, columns: str = "eval",
                 value: str = "test_acc", digits: int = 3) -> pd.DataFrame:
    """Per-seed difference of ``value`` to the ``reference`` row (default: the first), then ``mean ± std`` over
    seeds: paired, so seed-to-seed variation of the data cancels. A diverged seed on either side is lost."""
    ref = reference or order(df, by)[0]
    wide = df.pivot_table(index=[by, "seed"], columns=columns, values=value, dropna=False)
    d = wide.sub(wide.xs(ref, level=0), level=1)
    out = d.groupby(level=0, sort=False).agg(lambda v: mean_std_text(v, digits, signed=True))
    out.columns.name = None
    return out.reindex([v for v in order(df, by) if v != ref])[[c for c in order(df, columns) if c in out.columns]]


def means(runs: pd.DataFrame, by: str, cols: Sequence[str], ints: Sequence[str] = (),
          digits: dict | int = 3) -> pd.DataFrame:
    """Mean of the numeric ``cols`` (those present) per ``by`` over seeds: a cost table. ``ints`` are rounded to
    integers; ``digits`` a number or {column: digits}."""
    df = runs[[by] + [c for c in cols if c in runs]].copy()
    for c in df.columns[1:]:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    out = df.groupby(by, sort=False).mean()
    for c in ints:
        if c in out:
            out[c] = out[c].round().astype("Int64")
    return out.round(digits)


def mean_or_lost(v) -> float:
    """Mean over seeds; NaN (shown "diverged") when any seed diverged: a partial mean is no result."""
    return float(np.mean(v)) if len(v) else float("nan")


def show_lost(table: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    """``table`` with the NaN of ``cols`` written "diverged" (only where a run diverged; else unchanged)."""
    cols = [c for c in cols if c in table.columns and table[c].isna().any()]
    if not cols:
        return table
    out = table.astype({c: object for c in cols})
    for c in cols:
        out[c] = out[c].where(table[c].notna(), DIVERGED)
    return out


def per_task(df: pd.DataFrame, key: str, value: str = "test_acc", scale: float = 100.0) -> pd.DataFrame:
    """``key`` x task table of the mean over seeds (NaN where any seed diverged), times ``scale``."""
    return df.pivot_table(index=key, columns="task", values=value, aggfunc=mean_or_lost, sort=False,
                          dropna=False) * scale


def seed_std(df: pd.DataFrame, key: str, index, value: str = "test_acc", scale: float = 100.0) -> pd.Series:
    """Std over seeds of the per-seed mean over tasks (0 with one seed), aligned to ``index``."""
    seed_means = df.groupby([key, "seed"], sort=False)[value].agg(mean_or_lost).unstack() * scale
    return seed_means.std(1, ddof=1).reindex(index).fillna(0.0)


def over_tasks(df: pd.DataFrame, key: str, per_task_table: pd.DataFrame, out: pd.DataFrame,
               std: str = "std (seeds)", cost: str = "trainable") -> pd.DataFrame:
    """A multi-task table: ``out`` (rows: ``key``) + the mean over the tasks of ``per_task_table`` (NaN when any
    task is), its std over seeds (column ``std``, via :func:`seed_std`) and the largest ``cost`` per ``key``."""
    out["mean"] = per_task_table.mean(1, skipna=False)
    out[std] = seed_std(df, key, out.index).where(out["mean"].notna())
    out[cost] = df.groupby(key, sort=False)[cost].max().reindex(out.index)
    return out


def timing(df: pd.DataFrame, key: str, index) -> pd.DataFrame:
    """Wall time per ``key`` (rows ``index``): mean training time of one run; where rows carry ``select_time_s`` (a
    grid search, repeated on each seed's row), the search per task (first seed's rows) and the total."""
    by, first = (lambda d: d.groupby(key, sort=False)), df[df["seed"] == df["seed"].iloc[0]]
    out = pd.DataFrame({"train s / run": by(df)["train_time_s"].mean()}).reindex(index)
    if "select_time_s" in df:
        out["grid search s / task"] = by(first)["select_time_s"].mean().reindex(index)
        out["total s"] = (by(df)["train_time_s"].sum() + by(first)["select_time_s"].sum()).reindex(index)
    return out.round(2)
