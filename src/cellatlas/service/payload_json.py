"""The articles' JSON body, parsed strictly with simdjson and bounded before arrays are built.

The document is walked on simdjson's tape: every field's type is checked where it is
(``true`` is not a number, ``shape`` is two non-negative integers), array lengths are
checked against the declared shape and the server's limits before an array is
materialised, and the CSR arrays go straight into numpy (no Python object per number).
Duplicate keys are refused (nothing the user sent is silently overwritten). One parser is
kept and reused for bodies up to ``Settings.json_parser_keep_bytes``: allocating its buffers
afresh for every request costs more than parsing.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import numpy as np
import simdjson

from cellatlas.config import get_settings
from cellatlas.errors import InputError
from cellatlas.io import validate_csr_arrays
from cellatlas.service.limits import RequestLimits
from cellatlas.service.payload_fields import (
    Parsed,
    as_bool,
    check_shape,
    check_strings,
    opt_name,
    reject_unknown,
)

_CSR_FIX = "Send matrix as {indptr, indices, data, shape} built from a scipy CSR matrix (X.indptr.tolist(), ...)."
_INT_LIMIT = 2**53
"""Whole-number floats are accepted as indices up to here (exact in float64)."""


_kept: simdjson.Parser | None = None
_kept_lock = threading.Lock()


@contextmanager
def _parser(size: int, keep_bytes: int) -> Iterator[simdjson.Parser]:
    """The kept parser when the body fits and no other request holds it, else a fresh one."""
    global _kept
    if size > keep_bytes or not _kept_lock.acquire(blocking=False):
        yield simdjson.Parser()
        return
    try:
        if _kept is None:
            _kept = simdjson.Parser()
        yield _kept
    except BaseException:
        _kept = None  # the traceback may still hold this document's objects, which block a reuse
        raise
    finally:
        _kept_lock.release()


def _fail(field: str, message: str, fix: str = _CSR_FIX) -> InputError:
    return InputError(message, fix=fix, field=field)


def _object(value: Any, field: str, fix: str) -> simdjson.Object:
    if not isinstance(value, simdjson.Object):
        raise _fail(field, f"'{field}' must be a JSON object.", fix)
    keys = list(value.keys())
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise _fail(f"{field}.{dup}" if field != "body" else dup, f"The key '{dup}' occurs more than once.", "Send each field once.")
    return value


def _array(obj: simdjson.Object, key: str, field: str, *, max_len: int | None = None, exact: int | None = None) -> simdjson.Array:
    value = obj[key]
    if not isinstance(value, simdjson.Array):
        raise _fail(field, f"'{field}' must be a JSON array, got {_kind(value)}.")
    n = len(value)
    if exact is not None and n != exact:
        raise _fail(field, f"'{field}' has length {n:,}, expected {exact:,} (n_cells + 1).")
    if max_len is not None and n > max_len:
        raise _fail(field, f"'{field}' has {n:,} entries, more than the declared shape allows ({max_len:,}).")
    return value


def _kind(value: Any) -> str:
    if isinstance(value, simdjson.Object):
        return "an object"
    if isinstance(value, simdjson.Array):
        return "an array"
    if value is None:
        return "null"
    return type(value).__name__


def _numbers(arr: simdjson.Array, field: str, integer: bool) -> np.ndarray:
    """A flat JSON array of numbers as int64 (``integer``) or float64, refusing any other type."""
    try:
        if integer:
            try:
                return np.frombuffer(arr.as_buffer(of_type="i"), dtype=np.int64)
            except (TypeError, ValueError):
                out = np.frombuffer(arr.as_buffer(of_type="d"), dtype=np.float64)
                if out.size and (not np.array_equal(out, np.floor(out)) or np.abs(out).max() > _INT_LIMIT):
                    raise _fail(field, f"'{field}' must hold whole numbers (integers) below 2^53.") from None
                return out.astype(np.int64)
        return np.frombuffer(arr.as_buffer(of_type="d"), dtype=np.float64)
    except TypeError:
        raise _fail(field, f"'{field}' must hold only numbers (no strings, booleans, null or objects).") from None


def _nested(arr: simdjson.Array) -> bool:
    return any(isinstance(v, (simdjson.Array, simdjson.Object)) for v in arr)


def _strings(arr: simdjson.Array, field: str) -> list[str]:
    values = arr.as_list()
    check_strings(values, field)
    return values


def parse_json(body: bytes, options: Mapping[str, Any], limits: RequestLimits, *, keep_bytes: int | None = None) -> Parsed:
    """Parse the JSON body into a :class:`Parsed` query (CSR matrix, genes, options).

    ``keep_bytes`` (default ``Settings.json_parser_keep_bytes``): largest body parsed by the
    kept, reused parser.

    Raises
    ------
    InputError
        Malformed JSON, wrong types, unknown or duplicated fields (422, field named).
    PayloadTooLargeError, PaymentRequiredError
        The declared shape is over the limits (413) or over the key's balance (402).
    """
    keep = get_settings().json_parser_keep_bytes if keep_bytes is None else keep_bytes
    with _parser(len(body), keep) as parser:
        return _parse(parser, body, options, limits)


def _parse(parser: simdjson.Parser, body: bytes, options: Mapping[str, Any], limits: RequestLimits) -> Parsed:
    try:
        doc = parser.parse(body)
    except Exception as e:  # simdjson raises ValueError, RuntimeError, UnicodeDecodeError, ...
        raise InputError(
            f"The request body is not valid JSON ({e}).",
            fix="Send a UTF-8 JSON object with genes and matrix.{indptr, indices, data, shape}, or set Content-Type to a binary format.",
            field="body",
        ) from None
    root = _object(doc, "body", 'Send {"genes": [...], "matrix": {...}, ...}.')
    reject_unknown(root.keys(), {"genes", "matrix", "model", "reference_atlas", "atlas", "cell_ids", *options}, "field")
    for name in ("genes", "matrix"):
        if name not in root:
            raise InputError(f"The field '{name}' is missing.", fix="Send genes (list of str) and matrix (CSR arrays + shape).", field=name)
    matrix = _object(root["matrix"], "matrix", "Send matrix as {indptr, indices, data, shape}.")
    reject_unknown(matrix.keys(), {"indptr", "indices", "data", "shape"}, "matrix field", prefix="matrix.")
    for k in ("indptr", "indices", "data", "shape"):
        if k not in matrix:
            raise InputError(f"'matrix.{k}' is missing.", fix="Send all of matrix.indptr, indices, data and shape.", field=f"matrix.{k}")

    shape = matrix["shape"]
    n_cells, n_genes = check_shape(shape.as_list() if isinstance(shape, simdjson.Array) else shape, limits)
    genes_arr = _array(root, "genes", "genes", max_len=limits.max_genes)
    ip_arr = _array(matrix, "indptr", "matrix.indptr", exact=n_cells + 1)
    ix_arr = _array(matrix, "indices", "matrix.indices", max_len=n_cells * n_genes)
    dt_arr = _array(matrix, "data", "matrix.data", max_len=n_cells * n_genes)
    ids_arr = None
    if root.get("cell_ids") is not None:
        ids_arr = _array(root, "cell_ids", "cell_ids", max_len=limits.max_cells)

    genes = _strings(genes_arr, "genes")
    cell_ids = _strings(ids_arr, "cell_ids") if ids_arr is not None else None
    names = {k: opt_name(root.get(k), k) for k in ("model", "reference_atlas", "atlas")}
    ip = _numbers(ip_arr, "matrix.indptr", integer=True)
    ix = _numbers(ix_arr, "matrix.indices", integer=True)
    dt = _numbers(dt_arr, "matrix.data", integer=False)
    # as_buffer flattens nested arrays; a '[' count that differs from the arrays seen (plus
    # any '[' inside strings) means one is nested somewhere: find it (rare, so slow is fine).
    seen = 5 + (ids_arr is not None)
    in_strings = sum(s.count("[") for s in genes) + sum(s.count("[") for s in cell_ids or ()) + sum(
        (v or "").count("[") for v in names.values()
    )
    if body.count(b"[") != seen + in_strings:
        for field, arr in (("matrix.indptr", ip_arr), ("matrix.indices", ix_arr), ("matrix.data", dt_arr)):
            if _nested(arr):
                raise _fail(field, f"'{field}' must be a flat list of numbers (it holds a nested array or object).")
    X = validate_csr_arrays(ip, ix, dt, (n_cells, n_genes))
    parsed = Parsed(X=X, genes=genes, n_cells=n_cells, cell_ids=cell_ids)
    parsed.model = names["model"]
    parsed.atlas = names["reference_atlas"] or names["atlas"]
    parsed.options = {k: as_bool(root[k], k) for k in options if k in root}
    return parsed
