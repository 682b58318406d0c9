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
