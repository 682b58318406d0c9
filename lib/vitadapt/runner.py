"""The papermill driver behind ``make reproduce``.

    python -m vitadapt.runner --profile cpu [--nb 00,01] [--force] [-p NAME VALUE ...]

Runs every numbered notebook in notebooks/ (or those named by ``--nb``) headlessly for one profile. Each
executed notebook goes to a temporary name and is renamed to ``outputs/<profile>/<name>/<name>.ipynb`` only
when it succeeds (a failed one is kept as ``<name>.failed.ipynb`` beside it, the previous outputs untouched).
A notebook whose last successful run had the same config hash and code hash is skipped unless ``--force``.
One failing notebook is reported and the rest still run; the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from vitadapt.config import PROFILES, load_profile
from vitadapt.paths import NOTEBOOKS, output_dir
from vitadapt.results import _alive, code_hash

KERNEL = "vitadapt"
ALWAYS_RUN = {"90_results"}   # reads the other notebooks' outputs: never "unchanged"


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


def _config_key(profile: str, name: str, params: dict) -> str:
    import hashlib
    blob = json.dumps({"profile": load_profile(profile, name), "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _up_to_date(out_dir: Path, name: str, key: str, chash: str) -> bool:
    m = out_dir / "metrics.json"
    if not m.exists() or not (out_dir / f"{name}.ipynb").exists():
        return False
    try:
        run = json.loads(m.read_text())["run"]
    except (ValueError, KeyError):
        return False
    return run.get("runner_key") == key and run.get("code_hash") == chash


def _stamp(out_dir: Path, key: str, wall: float) -> None:
    """Add the runner's key and wall time to the run record the notebook wrote."""
    m = out_dir / "metrics.json"
    blob = json.loads(m.read_text())
    blob["run"]["runner_key"] = key
    blob["run"]["papermill_wall_time_s"] = round(wall, 2)
    tmp = m.with_name(".metrics.json.tmp")
    tmp.write_text(json.dumps(blob, indent=2, sort_keys=True))
    os.replace(tmp, m)


def _has_parameter(nb: Path, name: str) -> bool:
    import nbformat
    import re
    cells = nbformat.read(nb, 4).cells
    src = "\n".join(c.source for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    return re.search(rf"^{name}\s*[:=]", src, flags=re.M) is not None


def run_one(nb: Path, profile: str, params: dict, force: bool, kernel: str, timeout: int | None) -> tuple[str, float, str]:
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
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(nb), str(tmp), parameters={"profile": profile, **params}, kernel_name=kernel, language="python",
                            cwd=str(NOTEBOOKS), progress_bar=False, execution_timeout=timeout)
    except BaseException as e:  # includes KeyboardInterrupt: keep the partial notebook for debugging
        if tmp.exists():
            os.replace(tmp, out_dir / f"{name}.failed.ipynb")
        if isinstance(e, KeyboardInterrupt):
            raise
        msg = str(e).strip().splitlines()
        return "FAILED", time.perf_counter() - t0, (msg[-1] if msg else type(e).__name__)[:300]
    wall = time.perf_counter() - t0
    os.replace(tmp, out_dir / f"{name}.ipynb")
    (out_dir / f"{name}.failed.ipynb").unlink(missing_ok=True)
    if (out_dir / "metrics.json").exists():
        _stamp(out_dir, key, wall)
    return "ok", wall, ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vitadapt.runner", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu", help=f"one of {', '.join(PROFILES)} (default cpu)")
    ap.add_argument("--nb", default="", help="comma list of notebook numbers or names (default: all)")
    ap.add_argument("--force", action="store_true", help="re-run notebooks whose config and code are unchanged")
    ap.add_argument("--kernel", default=KERNEL, help="Jupyter kernel (default: the project kernel 'vitadapt')")
    ap.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="notebook parameter for every notebook (VALUE parsed as YAML)")
    args = ap.parse_args(argv)
    if args.profile not in PROFILES:
        ap.error(f"profile={args.profile!r} is not valid; valid values: {', '.join(PROFILES)}")
    try:
        nbs = discover(args.nb)
    except ValueError as e:
        ap.error(str(e))
    params = {k: yaml.safe_load(v) for k, v in args.param}
    os.environ.setdefault("TQDM_DISABLE", "1")
    results = []
    t_all = time.perf_counter()
    for i, nb in enumerate(nbs, 1):
        print(f"[{i}/{len(nbs)}] {nb.stem} ({args.profile}) ...", end="", flush=True)
        status, wall, err = run_one(nb, args.profile, params, args.force, args.kernel, args.timeout)
        print(f" {status}" + (f" in {wall:.1f} s" if wall else "") + (f"\n      {err}" if err else ""), flush=True)
        results.append((nb.stem, status, wall))
    failed = [n for n, s, _ in results if s == "FAILED"]
    print(f"{len(results) - len(failed)}/{len(results)} notebooks ok, profile {args.profile}, "
          f"{time.perf_counter() - t_all:.0f} s" + (f"; FAILED: {', '.join(failed)} (see outputs/{args.profile}/<name>/<name>.failed.ipynb)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
