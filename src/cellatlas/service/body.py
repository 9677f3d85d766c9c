"""Reading a request body under the server's limits, before anything parses it.

:func:`read_body` streams the body off the socket, hashes it for ``Idempotency-Key``
as it arrives, and undoes ``Content-Encoding`` (gzip, zstd) in bounded pieces. The
decoded bytes may not exceed ``max_body_bytes`` nor ``max_encoding_ratio`` times the
bytes received plus 1 MiB, so a compression bomb is refused after a few MiB of output.
Decoded bodies spill to an unnamed temporary file under ``upload_tmp_dir`` past 16 MiB
(nothing is left behind if the process dies); identity bodies stay the bytes received.

:class:`DecodeBudget` bounds how many bodies are read and decoded at once across the
server (worker processes share it through lock files): a request waits up to
``decode_wait_seconds`` for a slot, then gets 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tempfile
import time
import zlib
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, AsyncIterator

import zstandard
from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from cellatlas.config import Settings
from cellatlas.errors import InputError, PayloadTooLargeError, UnsupportedMediaTypeError
from cellatlas.service.errors import ServerBusyError

CONTENT_ENCODINGS = ("identity", "gzip", "zstd")
RATIO_SLACK = 1 << 20
"""Decoded bytes always allowed on top of ``ratio * received`` (small bodies have poor ratios)."""
_OUT_PIECE = 1 << 20
_FEED_BATCH = 1 << 20
_SPOOL_IN_MEMORY = 16 << 20
_ZSTD_MAX_WINDOW = 1 << 25
_ZSTD_SLICE = 256
_GZIP = ("gzip", "x-gzip")


@dataclass
class Body:
    """A received, decoded body: ``data`` (identity) or a spooled ``file`` (decoded), never both."""

    size: int
    received: int
    digest: str
    data: bytes | None = None
    file: IO[bytes] | None = None

    def head(self, n: int = 8) -> bytes:
        """The first ``n`` decoded bytes (format sniffing)."""
        if self.data is not None:
            return self.data[:n]
        self.file.seek(0)
        out = self.file.read(n)
        self.file.seek(0)
        return out

    def bytes(self) -> bytes:
        """The whole decoded body in memory."""
        if self.data is not None:
            return self.data
        self.file.seek(0)
        return self.file.read()

    def open(self) -> IO[bytes]:
        """A seekable binary file over the decoded body."""
        if self.data is not None:
            return io.BytesIO(self.data)
        self.file.seek(0)
        return self.file

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.data = None


def too_large_error(limit: int, size: int | None = None, *, decoded: bool = False) -> PayloadTooLargeError:
    """The 413 error for a body over ``limit`` bytes (as sent, or after decompression)."""
    got = f" ({size:,} bytes)" if size is not None else ""
    what = "decompressed request body" if decoded else "request body"
    return PayloadTooLargeError(
        f"The {what}{got} is larger than this server's limit of {limit:,} bytes.",
        fix="Split the cells into smaller requests (cellatlas.client.Client.annotate_large chunks to the server's "
        "limits), or use the compressed binary format (Content-Type: application/x-npz, Content-Encoding: zstd).",
        field="body",
        details={"max_body_bytes": limit, "body_bytes": size},
    )


def ratio_error(ratio: float, received: int) -> PayloadTooLargeError:
    """The 413 error for a body that decompresses far more than real data does."""
    return PayloadTooLargeError(
        f"The body decompresses to more than {ratio:g} times its {received:,} compressed bytes; "
        "real count matrices compress 3-7x, so this looks like a compression bomb.",
        fix="Send the data itself compressed once with gzip or zstd (or uncompressed).",
        field="Content-Encoding",
        details={"max_encoding_ratio": ratio, "received_bytes": received},
    )


class Decoder:
    """Incremental ``Content-Encoding`` decoder with hard caps on output size and ratio.

    Parameters
    ----------
    encoding
        ``identity``/empty, ``gzip`` (``x-gzip``) or ``zstd``.
    limit
        Most decoded bytes allowed.
    ratio
        Most decoded bytes per received byte (plus :data:`RATIO_SLACK`).
    spool_dir
        Directory for the temporary file decoded bytes spill into.
    """

    def __init__(self, encoding: str | None, limit: int, ratio: float, spool_dir: Path | None = None) -> None:
        enc = (encoding or "identity").strip().lower()
        if enc not in ("", "identity", "zstd", *_GZIP):
            raise UnsupportedMediaTypeError(
                f"Content-Encoding '{encoding}' is not supported.",
                fix=f"Use one of: {', '.join(CONTENT_ENCODINGS)}.",
                field="Content-Encoding",
            )
        self.encoding = "identity" if enc in ("", "identity") else "gzip" if enc in _GZIP else "zstd"
        self.limit, self.ratio = int(limit), float(ratio)
        self.received = 0
        self.size = 0
        self._parts: list[bytes] = []
        self._spool = None
        self._z = None
        if self.encoding != "identity":
            if spool_dir is not None:
                Path(spool_dir).mkdir(parents=True, exist_ok=True)
            self._spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY, dir=spool_dir)

    def feed(self, chunk: bytes) -> None:
        """Decode one received piece (raises 413/422 as soon as a cap is passed)."""
        self.received += len(chunk)
        if self.encoding == "identity":
            self._emit_size(len(chunk))
            self._parts.append(chunk)
            return
        try:
            if self.encoding == "gzip":
                self._feed_gzip(chunk)
            else:
                self._feed_zstd(chunk)
        except (zlib.error, zstandard.ZstdError) as e:
            raise self._invalid(e) from e

    def finish(self, digest: str = "") -> Body:
        """The decoded :class:`Body` (raises 422 on a truncated stream)."""
        if self.encoding == "identity":
            data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
            self._parts = []
            return Body(size=self.size, received=self.received, digest=digest, data=data)
        if self._z is None or not self._z.eof:
            raise self._invalid(f"truncated {self.encoding} stream (no end of stream/frame)")
        body = Body(size=self.size, received=self.received, digest=digest, file=self._spool)
        self._spool = None
        return body

    def close(self) -> None:
        """Drop everything held (called on errors)."""
        self._parts = []
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    # ------------------------------------------------------------- internals
    def _emit_size(self, n: int) -> None:
        self.size += n
        if self.size > self.limit:
            raise too_large_error(self.limit, decoded=self.encoding != "identity")
        if self.encoding != "identity" and self.size > self.ratio * self.received + RATIO_SLACK:
            raise ratio_error(self.ratio, self.received)

    def _write(self, out: bytes) -> None:
        if out:
            self._emit_size(len(out))
            self._spool.write(out)

    def _feed_gzip(self, data: bytes) -> None:
        while data:
            if self._z is None or self._z.eof:  # first member, or a further concatenated member
                self._z = zlib.decompressobj(wbits=31)
            self._write(self._z.decompress(data, _OUT_PIECE))
            data = self._z.unused_data if self._z.eof else self._z.unconsumed_tail

    def _feed_zstd(self, data: bytes) -> None:
        # zstd has no output bound per call: a few hundred input bytes can hold 128 KiB RLE
        # blocks each, so feed small slices (at most ~8 MiB out per call).
        view, i = memoryview(data), 0
        while True:
            pending = b""
            if self._z is None or self._z.eof:  # first frame, or a further concatenated frame
                pending = self._z.unused_data if self._z is not None else b""
                if self._z is not None and not pending and i >= len(view):
                    return  # ended exactly at a frame boundary
                self._z = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).decompressobj()
            if pending:
                piece = pending
            elif i < len(view):
                piece, i = view[i : i + _ZSTD_SLICE], i + _ZSTD_SLICE
            else:
                return
            self._write(self._z.decompress(piece))

    def _invalid(self, e: Exception | str) -> InputError:
        return InputError(
            f"The body could not be decoded as {self.encoding}: {e}.",
            fix=f"Send a valid {self.encoding} stream or drop the Content-Encoding header.",
            field="Content-Encoding",
        )


def request_hasher(request: Request):
    """BLAKE2b primed with what identifies a request besides its body (route, query, type, encoding).

    A retry must resend the same bytes (the client does); the body is hashed as it arrives.
    """
    h = hashlib.blake2b(digest_size=32)
    h.update(request.method.encode())
    h.update(request.url.path.encode())
    h.update(repr(sorted(request.query_params.multi_items())).encode())
    for name in ("content-type", "content-encoding"):
        h.update(b"\0" + (request.headers.get(name) or "").split(";")[0].strip().lower().encode())
    h.update(b"\0")
    return h


async def read_body(request: Request, settings: Settings, *, hashed: bool) -> Body:
    """Receive and decode the request body under the server's caps.

    Parameters
    ----------
    request
        The request; its body has not been read yet.
    settings
        ``max_body_bytes``, ``max_encoding_ratio`` and ``resolved_upload_tmp_dir``.
    hashed
        Also compute the request fingerprint (``Body.digest``) for ``Idempotency-Key``.

    Raises
    ------
    PayloadTooLargeError
        Over the byte limit or the compression ratio (413).
    UnsupportedMediaTypeError, InputError
        Unknown encoding (415), corrupt stream (422).
    """
    dec = Decoder(
        request.headers.get("content-encoding"),
        settings.max_body_bytes,
        settings.max_encoding_ratio,
        settings.resolved_upload_tmp_dir,
    )
    hasher = request_hasher(request) if hashed else None

    def consume(batch: bytes) -> None:
        if hasher is not None:
            hasher.update(batch)
        dec.feed(batch)

    try:
        pending: list[bytes] = []
        n = 0
        async for chunk in request.stream():
            if not chunk:
                continue
            if dec.encoding == "identity":  # cheap: keep in the event loop
                consume(chunk)
                continue
            pending.append(chunk)
            n += len(chunk)
            if n >= _FEED_BATCH:
                await run_in_threadpool(consume, b"".join(pending))
                pending, n = [], 0
        if pending:
            await run_in_threadpool(consume, b"".join(pending))
        return await run_in_threadpool(dec.finish, hasher.hexdigest() if hasher is not None else "")
    except BaseException:
        dec.close()
        raise


def decode_bytes(raw: bytes, encoding: str | None, limit: int, ratio: float = float("inf")) -> bytes:
    """Decode a whole body held in memory (tests, tools); the same caps as :func:`read_body`."""
    dec = Decoder(encoding, limit, ratio)
    try:
        for i in range(0, max(len(raw), 1), _FEED_BATCH):
            dec.feed(raw[i : i + _FEED_BATCH])
        body = dec.finish()
        out = body.bytes()
        body.close()
        return out
    finally:
        dec.close()


# ------------------------------------------------------------------ budget
class DecodeBudget:
    """At most ``slots`` bodies read and decoded at once, across worker processes.

    In-process waiters queue on a semaphore; a process holding it then takes one of
    ``slots`` lock files (``flock``, released by the kernel if the process dies), so
    ``--workers N`` share the same budget.

    Parameters
    ----------
    slots
        Concurrent decodes allowed server-wide.
    lock_dir
        Directory for the lock files (``None``: this process only).
    wait_seconds
        Longest wait for a slot before :class:`ServerBusyError` (429).
    """

    def __init__(self, slots: int, lock_dir: Path | None, wait_seconds: float) -> None:
        self.slots = max(1, int(slots))
        self.wait_seconds = float(wait_seconds)
        self._sem: asyncio.Semaphore | None = None
        self._fds: list[int] = []
        if lock_dir is not None:
            try:
                import fcntl  # noqa: F401  (POSIX only: without it the budget is per process)

                Path(lock_dir).mkdir(parents=True, exist_ok=True)
                self._fds = [os.open(Path(lock_dir) / f"decode-slot-{i}.lock", os.O_RDWR | os.O_CREAT, 0o600) for i in range(self.slots)]
            except (ImportError, OSError):
                self._fds = []
        self._held: set[int] = set()
        self.in_use = 0

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def _busy(self) -> ServerBusyError:
        return ServerBusyError(
            f"The server is decoding {self.slots} request bodies already.",
            fix="Retry after Retry-After seconds (the Python client does this automatically).",
            details={"retry_after": 2, "max_concurrent_decodes": self.slots},
        )

    def _try_lock(self) -> int | None:
        import fcntl

        for fd in self._fds:
            if fd in self._held:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            self._held.add(fd)
            return fd
        return None

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one decode slot for the ``async with`` block (429 when none frees in time)."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.slots)
        deadline = time.monotonic() + self.wait_seconds
        try:
            await asyncio.wait_for(self._sem.acquire(), timeout=max(0.0, self.wait_seconds))
        except asyncio.TimeoutError:
            raise self._busy() from None
        fd = None
        try:
            if self._fds:
                while (fd := self._try_lock()) is None:
                    if time.monotonic() >= deadline:
                        raise self._busy()
                    await asyncio.sleep(0.02)
            self.in_use += 1
            try:
                yield
            finally:
                self.in_use -= 1
        finally:
            if fd is not None:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_UN)
                self._held.discard(fd)
            self._sem.release()


def sweep_tmp(directory: Path) -> int:
    """Remove leftovers in the upload temporary directory; returns how many were removed.

    Decoded bodies are unnamed temporary files (gone when their process dies), so
    anything found here at start-up is left from a crash or an older version.
    """
    removed = 0
    d = Path(directory)
    if not d.is_dir():
        return 0
    for p in d.iterdir():
        try:
            if p.is_file() or p.is_symlink():
                p.unlink()
                removed += 1
        except OSError:
            continue
    return removed
