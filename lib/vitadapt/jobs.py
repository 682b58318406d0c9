"""The jobs of an experiment (one variant x seed, one domain x seed, one task x method): diverged jobs reported as
such, finished jobs kept across an interruption.

* :class:`JobStore` keeps each finished job's result and the running job's training checkpoint in a hidden folder
  beside the notebook's outputs, keyed by the run's config and code. An interrupted run started again with the same
  config and code takes the finished jobs from the store and restarts the running one from its last checkpoint
  (:func:`vitadapt.train.fit`'s exact resume); the store is deleted when the notebook finishes.
  ``VITADAPT_RESUME=0`` turns it off; ``VITADAPT_CKPT_EVERY_S`` sets how often a running job writes its checkpoint
  (seconds, default 60; 0: every step).
* A job whose training diverged (:class:`vitadapt.train.Diverged`) has ``NaN`` accuracies and a ``diverged`` note;
  :func:`mean_std_text` and :func:`summarize` turn them into "diverged" in tables and metrics, and
  :func:`mark_diverged` writes it into figures, so a lost job never reads as a chance-level result.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

DIVERGED = "diverged"


def resume_enabled() -> bool:
    v = os.environ.get("VITADAPT_RESUME", "1").strip().lower()
    if v not in ("0", "1", "no", "yes", "false", "true", "off", "on", ""):
        raise ValueError(f"VITADAPT_RESUME={v!r} is not valid; valid values: 1 (default), 0")
    return v in ("1", "yes", "true", "on", "")


def checkpoint_every_s() -> float:
    v = os.environ.get("VITADAPT_CKPT_EVERY_S", "60")
    try:
        out = float(v)
    except ValueError:
        out = -1.0
    if not out >= 0:
        raise ValueError(f"VITADAPT_CKPT_EVERY_S={v!r} is not valid; valid values: seconds >= 0 (0: every step)")
    return out


def _name(what: dict) -> str:
    text = "-".join(f"{k}={v}" for k, v in what.items())
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)[:80]
    return f"{slug}-{hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:10]}"


class JobStore:
    """Finished jobs and the running job's checkpoint, under ``root`` (``None``: a store that keeps nothing)."""

    def __init__(self, root: Path | None, log: Callable[[str], None] | None = print):
        self.root = Path(root) if root is not None else None
        self.log = log
        self.kept: list[str] = []          # jobs taken from the store in this run

    def _path(self, what: dict, suffix: str) -> Path:
        return self.root / f"{_name(what)}{suffix}"

    def run(self, what: dict, fn: Callable[[Path | None], Any]) -> Any:
        """``fn(checkpoint path)``'s result for job ``what``: from the store when an earlier, interrupted run of the
        same config and code finished it; else computed (resuming from the job's checkpoint if there is one),
        stored, and its checkpoint removed."""
        if self.root is None:
            return fn(None)
        done = self._path(what, ".pkl")
        if done.exists():
            try:
                value = pickle.loads(done.read_bytes())
            except Exception:                      # unreadable: compute again
                done.unlink(missing_ok=True)
            else:
                self.kept.append(_name(what))
                if self.log:
                    self.log(f"resume: kept the finished job {', '.join(f'{k} {v}' for k, v in what.items())}")
                return value
        ckpt = self._path(what, ".ckpt")
        if ckpt.exists() and self.log:
            self.log(f"resume: job {', '.join(f'{k} {v}' for k, v in what.items())} restarts from its checkpoint")
        value = fn(ckpt)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = done.with_name(f".{done.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(pickle.dumps(value))
            os.replace(tmp, done)
        except OSError:
            tmp.unlink(missing_ok=True)            # a full disk only costs the resume, never the run
        ckpt.unlink(missing_ok=True)
        return value

    def clear(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


# ---- diverged jobs in rows, tables, metrics and figures -------------------------------------------

def mean_std_text(values: Sequence[float], digits: int = 3, signed: bool = False) -> str:
    """``mean ± std`` of the finite values (ddof 1); "diverged" when every value is NaN (every job of the group
    diverged), and "(k of n diverged)" after the numbers when some did."""
    a = np.asarray(list(values), float)
    ok = a[np.isfinite(a)]
    if len(ok) == 0:
        return DIVERGED if len(a) else ""
    m = float(ok.mean())
    s = float(ok.std(ddof=1)) if len(ok) > 1 else 0.0
    if abs(m) < 0.5 * 10 ** -digits:
        m = 0.0                                    # no "-0.000"
    txt = f"{m:+.{digits}f} ± {s:.{digits}f}" if signed else f"{m:.{digits}f} ± {s:.{digits}f}"
    return txt + (f" ({len(a) - len(ok)} of {len(a)} diverged)" if len(ok) < len(a) else "")


def summarize(values) -> dict:
    """mean, std (ddof 1) and n over the finite values, and how many diverged (NaN); mean None if all did."""
    a = np.asarray(list(values), float)
    ok = a[np.isfinite(a)]
    out = {"mean": float(ok.mean()) if len(ok) else None,
           "std": float(ok.std(ddof=1)) if len(ok) > 1 else (0.0 if len(ok) else None), "n": int(len(ok))}
    if len(ok) < len(a):
        out.update(diverged=int(len(a) - len(ok)), status=DIVERGED if not len(ok) else
                   f"{len(a) - len(ok)} of {len(a)} diverged")
    return out


def mark_diverged(ax, df, x: str, y: str, order: Sequence) -> None:
    """Write "diverged" on a bar chart at every ``x`` category whose ``y`` values are all NaN (no bar is drawn
    there), and "k/n diverged" above categories where only some are."""
    for i, cat in enumerate(order):
        vals = np.asarray(df.loc[df[x] == cat, y], float)
        if not len(vals):
            continue
        bad = int((~np.isfinite(vals)).sum())
        if bad == len(vals):
            ax.text(i, 0.02, DIVERGED, rotation=90, ha="center", va="bottom", color="tab:red", fontsize=8,
                    transform=ax.get_xaxis_transform())
        elif bad:
            ax.text(i, 0.98, f"{bad}/{len(vals)} diverged", ha="center", va="top", color="tab:red", fontsize=6,
                    transform=ax.get_xaxis_transform())


def diverged_row(seed: int, eval_name: str, err) -> dict:
    """An evaluation row for a job whose training diverged (``err``: :class:`vitadapt.train.Diverged`)."""
    return {"seed": seed, "eval": eval_name, "test_acc": float("nan"), "val_acc": float("nan"), "selected": "",
            "diverged": err.short}
