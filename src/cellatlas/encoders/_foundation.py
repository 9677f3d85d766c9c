"""Shared plumbing of the foundation-model encoders (no torch imported here).

Where a checkpoint lives, whether the optional packages are installed, how a
missing piece is reported (:class:`~cellatlas.errors.ModelUnavailableError`
with the exact fix), how weights are fingerprinted, and the small cache that
keeps a loaded model in memory between requests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import scipy.sparse as sp

from cellatlas.config import Settings
from cellatlas.errors import InputError, ModelUnavailableError

EXTRA_INSTALL = "pip install 'cellatlas[foundation]' (or: pip install torch==2.13.0 transformers safetensors)"
_LFS_MAGIC = b"version https://git-lfs"
_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_CACHE_LOCK = threading.Lock()


def resolve_model_dir(name: str, settings: Settings, model_path: str | Path | None) -> Path:
    """The checkpoint directory: ``model_path`` if given, else ``$CELLATLAS_MODELS_DIR/<name>``."""
    if model_path is not None:
        return Path(model_path).expanduser()
    return Path(settings.resolved_models_dir) / name


def missing_packages(packages: Sequence[str]) -> list[str]:
    """Names in ``packages`` that cannot be imported (checked without importing them)."""
    return [p for p in packages if importlib.util.find_spec(p) is None]


def require_packages(name: str, packages: Sequence[str], files: str) -> None:
    """Raise :class:`ModelUnavailableError` with the install command if a package is missing."""
    missing = missing_packages(packages)
    if missing:
        raise ModelUnavailableError(
            f"The {name} encoder needs Python packages that are not installed: {', '.join(missing)}.",
            fix=install_fix(name, files), field="model", details={"missing_packages": missing},
        )


def install_fix(name: str, files: str) -> str:
    """The one-line fix for a model that is not installed."""
    return (
        f"Install the optional extra with {EXTRA_INSTALL}, then put the {name} checkpoint directory "
        f"({files}) at $CELLATLAS_MODELS_DIR/{name} (default ~/.cellatlas/models/{name}), or pass "
        "model_path=/path/to/checkpoint (CLI: --model-path). See docs/foundation.md."
    )


def is_lfs_pointer(path: Path) -> bool:
    """True when ``path`` is a Git-LFS pointer file rather than the real object."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(_LFS_MAGIC)) == _LFS_MAGIC
    except OSError:
        return False


def check_files(name: str, directory: Path, required: dict[str, Iterable[Path]], fix: str) -> None:
    """Raise :class:`ModelUnavailableError` if the directory or a required file is absent.

    Parameters
    ----------
    required
        Human-readable label -> candidate paths; at least one candidate must exist
        (e.g. ``{"weights": [model.safetensors, pytorch_model.bin]}``).
    """
    if not directory.is_dir():
        raise ModelUnavailableError(
            f"No {name} checkpoint directory at {directory}.", fix=fix, field="model",
            details={"path": str(directory)},
        )
    missing, pointers = [], []
    for label, candidates in required.items():
        found = [p for p in candidates if p.is_file()]
        if not found:
            missing.append(label)
        pointers += [p.name for p in found if is_lfs_pointer(p)]
    if missing:
        raise ModelUnavailableError(
            f"The {name} checkpoint at {directory} lacks: {', '.join(missing)}.", fix=fix, field="model",
            details={"path": str(directory), "missing": missing},
        )
    if pointers:
        raise ModelUnavailableError(
            f"{', '.join(pointers)} in {directory} are Git-LFS pointer files, not the real data.",
            fix="Run `git lfs install && git lfs pull` in the cloned model repository, then retry.",
            field="model", details={"path": str(directory), "lfs_pointers": pointers},
        )


def status_dict(name: str, usable: bool, reason: str, path: Path | None) -> dict[str, Any]:
    """The registry's status record for a foundation model."""
    return {"name": name, "usable": usable, "reason": reason, "path": str(path) if path else None, "kind": "foundation"}


def status_from(name: str, probe: Callable[[], str], directory: Path, settings: Settings, explicit: bool) -> dict[str, Any]:
    """Run ``probe`` (raises :class:`ModelUnavailableError` or returns a summary) into a status record.

    The reason never contains absolute server paths (the HTTP listing is public): the checkpoint
    directory reads ``$CELLATLAS_MODELS_DIR/<name>`` (or ``<model_path>``); ``path`` has the real one.
    """
    try:
        return status_dict(name, True, probe(), directory)
    except ModelUnavailableError as err:
        reason = err.one_line().replace(str(directory), "<model_path>" if explicit else f"$CELLATLAS_MODELS_DIR/{name}")
        reason = reason.replace(str(settings.resolved_models_dir), "$CELLATLAS_MODELS_DIR")
        return status_dict(name, False, reason, directory)


def file_digest(path: Path) -> str:
    """blake2b of a file's bytes, cached per (path, size, mtime) so large weights hash once."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _CACHE_LOCK:
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    with _CACHE_LOCK:
        _HASH_CACHE[key] = digest
    return digest


def fingerprint_of(name: str, settings: dict[str, Any], digests: Sequence[str]) -> str:
    """``<name>-<16 hex>`` over the tokenisation/pooling settings and the file or tensor digests."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for d in digests:
        h.update(d.encode())
    return f"{name}-{h.hexdigest()[:16]}"


class ModelCache:
    """A tiny LRU of loaded encoders keyed by checkpoint files and options (loading is slow)."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(directory: Path, options: dict[str, Any]) -> tuple:
        """Key on the resolved directory, every file's size and mtime, and the options."""
        files = tuple(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.rglob("*")) if p.is_file()
        )
        return (str(directory.resolve()), files, json.dumps(options, sort_keys=True, default=str))

    def get_or_load(self, key: tuple, loader: Callable[[], Any]) -> Any:
        """Return the cached value for ``key`` or call ``loader`` and keep its result."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = loader()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        """Forget every loaded model."""
        with self._lock:
            self._items.clear()


def length_batches(lengths: Sequence[int], *, max_tokens: int, max_cells: int) -> list[np.ndarray]:
    """Group cells of similar length so little compute is spent on padding.

    Cells are sorted by length (longest first, ties by input order) and cut into
    batches whose padded size ``n_cells x longest`` stays within ``max_tokens``
    (a batch always holds at least one cell) and at most ``max_cells`` cells.

    Returns
    -------
    list of numpy.ndarray
        Row indices into the input, one array per batch; together a permutation.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, min(max_cells, max_tokens // longest))
        batches.append(order[start : start + size])
        start += size
    return batches


def pad_rows(rows: Sequence[np.ndarray], fill: float, dtype) -> np.ndarray:
    """Stack 1-D arrays into ``[n, longest]``, right-padded with ``fill``."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); a zero row stays zero."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    norm[norm == 0] = 1.0
    return (x / norm).astype(np.float32)


def checked_counts(counts: Any, genes: Sequence[str]) -> "sp.csr_matrix":
    """Counts as float64 CSR for tokenisation; one gene per column and no negative values."""
    x = sp.csr_matrix(counts, dtype=np.float64)
    if x.shape[1] != len(genes):
        raise InputError(
            f"The matrix has {x.shape[1]} columns but {len(genes)} gene names were given.",
            fix="Pass exactly one gene name per matrix column.", field="genes",
        )
    if x.nnz and x.data.min() < 0:
        raise InputError("The count matrix has negative values.", fix="Pass raw (non-negative) counts.", field="matrix")
    return x
