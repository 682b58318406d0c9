"""Cache files written safely: a temporary name unique to the process (pid + random), then ``os.replace``, so
two processes filling the same cache both succeed (the last complete file wins) and readers never see half a
file. A full disk is reported as such, and no temporary file is left behind.

:class:`KeyedFile` is the one shape of every keyed cache (the per-item features of :class:`vitadapt.eval.FeatureCache`,
the trained products of :class:`vitadapt.protocol.products.ProductCache`): a file named by the digest of its key,
holding the key beside the payload, so a file written for another key (a digest collision, a hand-copied file) is
never read as this one's."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
from pathlib import Path

import torch


class CacheDiskFullError(OSError):
    """The disk filled up while a cache file was written."""


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)   # torch's zip writer: "[enforce fail at inline_container.cc:...] ... file write failed"
    return "inline_container.cc" in text or "No space left" in text


def torch_save_atomic(obj, path: Path, what: str = "feature cache") -> None:
    """``torch.save(obj, path)`` through a unique temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _disk_full(e):
            raise CacheDiskFullError(f"disk full writing the {what} {path} (set VITADAPT_CACHE to another folder "
                                     f"or free space)") from e
        raise


def torch_load_or_none(path: Path, what: str = "cache", **kw):
    """``torch.load(path)``, or None (with a warning) when the file is missing or unreadable."""
    import warnings
    if not Path(path).exists():
        return None
    try:
        return torch.load(path, map_location="cpu", **kw)
    except Exception as e:  # a truncated or foreign file: recompute and overwrite it
        warnings.warn(f"ignoring the unreadable {what} {path} ({type(e).__name__}: {str(e)[:120]}); it is rebuilt",
                      stacklevel=2)
        return None


def normal_key(key: dict) -> dict:
    """``key`` as its JSON reads back (tuples as lists, other values as ``str``): what a stored key compares to."""
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def key_digest(key: dict, length: int = 20) -> str:
    """The first ``length`` hex digits of the sha256 of ``key``'s JSON (sorted keys; :func:`normal_key`)."""
    return hashlib.sha256(json.dumps(normal_key(key), sort_keys=True).encode()).hexdigest()[:length]


class KeyedFile:
    """One cache file ``<folder>/<digest of key>.pt`` holding ``{"key", "payload"}``: :meth:`read` gives the payload
    (None: absent, unreadable or another key's), :meth:`write` stores one atomically (:func:`torch_save_atomic`)."""

    def __init__(self, folder: Path, key: dict, what: str, length: int = 20):
        self.key, self.digest, self.what = normal_key(key), key_digest(key, length), what
        self.path = Path(folder) / f"{self.digest}.pt"

    def read(self):
        blob = torch_load_or_none(self.path, self.what, weights_only=False)   # an older layout: no "payload", rebuilt
        return blob.get("payload") if isinstance(blob, dict) and blob.get("key") == self.key else None

    def write(self, payload) -> None:
        torch_save_atomic({"key": self.key, "payload": payload}, self.path, self.what)
