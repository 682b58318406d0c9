"""What a run shows, in words computed from its own numbers: is there an effect at this scale, what drives it, and
does it point the way the paper's does.

- :func:`paired_effects`: per (row, eval) the per-seed differences to a reference row, their mean and std, and on
  how many seeds they are positive;
- :func:`verdict`: "effect" (every seed on one side and the mean further from 0 than one std), "within noise",
  or "lost" (a diverged seed);
- :func:`loss_trends`: how each logged loss moved over a run (mean of the first and last steps), "falls", "rises"
  or "flat";
- :func:`effect_text` / :func:`trend_text`: those as Markdown sentences for a notebook (``IPython.display.Markdown``).

Nothing here holds a number: every figure is computed from the tables the notebook just produced.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

#: a loss "moved" when its last-steps mean differs from its first-steps mean by this fraction of the larger magnitude
FLAT_TOLERANCE = 0.05


def paired_effects(evals: pd.DataFrame, by: str, reference: str, value: str = "test_acc",
                   scale: float = 100.0) -> pd.DataFrame:
    """One row per (``by`` value other than ``reference``, eval): ``mean`` and ``std`` (ddof 1; 0 with one seed) of
    the per-seed difference ``value - value(reference)`` times ``scale``, ``n`` seeds, ``positive`` seeds, ``min``,
    ``max``, ``lost`` (seeds whose difference is NaN: a diverged run) and :func:`verdict`."""
    if reference not in set(evals[by]):
        raise ValueError(f"reference={reference!r} is not a value of {by!r}; valid: {sorted(set(evals[by]))}")
    wide = evals.pivot_table(index=[by, "seed"], columns="eval", values=value, dropna=False, aggfunc="first")
    d = wide.sub(wide.xs(reference, level=0), level=1) * scale
    rows = []
    for name in dict.fromkeys(evals[by]):
        if name == reference:
            continue
        for ev in dict.fromkeys(evals["eval"]):
            v = d.loc[name, ev] if ev in d.columns else pd.Series(dtype=float)
            ok = v.dropna().to_numpy()
            rows.append({by: name, "eval": ev, "mean": float(ok.mean()) if len(ok) else float("nan"),
                         "std": float(ok.std(ddof=1)) if len(ok) > 1 else 0.0, "n": int(len(v)),
                         "positive": int((ok > 0).sum()), "negative": int((ok < 0).sum()), "min": float(ok.min()) if len(ok) else float("nan"),
                         "max": float(ok.max()) if len(ok) else float("nan"), "lost": int(v.isna().sum())})
    out = pd.DataFrame(rows)
    out["verdict"] = [verdict(r) for r in out.to_dict("records")] if len(out) else []
    return out


#: fewest seeds on which a difference can be called an effect
MIN_SEEDS = 3


def verdict(row: dict) -> str:
    """"lost" when a seed diverged; "effect" when there are at least :data:`MIN_SEEDS` seeds, every seed's difference
    has the same (non-zero) sign and |mean| > std; otherwise "within noise"."""
    if row["lost"]:
        return "lost"
    n = row["n"]
    one_side = n in (row["positive"], row["negative"])
    return "effect" if n >= MIN_SEEDS and one_side and abs(row["mean"]) > row["std"] else "within noise"


def effect_text(effects: pd.DataFrame, by: str, reference: str, rows: Sequence[str] | None = None,
                paper: dict[str, str] | None = None, unit: str = "points", paper_rows: Sequence[str] | None = None,
                label: str = "") -> str:
    """Markdown bullets, one per row of :func:`paired_effects` (``rows``: the ``by`` values to describe, default
    all): "ExPLoRA - frozen, kNN: +12.3 ± 1.1 points, positive on 3 of 3 seeds: an effect". ``paper`` = {eval:
    the paper's direction in words, starting with its sign} adds, for the rows of ``paper_rows`` (default all),
    whether ours points the same way (for an effect) or cannot say (noise). ``label`` prefixes each bullet."""
    lines = []
    for r in effects.to_dict("records"):
        if rows is not None and r[by] not in rows:
            continue
        head = f"- **{label}{r[by]} − {reference}, {r['eval']}**: "
        if r["verdict"] == "lost":
            lines.append(head + f"{r['lost']} of {r['n']} seeds diverged, so no difference is reported.")
            continue
        # one shape whatever the signs (nbval masks the counts and words; on another CPU a zero may turn +/-)
        sign = "no change" if r["positive"] == r["negative"] == 0 else "positive" if r["mean"] >= 0 else "negative"
        count = r["n"] if sign == "no change" else r[sign]
        text = (head + f"{r['mean']:+.1f} ± {r['std']:.1f} {unit}, {sign} on {count} of {r['n']} seeds "
                f"(from {r['min']:+.1f} to {r['max']:+.1f}): ")
        text += "an effect." if r["verdict"] == "effect" else "within noise at this scale."
        if paper and r["eval"] in paper and (paper_rows is None or r[by] in paper_rows):
            if r["verdict"] == "effect":
                same = (r["mean"] > 0) == paper[r["eval"]].lstrip().startswith("+")
                text += f" The paper: {paper[r['eval']]}; ours points {'the same way' if same else 'the other way'}."
            else:
                text += f" The paper: {paper[r['eval']]}; at this scale ours cannot say."
        lines.append(text)
    return "\n".join(lines)


def loss_trends(history: pd.DataFrame, by: str, losses: Sequence[str], window: int = 5) -> pd.DataFrame:
    """Per (``by`` value, loss): the mean over seeds of the first ``window`` and last ``window`` logged steps
    (``first``, ``last``), ``change`` = last - first, and ``trend``: "falls" / "rises" when the change exceeds
    :data:`FLAT_TOLERANCE` of the larger magnitude, else "flat". Losses a run did not log are left out."""
    rows = []
    for name, h in history.groupby(by, sort=False):
        for loss in losses:
            if loss not in h or h[loss].isna().all():
                continue
            per_seed = h.sort_values("step").groupby("seed")[loss]
            first = float(np.mean([v.head(window).mean() for _, v in per_seed]))
            last = float(np.mean([v.tail(window).mean() for _, v in per_seed]))
            tol = FLAT_TOLERANCE * max(abs(first), abs(last), 1e-12)
            trend = "falls" if last < first - tol else "rises" if last > first + tol else "flat"
            rows.append({by: name, "loss": loss, "first": first, "last": last, "change": last - first, "trend": trend})
    return pd.DataFrame(rows)


def trend_text(trends: pd.DataFrame, by: str, name: str, notes: dict[str, dict[str, str]] | None = None) -> str:
    """One sentence on how ``name``'s losses moved: "dino 8.32 → 8.31 (flat), koleo 0.91 → -0.18 (falls)", then for
    each loss in ``notes`` = {loss: {trend: what that trend means}} ("falls", "rises", "flat") the sentence of the
    trend it took (none where ``notes`` has none for it)."""
    t = trends[trends[by] == name]
    if t.empty:
        return f"- **{name}**: no losses logged."
    parts = [f"{r.loss} {r.first:.3g} → {r.last:.3g} ({r.trend})" for r in t.itertuples()]
    text = f"- **{name}**: " + ", ".join(parts) + "."
    for r in t.itertuples():
        if say := ((notes or {}).get(r.loss) or {}).get(r.trend):
            text += f" {say}"
    return text


def findings(evals: pd.DataFrame, by: str, reference: str, rows: Sequence[str] | None = None,
             paper: dict[str, str] | None = None, history: pd.DataFrame | None = None,
             losses: Sequence[str] = (), notes: dict[str, dict[str, str]] | None = None,
             trend_rows: Sequence[str] | None = None, paper_rows: Sequence[str] | None = None
             ) -> tuple[str, pd.DataFrame]:
    """``(markdown, effects table)``: :func:`effect_text` of ``evals`` against ``reference`` and, with ``history``,
    :func:`trend_text` of the ``losses`` of each of ``trend_rows`` (default: ``rows``)."""
    eff = paired_effects(evals, by, reference)
    text = "**What this run shows** (paired per seed against " + f"{reference}):\n\n" + \
        effect_text(eff, by, reference, rows, paper, paper_rows=paper_rows)
    if history is not None and len(history) and losses:
        trends = loss_trends(history, by, losses)
        names = [n for n in (trend_rows or rows or dict.fromkeys(history[by])) if n in set(trends.get(by, []))]
        if names:
            text += "\n\n**How the losses moved** (mean of the first and last 5 steps over seeds):\n\n" + \
                "\n".join(trend_text(trends, by, n, notes) for n in names)
    return text, eff


def versus(evals: pd.DataFrame, by: str, focus: str, others: Sequence[str] | None = None,
           paper: dict[str, dict[str, str]] | None = None) -> tuple[str, pd.DataFrame]:
    """``(markdown, table)``: ``focus`` against each of ``others`` (default: every other ``by`` value), paired per
    seed (:func:`paired_effects` with each other row as the reference); ``paper`` = {other: {eval: direction}}."""
    others = [o for o in (others or dict.fromkeys(evals[by])) if o != focus and o in set(evals[by])]
    parts, texts = [], []
    for o in others:
        sub = evals[evals[by].isin([focus, o])]
        e = paired_effects(sub, by, o).assign(versus=o)
        parts.append(e)
        texts.append(effect_text(e, by, o, paper=(paper or {}).get(o)))
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return f"**What this run shows** ({focus} against each method, paired per seed):\n\n" + "\n".join(texts), table
