"""Golden metrics: a smoke run's metrics.json files against the committed ones, with tolerances.

    python -m vitadapt.golden write outputs/smoke tests/golden/metrics    # make golden
    python -m vitadapt.golden check outputs/smoke tests/golden/metrics    # make nbval, after the notebooks

Why: a number that comes out of training differs in its last digits from one CPU to another (vectorised
kernels round differently), and on a smoke-sized test set one prediction more or less moves an accuracy by
0.005 (200 images) to 0.03 (32 images). nbval therefore compares the golden notebooks' text with every decimal
masked (tests/sanitize.cfg) and the numbers are compared here, each with a tolerance.

The rules of :func:`compare`:

* structure is exact: the same keys and the same list lengths; strings, booleans, None and integers are exact;
  so are counts stored as floats (pandas turns an int column with a missing value into floats): keys named
  like ``n``, ``n_seeds``, ``steps``, ``images_seen``, ``backward_passes``, ``skipped``, ``trainable*``,
  ``*params*``, ``seed``;
* a loss (a key named ``final_*`` or with the word ``loss``) passes within 5 % of the larger magnitude, with no
  absolute slack: another CPU moves a smoke loss by 5e-5 relative at most, and a small one (the centre-vector
  drift, ~6e-4) must not hide under an accuracy's tolerance;
* any other float passes when ``|actual - golden| <= 0.05 * scale`` (an accuracy as a fraction: 5 points)
  **or** ``|actual - golden| <= 5 % of the larger magnitude``. ``scale`` is 100 for values in percent: the
  fields of a record whose ``metric`` says ``%`` or ``pp`` (``results`` rows), and the percent tables listed in
  ``PERCENT`` (a stale entry only makes the check stricter);
* not compared: the ``run`` record except its ``config`` (commit, hashes, package versions, host, start time)
  and, anywhere, keys named for times, memory, paths, hashes or versions (``VOLATILE``), and ``selected``, the
  probe's C or the kNN k chosen on validation, which a tie broken the other way on another CPU changes (the
  accuracies it leads to are still compared).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

ABS_TOL = 0.05      # accuracies as fractions; x100 for percent
REL_TOL = 0.05      # losses and other values far from 0..1
TOLERANCE = (f"floats within {ABS_TOL:g} abs (x100 in percent) or {REL_TOL:.0%} rel, losses {REL_TOL:.0%} rel; "
             "counts, strings and structure exact")

# a key is volatile when one of its words (split on anything but letters and digits) is one of these
VOLATILE = frozenset({"time", "times", "wall", "seconds", "sec", "s", "ms", "memory", "mem", "mb", "gb", "peak",
                      "rss", "started", "finished", "timestamp", "date", "path", "dir", "root", "hash", "version",
                      "versions", "packages", "commit", "host", "pid", "cpus",
                      "available"})   # which datasets this machine holds (../shared, downloads), not what the code computed
SKIPPED = frozenset({"selected"})
# counts: exact even when a float (3.0 steps)
COUNTS = frozenset({"n", "steps", "images", "backward", "passes", "skipped", "trainable", "params", "parameters",
                    "seed", "rank"})   # not "seeds": "std (seeds)" is a spread of accuracies ("n_seeds" has "n")
# values in percent that carry no ``metric`` field, as "<notebook>:<path>" patterns
PERCENT = tuple(re.compile(p) for p in (
    r"^30_rlrr:metrics\.(summary|per_task)\[",
    r"^30_rlrr:metrics\.rlrr_minus_lora_mean$",
    r"^31_rlrr_ablations:metrics\.(sides_residual|tables)\.",
))


def _words(key: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", str(key).lower())) - {""}


def volatile(key: str) -> bool:
    """Whether a key names something that changes from run to run or machine to machine."""
    return key in SKIPPED or bool(_words(key) & VOLATILE)


def is_loss(key: str) -> bool:
    """Whether a key names a training loss (final_loss, final_dino, final_cv_drift, loss_cluster, ...)."""
    return str(key).startswith("final_") or "loss" in _words(key)


def golden_view(blob: dict) -> dict:
    """What of a metrics.json is compared: ``metrics`` and ``run.config``, without volatile keys."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not volatile(k)}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    out = {k: v for k, v in blob.items() if k != "run"}
    if "run" in blob:
        out["run"] = {"config": (blob["run"] or {}).get("config", {})}
    return strip(out)


def _is_percent_record(d: dict) -> bool:
    m = d.get("metric")
    return isinstance(m, str) and ("%" in m or "(pp)" in m)


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fmt(x) -> str:
    if isinstance(x, dict):
        return f"a dict of {len(x)} keys"
    if isinstance(x, list):
        return f"a list of {len(x)} items"
    return f"{x:.6g}" if isinstance(x, float) else repr(x)


def compare(actual: dict, golden: dict, name: str = "") -> list[str]:
    """Differences between two metrics.json blobs (empty: they agree), one readable line each.

    ``name`` (the notebook) prefixes each line and selects the ``PERCENT`` entries."""
    diffs: list[str] = []
    prefix = f"{name}: " if name else ""

    def walk(a, g, path: str, key: str, scale: float) -> None:
        if isinstance(g, dict) and isinstance(a, dict):
            s = 100.0 if _is_percent_record(g) else scale
            for k in g:
                p = f"{path}.{k}" if path else str(k)
                if k not in a:
                    diffs.append(f"{prefix}{p}: missing (golden {_fmt(g[k])})")
                else:
                    walk(a[k], g[k], p, str(k), s)
            for k in a:
                if k not in g:
                    diffs.append(f"{prefix}{path + '.' if path else ''}{k}: not in the golden")
        elif isinstance(g, list) and isinstance(a, list):
            if len(a) != len(g):
                diffs.append(f"{prefix}{path}: {len(a)} items vs golden {len(g)}")
            for i, (x, y) in enumerate(zip(a, g)):
                walk(x, y, f"{path}[{i}]", key, scale)
        elif _num(a) and _num(g):
            if math.isnan(a) or math.isnan(g):          # a missing value (NaN in a pandas column) is exact
                if not (math.isnan(a) and math.isnan(g)):
                    diffs.append(f"{prefix}{path}: {_fmt(a)} vs golden {_fmt(g)}")
                return
            if (isinstance(a, int) and isinstance(g, int)) or _words(key) & COUNTS:
                if a != g:
                    diffs.append(f"{prefix}{path}: {_fmt(a)} vs golden {_fmt(g)} (exact)")
                return
            d, rel = abs(a - g), REL_TOL * max(abs(a), abs(g))
            if is_loss(key):
                if d > rel:
                    diffs.append(f"{prefix}{path}: {_fmt(a)} vs golden {_fmt(g)} (tolerance {REL_TOL:.0%} rel, a loss)")
                return
            s = 100.0 if any(r.search(f"{name}:{path}") for r in PERCENT) else scale
            if not (d <= ABS_TOL * s or d <= rel):
                tol = f"tolerance {ABS_TOL * s:g} abs{' (percent)' if s != 1 else ''} / {REL_TOL:.0%} rel"
                diffs.append(f"{prefix}{path}: {_fmt(a)} vs golden {_fmt(g)} ({tol})")
        elif a != g or type(a) is not type(g):
            diffs.append(f"{prefix}{path}: {_fmt(a)} vs golden {_fmt(g)}")

    walk(golden_view(actual), golden_view(golden), "", "", 1.0)
    return diffs


def count_values(blob: dict) -> int:
    """How many leaves of a blob :func:`compare` looks at."""
    def n(x):
        if isinstance(x, dict):
            return sum(n(v) for v in x.values())
        if isinstance(x, list):
            return sum(n(v) for v in x)
        return 1
    return n(golden_view(blob))


def write(outputs: Path, goldens: Path) -> list[Path]:
    """``goldens/<notebook>.json`` from every ``outputs/<notebook>/metrics.json`` (compared part only);
    goldens of notebooks no longer in ``outputs`` are removed."""
    goldens.mkdir(parents=True, exist_ok=True)
    written = []
    for m in sorted(outputs.glob("*/metrics.json")):
        p = goldens / f"{m.parent.name}.json"
        p.write_text(json.dumps(golden_view(json.loads(m.read_text())), indent=1, sort_keys=True) + "\n")
        written.append(p)
    for stale in sorted(set(goldens.glob("*.json")) - set(written)):
        stale.unlink()
        print(f"removed {stale} (no {outputs / stale.stem / 'metrics.json'})")
    return written


def check(outputs: Path, goldens: Path, newer_than: Path | None = None) -> tuple[list[str], int]:
    """Differences of every golden notebook's fresh metrics.json, and how many values were compared."""
    diffs, compared = [], 0
    goldens_found = sorted(goldens.glob("*.json"))
    if not goldens_found:
        return [f"no golden metrics in {goldens} (make golden writes them)"], 0
    since = newer_than.stat().st_mtime if newer_than is not None else None
    for gp in goldens_found:
        name = gp.stem
        m = outputs / name / "metrics.json"
        if not m.exists():
            diffs.append(f"{name}: {m} missing (the notebook failed or did not run)")
            continue
        if since is not None and m.stat().st_mtime < since:
            diffs.append(f"{name}: {m} is older than {newer_than} (not rewritten by this run: the notebook failed?)")
            continue
        golden = json.loads(gp.read_text())
        diffs += compare(json.loads(m.read_text()), golden, name)
        compared += count_values(golden)
    return diffs, compared


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vitadapt.golden", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["write", "check"])
    ap.add_argument("outputs", type=Path, help="a profile's outputs, e.g. outputs/smoke")
    ap.add_argument("goldens", type=Path, help="the golden metrics folder, e.g. tests/golden/metrics")
    ap.add_argument("--newer-than", type=Path, default=None,
                    help="check: a metrics.json older than this file is reported (its notebook did not finish)")
    args = ap.parse_args(argv)
    if args.command == "write":
        written = write(args.outputs, args.goldens)
        print(f"wrote {len(written)} golden metrics to {args.goldens}")
        return 0 if written else 1
    diffs, compared = check(args.outputs, args.goldens, args.newer_than)
    for d in diffs:
        print(d)
    if diffs:
        print(f"golden metrics: {len(diffs)} difference(s) ({TOLERANCE}; see vitadapt/golden.py)")
        return 1
    print(f"golden metrics: {compared} values of {len(list(args.goldens.glob('*.json')))} notebooks agree ({TOLERANCE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
