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
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
import time
from pathlib import Path

import yaml

from vitadapt.config import PROFILES, load_profile, load_yaml
from vitadapt.paths import NOTEBOOKS, REPO_ROOT, output_dir
from vitadapt.results import DRY_RUN_DIR, _alive, code_hash

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


def _dry_run_reason(blob: dict) -> str:
    """Why the run recorded in a metrics.json blob was a dry run ('' when it really ran)."""
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
    if _dry_run_reason(blob):     # data or weights may be here now: a dry run is never final
        return False
    return run.get("runner_key") == key and run.get("code_hash") == chash


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p)


def _write_atomic(path: Path, text: str) -> None:
    """Write a temporary file beside ``path``, flush it to disk, then rename it: ``path`` is the old file or
    the new one, never a mix. On any error the temporary file is removed and the error raised."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _stamp(out_dir: Path, key: str, wall: float) -> str:
    """Add the runner's key and wall time to the run record the notebook wrote. Returns '' or what went wrong
    (the notebook's metrics.json is then left as it was, without a key, so the next run does not skip it)."""
    m = out_dir / "metrics.json"
    try:
        blob = json.loads(m.read_text())
        blob["run"]["runner_key"] = key
        blob["run"]["papermill_wall_time_s"] = round(wall, 2)
        _write_atomic(m, json.dumps(blob, indent=2, sort_keys=True))
    except OSError as e:
        what = "disk full" if e.errno == errno.ENOSPC else f"{e.strerror or type(e).__name__}"
        return f"{what} writing {_rel(m)}; it is left as the notebook wrote it"
    except (ValueError, KeyError, TypeError) as e:
        return f"{_rel(m)} is not a run record ({type(e).__name__}: {e})"
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
    return f"partial notebook kept as {_rel(failed)}"


def run_one(nb: Path, profile: str, params: dict, force: bool, kernel: str, timeout: int | None,
            require_real: bool = False) -> tuple[str, float, str]:
    """Execute one notebook. Returns (status, wall seconds, error): status is 'ok', 'dry run (<reason>)',
    'skipped (unchanged)' or 'FAILED'. Ctrl-C raises :class:`Interrupted`."""
    import papermill as pm
    name = nb.stem
    out_dir = output_dir(profile, name)
    key = _config_key(profile, name, params)
    chash = code_hash(name, profile)
    if not force and name not in ALWAYS_RUN and _up_to_date(out_dir, name, key, chash):
        return "skipped (unchanged)", 0.0, ""
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
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(nb), str(tmp), parameters={"profile": profile, **params}, kernel_name=kernel, language="python",
                            cwd=str(NOTEBOOKS), progress_bar=False, execution_timeout=timeout, extra_arguments=KERNEL_ARGS)
    except KeyboardInterrupt:
        raise Interrupted(name, _keep_partial(tmp, failed)) from None
    except Exception as e:
        kept = _keep_partial(tmp, failed)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            where = _rel(Path(e.filename)) if e.filename and Path(e.filename) != tmp else "the executed notebook"
            msg = [f"disk full writing {where}"]
        else:
            msg = str(e).strip().splitlines() or [type(e).__name__]
        return "FAILED", time.perf_counter() - t0, f"{msg[-1][:300]} ({kept})"
    wall = time.perf_counter() - t0
    dry = dry_metrics.exists() and dry_metrics.stat().st_mtime_ns != dry_before
    where = dry_metrics.parent if dry else out_dir          # a dry run never replaces the real results
    os.replace(tmp, where / f"{name}.ipynb")
    failed.unlink(missing_ok=True)
    m = where / "metrics.json"
    if not m.exists():
        return "ok", wall, ""
    err = _stamp(where, key, wall)
    if err:
        return "FAILED", wall, err
    try:
        reason = _dry_run_reason(json.loads(m.read_text()))
    except (OSError, ValueError):
        reason = ""
    if reason and require_real:
        return "FAILED", wall, f"dry run ({reason}) and --require-real was given"
    return (f"dry run ({reason})" if reason else "ok"), wall, ""


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
    args = ap.parse_args(argv)
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
    os.environ.setdefault("TQDM_DISABLE", "1")
    results = []
    t_all = time.perf_counter()
    for i, nb in enumerate(nbs, 1):
        print(f"[{i}/{len(nbs)}] {nb.stem} ({args.profile}) ...", end="", flush=True)
        try:
            status, wall, err = run_one(nb, args.profile, per_nb[nb.stem], args.force, args.kernel, args.timeout,
                                        args.require_real)
        except KeyboardInterrupt as e:
            kept = f"; {e.kept}" if isinstance(e, Interrupted) else ""
            print(f" interrupted\ninterrupted during {nb.stem} after {len(results)}/{len(nbs)} notebooks finished; "
                  f"the previous outputs of {nb.stem} are intact{kept}", flush=True)
            return 130
        print(f" {status}" + (f" in {wall:.1f} s" if wall else "") + (f"\n      {err}" if err else ""), flush=True)
        results.append((nb.stem, status, wall, err))
    print(_summary(results, args.profile, time.perf_counter() - t_all), flush=True)
    return 1 if any(s == "FAILED" for _, s, _, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
