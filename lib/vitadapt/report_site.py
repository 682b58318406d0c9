"""The static site behind ``make report``: a profile's executed notebooks as HTML pages and an index that puts the
published numbers beside ours.

    python -m vitadapt.report_site --profile smoke [--outputs DIR] [--site DIR]

Reads ``outputs/<profile>/<notebook>/`` as the runner leaves it (``<nb>.ipynb`` and ``metrics.json``; a dry run's
under ``dry_run/``; a failed run's ``<nb>.failed.ipynb``) and writes ``outputs/<profile>/site/``:

- ``<nb>.html`` per executed notebook (nbconvert's HTMLExporter, lab template, every image embedded: the site
  opens from disk, no server), ``<nb>.dry_run.html`` / ``<nb>.failed.html`` for a later dry or failed run;
- ``<nb>/`` the notebook's figures and CSV tables, copied so that the site stands on its own;
- ``index.html``: every numbered notebook with its status (ok / dry run and why / failed and why / missing), its
  headline numbers (its ``metrics.json`` ``results`` rows, mean ± std over seeds), links to its page, figures and
  tables; then the paper-beside-ours table (:func:`vitadapt.protocol.report.paper_vs_ours` over
  :func:`~vitadapt.protocol.report.collect`, the join 90_results shows), one section per results table.

The site is built in a temporary folder beside the old one and swapped in by renames, so a failed build leaves
the previous site as it was. It lives under ``outputs/`` (git-ignored): generated locally, never committed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vitadapt.config import PROFILES
from vitadapt.paths import NOTEBOOKS, OUTPUTS, shown
from vitadapt import runner
from vitadapt.results import DRY_RUN_DIR

SITE = "site"
HEADLINES = 5                     # headline numbers per notebook on the index (the page has them all)
FIGURES = (".png", ".svg", ".jpg", ".jpeg", ".gif", ".pdf")
TABLES = (".csv",)


class ReportError(RuntimeError):
    """Nothing to build (or a bad profile): the message says what to run."""


@dataclass
class Entry:
    """One numbered notebook of the profile, as the runner left it."""
    name: str
    status: str = "missing"           # ok | dry run | failed | missing
    reason: str = ""                  # a dry run's reason, a failure's error
    page: str = ""                    # site-relative HTML page of the shown run ("" when missing)
    notes: list[str] = field(default_factory=list)          # HTML snippets: later dry / failed runs
    headlines: list[str] = field(default_factory=list)
    n_results: int = 0
    figures: list[str] = field(default_factory=list)        # site-relative
    tables: list[str] = field(default_factory=list)
    wall_s: float | None = None
    started: str = ""
    sources: list[tuple[Path, str, str]] = field(default_factory=list)   # (notebook, page name, label)


# ---- reading the outputs ---------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        blob = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return blob if isinstance(blob, dict) else {}


def notebook_error(nb: Path) -> str:
    """The failing cell's error of an executed notebook (``Name: message``), '' when it holds none."""
    err = runner.notebook_error(nb)
    if err is None:
        return ""
    msg, name = " ".join(str(err["evalue"]).split()), err["ename"] or "Error"
    return f"{name}: {msg}"[:300] if msg else name


def _fmt_value(v: float) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 100:
        return f"{int(v):,}"
    return f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"


def headline_numbers(metrics: dict, limit: int = HEADLINES) -> tuple[list[str], int]:
    """Up to ``limit`` one-line headlines of a metrics.json ``metrics`` blob and how many result rows it has.
    ``results`` rows read ``table · method: mean ± std (n)`` (parameter counts as integers); a notebook without
    result rows shows its first scalar numbers instead (00's sanity accuracies)."""
    rows = [r for r in metrics.get("results") or [] if isinstance(r, dict)]
    out = []
    for r in rows[:limit]:
        label = " · ".join(str(r[k]) for k in ("table", "method") if r.get(k) not in (None, ""))
        mean, std, n = r.get("mean"), r.get("std"), r.get("n")
        status = r.get("status") if isinstance(r.get("status"), str) else ""
        if not isinstance(mean, (int, float)) or mean != mean:          # None or NaN: diverged
            value = status or "no value"
        elif r.get("metric") == "parameters":
            value = f"{mean:,.0f} parameters"
        else:
            unit = " %" if "%" in str(r.get("metric", "")) else ""
            spread = f" ± {std:.1f}" if isinstance(std, (int, float)) and std == std else ""
            value = f"{mean:.1f}{spread}{unit}" + (f" (n={n}" + (f"; {status})" if status else ")") if n else "")
        out.append(f"{label}: {value}")
    if rows:
        return out, len(rows)
    skip = {"dry_run", "results", "per_seed", "summary", "parameters", "command"}
    for key, val in metrics.items():
        if key in skip or len(out) >= limit:
            continue
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            out.append(f"{key}: {_fmt_value(val)}")
        elif isinstance(val, dict):
            for k, v in val.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and len(out) < limit:
                    out.append(f"{key} {k}: {_fmt_value(v)}")
    return out, 0


def _names(outputs: Path) -> list[str]:
    """Every numbered notebook: those in notebooks/ and those with outputs here (a renamed one is kept)."""
    names = {p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")}
    names |= {d.name for d in outputs.glob("[0-9][0-9]_*") if d.is_dir()}
    return sorted(names)


def scan(outputs: Path) -> list[Entry]:
    """What the runner left for each notebook under ``outputs`` (one profile's folder)."""
    entries = []
    for name in _names(outputs):
        d = outputs / name
        e = Entry(name)
        real, dry, failed = d / f"{name}.ipynb", d / DRY_RUN_DIR / f"{name}.ipynb", d / f"{name}.failed.ipynb"
        shown = real if real.exists() else dry if dry.exists() else failed if failed.exists() else None
        if shown is None:
            entries.append(e)
            continue
        metrics_blob = _read_json(shown.parent / "metrics.json") if shown is not failed else {}
        metrics, run = metrics_blob.get("metrics") or {}, metrics_blob.get("run") or {}
        e.page = f"{name}.html"
        e.sources.append((shown, e.page, ""))
        if shown is failed:
            e.status, e.reason = "failed", notebook_error(failed) or "the run stopped with an error"
        elif runner.recorded_dry_run(metrics_blob):
            e.status, e.reason = "dry run", runner.recorded_dry_run(metrics_blob)
        else:
            e.status = "ok"
            if not metrics_blob:
                e.notes.append("no metrics.json beside the notebook")
        e.headlines, e.n_results = headline_numbers(metrics)
        e.wall_s = run.get("papermill_wall_time_s", run.get("wall_time_s"))
        e.started = str(run.get("started", ""))[:16].replace("T", " ")
        for f in sorted(shown.parent.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in FIGURES + TABLES:
                (e.figures if f.suffix.lower() in FIGURES else e.tables).append(f"{name}/{f.name}")
        mtime = shown.stat().st_mtime
        if shown is real and dry.exists() and dry.stat().st_mtime > mtime:
            why = runner.recorded_dry_run(_read_json(dry.parent / "metrics.json"))
            page = f"{name}.dry_run.html"
            e.sources.append((dry, page, "dry run"))
            e.notes.append(f'a later run was a <a href="{page}">dry run</a> ({html.escape(why)}); '
                           "the results shown are the last real run's")
        if shown is not failed and failed.exists() and failed.stat().st_mtime > mtime:
            page = f"{name}.failed.html"
            e.sources.append((failed, page, "failed"))
            e.notes.append(f'the latest run <a href="{page}">FAILED</a>: '
                           f'{html.escape(notebook_error(failed) or "see its page")}; the results shown are older')
        entries.append(e)
    return entries


# ---- writing the site ------------------------------------------------------------------------------------

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;
 color:#222}
h1{margin-bottom:.2em} .sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:14px}
th,td{border:1px solid #ddd;padding:.3em .55em;text-align:left;vertical-align:top}
th{background:#f4f4f4} tr:nth-child(even) td{background:#fbfbfb}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#17692f;font-weight:600} .dry{color:#8a5a00;font-weight:600} .failed{color:#b00020;font-weight:600}
.missing{color:#888;font-weight:600} .note{color:#8a5a00;font-size:13px} ul.h{margin:0;padding-left:1.1em}
.files a{margin-right:.6em} code{background:#f4f4f4;padding:0 .2em} nav.toc span{margin-right:.9em;white-space:nowrap}
"""

NAV_CSS = ("<style>nav.vitadapt{font:14px system-ui,sans-serif;padding:.5em 1em;background:#f4f4f4;"
           "border-bottom:1px solid #ddd;position:sticky;top:0;z-index:100}nav.vitadapt a{margin-right:.7em}</style>")

STATUS_CLASS = {"ok": "ok", "dry run": "dry", "failed": "failed", "missing": "missing"}


def _e(x) -> str:
    return html.escape(str(x))


def _exporter():
    from nbconvert import HTMLExporter
    return HTMLExporter(template_name="lab", embed_images=True)


# The lab template loads require.js, MathJax and mermaid from a CDN: our notebooks use none of them (no math, no
# diagrams; widgets need a kernel anyway), and a page opened from disk must not wait on the network.
_REMOTE_SCRIPT = re.compile(r'<script[^>]*\ssrc="https?://[^"]*"[^>]*>\s*</script>\s*'
                            r'|<script type="module">(?:(?!</script>).)*?https?://(?:(?!</script>).)*</script>\s*',
                            re.S)


def _has_widgets(nb) -> bool:
    return any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def _page(exporter, nb: Path, title: str, nav: str) -> str:
    import nbformat
    node = nbformat.read(str(nb), as_version=4)
    body, _ = exporter.from_notebook_node(node, resources={"metadata": {"name": title}})
    body = _REMOTE_SCRIPT.sub("", body)
    if _has_widgets(node):
        nav = nav.replace("</nav>", " · its forms (widgets) work only in JupyterLab, with a kernel</nav>")
    head_end = body.find("</head>")
    if head_end >= 0:
        body = body[:head_end] + NAV_CSS + body[head_end:]
    start = body.find("<body")
    start = body.find(">", start) + 1 if start >= 0 else 0
    return body[:start] + nav + body[start:]


def _nav(e: Entry, profile: str, label: str) -> str:
    status = label or e.status + (f": {e.reason}" if e.reason else "")
    links = "".join(f'<a href="{_e(f)}">{_e(Path(f).name)}</a>' for f in e.figures + e.tables)
    return (f'<nav class="vitadapt"><a href="index.html">&larr; index</a> <b>{_e(e.name)}</b> '
            f'(profile {_e(profile)}, {_e(status)}){" · files: " + links if links else ""}</nav>')


def _index_row(e: Entry) -> str:
    cls = STATUS_CLASS[e.status]
    status = f'<span class="{cls}">{_e(e.status)}</span>' + (f"<br>{_e(e.reason)}" if e.reason else "")
    if e.status == "missing":
        status += f"<br>run <code>make reproduce PROFILE=… NB={_e(e.name.split('_', 1)[0])}</code>"
    name = f'<a href="{_e(e.page)}">{_e(e.name)}</a>' if e.page else _e(e.name)
    heads = "".join(f"<li>{_e(h)}</li>" for h in e.headlines)
    more = e.n_results - len(e.headlines) if e.n_results > len(e.headlines) else 0
    if more:
        heads += f'<li><a href="{_e(e.page)}">{more} more result rows</a></li>'
    heads = f'<ul class="h">{heads}</ul>' if heads else ""
    notes = "".join(f'<div class="note">{n}</div>' for n in e.notes)
    files = "".join(f'<a href="{_e(f)}">{_e(Path(f).name)}</a> ' for f in e.figures + e.tables)
    wall = f"{e.wall_s:.0f} s" if isinstance(e.wall_s, (int, float)) else ""
    return (f"<tr><td>{name}</td><td>{status}{notes}</td><td>{heads}</td><td class=\"files\">{files}</td>"
            f"<td class=\"num\">{_e(wall)}</td><td>{_e(e.started)}</td></tr>")


def _paper_tables(profile: str, outputs: Path, pages: dict[str, str]) -> tuple[str, int, int]:
    """The paper-beside-ours sections (HTML), the number of rows and of rows with both numbers."""
    import pandas as pd
    from vitadapt.protocol.report import collect, paper_vs_ours
    ours = collect(profile, outputs)
    shown = paper_vs_ours(ours)
    where = {}
    if len(ours):
        for (t, m), g in ours.groupby(["table", "method"], sort=False):
            where[(t, m)] = sorted(set(g["notebook"]))
    cols = [c for c in ("method", "paper", "paper label", "paper setting", "ours (mean ± std)", "protocol", "ours",
                        "like for like") if c in shown]
    parts, toc, both = [], [], 0
    groups = []
    for table, g in shown.groupby("table", sort=False):
        has_both = int((g["paper"].notna() & g["ours (mean ± std)"].fillna("").astype(str).ne("")).sum())
        groups.append((table, g, has_both))
    # the tables where a published number meets ours first, then published only, then ours only
    groups.sort(key=lambda t: (-t[2], -int(t[1]["paper"].notna().sum())))
    for k, (table, g, has_both) in enumerate(groups):
        both += has_both
        anchor = f"t{k}"
        toc.append(f'<span><a href="#{anchor}">{_e(table)}</a>' + (f" ({has_both})" if has_both else "") + "</span>")
        g = g.sort_values("paper", key=lambda c: c.isna(), kind="stable")       # rows with a paper number first
        rows = []
        for _, r in g.iterrows():
            cells = []
            for c in cols:
                v = r[c]
                if c == "paper":
                    cells.append(f'<td class="num">{"" if pd.isna(v) else _e(_fmt_value(float(v)))}</td>')
                elif c == "like for like":
                    cells.append(f"<td>{'yes' if bool(v) else 'no'}</td>")
                else:
                    cells.append(f"<td>{'' if (not isinstance(v, str) and pd.isna(v)) else _e(v)}</td>")
            nbs = where.get((r["table"], r["method"]), [])
            cells.append("<td>" + " ".join(f'<a href="{_e(pages[n])}">{_e(n)}</a>' if n in pages else _e(n)
                                           for n in nbs) + "</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
        head = "".join(f'<th{" class=num" if c == "paper" else ""}>{_e(c)}</th>' for c in cols) + "<th>from</th>"
        parts.append(f'<h3 id="{anchor}">{_e(table)} <small>({len(g)} rows, {has_both} with paper and ours)'
                     f'</small></h3><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
    nav = f'<nav class="toc">{" ".join(toc)}</nav>' if toc else "<p>No result rows and no published numbers.</p>"
    return nav + "".join(parts), len(shown), both


def _index(profile: str, outputs: Path, entries: list[Entry], pages: dict[str, str], seconds: float) -> str:
    counts = {s: sum(e.status == s for e in entries) for s in STATUS_CLASS}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    commits = sorted({c for e in entries for c in [_commit(outputs / e.name)] if c})
    code = "; code " + _e(", ".join(commits)) if commits else ""
    paper, n_rows, n_both = _paper_tables(profile, outputs, pages)
    rows = "".join(_index_row(e) for e in entries)
    built = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    where = shown(outputs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vitadapt report: {_e(profile)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body>
<h1>vitadapt report, profile <code>{_e(profile)}</code></h1>
<p class="sub">{_e(len(entries))} notebooks: {_e(summary)}. From <code>{_e(where)}</code>; built {_e(built)} in
{seconds:.0f} s by <code>make report PROFILE={_e(profile)}</code>{code}. Numbers are mean ± std over seeds
(<a href="#paper">paper beside ours</a> below); a notebook's page holds every table and figure it printed.</p>
<h2>Notebooks</h2>
<table><thead><tr><th>notebook</th><th>status</th><th>headline numbers</th><th>figures and tables</th>
<th class="num">wall time</th><th>run started</th></tr></thead><tbody>{rows}</tbody></table>
<h2 id="paper">Paper beside ours</h2>
<p>{n_rows} rows, {n_both} with a published number and ours. The published numbers come from
<code>vitadapt.papers</code>; "ours" names the profile, backbone and data they were measured with: only
trainable-parameter counts compare like for like (see each notebook's at-a-glance table for what differs).
Tables where both meet come first (in brackets: how many rows).</p>
{paper}
</body></html>
"""


def _commit(d: Path) -> str:
    for m in (d / "metrics.json", d / DRY_RUN_DIR / "metrics.json"):
        c = (_read_json(m).get("run") or {}).get("git_commit")
        if c:
            return str(c)
    return ""


def _check(profile: str, outputs: Path) -> None:
    if profile not in PROFILES and not outputs.is_dir():
        raise ReportError(f"PROFILE={profile!r} is not valid; valid values: {', '.join(PROFILES)}")
    executed = [p for pat in ("[0-9][0-9]_*/[0-9][0-9]_*.ipynb", f"[0-9][0-9]_*/{DRY_RUN_DIR}/[0-9][0-9]_*.ipynb")
                for p in outputs.glob(pat)]
    if not executed:
        have = sorted(p.name for p in OUTPUTS.glob("*") if p.is_dir() and any(p.glob("[0-9][0-9]_*/*.ipynb")))
        rel = shown(outputs)
        raise ReportError(
            f"no executed notebooks in {rel} for profile {profile!r}: run `make reproduce PROFILE={profile}` "
            f"first, then `make report PROFILE={profile}`"
            + (f" (profiles with executed notebooks here: {', '.join(have)})" if have else ""))


def build(profile: str, outputs: Path | None = None, site: Path | None = None, quiet: bool = True) -> Path:
    """Build the site of ``profile`` (outputs from ``outputs``, default ``outputs/<profile>``) into ``site``
    (default ``<outputs>/site``); returns the index page. Raises :class:`ReportError` when there is nothing to
    build. Atomic: built in a temporary folder beside ``site`` and renamed into place."""
    t0 = time.perf_counter()
    outputs = Path(outputs) if outputs is not None else OUTPUTS / profile
    site = Path(site) if site is not None else outputs / SITE
    _check(profile, outputs)
    entries = scan(outputs)
    site.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{site.name}.building-", dir=site.parent))
    try:
        exporter = _exporter()
        pages = {e.name: e.page for e in entries if e.page}
        for e in entries:
            for f in e.figures + e.tables:
                src = outputs / e.name / Path(f).name
                if not src.exists():
                    src = outputs / e.name / DRY_RUN_DIR / Path(f).name
                (tmp / e.name).mkdir(exist_ok=True)
                shutil.copy2(src, tmp / f)
            for nb, page, label in e.sources:
                if not quiet:
                    print(f"  {page}", flush=True)
                try:
                    text = _page(exporter, nb, f"{e.name} ({profile})", _nav(e, profile, label))
                except Exception as err:           # an unreadable notebook: say which, keep building the rest
                    raise ReportError(f"cannot convert {nb}: {type(err).__name__}: {err}") from err
                (tmp / page).write_text(text, encoding="utf-8")
        (tmp / "index.html").write_text(_index(profile, outputs, entries, pages, time.perf_counter() - t0),
                                        encoding="utf-8")
        os.chmod(tmp, 0o755)
        old = None
        if site.exists():
            old = site.with_name(f".{site.name}.old-{os.getpid()}")
            os.replace(site, old)
        os.replace(tmp, site)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return site / "index.html"


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vitadapt.report_site", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="cpu", help=f"whose outputs ({', '.join(PROFILES)}); default cpu")
    ap.add_argument("--outputs", type=Path, default=None,
                    help="the profile's outputs folder (default outputs/<profile>)")
    ap.add_argument("--site", type=Path, default=None, help="where the site goes (default <outputs>/site)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        index = build(args.profile, args.outputs, args.site, quiet=False)
    except ReportError as e:
        print(f"make report: {e}", file=sys.stderr)
        return 2
    rel = shown(index)
    print(f"wrote {rel} ({len(list(index.parent.glob('*.html')))} pages, {_size(index.parent) / 1e6:.1f} MB, "
          f"{time.perf_counter() - t0:.0f} s); open it from disk: {index.resolve().as_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
