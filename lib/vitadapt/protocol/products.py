"""Trained products shared across notebooks and reruns: a file per product under ``$VITADAPT_CACHE/<kind>/``
(default ``outputs/cache``), named by the digest of everything that determines it.

A product (ExPLoRA's merged pre-trained backbone, :func:`vitadapt.experiments.explora.pretrain_variant`; UpStep's
adapted backbone, :func:`vitadapt.experiments.upstep.adapt_or_load`) is looked up by a *key*: a dict of every value
that determines the result (settings, seed, the weights' fingerprint, a digest of the drawn images' identities,
numerics-relevant Fabric settings, library versions and a digest of the library sources that compute it). A second
run with the same key loads the file instead of training; any difference trains again. Only finished runs are
written (a diverged run raises before), atomically (:func:`vitadapt.data.cachefile.torch_save_atomic`); an
unreadable file or one holding another key is ignored and rebuilt.

The stored record keeps the wall time *measured when the product was trained*; a loaded one says ``cached: True``
and gives ``cache_key`` (the file's digest), so cost tables never show a load as the training time.

* ``VITADAPT_PRETRAIN_CACHE=0`` / ``VITADAPT_UPSTEP_CACHE=0`` turn either cache off (default on).
* Processes launched by torchrun/SLURM (world size > 1) do not use these caches: every rank would have to agree on
  a hit before the collectives of training; the run trains as before. In-kernel DDP (``ddp_notebook``) does, as
  the kernel alone looks up and writes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

from vitadapt import paths

#: kind -> the environment variable that turns its cache off
SWITCHES = {"pretrained": "VITADAPT_PRETRAIN_CACHE", "upstep": "VITADAPT_UPSTEP_CACHE"}
#: library sources (relative to lib/vitadapt) that every trained product depends on: objectives, adapters, the loop,
#: data, weights and the token passes; each experiment adds its own module. Broad on purpose: a stale product is
#: worse than a retrain.
COMMON_SOURCES = ("ssl", "peft", "data", "models", "train.py", "vit.py", "eval.py", "distributed.py",
                  "protocol/products.py")
#: Fabric and loader settings of ExperimentConfig that change a training run's numerics
NUMERICS = ("weights", "arch", "arch_kwargs", "img_size", "batch_size", "num_workers", "accelerator", "devices",
            "num_nodes", "strategy", "precision", "accumulate_grad_batches", "grad_checkpointing")


def enabled(kind: str) -> bool:
    """Whether the cache of ``kind`` (a key of :data:`SWITCHES`) is used in this process."""
    if kind not in SWITCHES:
        raise ValueError(f"kind={kind!r} is not valid; valid values: {', '.join(SWITCHES)}")
    v = os.environ.get(SWITCHES[kind], "1").strip().lower()
    if v not in ("0", "1", "no", "yes", "false", "true", "off", "on", ""):
        raise ValueError(f"{SWITCHES[kind]}={v!r} is not valid; valid values: 1 (default), 0")
    return v in ("1", "yes", "true", "on", "") and paths.launch_world() == 1


def source_digest(sources: Sequence[str]) -> str:
    """sha256 of the ``.py`` files of ``sources`` (files or folders relative to ``lib/vitadapt``), names included
    (:func:`vitadapt.paths.files_digest`); read once per process (a grid's jobs share it)."""
    return _source_digest(tuple(sources))


@functools.lru_cache(maxsize=None)
def _source_digest(sources: tuple[str, ...]) -> str:
    root, files = Path(__file__).resolve().parents[1], []
    for s in sources:
        p = root / s
        if not p.exists():
            raise ValueError(f"source {s!r} is not a file or folder under {root}")
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return paths.files_digest(files, root)[:20]


def items_digest(images: tuple) -> str:
    """Digest of the identities of the drawn images ``(dataset, indices)`` in their order (paths, or the array
    content and index: :func:`vitadapt.eval._item_keys`); no label is read."""
    from vitadapt.eval import _item_keys
    dataset, indices = images
    keys = _item_keys(dataset)
    return hashlib.sha256("\n".join(keys[i] for i in indices).encode()).hexdigest()[:20]


def state_digest(state: dict | None) -> str | None:
    """sha256 of every tensor of a state dict (names, shapes, dtypes, bytes); None for None."""
    if state is None:
        return None
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = torch.as_tensor(t).detach().cpu().contiguous()
        h.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def file_digest(path: Path) -> str | None:
    """sha256 of a file's bytes (:func:`vitadapt.data.manifest.file_sha256`; None when it is not there)."""
    from vitadapt.data.manifest import file_sha256
    path = Path(path)
    return file_sha256(path)[:20] if path.is_file() else None


def settings(obj, names: Sequence[str] | None = None, cls=None) -> dict:
    """``{field: value}`` of ``obj``: the fields ``names``, or every dataclass field of ``cls``."""
    names = [f.name for f in dataclasses.fields(cls)] if cls is not None else list(names or ())
    return {n: getattr(obj, n) for n in names}


#: the libraries whose versions enter a product's key
LIBRARIES = ("torch", "timm", "lightning")


def environment() -> dict:
    """The Python and library versions a product depends on (:func:`vitadapt.results.package_versions`)."""
    from vitadapt.results import package_versions
    return package_versions(LIBRARIES)


#: the cost tables' column counting runs loaded from the cache (only when some were: a fresh run's table is as before)
LOADED = "loaded from cache"


def with_loaded(table, runs, by: str):
    """``table`` (a cost table indexed by ``by``) with :data:`LOADED`, the number of ``runs`` of each ``by`` value
    whose record says ``cached``, when any was: their cost columns are those measured when they were trained."""
    if "cached" not in runs or not runs["cached"].eq(True).any():
        return table
    return table.assign(**{LOADED: runs["cached"].eq(True).groupby(runs[by], sort=False).sum()
                           .reindex(table.index).fillna(0).astype(int)})


def digest(key: dict) -> str:
    """The file name of ``key`` (:func:`vitadapt.data.cachefile.key_digest`, 24 hex digits)."""
    from vitadapt.data.cachefile import key_digest
    return key_digest(key, 24)


class ProductCache:
    """One product's file: :meth:`load` gives the stored payload (None: absent, unreadable, another key, or the
    cache is off), :meth:`save` writes one (nothing when off). ``key``: what determines the product (callers may
    pass ``{}`` when :func:`enabled` is false, to skip computing it)."""

    def __init__(self, kind: str, key: dict):
        from vitadapt.data.cachefile import KeyedFile
        root = Path(os.environ["VITADAPT_CACHE"]) if os.environ.get("VITADAPT_CACHE") else paths.CACHE
        self.on, self.kind = enabled(kind), kind
        self.file = KeyedFile(root / kind, key, f"{kind} cache", 24)
        self.key, self.digest, self.path = self.file.key, self.file.digest, self.file.path

    def load(self) -> dict | None:
        return self.file.read() if self.on else None

    def save(self, payload: dict) -> None:
        """Write ``payload`` with the key; a full disk costs the cache (a warning), never the run."""
        if not self.on:
            return
        from vitadapt.data.cachefile import CacheDiskFullError
        try:
            self.file.write(payload)
        except CacheDiskFullError as e:
            warnings.warn(str(e), stacklevel=2)
