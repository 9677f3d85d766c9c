"""Python client of the Cell Atlas HTTP API.

>>> from cellatlas.client import Client
>>> c = Client("http://127.0.0.1:8000", "sk-ca-...")     # or CELLATLAS_API_URL / CELLATLAS_API_KEY
>>> res = c.annotate(X, genes)                           # same AnnotationResult as cellatlas.annotate
>>> c.annotate_adata(adata)                              # same obs/obsm/uns columns as in-process
>>> res = c.annotate_large(X, genes)                     # chunked to the server's limit, order preserved

Binary transport (npz + zstd request, columnar npz response) is the default;
``transport="json"`` sends the articles' JSON body and reads JSON instead. Every request carries an ``Idempotency-Key``, so
retries after 429/5xx/connection errors (with exponential backoff) are never
charged twice.
"""

from __future__ import annotations

import io
import os
import random
import time
import uuid
import warnings
from typing import Any, Callable, Iterator, Sequence

import httpx
import numpy as np
import orjson
import scipy.sparse as sp
import zstandard

from cellatlas import errors as _errors
from cellatlas.errors import CellAtlasError, InputError
from cellatlas.result import AnnotationResult
from cellatlas.service.columnar import decode_result

DEFAULT_CHUNK = 10_000
"""Cells per request unless the server's limit is lower (bounds client memory too)."""
_BODY_MARGIN = 0.8
_RETRY_STATUS = {429, 500, 502, 503, 504}


class ServiceUnreachableError(CellAtlasError):
    """The server could not be reached (after retries)."""

    status_code = 503
    code = "service_unreachable"


def _error_classes() -> dict[str, type[CellAtlasError]]:
    from cellatlas.service import errors as _service_errors

    out: dict[str, type[CellAtlasError]] = {}
    for obj in [*vars(_errors).values(), *vars(_service_errors).values()]:
        if isinstance(obj, type) and issubclass(obj, CellAtlasError):
            out.setdefault(obj.code, obj)
    return out


def error_from_response(r: httpx.Response) -> CellAtlasError:
    """The typed :class:`CellAtlasError` a server error response describes."""
    try:
        body = orjson.loads(r.content)["error"]
        if not isinstance(body, dict):
            raise TypeError
    except (orjson.JSONDecodeError, KeyError, TypeError):
        body = {"code": "http_error", "message": f"HTTP {r.status_code}: {r.text[:300]}", "fix": None}
    cls = _error_classes().get(body.get("code", ""), CellAtlasError)
    err = cls(body.get("message", ""), fix=body.get("fix"), field=body.get("field"), details=body.get("details") or {})
    if err.status_code != r.status_code:
        err.status_code = r.status_code
        err.code = body.get("code", err.code)
    return err


class Client:
    """Client of a Cell Atlas server.

    Parameters
    ----------
    base_url
        Server root, e.g. ``http://127.0.0.1:8000`` (a full ``.../v1/singlecell/annotate``
        URL is accepted too). Default: ``CELLATLAS_API_URL``.
    api_key
        ``sk-...`` key. Default: ``CELLATLAS_API_KEY`` (may be absent for ``serve --local``).
    transport
        ``"binary"`` (npz, default) or ``"json"`` (the articles' body).
    compression
        ``"auto"`` (default: zstd, none when the server is on this machine's loopback,
        where compressing costs more than it saves), ``"zstd"``, ``"gzip"`` or ``None``.
    timeout
        Seconds per request.
    max_retries, backoff
        Retries on 429, 5xx and connection errors; waits ``backoff * 2**attempt``
        seconds (with jitter, or the server's ``Retry-After``).
    progress
        Show a progress bar when a call needs more than one request.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        transport: str = "binary",
        compression: str | None = "auto",
        timeout: float = 300.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        progress: bool = True,
        http: httpx.Client | None = None,
    ) -> None:
        base_url = base_url or os.environ.get("CELLATLAS_API_URL")
        if not base_url:
            raise InputError("No server URL was given.", fix="Pass Client(base_url=...) or set CELLATLAS_API_URL.", field="base_url")
        if transport not in ("binary", "json"):
            raise InputError(f"Unknown transport '{transport}'.", fix="Use transport='binary' or 'json'.", field="transport")
        if compression not in (None, "auto", "zstd", "gzip"):
            raise InputError(f"Unknown compression '{compression}'.", fix="Use 'auto', 'zstd', 'gzip' or None.", field="compression")
        self.base_url = _root_url(base_url)
        if compression == "auto":
            compression = None if httpx.URL(self.base_url).host in ("127.0.0.1", "localhost", "::1") else "zstd"
        self.api_key = api_key or os.environ.get("CELLATLAS_API_KEY")
        self.transport, self.compression = transport, compression
        self.max_retries, self.backoff, self.progress = int(max_retries), float(backoff), progress
        headers = {"User-Agent": "cellatlas-client", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = http or httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)
        if http is not None:
            self._http.headers.update(headers)
        self._limits: dict[str, Any] | None = None
        self.last_usage: dict[str, Any] | None = None
        self.last_warnings: list[dict[str, str]] = []
        """``warnings`` of the last annotate/embed call (``{"code", "message"}``; also shown with :mod:`warnings`)."""
        self.last_server_timing: str | None = None
        """``Server-Timing`` of the last response: milliseconds per server step (read, parse, engine, hash, respond)."""

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ discovery
    def limits(self, refresh: bool = False) -> dict[str, Any]:
        """The server's limits, pricing and formats (``GET /v1/limits``, cached)."""
        if self._limits is None or refresh:
            self._limits = self._get("/v1/limits")
        return self._limits

    def models(self) -> list[dict[str, Any]]:
        """Models installed on the server and whether they can run."""
        return self._get("/v1/models")["models"]

    def atlases(self) -> list[dict[str, Any]]:
        """Reference atlases installed on the server."""
        return self._get("/v1/atlases")["atlases"]

    def usage(self, limit: int = 50) -> dict[str, Any]:
        """Credits left and recent usage of this key."""
        return self._get("/v1/usage", params={"limit": limit})

    def markers(self, atlas: str | None = None, labels: Sequence[str] | None = None):
        """The atlas's marker table as a DataFrame (label, ontology_id, gene, sign, source)."""
        import pandas as pd

        params: list[tuple[str, str]] = [("format", "tsv")]
        if atlas:
            params.append(("reference_atlas", atlas))
        params += [("label", lab) for lab in labels or ()]
        r = self._request("GET", "/v1/singlecell/markers", params=params)
        return pd.read_csv(io.BytesIO(r.content), sep="\t", dtype=str, keep_default_na=False)

    # ------------------------------------------------------------ annotation
    def annotate(self, X, genes: Sequence[str] | None = None, model: str | None = None, atlas: str | None = None, **kwargs: Any) -> AnnotationResult:
        """Annotate cells on the server; returns the same object as ``cellatlas.annotate``.

        Inputs larger than the server's per-request limit are chunked
        (see :meth:`annotate_large`, which takes the same keyword arguments).
        """
        kwargs.setdefault("progress", False)
        return self.annotate_large(X, genes, model, atlas, **kwargs)

    def annotate_large(
        self,
        X,
        genes: Sequence[str] | None = None,
        model: str | None = None,
        atlas: str | None = None,
        *,
        chunk_size: int | None = None,
        cell_ids: Sequence[str] | None = None,
        return_embedding: bool = False,
        skip_gene_check: bool = False,
        progress: bool | None = None,
    ) -> AnnotationResult:
        """Annotate any number of cells in chunks within the server's limits, order preserved.

        Parameters
        ----------
        X
            Counts (cells x genes): scipy sparse, dense numpy, or AnnData.
        genes
            One identifier per column (from ``var_names`` for AnnData).
        model, atlas
            Server defaults when ``None``.
        chunk_size
            Cells per request (default: the server's limit, at most 10,000, which bounds client memory).
        cell_ids
            Row identifiers for the result (default ``obs_names`` or ``0..n-1``).
        return_embedding
            Also fetch embeddings and layout (``obsm`` in :meth:`annotate_adata`).
        skip_gene_check
            Ask the server to skip its gene-list check (targeted panels; see ``cellatlas.annotate``).
        progress
            Progress bar (default: the client's setting, shown for > 1 chunk).
        """
        X, genes, cell_ids = _as_csr(X, genes, cell_ids)
        parts: list[AnnotationResult] = []
        usage = {"cells": 0, "credits_charged": 0, "credits_left": None}
        notes: dict[str, str] = {}
        params = {"format": "npz"} if self.transport == "binary" else {}
        if return_embedding:
            params["return_embedding"] = "true"
        if skip_gene_check:
            params["skip_gene_check"] = "true"
        for lo, hi, resp in self._chunked("/v1/singlecell/annotate", X, genes, model, atlas, chunk_size, params, progress):
            if "meta_json" in resp:  # columnar npz response
                part, resp = decode_result(resp, cell_ids[lo:hi])
            else:
                part = AnnotationResult.from_calls(
                    resp["calls"],
                    cell_ids=cell_ids[lo:hi],
                    gene_report=resp.get("gene_report"),
                    provenance=resp.get("provenance"),
                    embedding=_f32(resp.get("embedding")),
                    layout=_f32(resp.get("layout")),
                )
            parts.append(part)
            _add_usage(usage, resp.get("usage"))
            notes.update((w.get("code"), w.get("message")) for w in resp.get("warnings") or ())
        self.last_usage = usage
        self._warn(notes)
        return AnnotationResult.concat(parts)

    def annotate_adata(
        self,
        adata,
        model: str | None = None,
        atlas: str | None = None,
        *,
        key_added: str = "cell_type",
        copy: bool = False,
        layer: str | None = None,
        use_raw: bool | None = None,
        chunk_size: int | None = None,
        progress: bool | None = None,
    ):
        """Annotate an AnnData on the server, writing what ``cellatlas.annotate_adata`` writes.

        Same rules: ``key_added`` names the columns, an existing column cellatlas did not
        write is moved to ``<name>_uploaded`` (warning), ``copy=True`` returns an annotated
        copy; otherwise the :class:`AnnotationResult` is returned.
        """
        from cellatlas.adata_out import annotate_into
        from cellatlas.io import counts_from_adata

        def run(target):
            X, genes, cell_ids = counts_from_adata(target, layer=layer, use_raw=use_raw)[:3]
            return self.annotate_large(X, genes, model, atlas, chunk_size=chunk_size, cell_ids=cell_ids, return_embedding=True, progress=progress)

        return annotate_into(adata, run, key_added=key_added, copy=copy)

    def embed(self, X, genes: Sequence[str] | None = None, model: str | None = None, atlas: str | None = None, *, chunk_size: int | None = None, progress: bool | None = None):
        """Embeddings, layout coordinates and gene report, like ``cellatlas.embed``."""
        X, genes, _ = _as_csr(X, genes, None)
        embs, lays, report, notes = [], [], {}, {}
        params = {"format": "npz"} if self.transport == "binary" else {}
        for _lo, _hi, resp in self._chunked("/v1/singlecell/embed", X, genes, model, atlas, chunk_size, params, progress):
            meta = orjson.loads(resp["meta_json"].tobytes()) if "meta_json" in resp else resp
            embs.append(_f32(resp["embedding"]))
            lays.append(_f32(resp["layout"]))
            report = report or meta.get("gene_report", {})
            notes.update((w.get("code"), w.get("message")) for w in meta.get("warnings") or ())
        self._warn(notes)
        return np.concatenate(embs), np.concatenate(lays), report

    # ------------------------------------------------------------ internals
    def _warn(self, notes: dict[str, str]) -> None:
        """Show the server's warnings of the last call once each (e.g. a model fallback)."""
        self.last_warnings = [{"code": c, "message": m} for c, m in notes.items()]
        for message in notes.values():
            warnings.warn(f"cellatlas server: {message}", UserWarning, stacklevel=4)

    def _chunked(self, path, X, genes, model, atlas, chunk_size, params, progress) -> Iterator[tuple[int, int, dict]]:
        bounds = list(self._chunk_bounds(X, chunk_size))
        show = (self.progress if progress is None else progress) and len(bounds) > 1
        with _progress(show, X.shape[0]) as advance:
            for lo, hi in bounds:
                body, headers, q = self._encode(X, genes, lo, hi, model, atlas)
                r = self._request("POST", path, content=body, headers=headers, params={**q, **params})
                yield lo, hi, _decode_response(r)
                advance(hi - lo)

    def _chunk_bounds(self, X: sp.csr_matrix, chunk_size: int | None) -> Iterator[tuple[int, int]]:
        lim = self.limits()
        size = max(1, min(int(chunk_size or DEFAULT_CHUNK), int(lim["max_cells_per_request"])))
        max_bytes = int(lim["max_body_bytes"]) * _BODY_MARGIN
        per_value = 8 if self.transport == "binary" else 24  # rough serialised bytes per stored value
        n, lo = X.shape[0], 0
        if n == 0:
            yield 0, 0
            return
        while lo < n:
            hi = min(lo + size, n)
            while hi - lo > 1 and (X.indptr[hi] - X.indptr[lo]) * per_value + 8 * (hi - lo) > max_bytes:
                hi = lo + (hi - lo) // 2
            yield lo, hi
            lo = hi

    def _encode(self, X: sp.csr_matrix, genes: list[str], lo: int, hi: int, model, atlas) -> tuple[bytes, dict, dict]:
        a, b = int(X.indptr[lo]), int(X.indptr[hi])
        indptr = (X.indptr[lo : hi + 1] - a).astype(np.int64 if b - a >= 2**31 else np.int32)
        indices, data = X.indices[a:b].astype(np.int32, copy=False), X.data[a:b].astype(np.float32, copy=False)
        shape = [hi - lo, X.shape[1]]
        if self.transport == "binary":
            indices, data = _compact(indices, data, X.shape[1])
            buf = io.BytesIO()
            np.savez(buf, indptr=indptr, indices=indices, data=data, shape=np.asarray(shape, dtype=np.int64), genes=np.asarray(genes, dtype=str))
            body, headers = buf.getbuffer(), {"Content-Type": "application/x-npz"}
            query = {k: v for k, v in (("model", model), ("reference_atlas", atlas)) if v}
        else:
            obj: dict[str, Any] = {"genes": genes, "matrix": {"indptr": indptr, "indices": indices, "data": data, "shape": shape}}
            obj.update({k: v for k, v in (("model", model), ("reference_atlas", atlas)) if v})
            body, headers, query = orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), {"Content-Type": "application/json"}, {}
        if self.compression == "zstd":
            body, headers["Content-Encoding"] = zstandard.ZstdCompressor(level=1, threads=-1).compress(body), "zstd"
        elif self.compression == "gzip":
            import gzip

            body, headers["Content-Encoding"] = gzip.compress(body, compresslevel=1, mtime=0), "gzip"
        return bytes(body), headers, query

    def _get(self, path: str, params: dict | None = None) -> dict[str, Any]:
        return orjson.loads(self._request("GET", path, params=params).content)

    def _request(self, method: str, path: str, *, content: bytes | None = None, headers: dict | None = None, params=None) -> httpx.Response:
        headers = dict(headers or {})
        if method == "POST":
            headers.setdefault("Idempotency-Key", str(uuid.uuid4()))
        if content is not None:
            headers["Content-Length"] = str(len(content))
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                body = None if content is None else _body_chunks(content)  # fresh stream per attempt
                r = self._http.request(method, path, content=body, headers=headers, params=params)
            except httpx.TransportError as e:
                last = e
                if attempt < self.max_retries:
                    time.sleep(self._wait(attempt, None))
                    continue
                raise ServiceUnreachableError(
                    f"Cannot reach {self.base_url} ({type(e).__name__}: {e}) after {attempt + 1} attempts.",
                    fix="Check the URL and that the server is running (`cellatlas serve`).",
                ) from last
            if r.status_code in _RETRY_STATUS and attempt < self.max_retries:
                time.sleep(self._wait(attempt, r.headers.get("retry-after")))
                continue
            if r.status_code >= 400:
                raise error_from_response(r)
            self.last_server_timing = r.headers.get("server-timing")
            return r
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(60.0, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return self.backoff * (2**attempt) * (0.5 + random.random())


# ---------------------------------------------------------------- helpers
def _root_url(url: str) -> str:
    url = url.rstrip("/")
    for suffix in ("/v1/singlecell/annotate", "/v1/singlecell", "/v1"):
        if url.endswith(suffix):
            return url[: -len(suffix)]
    return url


def _as_csr(X, genes, cell_ids) -> tuple[sp.csr_matrix, list[str], np.ndarray]:
    if type(X).__name__ == "AnnData":
        from cellatlas.io import counts_from_adata

        mat, g, ids = counts_from_adata(X)[:3]
        X, genes = mat, g if genes is None else genes
        cell_ids = ids if cell_ids is None else cell_ids
    if genes is None:
        raise InputError("No gene names were given.", fix="Pass genes=[...] with one identifier per column.", field="genes")
    if not sp.issparse(X):
        X = sp.csr_matrix(np.asarray(X))
    X = X.tocsr() if X.format != "csr" else X  # never copied when already CSR: chunks are sliced as views
    n = X.shape[0]
    ids = np.arange(n).astype(str).astype(object) if cell_ids is None else np.asarray(cell_ids, dtype=object)
    return X, [str(g) for g in genes], ids


def _compact(indices: np.ndarray, data: np.ndarray, n_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """Lossless narrower dtypes for the wire: uint16 column numbers when there are fewer than
    65,536 genes, uint16 values when they are whole counts below 65,536 (typical UMI data)."""
    if n_genes <= np.iinfo(np.uint16).max:
        indices = indices.astype(np.uint16)
    with np.errstate(invalid="ignore"):  # NaN/negative/huge values cast to something unequal
        narrow = data.astype(np.uint16)  # anything but a whole count below 65,536 changes
    if np.array_equal(narrow, data):
        data = narrow
    return indices, data


def _body_chunks(content: bytes, size: int = 1 << 20) -> Iterator[memoryview]:
    """The body as 1 MiB views: httpx re-slices one large bytes object per socket write
    (quadratic copying, ~10x slower for 100 MB); views of bounded chunks avoid that."""
    view = memoryview(content)
    for start in range(0, len(content), size):
        yield view[start : start + size]


def _decode_response(r: httpx.Response) -> dict[str, Any]:
    """JSON body as a dict; an npz body as a dict of its arrays (metadata in ``meta_json``)."""
    if r.headers.get("content-type", "").startswith("application/x-npz"):
        with np.load(io.BytesIO(r.content), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    return orjson.loads(r.content)


def _f32(a) -> np.ndarray | None:
    return None if a is None else np.asarray(a, dtype=np.float32)


def _add_usage(total: dict[str, Any], usage: dict[str, Any] | None) -> None:
    if usage:
        total["cells"] += int(usage.get("cells", 0))
        total["credits_charged"] += int(usage.get("credits_charged", 0))
        total["credits_left"] = usage.get("credits_left")


class _progress:
    """Context manager yielding ``advance(n)``; a rich progress bar when ``show``."""

    def __init__(self, show: bool, total: int) -> None:
        self.show, self.total, self._bar = show, total, None

    def __enter__(self) -> Callable[[int], None]:
        if not self.show:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("annotating"), BarColumn(), MofNCompleteColumn(), TextColumn("cells"), TimeRemainingColumn(), console=Console(stderr=True))
        self._bar.start()
        task = self._bar.add_task("cells", total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
