"""Run records, metrics.json and tables.

A notebook opens a :class:`Run` first and calls :meth:`Run.finish` last. Everything it saves (figures,
tables, metrics) goes to a hidden pending folder and is moved into ``out_dir`` only by ``finish``: a run that
fails or is interrupted leaves the previous outputs exactly as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from vitadapt.paths import CONFIGS, NOTEBOOKS, REPO_ROOT, files_digest, output_dir, resolve, shown

DRY_RUN_DIR = "dry_run"     # where a dry run's outputs go, beside (never over) the real results
PACKAGES = ("torch", "torchvision", "timm", "peft", "lightly", "lightning", "torchgeo", "scikit-learn", "numpy",
            "papermill", "nbval")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a temporary file beside ``path``, flush it to disk, then rename it: ``path`` is the old file or the
    new one, never a mix. On any error the temporary file is removed and the error raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lib", "notebooks", "configs"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() or "unknown") + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def package_versions(names=PACKAGES) -> dict[str, str]:
    """The Python version and the installed versions of ``names`` (default :data:`PACKAGES`; missing ones left out)."""
    out = {"python": platform.python_version()}
    for p in names:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def code_hash(notebook: str | None = None, profile: str | None = None) -> str:
    """Hash of the library sources, the notebook and the profile YAML: what a result depends on."""
    files = sorted((REPO_ROOT / "lib" / "vitadapt").rglob("*.py"))
    if notebook:
        files += sorted(NOTEBOOKS.glob(f"{notebook}.ipynb"))
    if profile:
        files += [CONFIGS / f"{profile}.yaml"]
    if notebook:
        files += [CONFIGS / "notebooks" / f"{notebook}.yaml"]
    return files_digest([f for f in files if f.exists()], REPO_ROOT)[:16]


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        try:
            return x.item()
        except Exception:
            pass
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


class Run:
    """One execution of one notebook: collects sources, saves outputs atomically, writes metrics.json."""

    def __init__(self, notebook: str, cfg, quiet: bool = False):
        self.notebook, self.cfg = notebook, cfg
        self.out_dir = resolve(cfg.out_dir) if cfg.out_dir else output_dir(cfg.profile, notebook)
        self.pending = self.out_dir.parent / f".{self.out_dir.name}.pending-{os.getpid()}"
        for stale in self.out_dir.parent.glob(f".{self.out_dir.name}.pending-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
                shutil.rmtree(stale, ignore_errors=True)     # left by an interrupted run
        self.pending.mkdir(parents=True)
        self.resume_dir = self.out_dir.parent / f".{self.out_dir.name}.resume"     # see vitadapt.jobs
        self.jobs = self._job_store(quiet)
        from vitadapt.train import set_notebook
        set_notebook(notebook)
        self.sources: dict = {}
        self.compute: dict = {}          # devices and processes (vitadapt.distributed.describe), set by protocol.setup
        self.t0 = time.perf_counter()
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if not quiet:
            print(f"{notebook} | profile {cfg.profile} | outputs -> {shown(self.out_dir)}")

    def _job_store(self, quiet: bool):
        """The finished jobs of an interrupted earlier run with this config and code (see :mod:`vitadapt.jobs`);
        stores of another config or code are removed."""
        from vitadapt.jobs import JobStore, resume_enabled
        key = hashlib.sha256(f"{self.cfg.hash()} {code_hash(self.notebook, self.cfg.profile)}".encode()).hexdigest()[:16]
        for old in self.resume_dir.glob("*") if self.resume_dir.exists() else []:
            if old.name != key:
                shutil.rmtree(old, ignore_errors=True)
        if not resume_enabled():
            return JobStore(None)
        root = self.resume_dir / key
        kept = len(list(root.glob("*.pkl"))) if root.exists() else 0
        if kept and not quiet:
            print(f"resume: {kept} finished job(s) of an interrupted run with this config and code are kept "
                  f"(VITADAPT_RESUME=0 to start afresh)")
        return JobStore(root, log=None if quiet else print)

    def use(self, kind: str, record: dict) -> None:
        """Record a data or weight source the run used (printed in the notebook, kept in metrics.json)."""
        self.sources[kind] = record

    def path(self, name: str) -> Path:
        """Where to write an output file now (inside the pending folder)."""
        return self.pending / name

    def save_figure(self, fig, name: str, dpi: int = 100) -> Path:
        p = self.path(name)
        fig.savefig(p, dpi=dpi, bbox_inches="tight", metadata={"Software": None} if name.endswith(".png") else None)
        return p

    def save_table(self, df, name: str) -> Path:
        p = self.path(name)
        df.to_csv(p, index=True)
        return p

    def record(self) -> dict:
        return {"notebook": self.notebook, "profile": self.cfg.profile, "config": self.cfg.to_dict(),
                "config_hash": self.cfg.hash(), "code_hash": code_hash(self.notebook, self.cfg.profile),
                "git_commit": git_commit(), "packages": package_versions(), "sources": self.sources,
                "resumed_jobs": len(self.jobs.kept), "compute": self.compute,
                "started": self.started, "wall_time_s": round(time.perf_counter() - self.t0, 2),
                "host": {"machine": platform.machine(), "cpus": os.cpu_count()}}

    def finish(self, metrics: dict) -> Path:
        """Write metrics.json and move every pending output into ``out_dir`` (each by an atomic rename). A dry run
        (``metrics["dry_run"]`` gives its reason) goes to ``out_dir/dry_run/``: it never replaces real results."""
        blob = {"metrics": _jsonable(metrics), "run": _jsonable(self.record())}
        atomic_write_text(self.pending / "metrics.json", json.dumps(blob, indent=2, sort_keys=True))
        target = self.out_dir / DRY_RUN_DIR if metrics.get("dry_run") else self.out_dir
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted(self.pending.iterdir()):
            if f.name != "metrics.json":
                os.replace(f, target / f.name)
        os.replace(self.pending / "metrics.json", target / "metrics.json")   # last: marks completion
        shutil.rmtree(self.pending, ignore_errors=True)
        shutil.rmtree(self.resume_dir, ignore_errors=True)      # finished: nothing left to resume
        if target == self.out_dir:
            shutil.rmtree(self.out_dir / DRY_RUN_DIR, ignore_errors=True)     # a real run supersedes a dry one
        return target / "metrics.json"
