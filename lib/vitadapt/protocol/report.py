"""What a notebook reports: summaries over seeds for metrics.json, rows of the shared results schema (always
written, so 90_results sees every notebook), and the published numbers (:mod:`vitadapt.papers`) beside ours."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from vitadapt.jobs import summarize


def summary(df: pd.DataFrame, keys: Sequence[str], value: str = "test_acc") -> dict:
    """``{"k1/k2/...": {mean, std, n[, diverged, status]}}`` of ``value`` over the rows of each ``keys`` group."""
    out = {}
    for k, g in df.groupby(list(keys), sort=False):
        out["/".join(map(str, k if isinstance(k, tuple) else (k,)))] = summarize(g[value])
    return out


def mean_per_key(df: pd.DataFrame, by: str, cols: Sequence[str]) -> dict[str, dict]:
    """``{str(key): {col: mean over the key's rows, None where absent or all NaN}}`` per ``by`` value (costs)."""
    if not len(df) or by not in df:
        return {}
    return {str(k): {c: float(g[c].mean()) if c in g and g[c].notna().any() else None for c in cols}
            for k, g in df.groupby(by, sort=False)}


def row_costs(runs: pd.DataFrame, by: str, trainable: str = "trainable_params") -> dict[str, dict]:
    """Result-row extras per ``by`` value: mean ``trainable`` parameters (int) and training ``wall_time_s`` over
    seeds; keys where either is missing are left out."""
    return {k: {"trainable": int(c[trainable]), "wall_time_s": c["wall_time_s"]}
            for k, c in mean_per_key(runs, by, (trainable, "wall_time_s")).items() if None not in c.values()}


def result_row(table: str, method: str, values, metric: str = "top-1 (%)", scale: float = 100.0, **extra) -> dict:
    """A row of the shared results schema: mean, std and n over seeds of ``values`` (fractions -> %)."""
    s = summarize(np.asarray(list(values), float) * scale)     # diverged seeds (NaN) are counted, never averaged
    return {"table": table, "method": method, "metric": metric, **s, **extra}


def result_rows(df: pd.DataFrame, table: str | Callable, keys: Sequence[str], value: str = "test_acc",
                method: Callable | None = None, extra: Callable[[pd.DataFrame], dict] | None = None,
                **kw) -> list[dict]:
    """One :func:`result_row` per ``keys`` group of ``df``: ``value`` averaged per seed (over tasks, where a group
    has several), then mean ± std over seeds. ``table`` is a name or ``table(key)``; ``method(key)`` names the row
    (default: the key's parts joined by " / "); ``extra(group)`` adds columns (trainable, wall time)."""
    rows = []
    for k, d in df.groupby(list(keys), sort=False):
        k = k if isinstance(k, tuple) else (k,)
        name = method(*k) if method else " / ".join(map(str, k))
        if name is None:
            continue
        rows.append(result_row(table(*k) if callable(table) else table, name, d.groupby("seed", sort=False)[value].mean(),
                               **kw, **(extra(d) if extra else {})))
    return rows


def finish(setup, metrics: dict | None = None, results: Sequence[dict] | None = None) -> None:
    """Write metrics.json (``dry_run`` and ``results`` always present), move the outputs into place and say where
    (relative to the profile's outputs, so the notebook's text is the same on every machine)."""
    path = setup.run.finish({"dry_run": setup.dry, **(metrics or {}), "results": list(results or [])})
    print("wrote", path.relative_to(path.parents[3]))


def beside(paper: pd.DataFrame, ours: pd.DataFrame, ours_label: str, cols: Sequence[str], index: str,
           digits: int = 1) -> pd.DataFrame:
    """A published table (its source named in ``paper.attrs["label"]``) above ours, on ``cols`` (those ours has),
    rows indexed by (source, ``index``)."""
    both = pd.concat([paper[list(cols)].assign(source=paper.attrs["label"]),
                      ours[[c for c in cols if c in ours.columns]].assign(source=ours_label)])
    both.index.name = index
    return both.reset_index().set_index(["source", index]).round(digits)


# ---- 90_results: every notebook's rows beside the published ones -----------------------------------------

def collect(profile: str, outputs: Path | None = None) -> pd.DataFrame:
    """Every notebook's ``metrics["results"]`` rows for ``profile``, with the run's backbone and data."""
    from vitadapt.paths import OUTPUTS
    rows = []
    for m in sorted((outputs or OUTPUTS / profile).glob("*/metrics.json")):
        blob = json.loads(m.read_text())
        run = blob.get("run", {})
        src = run.get("sources", {})
        backbone = (src.get("weights") or {}).get("weights_used", run.get("config", {}).get("weights", "?"))
        data = (src.get("data") or {}).get("dataset", run.get("config", {}).get("dataset", "?"))
        for r in blob.get("metrics", {}).get("results", []) or []:
            rows.append({"notebook": m.parent.name, "ours": f"{profile}, {backbone}, {data}", **r})
    return pd.DataFrame(rows)


def paper_vs_ours(ours: pd.DataFrame) -> pd.DataFrame:
    """Our rows joined to the published numbers on (table, method); rows without a paper value keep NaN; a
    "like for like" column (only trainable-parameter counts are), "ours (mean ± std)" as text and the ``protocol``
    that chose our number (:mod:`vitadapt.protocol.selection`: an official row such as ``"ExPLoRA: linear probe
    (official)"`` joins the paper's ``"ExPLoRA: linear probe"``, whose numbers the authors chose the official way)."""
    from vitadapt.papers import numbers
    from vitadapt.protocol.selection import family, kind
    paper = numbers().drop(columns=["paper_name", "metric"])
    if ours is not None and len(ours):
        ours = ours.assign(protocol=ours["table"].map(kind), table=ours["table"].map(family))
    table = paper.assign(mean=float("nan")) if ours is None or not len(ours) else \
        ours.merge(paper, on=["table", "method"], how="outer")
    table["like for like"] = table["table"].eq("Trainable parameters")
    table["ours (mean ± std)"] = table.apply(_ours_text, axis=1) if ours is not None and len(ours) else ""
    cols = ["table", "method", "paper", "paper label", "paper setting", "ours (mean ± std)", "protocol", "ours",
            "like for like"]
    keys = [k for k in ("table", "method", "protocol") if k in table]
    return table[[c for c in cols if c in table]].sort_values(keys, na_position="first").reset_index(drop=True)


def _ours_text(r) -> str:
    status = r.get("status") if isinstance(r.get("status"), str) else ""       # "diverged" / "1 of 3 diverged"
    if pd.isna(r.get("mean")):
        return status
    if r.get("metric") == "parameters":
        return f"{r['mean']:,.0f}"
    return f"{r['mean']:.1f} ± {r['std']:.1f} (n={int(r['n'])}" + (f"; {status})" if status else ")")


def joined(shown: pd.DataFrame) -> dict[str, int]:
    """Per results table, how many rows have both a published number and ours (what 90_results can compare)."""
    if "mean" not in shown and "ours (mean ± std)" not in shown:
        return {}
    both = shown[shown["paper"].notna() & shown["ours (mean ± std)"].astype(str).ne("")
                 & shown["ours (mean ± std)"].notna()]
    return {str(k): int(v) for k, v in both.groupby("table", sort=True).size().items()}
