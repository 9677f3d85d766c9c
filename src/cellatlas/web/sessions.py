"""Workspace sessions: one temporary directory per upload, under ``settings.home``.

A session is identified by a random URL-safe token. Its directory holds the
uploaded file, ``meta.json`` (facts, owner, run options, status) and, once a
run finished, ``result.pkl`` (written by this server only) and
``relabels.json``. Sessions older than the time-to-live are removed when new
ones are created; an upload larger than the size limit is refused while it
streams, before it reaches the disk in full.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from cellatlas.errors import AuthError, CellAtlasError, PayloadTooLargeError, UnsupportedMediaTypeError

#: Upload suffixes the workspace accepts (longest match wins), mapped to a format name.
ACCEPTED_SUFFIXES: dict[str, str] = {
    ".h5ad": "AnnData .h5ad",
    ".h5": "10x Genomics .h5",
    ".zip": "zipped Matrix Market directory",
    ".csv.gz": "CSV (gzip)",
    ".csv": "CSV",
    ".tsv.gz": "TSV (gzip)",
    ".tsv": "TSV",
    ".txt.gz": "text table (gzip)",
    ".txt": "text table",
}
_TOKEN_BYTES = 18
_TOUCH_EVERY_S = 60.0


class SessionNotFoundError(CellAtlasError):
    """The workspace session does not exist (expired, deleted or never created)."""

    status_code = 404
    code = "session_not_found"


@dataclass
class Session:
    """One upload and everything derived from it."""

    id: str
    dir: Path
    meta: dict[str, Any]
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def upload_path(self) -> Path:
        return self.dir / self.meta["stored_name"]

    def save_meta(self) -> None:
        """Write ``meta.json`` atomically."""
        tmp = self.dir / "meta.json.tmp"
        tmp.write_text(json.dumps(self.meta, default=str))
        os.replace(tmp, self.dir / "meta.json")

    def reload_meta(self) -> None:
        """Re-read ``meta.json`` (status and facts written by whichever process ran the job)."""
        with self.lock:
            try:
                self.meta = json.loads((self.dir / "meta.json").read_text())
            except (OSError, ValueError):
                pass  # removed meanwhile; the caller's next step reports it

    def update(self, **values: Any) -> None:
        """Set ``meta`` keys and persist them."""
        with self.lock:
            self.meta.update(values)
            self.save_meta()

    # ---------------------------------------------------------------- result
    def save_result(self, payload: dict[str, Any]) -> None:
        """Persist the run's outputs (server-written pickle; never user-supplied)."""
        with self.lock:
            tmp = self.dir / "result.pkl.tmp"
            with open(tmp, "wb") as fh:
                pickle.dump(payload, fh, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, self.dir / "result.pkl")
            self.cache["result"] = payload
            self.cache["result_stamp"] = (self.dir / "result.pkl").stat().st_mtime_ns

    def load_result(self) -> dict[str, Any] | None:
        """The run's outputs, or ``None`` when no run finished yet (re-read if another worker rewrote them)."""
        with self.lock:
            p = self.dir / "result.pkl"
            if not p.exists():
                self.cache.pop("result", None)
                return None
            stamp = p.stat().st_mtime_ns
            if self.cache.get("result_stamp") != stamp or "result" not in self.cache:
                with open(p, "rb") as fh:
                    self.cache["result"] = pickle.load(fh)
                self.cache["result_stamp"] = stamp
            return self.cache["result"]

    # ---------------------------------------------------------------- relabels
    def relabels(self) -> dict[int, str]:
        """User relabels: cell index -> new label (read from disk: small, and shared by all workers)."""
        with self.lock:
            p = self.dir / "relabels.json"
            raw = json.loads(p.read_text()) if p.exists() else {}
            return {int(k): str(v) for k, v in raw.items()}

    def set_relabels(self, relabels: dict[int, str]) -> None:
        """Replace the relabel map and persist it."""
        with self.lock:
            tmp = self.dir / "relabels.json.tmp"
            tmp.write_text(json.dumps({str(k): v for k, v in sorted(relabels.items())}))
            os.replace(tmp, self.dir / "relabels.json")


class SessionStore:
    """Create, find and expire workspace sessions under ``root``.

    Parameters
    ----------
    root
        Directory holding one sub-directory per session.
    max_upload_bytes
        Uploads larger than this are refused with HTTP 413.
    ttl_seconds
        Sessions untouched for longer are deleted by :meth:`cleanup`.
    """

    def __init__(self, root: Path, *, max_upload_bytes: int, ttl_seconds: float) -> None:
        self.root = Path(root)
        self.max_upload_bytes = int(max_upload_bytes)
        self.ttl_seconds = float(ttl_seconds)
        self._live: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- create
    async def create_from_stream(self, filename: str, chunks: AsyncIterator[bytes], owner: str | None) -> Session:
        """Stream an upload to a new session directory, enforcing the size limit.

        Raises
        ------
        UnsupportedMediaTypeError
            The file name has none of :data:`ACCEPTED_SUFFIXES`.
        PayloadTooLargeError
            The body exceeds ``max_upload_bytes`` (the partial session is removed).
        """
        suffix = upload_suffix(filename)
        self.cleanup()
        sid = secrets.token_urlsafe(_TOKEN_BYTES)
        d = self.root / sid
        d.mkdir(parents=True)
        stored = _safe_name(filename, suffix)
        size = 0
        try:
            with open(d / stored, "wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise PayloadTooLargeError(
                            f"The upload is larger than this server's workspace limit of {_human(self.max_upload_bytes)}.",
                            fix="Upload a smaller file (e.g. subset cells or keep raw counts only), use the Python client "
                            "(`cellatlas.Client.annotate_large`) for big datasets, or raise CELLATLAS_WORKSPACE_MAX_UPLOAD_BYTES.",
                            field="file",
                        )
                    fh.write(chunk)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        if size == 0:
            shutil.rmtree(d, ignore_errors=True)
            raise UnsupportedMediaTypeError(
                f"'{filename}' is empty (0 bytes).", fix="Choose the file again; it may not have finished saving.", field="file"
            )
        now = time.time()
        meta = {
            "id": sid,
            "filename": filename,
            "stored_name": stored,
            "format": ACCEPTED_SUFFIXES[suffix],
            "size_bytes": size,
            "owner": owner,
            "created": now,
            "touched": now,
            "status": {"state": "uploaded", "stage": "Uploaded", "progress": 0.0},
        }
        s = Session(id=sid, dir=d, meta=meta)
        s.save_meta()
        with self._lock:
            self._live[sid] = s
        return s

    # ---------------------------------------------------------------- find
    def get(self, sid: str, owner: str | None) -> Session:
        """The session ``sid`` if ``owner`` may use it.

        Raises
        ------
        SessionNotFoundError
            Unknown or expired id.
        AuthError
            The session belongs to another API key.
        """
        if not sid or not all(c.isalnum() or c in "-_" for c in sid):
            raise _not_found(sid)
        p = self.root / sid / "meta.json"
        if not p.exists():  # never created, expired, or deleted (by any worker process)
            with self._lock:
                self._live.pop(sid, None)
            raise _not_found(sid)
        with self._lock:
            s = self._live.setdefault(sid, Session(id=sid, dir=p.parent, meta={}))
        s.reload_meta()  # a job in another worker process may have moved it on
        if time.time() - float(s.meta.get("touched", 0)) > self.ttl_seconds:  # expired: gone, even before a sweep
            with self._lock:
                self._live.pop(sid, None)
            shutil.rmtree(s.dir, ignore_errors=True)
            raise _not_found(sid)
        if s.meta.get("owner") != owner:
            raise AuthError(
                "This workspace session belongs to a different API key.",
                fix="Sign in with the key that uploaded the file, or upload the file again.",
            )
        if time.time() - float(s.meta.get("touched", 0)) > _TOUCH_EVERY_S:
            s.update(touched=time.time())
        return s

    def delete(self, sid: str, owner: str | None) -> None:
        """Remove a session and its files."""
        s = self.get(sid, owner)
        with self._lock:
            self._live.pop(sid, None)
        shutil.rmtree(s.dir, ignore_errors=True)

    def cleanup(self, now: float | None = None) -> list[str]:
        """Delete sessions idle for longer than the time-to-live; returns their ids."""
        now = time.time() if now is None else now
        removed = []
        for d in self.root.iterdir() if self.root.is_dir() else []:
            meta = d / "meta.json"
            try:
                touched = json.loads(meta.read_text()).get("touched", 0)
            except (OSError, ValueError):
                touched = d.stat().st_mtime
            if now - float(touched) > self.ttl_seconds:
                with self._lock:
                    self._live.pop(d.name, None)
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        return removed


def upload_suffix(filename: str) -> str:
    """The accepted suffix of ``filename`` (e.g. ``.csv.gz``).

    Raises
    ------
    UnsupportedMediaTypeError
        If the name ends with none of :data:`ACCEPTED_SUFFIXES`.
    """
    low = (filename or "").lower()
    for suf in sorted(ACCEPTED_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf):
            return suf
    raise UnsupportedMediaTypeError(
        f"'{filename}' is not a file type the workspace reads.",
        fix="Upload an AnnData .h5ad, a 10x Genomics .h5, a .zip of a Matrix Market directory "
        "(matrix.mtx, features.tsv/genes.tsv, barcodes.tsv), or a cells x genes .csv/.tsv.",
        field="file",
    )


def _safe_name(filename: str, suffix: str) -> str:
    """The upload's own name (so reader messages name the user's file), reduced to safe characters."""
    stem = filename[: len(filename) - len(suffix)] if filename.lower().endswith(suffix) else "upload"
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip("._")[:100] or "upload"
    return stem + suffix


def _not_found(sid: str) -> SessionNotFoundError:
    return SessionNotFoundError(
        "This workspace session no longer exists (it expired or was deleted).",
        fix="Upload the file again to start a new session.",
        details={"session": sid},
    )


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
