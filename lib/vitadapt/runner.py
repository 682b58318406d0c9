"""The papermill driver behind ``make reproduce``.

    python -m vitadapt.runner --profile cpu [--nb 00,01] [--force] [--require-real] [-p NAME VALUE ...]

Runs every numbered notebook in notebooks/ (or those named by ``--nb``) headlessly for one profile. Each
executed notebook goes to a temporary name and is renamed to ``outputs/<profile>/<name>/<name>.ipynb`` only
when it succeeds (a failed one is kept as ``<name>.failed.ipynb`` beside it, the previous outputs untouched).
A notebook whose last real run had the same config hash and code hash is skipped unless ``--force``; a dry run
(the notebook stopped before training, ``metrics["dry_run"]`` says why) is never skipped, and with
``--require-real`` it counts as a failure. ``-p`` values are YAML (``5e-4`` is a number); a name that no
selected notebook has is an error. One failing notebook is reported and the rest still run; the exit code is 1
if any failed, 130 when interrupted (Ctrl-C).

While a notebook runs, stderr shows its cells done / total and the time left in it and in the suite (``--progress``:
a bar redrawn in place in a terminal, plain lines at most every ``--progress-every`` seconds otherwise), estimated
from the cell timings of each notebook's last finished run in ``outputs/<profile>/.timings.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import yaml

from vitadapt.config import PROFILES, load_profile, load_yaml
from vitadapt.paths import NOTEBOOKS, launch_rank, launch_world, output_dir, shown
from vitadapt.results import DRY_RUN_DIR, _alive, atomic_write_text, code_hash

KERNEL = "vitadapt"
ALWAYS_RUN = {"90_results"}   # reads the other notebooks' outputs: never "unchanged"
# The kernel logs to the runner's terminal: a TCP warning on every start, zmq tracebacks when it is stopped while
# busy (Ctrl-C). Errors of the notebook itself are in the notebook, not in this log.
KERNEL_ARGS = ["--IPKernelApp.log_level=CRITICAL"]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a notebook; ``kept`` says what became of its partial notebook."""

    def __init__(self, notebook: str, kept: str):
        super().__init__(notebook)
        self.notebook, self.kept = notebook, kept


def discover(selection: str = "") -> list[Path]:
    """Numbered notebooks, optionally filtered by a comma list of numbers or names ("00,01" or "01_baselines")."""
    nbs = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if not selection:
        return nbs
    wanted = [s.strip() for s in selection.split(",") if s.strip()]
    out = []
    for w in wanted:
        match = [p for p in nbs if p.stem == w or p.stem.split("_", 1)[0] == w]
        if not match:
            raise ValueError(f"NB={w!r} matches no notebook; valid: {', '.join(p.stem for p in nbs)}")
        out += [m for m in match if m not in out]
    return out


def notebook_parameters(nb: Path) -> list[str]:
    """Names defined in the notebook's ``parameters``-tagged cell (``name = ...`` or ``name: type = ...``)."""
    import nbformat
    cells = nbformat.read(nb, 4).cells
    src = "\n".join(c.source for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    return list(dict.fromkeys(re.findall(r"^([A-Za-z_]\w*)\s*(?::|=(?!=))", src, flags=re.M)))


def _has_parameter(nb: Path, name: str) -> bool:
    return name in notebook_parameters(nb)


def split_params(nbs: list[Path], params: dict) -> tuple[dict[str, dict], list[str]]:
    """Each notebook's share of ``params`` and one note per parameter that only some notebooks take.
    A name that no selected notebook has is a ValueError listing the valid ones."""
    have = {nb.stem: notebook_parameters(nb) for nb in nbs}
    notes = []
    for name in params:
        without = [n for n, names in have.items() if name not in names]
        if len(without) == len(have):
            valid = sorted(set().union(*have.values()))
            whose = nbs[0].stem if len(nbs) == 1 else f"the {len(nbs)} selected notebooks"
            raise ValueError(f"-p {name}: no selected notebook has this parameter; valid parameters of {whose}: "
                             f"{', '.join(valid) or '(none)'}")
        if without:
            notes.append(f"-p {name} is not passed to {', '.join(without)} (no such parameter there)")
    return {n: {k: v for k, v in params.items() if k in names} for n, names in have.items()}, notes


def _config_key(profile: str, name: str, params: dict) -> str:
    import hashlib
    blob = json.dumps({"profile": load_profile(profile, name), "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def recorded_dry_run(blob: dict) -> str:
    """Why the run recorded in a metrics.json blob was a dry run ('' when it really ran), on one line."""
    reason = (blob.get("metrics") or {}).get("dry_run")
    if not reason:
        return ""
    return " ".join(reason.split()) if isinstance(reason, str) else "yes" if reason is True else str(reason)


def _up_to_date(out_dir: Path, name: str, key: str, chash: str) -> bool:
    m = out_dir / "metrics.json"
    if not m.exists() or not (out_dir / f"{name}.ipynb").exists():
        return False
    try:
        blob = json.loads(m.read_text())
        run = blob["run"]
    except (ValueError, KeyError):
        return False
    if recorded_dry_run(blob):     # data or weights may be here now: a dry run is never final
        return False
    return run.get("runner_key") == key and run.get("code_hash") == chash


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def notebook_error(nb_file: Path) -> dict | None:
    """The failing cell's error output of an executed notebook (papermill's own ``PapermillExecutionError`` banner
    skipped): ``{cell, ename, evalue, traceback}`` (``cell`` is its ``In [n]`` number or code-cell position,
    ``traceback`` a list of lines without ANSI codes), or None (none, or the file cannot be read)."""
    try:
        nb = json.loads(Path(nb_file).read_text())
    except (OSError, ValueError):
        return None
    n_code = 0
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        n_code += 1
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error" and out.get("ename") != "PapermillExecutionError":
                lines = strip_ansi("\n".join(out.get("traceback") or [])).splitlines()
                return {"cell": cell.get("execution_count") or n_code, "ename": out.get("ename", ""),
                        "evalue": strip_ansi(out.get("evalue", "")), "traceback": [ln for ln in lines if ln.strip()]}
    return None


def _stamp(out_dir: Path, key: str, wall: float) -> str:
    """Add the runner's key and wall time to the run record the notebook wrote. Returns '' or what went wrong
    (the notebook's metrics.json is then left as it was, without a key, so the next run does not skip it)."""
    m = out_dir / "metrics.json"
    try:
        blob = json.loads(m.read_text())
        blob["run"]["runner_key"] = key
        blob["run"]["papermill_wall_time_s"] = round(wall, 2)
        atomic_write_text(m, json.dumps(blob, indent=2, sort_keys=True))
    except OSError as e:
        what = "disk full" if e.errno == errno.ENOSPC else f"{e.strerror or type(e).__name__}"
        return f"{what} writing {shown(m)}; it is left as the notebook wrote it"
    except (ValueError, KeyError, TypeError) as e:
        return f"{shown(m)} is not a run record ({type(e).__name__}: {e})"
    return ""


def _keep_partial(tmp: Path, failed: Path) -> str:
    """Keep a failed run's partial notebook as ``failed`` if it is a valid notebook (a full disk can truncate
    it); otherwise delete it and leave any earlier ``failed`` alone. Returns a note for the error line."""
    import nbformat
    if not tmp.exists():
        return "no partial notebook"
    try:
        nbformat.read(tmp, 4)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        earlier = f"; the earlier {failed.name} is kept" if failed.exists() else ""
        return f"its partial notebook was not a valid notebook ({type(e).__name__}; disk full?) and was deleted{earlier}"
    os.replace(tmp, failed)
    return f"partial notebook kept as {shown(failed)}"


# ---- progress: cells done / total and the time left, from the last run's cell timings ----------------------------

TIMINGS = ".timings.json"        # outputs/<profile>/.timings.json: each notebook's cell timings of its last finished run
EVERY_S = 30.0                   # without a terminal: a progress line at most this often (and after a cell this long)


def _fmt_s(s: float) -> str:
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def timings_path(profile: str) -> Path:
    return output_dir(profile, "_").parent / TIMINGS


def load_timings(profile: str) -> dict[str, dict]:
    """``{notebook: {"wall_s", "cells": [[cell key, seconds], ...], "status", "finished"}}`` of the last finished
    runs; {} when there are none or the file is not readable (it is then rewritten by the next finished run)."""
    p = timings_path(profile)
    try:
        blob = json.loads(p.read_text())
        return {k: v for k, v in blob["notebooks"].items() if isinstance(v, dict)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        print(f"note: {shown(p)} is not readable ({type(e).__name__}); no time estimates until a run finishes",
              file=sys.stderr, flush=True)
        return {}


def save_timings(profile: str, name: str, record: dict) -> None:
    """Store one notebook's timings, atomically: the file is the old one or the new one, never a mix."""
    p = timings_path(profile)
    p.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stderr(io.StringIO()):       # an unreadable file was reported when it was loaded
        blob = {"version": 1, "notebooks": load_timings(profile)}
    blob["notebooks"][name] = record
    atomic_write_text(p, json.dumps(blob, indent=1, sort_keys=True))


def cell_key(cell, index: int) -> str:
    """What matches a cell with the same cell of the last run: its id (papermill's injected parameters get a new
    id every run, so they are matched by their tag), else its position."""
    if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
        return "injected-parameters"
    return cell.get("id") or f"#{index}"


def remaining_s(expected: list[float | None], actual: list[float | None], current: int | None,
                elapsed: float) -> float | None:
    """Seconds left in a notebook. ``expected``: each code cell's time in the last run (None: a new cell, counted
    as the median of the known ones); ``actual``: this run's time of each finished cell (None: not finished);
    ``current``: the running cell, ``elapsed`` seconds into it. The last run's times are scaled by how much
    slower or faster this run has been so far (between 1/4 and 4 times, once 5 s of known cells finished).
    None when no cell has a timing."""
    known = sorted(e for e in expected if e is not None)
    if not known:
        return None
    median = known[len(known) // 2]
    exp = [median if e is None else e for e in expected]
    done = [i for i, a in enumerate(actual) if a is not None]
    was, now = sum(exp[i] for i in done), sum(actual[i] for i in done)
    scale = min(4.0, max(0.25, now / was)) if was >= 5 else 1.0
    left = scale * sum(e for i, e in enumerate(exp) if actual[i] is None and i != current)
    if current is not None and actual[current] is None:
        left += max(0.0, scale * exp[current] - elapsed)
    return left


class Progress:
    """What the runner shows while papermill executes a notebook, fed by papermill's cell callbacks (see
    :func:`_engine`): cells done / total, time spent, the time left estimated from the last run's cell timings,
    and the whole suite's. ``mode``: "bar" (one line redrawn in place, for a terminal), "lines" (a plain line when
    a notebook starts and then at most every ``every_s`` seconds or after a cell that long: a log stays readable)
    or "off". It also records this run's cell timings (:meth:`timings`) whatever the mode."""

    def __init__(self, mode: str = "off", stream=None, every_s: float = EVERY_S, clock=time.monotonic):
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"progress mode {mode!r} is not valid; valid values: bar, lines, off")
        self.mode, self.stream, self.every_s, self.clock = mode, stream or sys.stderr, every_s, clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self.label, self.history, self.after, self.keys = "", None, (0.0, 0), []

    # -- the runner's side
    def start(self, label: str, history: dict | None, after: tuple[float, int] | None = None) -> None:
        """A notebook starts. ``history``: its record in the timings file (or None); ``after`` (default: as set
        on ``self.after``): the expected seconds of the notebooks to run after it, and how many have no timings."""
        with self._lock:
            self.label, self.history = label, history
            self.after = self.after if after is None else after
            self.keys, self.code_pos, self.actual, self.current = [], {}, [], None
            self.t0 = self.cell_t0 = self.last_line = self.clock()
            self._stop.clear()
        if self.mode == "off":
            return
        self._emit(force=True)
        if self.mode == "bar" or self.every_s > 0:
            self._thread = threading.Thread(target=self._tick, name="vitadapt-progress", daemon=True)
            self._thread.start()

    def finish(self) -> None:
        """The notebook ended (or failed, or was interrupted): stop the clock and clear the bar."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        if self.mode == "bar":
            with self._lock:
                self.stream.write("\r\033[K")
                self.stream.flush()

    def timings(self) -> list[list]:
        """This run's finished code cells: ``[[cell key, seconds], ...]``."""
        return [[k, round(a, 3)] for k, a in zip(self.keys, self.actual) if a is not None]

    # -- papermill's side (NotebookExecutionManager callbacks)
    def notebook_started(self, nb) -> None:
        with self._lock:
            code = [(i, c) for i, c in enumerate(nb.cells) if c.get("cell_type") == "code"]
            self.code_pos = {i: pos for pos, (i, _) in enumerate(code)}
            self.keys = [cell_key(c, i) for i, c in code]
            self.actual = [None] * len(code)
            try:
                last = {str(k): float(s) for k, s in self.history.get("cells", [])} if self.history else {}
            except (TypeError, ValueError, AttributeError):       # a hand-edited file: no estimate
                last = {}
            self.expected = [last.get(k) for k in self.keys] if last else []

    def cell_start(self, cell, index: int) -> None:
        if index in self.code_pos:
            with self._lock:
                self.current, self.cell_t0 = self.code_pos[index], self.clock()
            self._emit(force=self.mode == "bar")

    def cell_complete(self, cell, index: int) -> None:
        if index not in self.code_pos:
            return
        with self._lock:
            pos = self.code_pos[index]
            took = (cell.get("metadata", {}).get("papermill") or {}).get("duration")
            self.actual[pos] = float(took) if isinstance(took, (int, float)) else self.clock() - self.cell_t0
            self.current = None
        if self.mode == "bar":
            self._emit(force=True)
        elif self.every_s <= 0 or self.actual[pos] >= self.every_s:
            self._emit(force=True)
        else:
            self._emit()

    # -- what is shown
    def left(self) -> float | None:
        """Seconds left in this notebook, or None (no timings from a finished run)."""
        if not self.history:
            return None
        if not self.keys:                          # the kernel is starting: the whole last run
            return max(0.0, float(self.history.get("wall_s", 0)) - (self.clock() - self.t0))
        elapsed = self.clock() - self.cell_t0 if self.current is not None else 0.0
        return remaining_s(self.expected, self.actual, self.current, elapsed) if self.expected else None

    def status(self) -> str:
        """One line: cells done / total, time spent, time left in the notebook and in the suite."""
        now = self.clock()
        n, done = len(self.keys), sum(a is not None for a in self.actual)
        parts = [f"{done}/{n} cells" if n else "starting the kernel", _fmt_s(now - self.t0)]
        if self.current is not None and now - self.cell_t0 >= 5:
            parts.append(f"cell {self.current + 1} running for {_fmt_s(now - self.cell_t0)}")
        left = self.left()
        if left is None:
            parts.append("no estimate yet (first timed run)")
        else:
            parts.append(f"about {_fmt_s(left)} left (last run {_fmt_s(float(self.history.get('wall_s', 0)))})")
        after, unknown = self.after
        notebooks = f"notebook{'s' * (unknown > 1)} without timings"
        if after > 0 or (unknown and left is not None):      # notebooks to run after this one
            least = "at least " if unknown or left is None else "about "
            parts[-1] += f"; suite {least}{_fmt_s((left or 0) + after)} left"
            parts[-1] += f" ({unknown} {notebooks})" if unknown else ""
        elif unknown:
            parts[-1] += f"; {unknown} more {notebooks}"
        text = ", ".join(parts)
        if self.mode == "bar" and n:
            width = 20
            fill = int(width * done / n)
            return f"{self.label} [{'#' * fill}{'-' * (width - fill)}] {text}"
        return f"{self.label}: {text}"

    def _emit(self, force: bool = False) -> None:
        if self.mode == "off":
            return
        with self._lock:
            now = self.clock()
            if not force and (self.every_s <= 0 or now - self.last_line < self.every_s):
                return
            self.last_line = now
            line = self.status()
            if self.mode == "bar":
                cols = shutil.get_terminal_size((100, 24)).columns
                self.stream.write("\r" + line[: max(10, cols - 1)] + "\033[K")
            else:
                self.stream.write(line + "\n")
            self.stream.flush()

    def _tick(self) -> None:
        """The clock between callbacks: the bar every second; a plain line when ``every_s`` passed silently."""
        while not self._stop.wait(1.0):
            try:
                self._emit(force=self.mode == "bar")
            except (OSError, ValueError):       # the stream went away (a closed pipe): stop showing progress
                return


_ENGINE = None


def _engine() -> str:
    """Register (once) and name papermill's nbclient engine with a ``progress`` argument: its cell callbacks
    (NotebookExecutionManager.cell_start / cell_complete) also feed a :class:`Progress`."""
    global _ENGINE
    from papermill.engines import NBClientEngine, papermill_engines
    if _ENGINE is None:

        class ProgressEngine(NBClientEngine):
            @classmethod
            def execute_managed_notebook(cls, nb_man, kernel_name, progress: Progress | None = None, **kwargs):
                if progress is not None:
                    progress.notebook_started(nb_man.nb)
                    start, complete = nb_man.cell_start, nb_man.cell_complete

                    def cell_start(cell, cell_index=None, **kw):
                        start(cell, cell_index, **kw)
                        progress.cell_start(cell, cell_index)

                    def cell_complete(cell, cell_index=None, **kw):
                        complete(cell, cell_index, **kw)
                        progress.cell_complete(cell, cell_index)

                    nb_man.cell_start, nb_man.cell_complete = cell_start, cell_complete
                return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

        _ENGINE = "vitadapt"
        papermill_engines.register(_ENGINE, ProgressEngine)
    return _ENGINE


def _would_skip(nb: Path, profile: str, params: dict, force: bool) -> bool:
    """Whether :func:`run_one` skips ``nb`` as unchanged (its last real run had this config and code)."""
    name = nb.stem
    return (not force and name not in ALWAYS_RUN
            and _up_to_date(output_dir(profile, name, 0), name, _config_key(profile, name, params), code_hash(name, profile)))


def run_one(nb: Path, profile: str, params: dict, force: bool, kernel: str, timeout: int | None,
            require_real: bool = False, progress: Progress | None = None, label: str = "") -> tuple[str, float, str]:
    """Execute one notebook. Returns (status, wall seconds, error): status is 'ok', 'dry run (<reason>)',
    'skipped (unchanged)' or 'FAILED'. Ctrl-C raises :class:`Interrupted`. ``progress`` shows the run's cells
    (``label`` heads its lines); the cell timings of a finished run go to ``outputs/<profile>/.timings.json``."""
    import papermill as pm
    name = nb.stem
    out_dir = output_dir(profile, name)
    key = _config_key(profile, name, params)
    chash = code_hash(name, profile)
    # rank 0's outputs decide for every rank of a multi-process launch: all run a notebook, or none does
    if not force and name not in ALWAYS_RUN and _up_to_date(output_dir(profile, name, 0), name, key, chash):
        return "skipped (unchanged)", 0.0, ""
    progress = progress or Progress("off")
    out_dir.mkdir(parents=True, exist_ok=True)
    if _has_parameter(nb, "interactive"):
        params = {"interactive": False, **params}     # widgets never block a headless run
    for stale in out_dir.glob(f".{name}.running-*.ipynb"):      # left by a killed runner
        pid = stale.name[: -len(".ipynb")].rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = out_dir / f".{name}.running-{os.getpid()}.ipynb"
    failed = out_dir / f"{name}.failed.ipynb"
    dry_metrics = out_dir / DRY_RUN_DIR / "metrics.json"        # where a dry run writes (results.Run.finish)
    dry_before = dry_metrics.stat().st_mtime_ns if dry_metrics.exists() else None
    progress.start(label or f"{name} ({profile})", load_timings(profile).get(name))
    os.environ["VITADAPT_RUN_ID"] = f"{label or name}-{name}"   # the same on every rank: this notebook's process group
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(nb), str(tmp), parameters={"profile": profile, **params}, kernel_name=kernel, language="python",
                            cwd=str(NOTEBOOKS), progress_bar=False, execution_timeout=timeout, extra_arguments=KERNEL_ARGS,
                            engine_name=_engine(), progress=progress)
    except KeyboardInterrupt:
        raise Interrupted(name, _keep_partial(tmp, failed)) from None
    except Exception as e:
        kept = _keep_partial(tmp, failed)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            where = shown(Path(e.filename)) if e.filename and Path(e.filename) != tmp else "the executed notebook"
            msg = [f"disk full writing {where}"]
        else:
            msg = str(e).strip().splitlines() or [type(e).__name__]
        return "FAILED", time.perf_counter() - t0, f"{msg[-1][:300]} ({kept})"
    finally:
        progress.finish()
    wall = time.perf_counter() - t0
    dry = dry_metrics.exists() and dry_metrics.stat().st_mtime_ns != dry_before
    where = dry_metrics.parent if dry else out_dir          # a dry run never replaces the real results
    os.replace(tmp, where / f"{name}.ipynb")
    failed.unlink(missing_ok=True)
    m = where / "metrics.json"
    if not m.exists():
        _record_timings(profile, name, progress, wall, "ok")
        return "ok", wall, ""
    err = _stamp(where, key, wall)
    if err:
        return "FAILED", wall, err
    try:
        reason = recorded_dry_run(json.loads(m.read_text()))
    except (OSError, ValueError):
        reason = ""
    _record_timings(profile, name, progress, wall, "dry run" if reason else "ok")
    if reason and require_real:
        return "FAILED", wall, f"dry run ({reason}) and --require-real was given"
    return (f"dry run ({reason})" if reason else "ok"), wall, ""


def _record_timings(profile: str, name: str, progress: Progress, wall: float, status: str) -> None:
    """Keep a finished run's cell timings for the next run's estimate (rank 0 only); a failure to write them is a
    note only."""
    if launch_rank() != 0:
        return
    if not progress.timings():
        return
    record = {"wall_s": round(wall, 2), "cells": progress.timings(), "status": status,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        save_timings(profile, name, record)
    except OSError as e:
        what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or type(e).__name__)
        print(f"note: {what} writing {shown(timings_path(profile))}; the next run of {name} has no time estimate",
              file=sys.stderr, flush=True)


def _summary(results: list[tuple[str, str, float, str]], profile: str, seconds: float) -> str:
    failed = [(n, e) for n, s, _, e in results if s == "FAILED"]
    dry = [(n, s[len("dry run ("):-1]) for n, s, _, _ in results if s.startswith("dry run")]
    ran = sum(s == "ok" for _, s, _, _ in results)
    skipped = sum(s.startswith("skipped") for _, s, _, _ in results)
    lines = [f"{len(results) - len(failed)}/{len(results)} notebooks ok, profile {profile}, {seconds:.0f} s: "
             f"{ran} ran, {len(dry)} dry run, {skipped} skipped (unchanged), {len(failed)} FAILED"]
    lines += [f"  dry run: {n}: {reason}" for n, reason in dry]
    lines += [f"  FAILED: {n}: {err}" for n, err in failed]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vitadapt.runner", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu", help=f"one of {', '.join(PROFILES)} (default cpu)")
    ap.add_argument("--nb", default="", help="comma list of notebook numbers or names (default: all)")
    ap.add_argument("--force", action="store_true", help="re-run notebooks whose config and code are unchanged")
    ap.add_argument("--require-real", action="store_true",
                    help="a dry run (a notebook that stopped before training) is a failure")
    ap.add_argument("--kernel", default=KERNEL, help="Jupyter kernel (default: the project kernel 'vitadapt')")
    ap.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="notebook parameter (VALUE parsed as YAML, 5e-4 is a number); given to every selected "
                         "notebook that has it")
    ap.add_argument("--progress", default="auto", choices=("auto", "bar", "lines", "off"),
                    help="cell progress and time left while a notebook runs, on stderr: a bar redrawn in place (auto "
                         "in a terminal), plain lines (auto otherwise), or off")
    ap.add_argument("--progress-every", type=float, default=EVERY_S, metavar="SECONDS",
                    help=f"plain lines: at most one per SECONDS, and one after each cell that long (default {EVERY_S:g}; "
                         "0: one per cell)")
    args = ap.parse_args(argv)
    if args.progress_every < 0:
        ap.error(f"--progress-every {args.progress_every:g} is not valid; valid values: 0 (every cell) or more seconds")
    if args.profile not in PROFILES:
        ap.error(f"profile={args.profile!r} is not valid; valid values: {', '.join(PROFILES)}")
    try:
        nbs = discover(args.nb)
    except ValueError as e:
        ap.error(str(e))
    params = {}
    for name, text in args.param:
        try:
            params[name] = load_yaml(text)
        except yaml.YAMLError as e:
            ap.error(f"-p {name} {text!r} is not a valid YAML value ({getattr(e, 'problem', None) or e})")
    if "profile" in params and params.pop("profile") != args.profile:
        ap.error(f"-p profile {dict(args.param)['profile']!r} disagrees with --profile {args.profile!r}; "
                 f"give the profile once, with --profile")
    try:
        per_nb, notes = split_params(nbs, params)
    except ValueError as e:
        ap.error(str(e))
    for note in notes:
        print(note, flush=True)
    os.environ.setdefault("TQDM_DISABLE", "1")        # the notebooks stay free of progress bars; the runner shows one
    mode = args.progress
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() and os.environ.get("TERM") != "dumb" else "lines"
    progress = Progress(mode, sys.stderr, args.progress_every)
    expected = _expected_walls(nbs, args.profile, per_nb, args.force)

    def say(text: str) -> None:
        """A result line: stdout (the record), echoed to the terminal whose bar it replaces if stdout is a file."""
        print(text, flush=True)
        if mode == "bar" and not sys.stdout.isatty():
            print(text, file=sys.stderr, flush=True)

    if args.profile in ("gpu", "paper"):                 # GPU profiles: what the suite will cost, before it runs
        say(plan_text(args.profile, nbs))
    results = []
    t_all = time.perf_counter()
    for i, nb in enumerate(nbs, 1):
        label = f"[{i}/{len(nbs)}] {nb.stem} ({args.profile})"
        later = expected[i:]
        progress.after = (sum(w for w in later if w), sum(w is None for w in later))
        try:
            status, wall, err = run_one(nb, args.profile, per_nb[nb.stem], args.force, args.kernel, args.timeout,
                                        args.require_real, progress, label)
        except KeyboardInterrupt as e:
            kept = f"; {e.kept}" if isinstance(e, Interrupted) else ""
            say(f"{label} ... interrupted\ninterrupted during {nb.stem} after {len(results)}/{len(nbs)} notebooks "
                f"finished; the previous outputs of {nb.stem} are intact{kept}")
            return 130
        say(f"{label} ... {status}" + (f" in {wall:.1f} s" if wall else "") + (f"\n      {err}" if err else ""))
        results.append((nb.stem, status, wall, err))
        if status == "FAILED" and launch_world() > 1:
            say(f"stopping after {nb.stem} failed: the other ranks of this {launch_world()}-process launch cannot go "
                f"on without this one (torchrun then stops them; under SLURM they fail after ddp_timeout_min)")
            break
    say(_summary(results, args.profile, time.perf_counter() - t_all))
    return 1 if any(s == "FAILED" for _, s, _, _ in results) else 0


def plan_text(profile: str, nbs: list[Path]) -> str:
    """The estimated GPU time of ``nbs`` in ``profile`` (:func:`vitadapt.plan.estimate`), or why there is none."""
    from vitadapt.plan import estimate, format_estimate
    try:
        return format_estimate(estimate(profile, nbs), profile)
    except ValueError as e:          # a bad config: its notebook reports it when it runs
        return f"estimated time: not available ({e})"


def _expected_walls(nbs: list[Path], profile: str, per_nb: dict[str, dict], force: bool) -> list[float | None]:
    """Each notebook's expected seconds for the suite's time left: 0 when it will be skipped as unchanged, its
    last finished run's wall time, or None (no timings yet)."""
    with contextlib.redirect_stderr(io.StringIO()):       # an unreadable timings file is reported once, later
        history = load_timings(profile)
    out = []
    for nb in nbs:
        try:
            skip = _would_skip(nb, profile, per_nb[nb.stem], force)
        except Exception:          # a bad config: run_one reports it when it gets there
            skip = False
        wall = (history.get(nb.stem) or {}).get("wall_s")
        out.append(0.0 if skip else float(wall) if isinstance(wall, (int, float)) else None)
    return out


if __name__ == "__main__":
    sys.exit(main())
