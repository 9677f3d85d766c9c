"""What an atlas runtime precomputes, kept for the next process and sent to Dask workers.

An :class:`~cellatlas.runtime.AtlasRuntime` precomputes, for one atlas and one set of query
genes, things that do not depend on the cells: the reference's marker-score centres at
each depth, the reference downsampled and embedded at each depth level with its faiss
index (:class:`~cellatlas.neighbours.DepthMatchedIndex`), and the encoder refitted on the
shared genes when some panel genes are missing. Recomputing them cost most of a fresh
10,000-cell run (binomial thinning of every reference count once per level).

:class:`RuntimeStore` keeps them as named groups of arrays: in memory, under
``CELLATLAS_HOME/cache/runtime`` (one ``.npz`` file per group, written atomically; an
unreadable file is recomputed, an unwritable home only skips the store), and as a plain
dict that a Dask client broadcasts to its workers (:meth:`export`, ``preloaded=``). The key
covers the atlas file's checksum, the model, the genes read, the code that computes the
groups and the numpy/faiss/scikit-learn versions (their random streams and kernels), so a
changed input or rule is never answered from an old store.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

FORMAT = 1
"""Bump when a group changes shape: stored groups of another format are not read."""
_CODE = ("runtime.py", "neighbours.py", "markers.py", "ranks.py", "sparse.py", "encoders/default.py", "runtime_store.py",
         "refindex.py", "fusion.py")


@lru_cache(maxsize=1)
def _code_hash() -> str:
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in _CODE:
        h.update((here / name).read_bytes())
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("numpy", "faiss-cpu", "scikit-learn"):
        try:
            h.update(f"{pkg}={version(pkg)}".encode())
        except PackageNotFoundError:  # pragma: no cover - e.g. a faiss build from conda
            h.update(f"{pkg}=?".encode())
    return h.hexdigest()


def runtime_key(atlas_sha256: str, model: str, genes: Sequence[str]) -> str | None:
    """Key of the precomputed groups of one (atlas file, model, query genes); ``None`` without a checksum."""
    if not atlas_sha256:
        return None
    h = hashlib.sha256(_code_hash().encode())
    h.update(repr((FORMAT, atlas_sha256, model)).encode())
    h.update("\0".join(genes).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


class RuntimeStore:
    """Named groups of arrays: memory first, then ``directory/<key>.<name>.npz``.

    Parameters
    ----------
    key
        From :func:`runtime_key`; ``None`` keeps groups in memory only.
    directory
        Where groups are stored (default ``Settings.home / "cache" / "runtime"``).
    preloaded
        Groups already computed elsewhere (:meth:`export` of a Dask client's store).
    """

    def __init__(self, key: str | None, directory: Path | None = None, preloaded: dict[str, dict[str, np.ndarray]] | None = None):
        self.key = key
        if directory is None and key is not None:
            from cellatlas.config import get_settings

            directory = get_settings().home / "cache" / "runtime"
        self.directory = directory
        self._groups: dict[str, dict[str, np.ndarray]] = dict(preloaded or {})
        self._lock = threading.Lock()

    def _path(self, name: str) -> Path | None:
        return None if self.key is None or self.directory is None else self.directory / f"{self.key}.{name}.npz"

    def get(self, name: str) -> dict[str, np.ndarray] | None:
        """The group ``name`` (from memory, or read from disk), or ``None``."""
        with self._lock:
            if name in self._groups:
                return self._groups[name]
        path = self._path(name)
        if path is None:
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                group = {k: z[k] for k in z.files}
        except Exception:  # noqa: BLE001 - missing, truncated or unreadable: recompute
            return None
        with self._lock:
            self._groups[name] = group
        return group

    def put(self, name: str, group: dict[str, np.ndarray]) -> None:
        """Keep ``group`` in memory and write it to disk (atomically; skipped where the home is not writable)."""
        with self._lock:
            self._groups[name] = group
        path = self._path(name)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            with open(tmp, "wb") as fh:
                np.savez(fh, **group)
            os.replace(tmp, path)
        except OSError:
            pass

    def export(self) -> dict[str, dict[str, np.ndarray]]:
        """Every group held in memory (to send to Dask workers as ``preloaded``)."""
        with self._lock:
            return dict(self._groups)


def pack_json(obj: Any) -> np.ndarray:
    """A JSON-able value as a uint8 array (groups hold arrays only)."""
    return np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)


def unpack_json(arr: np.ndarray) -> Any:
    return json.loads(np.asarray(arr, dtype=np.uint8).tobytes().decode())
