"""Jobs: variants x seeds (or tasks x methods, domains x seeds) run through the resumable job store, and
one-factor-at-a-time ablation lists.

A job is a dict of names (``{"variant": "explora", "seed": 0}``); :func:`run_jobs` runs ``work(job, ckpt)`` for each
one, in order, through :class:`vitadapt.jobs.JobStore` (a finished job of an interrupted earlier run with the same
config and code is taken from the store; ``ckpt`` is where the running job checkpoints its training) and logs the
``"log"`` line each output carries.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable, Sequence

import pandas as pd

from vitadapt.jobs import JobStore


def product(**axes: Sequence) -> list[dict]:
    """Every combination of the axes, the first axis outermost: ``product(seed=(0, 1), variant=("a", "b"))``."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


def run_jobs(run, jobs: Iterable[dict], work: Callable[[dict, Any], dict],
             log: Callable[[str], None] | None = print) -> list[dict]:
    """``work(job, ckpt)`` for every job through ``run.jobs`` (a :class:`~vitadapt.jobs.JobStore`; none when
    ``run`` is None); returns the outputs in order. An output's ``"log"`` line is printed with ``log``."""
    store = getattr(run, "jobs", None) or JobStore(None)
    outs = []
    for job in jobs:
        out = store.run(job, lambda ckpt, job=job: work(job, ckpt))
        if log and out.get("log"):
            log(out["log"])
        outs.append(out)
    return outs


def frames(outs: Sequence[dict], *names: str) -> list[pd.DataFrame]:
    """One DataFrame per name, concatenating each output's list of rows (or single row) under that name."""
    result = []
    for name in names:
        rows = []
        for o in outs:
            v = o.get(name)
            rows += v if isinstance(v, list) else ([v] if v else [])
        result.append(pd.DataFrame(rows))
    return result


@dataclasses.dataclass
class Results:
    """A grid's outputs as frames: ``evals``, a row per evaluation (job keys, eval, scores); ``runs``, a row per
    training run (its cost and final statistics); ``history``, a row per (run, logged step)."""
    evals: pd.DataFrame
    runs: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)
    history: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)

    @classmethod
    def of(cls, outs: Sequence[dict], names: Sequence[str] = ("evals", "runs", "history")) -> "Results":
        """The three frames from :func:`run_jobs` outputs: the rows under each of ``names``, concatenated
        (:func:`frames`)."""
        return cls(*frames(outs, *names))


def one_factor(cfg, axes: Sequence[tuple[str, Sequence, Callable[[Any], str]]],
               canon: Callable[[str, Any], Any] = lambda field, v: v) -> list[tuple[str, dict]]:
    """One factor at a time around ``cfg``: ``[(label, {field: value})]`` for every value of every axis
    ``(field, values, label_of_value)`` that differs from the configured one (``canon(field, v)`` makes values
    comparable, e.g. ``"1,L"`` and ``"[1,L]"``), each once."""
    out, seen = [], set()
    for field, values, label in axes:
        current = canon(field, getattr(cfg, field))
        for v in values:
            key = (field, canon(field, v))
            if key[1] == current or key in seen:
                continue
            seen.add(key)
            out.append((label(v), {field: v}))
    return out
