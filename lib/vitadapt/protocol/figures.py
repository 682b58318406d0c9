"""Figures every notebook draws: bar panels of accuracy over seeds (error bars: std) with chance and the runs
that diverged named where their bar would be, training curves, and accuracy against trainable parameters."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from vitadapt.jobs import mark_diverged
from vitadapt.protocol.tables import order as first_seen


def bars(df: pd.DataFrame, x: str, y: str = "test_acc", panels: str | None = "eval", hue: str | None = None,
         hue_order: Sequence | None = None, chance: float | pd.Series | None = None, title: str = "",
         ylabel: str = "test accuracy", ylim: tuple | str | None = (0, 1), palette=None, dodge: bool = True,
         panel_width: float | None = None, rotation: int = 30, legend: bool = True, own_x: bool = False, ax=None):
    """One bar panel per value of ``panels`` (None: one panel): mean ``y`` per ``x`` (and ``hue``) over seeds,
    error bars the std. ``chance``: a dashed line (a number) or one per ``x`` (a Series). ``ylim=None`` draws a
    zero line and scales to the data (for changes); ``"data"`` fits each panel to its finite values
    (:func:`finite_range`). ``own_x``: each panel shows only its own ``x`` values (else every panel all of them,
    in one order). Bars lost to divergence are named in place. ``ax``: draw the
    (single) panel there, in a figure of the caller's."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    names = first_seen(df, panels) if panels else [None]
    xs = first_seen(df, x)
    width = panel_width or max(3.6, 0.55 * len(xs) * (1 + 0.5 * bool(hue)) + 1.5)
    fig, axes = (ax.figure, [[ax]]) if ax is not None else \
        plt.subplots(1, len(names), figsize=(width * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        d = df[df[panels] == name] if panels else df
        xs = first_seen(d, x) if own_x else xs
        kw = dict(hue=hue, hue_order=hue_order or first_seen(d, hue), palette=palette, dodge=dodge) if hue else \
            dict(color="tab:blue")
        sns.barplot(d, x=x, y=y, order=xs, errorbar="sd", capsize=0.1, ax=ax, legend=legend and bool(hue), **kw)
        if isinstance(chance, pd.Series):
            for i, v in enumerate(chance.reindex(xs)):
                ax.hlines(v, i - 0.4, i + 0.4, colors="gray", linestyles="--", lw=0.8)
        elif chance is not None:
            ax.axhline(float(chance), ls="--", c="gray", lw=0.8)
        if hue:
            lost = d[d[y].isna()]
            if len(lost):      # no bar is drawn for a diverged run: say so where it would be
                ax.text(0.5, 0.5, "diverged: " + ", ".join(sorted({f"{r[x]} / {r[hue]}" + (f" seed {r['seed']}" if
                        "seed" in r else "") for _, r in lost.iterrows()})), transform=ax.transAxes, ha="center",
                        va="center", color="tab:red", fontsize=8, wrap=True)
        else:
            mark_diverged(ax, d, x, y, xs)
        ax.set_title(" · ".join(str(t) for t in (name, title) if t), fontsize=9)
        if ylim is None:
            ax.axhline(0, color="gray", lw=0.8)
        elif ylim == "data":
            ax.set_ylim(*finite_range(d[y]))
        else:
            ax.set_ylim(*ylim)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("")
        ax.tick_params(axis="x", labelsize=7, rotation=rotation)
        for lab in ax.get_xticklabels():
            lab.set_horizontalalignment("right" if rotation else "center")
        if hue and legend and ax.get_legend() is not None:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def curves(history: pd.DataFrame, by: str, cols: Sequence[str], titles: dict | None = None,
           dashed: dict | None = None, smooth: int = 1, symlog: Sequence[str] = (), x: str = "step"):
    """One panel per column of ``cols`` (those logged): its mean over seeds per ``by`` against ``x``. ``dashed``
    maps a column to a second one drawn dashed in the same colour (e.g. the frozen base model's value)."""
    import matplotlib.pyplot as plt
    cols = [c for c in cols if c in history and history[c].notna().any()]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.8 * len(cols), 3.1), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, g in enumerate(first_seen(history, by)):
        h = history[history[by] == g].groupby(x)[[c for c in history.columns if c in set(cols) | set(
            (dashed or {}).values())]].mean()
        h = h.rolling(smooth, min_periods=1).mean() if smooth > 1 else h
        for ax, c in zip(axes[0], cols):
            ax.plot(h.index, h[c], color=colours[i % len(colours)], label=str(g), lw=1.2)
            if dashed and c in dashed and dashed[c] in h:
                ax.plot(h.index, h[dashed[c]], color=colours[i % len(colours)], ls="--", lw=0.8)
    for ax, c in zip(axes[0], cols):
        ax.set_title((titles or {}).get(c, c), fontsize=9)
        ax.set_xlabel(x)
        if c in symlog:
            ax.set_yscale("symlog", linthresh=1e-6)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def against_budget(ax, trainable: pd.Series, acc: pd.Series, xlabel: str = "trainable parameters (here)",
                   ylabel: str = "mean accuracy (%)") -> None:
    """A scatter of accuracy against trainable parameters (log x), each point labelled; the entries without an
    accuracy (diverged) are named in the title."""
    acc = pd.to_numeric(acc, errors="coerce")
    ok = acc.notna()
    ax.scatter(trainable[ok], acc[ok])
    for name in acc.index[ok]:
        ax.annotate(str(name)[:18], (trainable[name], acc[name]), fontsize=7)
    lost = [str(n) for n in acc.index[~ok]]
    if lost:
        ax.set_title("diverged: " + ", ".join(lost), color="tab:red", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def finite_range(values, pad: tuple[float, float] = (0.1, 0.05), lo: float = 0.0, hi: float = 1.0) -> tuple:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return (lo, hi) if not len(v) else (max(lo, v.min() - pad[0]), min(hi, v.max() + pad[1]))


def accuracy_vs_cost(rows: pd.DataFrame):
    """90_results: accuracy of every result row with a trainable count, against trainable parameters and
    against wall time (this machine), coloured by table. None when no row has a count."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    if not len(rows) or "trainable" not in rows:
        return None
    d = rows[pd.to_numeric(rows["trainable"], errors="coerce") > 0]
    if not len(d):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    sns.scatterplot(d, x="trainable", y="mean", hue="table", style="table", ax=axes[0], s=60)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("trainable parameters")
    axes[0].set_ylabel("accuracy (%)")
    if "wall_time_s" in d and d["wall_time_s"].notna().any():
        sns.scatterplot(d, x="wall_time_s", y="mean", hue="table", style="table", ax=axes[1], s=60, legend=False)
        axes[1].set_xscale("log")
        axes[1].set_xlabel("wall time (s, this machine)")
    for _, r in d.iterrows():
        axes[0].annotate(str(r["method"])[:18], (r["trainable"], r["mean"]), fontsize=6)
    fig.tight_layout()
    return fig


def table_bars(rows: pd.DataFrame, name: str):
    """90_results: one results table's rows as bars, mean ± std over seeds (percent)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(rows)), 3))
    ax.bar(range(len(rows)), rows["mean"], yerr=rows["std"], capsize=3, color=sns.color_palette("deep")[0])
    ax.set_xticks(range(len(rows)), [str(m)[:22] for m in rows["method"]], rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(name)
    return fig
