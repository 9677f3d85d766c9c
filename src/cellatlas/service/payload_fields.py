"""The decoded query and the strict field checks shared by the JSON, npz and h5ad decoders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from cellatlas.errors import InputError
from cellatlas.service.limits import RequestLimits

MAX_NAME_CHARS = 200
"""Longest model or atlas name accepted (names, never paths, over HTTP)."""
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_SHAPE_FIX = "Send shape as two non-negative integers [n_cells, n_genes], e.g. list(X.shape)."


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


def reject_unknown(given: Iterable, allowed: set[str], what: str, prefix: str = "") -> None:
    """422 naming the first name in ``given`` that is not in ``allowed``."""
    unknown = sorted(str(k) for k in given if k not in allowed)
    if unknown:
        shown = unknown[0] if len(unknown[0]) <= 100 else unknown[0][:100] + "..."
        raise InputError(
            f"Unknown {what} '{prefix}{shown}'" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "") + ".",
            fix=f"Accepted: {', '.join(sorted(allowed))}.",
            field=prefix + shown,
        )


def check_shape(shape: Any, limits: RequestLimits, field: str = "matrix.shape") -> tuple[int, int]:
    """``(n_cells, n_genes)`` from a declared shape: exactly two non-negative integers within the limits.

    Booleans, floats, strings and objects are refused (422); too many cells or genes is 413,
    more cells than the key can pay for is 402, all before any array is read.
    """
    if isinstance(shape, np.ndarray):
        if shape.ndim != 1 or shape.dtype.kind not in "iu":
            raise InputError(f"'{field}' must be a 1-D integer array of two values, got dtype {shape.dtype} and {shape.ndim} dimension(s).", fix=_SHAPE_FIX, field=field)
        shape = shape.tolist()
    if not isinstance(shape, (list, tuple)) or len(shape) != 2 or not all(type(d) is int for d in shape):
        shown = repr(shape)
        raise InputError(f"'{field}' must be two integers [n_cells, n_genes], got {shown[:80]}{'...' if len(shown) > 80 else ''}.", fix=_SHAPE_FIX, field=field)
    n_cells, n_genes = shape
    if n_cells < 1 or n_genes < 1:
        raise InputError(f"'{field}' must be at least [1, 1], got [{n_cells}, {n_genes}].", fix=_SHAPE_FIX, field=field)
    limits.check_genes(n_genes, field)
    limits.check_cells(n_cells, field)
    return n_cells, n_genes


def check_strings(values: Sequence[Any], field: str) -> None:
    """422 unless ``values`` is a list of strings that encode as UTF-8 (no lone surrogates)."""
    if not isinstance(values, list) or set(map(type, values)) - {str}:
        raise InputError(
            f"'{field}' must be a list of strings.",
            fix=f"Send {field} as a list of strings, one per {'column' if field == 'genes' else 'row'}.",
            field=field,
        )
    try:
        "".join(values).encode("utf-8")
    except UnicodeEncodeError:
        at = next(i for i, v in enumerate(values) if not _utf8_ok(v))
        raise InputError(f"'{field}[{at}]' is not valid Unicode text (a lone surrogate).", fix="Send names as UTF-8 text.", field=field) from None


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def str_array(arr: np.ndarray, field: str) -> list[str]:
    """A 1-D numpy string array (``U`` or UTF-8 ``S``) as a list of ``str`` (422 otherwise)."""
    if arr.ndim != 1 or arr.dtype.kind not in "US":
        raise InputError(f"npz array '{field}' must be a 1-D string array.", fix=f"Store {field} with np.array(values, dtype=str).", field=field)
    values = arr.tolist()
    if arr.dtype.kind == "S":
        try:
            values = [v.decode("utf-8") for v in values]
        except UnicodeDecodeError as e:
            raise InputError(f"npz array '{field}' holds bytes that are not UTF-8 text ({e.reason} at byte {e.start}).",
                             fix=f"Store {field} with np.array(values, dtype=str) (unicode).", field=field) from None
    check_strings(values, field)
    return values


def opt_name(value: Any, field: str) -> str | None:
    """An optional model/atlas name: ``None`` or a non-empty string of at most 200 characters."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
        raise InputError(
            f"'{field}' must be a non-empty name of at most {MAX_NAME_CHARS} characters.",
            fix=f"Send {field} as a name (GET /v1/models and /v1/atlases list the choices).",
            field=field,
        )
    return value


def as_bool(v: Any, field: str) -> bool:
    """A boolean option: JSON ``true``/``false``, or ``true/false/1/0/yes/no/on/off`` as text."""
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in _TRUE + _FALSE:
        return v.lower() in _TRUE
    shown = repr(v) if isinstance(v, (str, int, float)) or v is None else type(v).__name__
    raise InputError(f"'{field}' must be true or false; got {shown[:40]}.", fix=f"Send {field}=true or {field}=false.", field=field)
