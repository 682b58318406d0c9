"""A form that launches any numbered notebook as a papermill run in a subprocess and shows what it produced.

``Launcher(notebook, profile)`` builds the form: a notebook picker (changing it rebuilds the fields), the
profile, and one text box per parameter of the picked notebook (read with ``papermill.inspect_notebook``;
a YAML value, empty means "the profile's value"). "Run" first checks every field (YAML that does not parse, a
value of the wrong type, an unknown profile or notebook) and reports the bad ones in the form, naming the
field and the problem, without launching anything. Otherwise it starts ``python -m vitadapt.runner --nb
<notebook> --force -p ...`` in a subprocess, exactly as ``make reproduce`` runs a notebook.

A background thread follows the run: the progress bar reads this run's own running-notebook file (the runner
writes ``.<notebook>.running-<runner pid>.ipynb``, and the runner is the process started here), and when the
run ends the output area shows a one-line summary, then the tables (``*.csv``) and figures (``*.png``) the run
saved, or the failing cell's error (from ``<notebook>.failed.ipynb``) and the last lines of the runner's log.
That thread writes to the output area only through ``Output.append_*`` and by assigning ``outputs``: output
captured with ``with output:`` off the main thread belongs to a request that has already finished, and a
browser front end drops it (ipywidgets, "Interacting with output widgets from background threads").
"""

from __future__ import annotations

import collections
import html
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vitadapt.config import PROFILES, load_profile, load_yaml
from vitadapt.paths import NOTEBOOKS, REPO_ROOT, output_dir, shown
from vitadapt.runner import notebook_error, recorded_dry_run

__all__ = ["Launcher", "notebook_path", "notebooks", "notebook_parameters", "parse_value", "cell_progress",
           "running_file"]

HIDDEN = {"interactive"}      # the runner sets it False: a launched run is headless, a form there would block
MAX_ROWS = 60                 # rows of a saved table shown in the form
LOG_LINES = 15                # last lines of the runner's log shown after a failure
TRACEBACK_LINES = 12          # last lines of the failing cell's traceback
_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "list": (list,), "dict": (dict,)}
_EXAMPLES = {"str": "a text, e.g. aid", "int": "a whole number, e.g. 3", "float": "a number, e.g. 5e-4",
             "bool": "true or false", "list": "a list, e.g. [0, 1]", "dict": "a mapping, e.g. {a: 1}"}


def notebooks() -> list[Path]:
    """The numbered notebooks, in order."""
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def notebook_path(name: str) -> Path:
    nbs = notebooks()
    for p in nbs:
        if name in (p.stem, p.name, p.stem[:2]):
            return p
    raise ValueError(f"notebook={name!r} is not valid; valid values: {', '.join(p.stem for p in nbs)}")


def notebook_parameters(path: Path) -> dict[str, dict]:
    import papermill as pm
    return pm.inspect_notebook(str(path))


def parse_value(text: str):
    """A form value: '' means None (take the profile's value); anything else is read as YAML."""
    text = text.strip()
    if not text:
        return None
    try:
        return load_yaml(text)                 # as -p and the config files: 5e-4 is a number
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at column {where.column + 1}" if where is not None else ""
        raise ValueError(f"value {text!r} is not valid YAML ({getattr(e, 'problem', None) or e}{at})") from None


def _type_problem(value, type_name: str) -> str:
    """'' when ``value`` fits the notebook's annotation (``int``, ``Optional[list]``, ...), else what is wrong."""
    base = re.fullmatch(r"(?:Optional\[)?(\w+)\]?", type_name.strip())
    base = base.group(1) if base else ""
    if base not in _TYPES:
        return ""                              # an annotation we do not know: the notebook checks it
    ok = isinstance(value, _TYPES[base]) and not (base in ("int", "float") and isinstance(value, bool))
    if ok:
        return ""
    kind = type(value).__name__
    return f"{value!r} is a {kind}; this parameter takes {_EXAMPLES[base]}"


def cell_progress(nb_file: Path) -> tuple[int, int]:
    """(finished code cells, code cells) of a notebook papermill is writing."""
    try:
        nb = json.loads(Path(nb_file).read_text())
    except (OSError, ValueError):
        return 0, 0
    code = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    done = sum(1 for c in code if c.get("metadata", {}).get("papermill", {}).get("status") == "completed")
    return done, len(code)


def running_file(out_dir: Path, name: str, runner_pid: int) -> Path:
    """The partial notebook a runner process writes while it executes ``name`` (``runner.run_one``)."""
    return Path(out_dir) / f".{name}.running-{runner_pid}.ipynb"


def _read_table(path: Path):
    import pandas as pd
    df = pd.read_csv(path)
    first = df.columns[0] if len(df.columns) else ""
    if str(first).startswith("Unnamed"):       # a saved RangeIndex: not a column of the table
        df = df.drop(columns=first)
    return df


class _Rich:
    """A display object with an HTML and a plain-text form (the text is what a non-HTML front end shows)."""

    def __init__(self, html_text: str, plain: str):
        self.html, self.plain = html_text, plain

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return self.plain


@dataclass
class _Run:
    """One launch: what its watcher thread needs, fixed when it starts (the form may change meanwhile)."""
    name: str
    profile: str
    out_dir: Path
    process: subprocess.Popen
    started: float
    log: collections.deque = field(default_factory=lambda: collections.deque(maxlen=400))
    progress: list = field(default_factory=list)       # (done, total) seen, in order

    @property
    def running(self) -> Path:
        return running_file(self.out_dir, self.name, self.process.pid)


class Launcher:
    """The form. ``widgets`` maps parameter names to their input widgets (``profile`` is a dropdown),
    ``output`` is the output area, ``launch(wait=True)`` runs headless (what the tests do)."""

    def __init__(self, notebook: str = "01_baselines", profile: str = "smoke"):
        import ipywidgets as W
        if profile not in PROFILES:
            raise ValueError(f"profile={profile!r} is not valid; valid values: {', '.join(PROFILES)}")
        path = notebook_path(notebook)
        self.picker = W.Dropdown(options=[p.stem for p in notebooks()], value=path.stem, description="notebook",
                                 style={"description_width": "140px"})
        self.profile = W.Dropdown(options=list(PROFILES), value=profile, description="profile",
                                  style={"description_width": "140px"})
        self.fields = W.VBox()
        self.button = W.Button(description="Run", button_style="primary", icon="play")
        self.stop_button = W.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.progress = W.IntProgress(value=0, min=0, max=1, description="cells")
        self.status = W.HTML()
        self.output = W.Output()
        self.button.on_click(lambda _: self.launch())
        self.stop_button.on_click(lambda _: self.stop())
        self.process: subprocess.Popen | None = None
        self.run: _Run | None = None
        self.watcher: threading.Thread | None = None
        self.select(path.stem)
        self.picker.observe(lambda change: self.select(change["new"]), names="value")
        self.profile.observe(lambda _: self._placeholders(), names="value")
        self.form = W.VBox([W.HTML("<b>Launch a notebook</b> (empty fields take the profile's value; others are "
                                   "YAML, e.g. <code>[0, 1, 2]</code>)"),
                            self.picker, self.fields, W.HBox([self.button, self.stop_button]),
                            W.HBox([self.progress, self.status]), self.output])

    def _ipython_display_(self):
        from IPython.display import display
        display(self.form)

    # ---- the fields -----------------------------------------------------------------------------
    def select(self, notebook: str) -> None:
        """Make the form for ``notebook``: its parameters become the fields (the profile is kept)."""
        import ipywidgets as W
        self.path = notebook_path(notebook)
        self.name = self.path.stem
        if self.picker.value != self.name:
            self.picker.value = self.name          # observe calls select again: the same fields, cheap
        self.params = notebook_parameters(self.path)
        self.widgets: dict[str, W.Widget] = {"profile": self.profile}
        rows = [self.profile]
        for name, p in self.params.items():
            if name == "profile" or name in HIDDEN:
                continue
            default = p["default"]
            w = W.Text(value="" if default == "None" else default, description=name,
                       style={"description_width": "140px"}, layout=W.Layout(width="460px"))
            w.tooltip = f"{p['help']} ({p['inferred_type_name']})"
            self.widgets[name] = w
            rows.append(W.HBox([w, W.HTML(f"<small>{html.escape(p['help'])}</small>")]))
        self.profile.tooltip = self.params.get("profile", {}).get("help", "")
        self.fields.children = rows
        self._placeholders()
        if self.run is None or self.run.process.poll() is not None:
            self.progress.value, self.progress.max = 0, 1
            self.status.value = ""
            self.output.outputs = ()

    def _placeholders(self) -> None:
        """Each empty field shows the value it gets from the selected profile."""
        try:
            values = load_profile(self.profile.value, self.name)
        except Exception:        # a broken config file is reported by the run itself
            values = {}
        for name, w in self.widgets.items():
            if name != "profile":
                w.placeholder = (f"{self.profile.value}: {json.dumps(values[name], default=str)}" if name in values
                                 else "profile value")

    # ---- values ---------------------------------------------------------------------------------
    def problems(self) -> dict[str, str]:
        """``{field: what is wrong}`` for every field whose value cannot be passed to the notebook."""
        out = {}
        if self.profile.value not in PROFILES:
            out["profile"] = f"{self.profile.value!r} is not a profile; valid values: {', '.join(PROFILES)}"
        for name, w in self.widgets.items():
            if name == "profile":
                continue
            try:
                value = parse_value(w.value)
            except ValueError as e:
                out[name] = str(e)
                continue
            if value is None:
                continue
            problem = _type_problem(value, self.params[name]["inferred_type_name"])
            if not problem and name.endswith("profile") and value != "" and value not in PROFILES:
                problem = f"{value!r} is not a profile; valid values: {', '.join(PROFILES)}"
            if not problem and name == "target" and self.name == "99_launcher":
                try:
                    notebook_path(str(value))
                except ValueError as e:
                    problem = str(e)
            if problem:
                out[name] = problem
        return out

    def parameters(self) -> dict:
        """The run's parameters from the form (those left empty are not passed). A ValueError names every
        field that is not valid."""
        bad = self.problems()
        if bad:
            raise ValueError("; ".join(f"{k}: {v}" for k, v in bad.items()))
        out = {"profile": self.profile.value}
        for name, w in self.widgets.items():
            if name != "profile":
                value = parse_value(w.value)
                if value is not None:
                    out[name] = value
        return out

    def command(self) -> list[str]:
        params = self.parameters()
        cmd = [sys.executable, "-m", "vitadapt.runner", "--profile", params.pop("profile"), "--nb",
               self.name, "--force", "--progress", "off"]          # the form draws its own progress bar
        for k, v in params.items():
            cmd += ["-p", k, json.dumps(v)]     # JSON is YAML: the runner parses it back
        return cmd

    @property
    def out_dir(self) -> Path:
        return output_dir(self.profile.value, self.name)

    # ---- running --------------------------------------------------------------------------------
    def launch(self, wait: bool = False) -> subprocess.Popen | None:
        """Check the fields and start the run; None (and the problems in the form) when a field is invalid.
        ``wait=True`` returns once the run has ended and its results are in the output area."""
        if self.process is not None and self.process.poll() is None:
            self.status.value = f"a run of {self.run.name} is already going: wait for it, or press Stop"
            return self.process
        self.output.outputs = ()
        for w in self.widgets.values():
            w.layout.border = None
        bad = self.problems()
        if bad:
            for name in bad:
                self.widgets[name].layout.border = "2px solid #d9534f"
            n = len(bad)
            self.status.value = (f"<span style='color:#d9534f'><b>not launched:</b> {n} invalid field"
                                 f"{'s' if n > 1 else ''} ({', '.join(bad)})</span>")
            self.output.append_stderr("".join(f"{k}: {v}\n" for k, v in bad.items()))
            return None
        cmd = self.command()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env=env)
        self.run = run = _Run(self.name, self.profile.value, self.out_dir, self.process, time.time())
        self.progress.value, self.progress.max = 0, 1
        self.progress.bar_style = ""
        self.button.disabled, self.stop_button.disabled = True, False
        self.status.value = f"running {run.name} ({run.profile}): starting the kernel ..."
        self.output.append_stdout("$ " + " ".join(["python", *cmd[1:]]) + "\n")
        reader = threading.Thread(target=self._read_log, args=(run,), daemon=True)
        reader.start()
        self.watcher = threading.Thread(target=self._watch, args=(run, reader), daemon=True)
        self.watcher.start()
        if wait:
            self.watcher.join()
        return self.process

    def stop(self) -> None:
        """Stop the run as Ctrl-C would: the runner keeps the partial notebook, the previous results stay."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.status.value = f"stopping {self.run.name} ..."

    @staticmethod
    def _read_log(run: _Run) -> None:
        for line in run.process.stdout:        # read as it comes: a full pipe would block the runner
            run.log.append(line.rstrip("\n"))

    def _watch(self, run: _Run, reader: threading.Thread) -> None:
        try:
            while run.process.poll() is None:
                self._follow(run)
                time.sleep(0.5)
            reader.join(timeout=10)
            self._finish(run)
        except Exception as e:     # never die silently: the form would look busy forever
            self.output.append_stderr(f"the launcher failed while following the run: {type(e).__name__}: {e}\n")
        finally:
            self.button.disabled, self.stop_button.disabled = False, True

    def _follow(self, run: _Run) -> None:
        done, total = cell_progress(run.running)
        if not total:
            return
        run.progress.append((done, total))
        self.progress.max, self.progress.value = total, done
        self.status.value = (f"running {run.name} ({run.profile}): cell {min(done + 1, total)} of {total}, "
                             f"{time.time() - run.started:.0f} s")

    def _finish(self, run: _Run) -> None:
        rc, wall = run.process.returncode, time.time() - run.started
        log = list(run.log)
        dry = _dry_run_reason(run)
        where = run.out_dir / "dry_run" if dry else run.out_dir
        if rc == 0:
            self.progress.value = self.progress.max
            self.progress.bar_style = "warning" if dry else "success"
            tables, figures = self._fresh(where, "*.csv", run), self._fresh(where, "*.png", run)
            what = f"dry run ({dry})" if dry else "ok"
            line = (f"{run.name} ({run.profile}): {what} in {wall:.1f} s; {len(tables)} table"
                    f"{'s' if len(tables) != 1 else ''}, {len(figures)} figure{'s' if len(figures) != 1 else ''} "
                    f"in {shown(where)}")
            self.status.value = f"<span style='color:#3c763d'><b>done</b></span>: {html.escape(line)}"
            self.output.append_display_data(_Rich(f"<b>{html.escape(line)}</b>", line))
            self.show_results(where, tables, figures)
            return
        self.progress.bar_style = "danger"
        stopped = rc in (130, -signal.SIGINT)
        what = "stopped" if stopped else f"FAILED (exit {rc})"
        line = f"{run.name} ({run.profile}): {what} after {wall:.1f} s"
        self.status.value = f"<span style='color:#d9534f'><b>{html.escape(what)}</b></span>: {html.escape(line)}"
        self.output.append_display_data(_Rich(f"<b style='color:#d9534f'>{html.escape(line)}</b>", line))
        failed = run.out_dir / f"{run.name}.failed.ipynb"
        fresh = failed.exists() and failed.stat().st_mtime >= run.started - 1
        err = notebook_error(failed) if fresh and not stopped else None    # Stop's KeyboardInterrupt is no news
        if err:
            self.output.append_stderr(
                f"{err['ename']}: {err['evalue']}\n\nin cell In [{err['cell']}] of {shown(failed)}; the end of its "
                f"traceback:\n" + "\n".join(err["traceback"][-TRACEBACK_LINES:]) + "\n")
        tail = log[-LOG_LINES:]
        self.output.append_stdout(f"\nthe runner's log (last {len(tail)} lines):\n" + "\n".join(tail) + "\n")

    @staticmethod
    def _fresh(folder: Path, pattern: str, run: _Run) -> list[Path]:
        """Files of ``folder`` this run wrote (older ones belong to other runs, with other parameters)."""
        return sorted(p for p in folder.glob(pattern) if p.stat().st_mtime >= run.started - 1)

    def show_results(self, out_dir: Path, tables: list[Path] | None = None, figures: list[Path] | None = None):
        """Put the tables (as HTML) and figures of ``out_dir`` in the output area (all of them by default)."""
        from IPython.display import Image
        tables = sorted(Path(out_dir).glob("*.csv")) if tables is None else tables
        figures = sorted(Path(out_dir).glob("*.png")) if figures is None else figures
        for t in tables:
            try:
                df = _read_table(t)
            except Exception as e:
                self.output.append_stderr(f"{t.name}: not readable as a table ({type(e).__name__}: {e})\n")
                continue
            more = f" (first {MAX_ROWS} of {len(df)} rows)" if len(df) > MAX_ROWS else ""
            shown = df.head(MAX_ROWS)
            self.output.append_display_data(_Rich(
                f"<h4>{html.escape(t.name)}{more}</h4>"
                + shown.to_html(index=False, na_rep="", float_format=lambda x: f"{x:.4g}"),
                f"{t.name}{more}\n{shown.to_string(index=False, na_rep='')}"))
        for f in figures:
            self.output.append_display_data(_Rich(f"<h4>{html.escape(f.name)}</h4>", f.name))
            self.output.append_display_data(Image(filename=str(f)))
        metrics = Path(out_dir) / "metrics.json"
        if not tables and not figures and metrics.exists():
            blob = json.loads(metrics.read_text()).get("metrics", {})
            self.output.append_stdout(json.dumps(blob, indent=1, default=str)[:3000] + "\n")


def _dry_run_reason(run: _Run) -> str:
    """Why this run was a dry run ('' when it really ran): a dry run writes dry_run/metrics.json instead."""
    m = run.out_dir / "dry_run" / "metrics.json"
    if not m.exists() or m.stat().st_mtime < run.started - 1:
        return ""
    try:
        return recorded_dry_run(json.loads(m.read_text()))
    except (OSError, ValueError, AttributeError):
        return "see dry_run/metrics.json"
