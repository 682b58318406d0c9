"""Where things live. Every relative path is resolved against the repository root, never the cwd,
so a notebook runs the same from notebooks/, tests/golden/ or the repository root."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(os.environ.get("VITADAPT_ROOT", Path(__file__).resolve().parents[2]))
OUTPUTS = REPO_ROOT / "outputs"
CONFIGS = REPO_ROOT / "configs"
MANIFESTS = REPO_ROOT / "data_manifests"
NOTEBOOKS = REPO_ROOT / "notebooks"
CACHE = Path(os.environ.get("VITADAPT_CACHE", OUTPUTS / "cache"))


def resolve(path: str | os.PathLike) -> Path:
    """An absolute path: absolute paths stay, relative ones are taken from the repository root."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else (REPO_ROOT / p)


def shown(path: str | os.PathLike) -> str:
    """``path`` as messages show it: relative to the repository root when inside it, else as it is."""
    p = Path(path)
    return str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p)


def launch_rank() -> int:
    """This process's global rank when launched by torchrun (``RANK``) or SLURM (``SLURM_PROCID`` with more
    than one task), else 0. Papermill kernels inherit the launcher's environment, so a notebook knows it too."""
    rank = os.environ.get("RANK")
    if rank is None and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        rank = os.environ.get("SLURM_PROCID")
    try:
        return int(rank) if rank is not None else 0
    except ValueError:
        raise ValueError(f"RANK/SLURM_PROCID={rank!r} is not valid; valid values: a non-negative integer") from None


def launch_world() -> int:
    """How many processes torchrun (``WORLD_SIZE``) or SLURM (``SLURM_NTASKS``) started for this run (1: neither)."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def output_dir(profile: str, notebook: str, rank: int | None = None) -> Path:
    """``outputs/<profile>/<notebook>`` on rank 0. Other ranks of a multi-process launch write their copy under
    ``outputs/<profile>/.ranks/rank<r>/<notebook>`` so that they never overwrite rank 0's outputs. ``rank``:
    another rank's folder (default this process's)."""
    rank = launch_rank() if rank is None else rank
    base = OUTPUTS / profile
    return base / notebook if rank == 0 else base / ".ranks" / f"rank{rank}" / notebook


def files_digest(files, root: Path) -> str:
    """sha256 over ``files`` in their order: each one's path relative to ``root`` (POSIX), then its bytes. The one
    digest of source files: :func:`vitadapt.results.code_hash`, :func:`vitadapt.protocol.products.source_digest`."""
    import hashlib
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).relative_to(root).as_posix().encode())
        h.update(Path(f).read_bytes())
    return h.hexdigest()
