"""Turn an HTTP request body into a validated query for the engine.

Three body formats on the same routes, chosen by ``Content-Type``:

* ``application/json`` — the articles' wire format (``genes``, ``matrix.{indptr,
  indices, data, shape}``, ``model``, ``reference_atlas``), parsed with orjson;
* ``application/x-npz`` — a numpy ``.npz`` holding the same arrays
  (``indptr``, ``indices``, ``data``, ``shape``, ``genes``, optional ``cell_ids``);
  options travel as query parameters;
* ``application/x-h5ad`` — an ``.h5ad`` file (counts from ``X``, ``layers[layer]``
  or ``raw``, as the in-process path reads them).

``Content-Encoding: gzip`` or ``zstd`` is decoded first, never past the body limit.
"""

from __future__ import annotations

import gzip
import io
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import orjson
import zstandard

from cellatlas.errors import InputError, PayloadTooLargeError, UnsupportedMediaTypeError
from cellatlas.io import validate_csr_arrays

JSON_TYPES = ("application/json", "text/json")
NPZ_TYPES = ("application/x-npz", "application/vnd.cellatlas.csr+npz", "application/zip")
H5AD_TYPES = ("application/x-h5ad", "application/x-hdf5", "application/x-hdf")
CONTENT_TYPES = JSON_TYPES[:1] + NPZ_TYPES[:1] + H5AD_TYPES[:1] + ("application/octet-stream",)
CONTENT_ENCODINGS = ("identity", "gzip", "zstd")
NPZ_ARRAYS = ("indptr", "indices", "data", "shape", "genes")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass
class Parsed:
    """A decoded request: matrix (CSR or AnnData), genes, selection and options."""

    X: Any
    genes: list[str] | None
    n_cells: int
    model: str | None = None
    atlas: str | None = None
    cell_ids: list[str] | None = None
    layer: str | None = None
    use_raw: bool | None = None
    options: dict[str, Any] = field(default_factory=dict)
    body_format: str = "json"

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``cellatlas.annotate`` / ``cellatlas.embed`` (only what was given)."""
        kw: dict[str, Any] = {}
        if self.model is not None:
            kw["model"] = self.model
        if self.atlas is not None:
            kw["atlas"] = self.atlas
        if self.cell_ids is not None:
            kw["cell_ids"] = self.cell_ids
        if self.layer is not None:
            kw["layer"] = self.layer
        if self.use_raw is not None:
            kw["use_raw"] = self.use_raw
        if self.options.get("skip_gene_check"):
            kw["skip_gene_check"] = True
        return kw


# ------------------------------------------------------------------ decoding
def decode_body(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding`` (gzip, zstd or identity), refusing output over ``limit`` bytes.

    Raises
    ------
    UnsupportedMediaTypeError
        Unknown encoding (415).
    PayloadTooLargeError
        The decoded body exceeds ``limit`` (413).
    InputError
        The body is not valid gzip/zstd data.
    """
    enc = (content_encoding or "identity").strip().lower()
    if enc in ("", "identity"):
        return body
    try:
        if enc in ("gzip", "x-gzip"):
            d = zlib.decompressobj(wbits=31)
            out = d.decompress(body, limit + 1)
            if len(out) > limit or d.unconsumed_tail:
                raise _decoded_too_large(limit)
            if not d.eof:
                raise zlib.error("truncated gzip stream")
            return out
        if enc == "zstd":
            return _zstd_decode(body, limit)
    except (zlib.error, zstandard.ZstdError, gzip.BadGzipFile, EOFError) as e:
        raise InputError(
            f"The body could not be decoded as {enc}: {e}.",
            fix=f"Send a valid {enc} stream or drop the Content-Encoding header.",
            field="Content-Encoding",
        ) from e
    raise UnsupportedMediaTypeError(
        f"Content-Encoding '{content_encoding}' is not supported.",
        fix=f"Use one of: {', '.join(CONTENT_ENCODINGS)}.",
        field="Content-Encoding",
    )


def _zstd_decode(body: bytes, limit: int, chunk: int = 1 << 24) -> bytes:
    """Decode every zstd frame of ``body`` in bounded chunks (never allocating past ``limit``)."""
    if zstandard.frame_content_size(body) > limit:
        raise _decoded_too_large(limit)
    parts, total = [], 0
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body), read_across_frames=True) as r:
        while True:
            part = r.read(chunk)
            if not part:
                break
            total += len(part)
            if total > limit:
                raise _decoded_too_large(limit)
            parts.append(part)
    return b"".join(parts)


def _decoded_too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"The decompressed body is larger than the server's limit of {limit:,} bytes.",
        fix="Split the cells into smaller requests (cellatlas.client.Client.annotate_large does this for you).",
        field="body",
        details={"max_body_bytes": limit},
    )


def body_format(content_type: str | None, body: bytes) -> str:
    """``json``, ``npz`` or ``h5ad`` from the Content-Type (sniffed for octet-stream)."""
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct in JSON_TYPES or ct.endswith("+json"):
        return "json"
    if ct in NPZ_TYPES:
        return "npz"
    if ct in H5AD_TYPES:
        return "h5ad"
    if ct in ("", "application/octet-stream"):
        if body[:4] == b"PK\x03\x04":
            return "npz"
        if body[:8] == b"\x89HDF\r\n\x1a\n":
            return "h5ad"
        if ct == "" and body[:1] in (b"{", b" ", b"\n"):
            return "json"
    raise UnsupportedMediaTypeError(
        f"Content-Type '{content_type or ''}' is not supported on this route.",
        fix=f"Send one of: {', '.join(CONTENT_TYPES)} (JSON is the compatible path, npz the fast one).",
        field="Content-Type",
    )


# ------------------------------------------------------------------- parsing
def parse_request(
    body: bytes,
    *,
    content_type: str | None,
    params: Mapping[str, str],
    options: Mapping[str, Any],
    max_cells: int,
) -> Parsed:
    """Decode a (decompressed) body into a :class:`Parsed` query.

    Parameters
    ----------
    body
        The request body after :func:`decode_body`.
    content_type
        The request's Content-Type header.
    params
        Query-string parameters (``model``, ``reference_atlas``/``atlas``, options, and
        for h5ad ``layer``/``use_raw``). Unknown names are refused.
    options
        Route options and their defaults (e.g. ``{"return_embedding": False}``); bools only.
    max_cells
        Cells-per-request limit, checked on the declared shape before any array is built.
    """
    fmt = body_format(content_type, body)
    allowed_params = {"model", "reference_atlas", "atlas", *options}
    if fmt == "h5ad":
        allowed_params |= {"layer", "use_raw"}
    _reject_unknown(params, allowed_params, "query parameter")
    sel = {
        "model": params.get("model"),
        "atlas": params.get("reference_atlas", params.get("atlas")),
        "options": {k: _bool(params[k], k) if k in params else v for k, v in options.items()},
    }
    if fmt == "json":
        parsed = _parse_json(body, options, max_cells, sel)
    elif fmt == "npz":
        parsed = _parse_npz(body, max_cells)
    else:
        parsed = _parse_h5ad(body, max_cells, params)
    parsed.body_format = fmt
    parsed.model = parsed.model or sel["model"]
    parsed.atlas = parsed.atlas or sel["atlas"]
    parsed.options = {**sel["options"], **parsed.options}
    return parsed


def _fast_json(body: bytes) -> dict | None:
    """The body with ``matrix.indptr/indices/data`` read by simdjson straight into numpy
    (no Python object per number: ~3x faster and far smaller than orjson for big matrices).

    Returns ``None`` (use orjson, which also words the errors) unless the body is the
    plain shape: an object of scalars and flat arrays whose ``matrix`` holds flat arrays
    of numbers; no array nests anywhere (checked by counting ``[`` in the raw bytes).
    """
    try:
        import simdjson
    except ImportError:  # optional accelerator
        return None
    numeric = {"indptr": ("i", np.int64), "indices": ("i", np.int64), "data": ("d", np.float64)}
    arrays = 0

    def plain(value):
        nonlocal arrays
        if isinstance(value, simdjson.Object):
            raise TypeError("nested object")
        if isinstance(value, simdjson.Array):
            arrays += 1
            return value.as_list()
        return value

    try:
        doc = simdjson.Parser().parse(body)
        if not isinstance(doc, simdjson.Object) or not isinstance(doc.get("matrix"), simdjson.Object):
            return None
        out = {key: plain(doc[key]) for key in doc.keys() if key != "matrix"}
        matrix = {}
        for key in doc["matrix"].keys():
            item = doc["matrix"][key]
            if key in numeric and isinstance(item, simdjson.Array):
                arrays += 1
                kind, dtype = numeric[key]
                matrix[key] = np.frombuffer(item.as_buffer(of_type=kind), dtype=dtype)
            else:
                matrix[key] = plain(item)
        out["matrix"] = matrix
        return out if body.count(b"[") == arrays else None
    except (ValueError, TypeError, RuntimeError, KeyError, IndexError):
        return None


def _parse_json(body: bytes, options: Mapping[str, Any], max_cells: int, sel: dict) -> Parsed:
    obj = _fast_json(body)
    try:
        obj = orjson.loads(body) if obj is None else obj
    except orjson.JSONDecodeError as e:
        raise InputError(
            f"The request body is not valid JSON: {e}.",
            fix="Send a JSON object with genes and matrix.{indptr, indices, data, shape}, or set Content-Type to a binary format.",
            field="body",
        ) from e
    if not isinstance(obj, dict):
        raise InputError("The JSON body must be an object.", fix='Send {"genes": [...], "matrix": {...}, ...}.', field="body")
    _reject_unknown(obj, {"genes", "matrix", "model", "reference_atlas", "atlas", "cell_ids", *options}, "field")
    for name in ("genes", "matrix"):
        if name not in obj:
            raise InputError(f"The field '{name}' is missing.", fix="Send genes (list of str) and matrix (CSR arrays + shape).", field=name)
    matrix = obj["matrix"]
    if not isinstance(matrix, dict):
        raise InputError("'matrix' must be an object.", fix="Send matrix as {indptr, indices, data, shape}.", field="matrix")
    _reject_unknown(matrix, {"indptr", "indices", "data", "shape"}, "matrix field", prefix="matrix.")
    for k in ("indptr", "indices", "data", "shape"):
        if k not in matrix:
            raise InputError(f"'matrix.{k}' is missing.", fix="Send all of matrix.indptr, indices, data and shape.", field=f"matrix.{k}")
    _check_cells(_declared_cells(matrix["shape"]), max_cells)
    X = validate_csr_arrays(matrix["indptr"], matrix["indices"], matrix["data"], matrix["shape"])
    genes = _str_list(obj["genes"], "genes")
    parsed = Parsed(X=X, genes=genes, n_cells=X.shape[0])
    parsed.model = _opt_str(obj, "model")
    parsed.atlas = _opt_str(obj, "reference_atlas") or _opt_str(obj, "atlas")
    if obj.get("cell_ids") is not None:
        parsed.cell_ids = _str_list(obj["cell_ids"], "cell_ids")
    parsed.options = {k: _bool(obj[k], k) for k in options if k in obj}
    return parsed


def _parse_npz(body: bytes, max_cells: int) -> Parsed:
    fix = "Write it with numpy.savez(f, indptr=..., indices=..., data=..., shape=..., genes=np.array(genes, dtype=str))."
    try:
        npz = np.load(io.BytesIO(body), allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise InputError(f"The body is not a readable .npz archive: {e}.", fix=fix, field="body") from e
    if not hasattr(npz, "files"):
        raise InputError("The body is a single .npy array, not an .npz archive.", fix=fix, field="body")
    keys = set(npz.files)
    with npz:
        _reject_unknown(dict.fromkeys(keys), {*NPZ_ARRAYS, "cell_ids"}, "npz array")
        for k in NPZ_ARRAYS:
            if k not in keys:
                raise InputError(f"The npz archive has no array '{k}'.", fix=fix, field=k)
        try:
            arrays = {k: npz[k] for k in keys}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise InputError(f"An array in the npz archive cannot be read: {e}.", fix=fix, field="body") from e
    _check_cells(_declared_cells(arrays["shape"]), max_cells)
    X = validate_csr_arrays(arrays["indptr"], arrays["indices"], arrays["data"], arrays["shape"])
    parsed = Parsed(X=X, genes=_str_array(arrays["genes"], "genes"), n_cells=X.shape[0])
    if "cell_ids" in arrays:
        parsed.cell_ids = _str_array(arrays["cell_ids"], "cell_ids")
    return parsed


def _parse_h5ad(body: bytes, max_cells: int, params: Mapping[str, str]) -> Parsed:
    from cellatlas import io as cio

    fd, path = tempfile.mkstemp(suffix=".h5ad")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
        try:
            adata = cio.read(path, fmt="h5ad")
        except Exception as e:  # InputError from io, or h5py/anndata errors on a damaged file
            reason = e.message if isinstance(e, InputError) else f"{type(e).__name__}: {e}"
            raise InputError(
                f"The body is not a readable .h5ad file ({reason.replace(os.path.basename(path), 'upload')}).",
                fix="Upload the file written by AnnData.write_h5ad (or use the npz/JSON formats).",
                field="body",
            ) from e
    finally:
        os.unlink(path)
    _check_cells(int(adata.n_obs), max_cells)
    use_raw = _bool(params["use_raw"], "use_raw") if "use_raw" in params else None
    return Parsed(X=adata, genes=None, n_cells=int(adata.n_obs), layer=params.get("layer"), use_raw=use_raw)


# ------------------------------------------------------------------- helpers
def _reject_unknown(given: Mapping, allowed: set[str], what: str, prefix: str = "") -> None:
    unknown = sorted(str(k) for k in given if k not in allowed)
    if unknown:
        raise InputError(
            f"Unknown {what} '{prefix}{unknown[0]}'" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "") + ".",
            fix=f"Accepted: {', '.join(sorted(allowed))}.",
            field=prefix + unknown[0],
        )


def _check_cells(n_cells: int, max_cells: int) -> None:
    if n_cells > max_cells:
        raise PayloadTooLargeError(
            f"The request holds {n_cells:,} cells; this server accepts at most {max_cells:,} per request.",
            fix=f"Send the cells in chunks of at most {max_cells:,} (cellatlas.client.Client.annotate_large does this, order preserved).",
            field="matrix.shape",
            details={"max_cells_per_request": max_cells, "n_cells": n_cells},
        )


def _declared_cells(shape: Any) -> int:
    """``shape[0]`` if it reads as an integer (full checks are in validate_csr_arrays), else 0."""
    try:
        return int(shape[0])
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0


def _str_list(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
        raise InputError(f"'{name}' must be a list of strings.", fix=f"Send {name} as a JSON list of strings, one per {'column' if name == 'genes' else 'row'}.", field=name)
    return value


def _str_array(arr: np.ndarray, name: str) -> list[str]:
    if arr.ndim != 1 or arr.dtype.kind not in "US":
        raise InputError(f"npz array '{name}' must be a 1-d string array.", fix=f"Store {name} with np.array(values, dtype=str).", field=name)
    return [s.decode() if isinstance(s, bytes) else str(s) for s in arr.tolist()]


def _opt_str(obj: Mapping, name: str) -> str | None:
    v = obj.get(name)
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise InputError(f"'{name}' must be a non-empty string.", fix=f"Send {name} as a string (GET /v1/models, /v1/atlases list the choices).", field=name)
    return v


def _bool(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in _TRUE + _FALSE:
        return v.lower() in _TRUE
    raise InputError(f"'{name}' must be true or false; got {v!r:.40}.", fix=f"Send {name}=true or {name}=false.", field=name)
