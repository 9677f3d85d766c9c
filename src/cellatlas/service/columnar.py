"""Columnar (npz) encoding of an :class:`~cellatlas.result.AnnotationResult`.

The binary response of ``POST /v1/singlecell/annotate`` (``Accept: application/x-npz``
or ``?format=npz``): one array per per-cell field instead of one JSON object per
cell, so neither side loops over cells in Python to build or read dicts. JSON
metadata (gene report, provenance, usage) travels as a uint8 array ``meta_json``.
Strings are fixed-width unicode arrays, so the archive loads with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import orjson

from cellatlas.result import Alternates, AnnotationResult

MARKER_SEP = ","
"""Separator of the marker genes of one cell (gene symbols never contain commas)."""

_STR = ("cell_ids", "label", "ontology_id", "level", "knn_label", "marker_label")
_F32 = ("confidence", "knn_prob", "marker_score", "distance")
_BOOL = ("agreement", "novel")


def encode_result(res: AnnotationResult, meta: dict[str, Any], *, with_embedding: bool, dumps) -> bytes:
    """npz bytes holding every per-cell field of ``res`` plus ``meta`` as ``meta_json``.

    Parameters
    ----------
    res
        The result to encode.
    meta
        JSON-ready metadata (gene report, provenance, usage, ...).
    with_embedding
        Include ``embedding`` and ``layout``.
    dumps
        JSON encoder for ``meta`` (bytes).
    """
    alts = res.alternates if isinstance(res.alternates, Alternates) else Alternates.from_lists(list(res.alternates))
    arrays: dict[str, np.ndarray] = {name: np.asarray(getattr(res, name)).astype(str) for name in _STR}
    arrays.update({name: np.asarray(getattr(res, name), dtype=np.float32) for name in _F32})
    arrays.update({name: np.asarray(getattr(res, name), dtype=bool) for name in _BOOL})
    arrays["alternate_label"] = np.asarray(alts.labels).astype(str)
    arrays["alternate_score"] = np.asarray(alts.scores, dtype=np.float32)
    arrays["markers"] = np.asarray([MARKER_SEP.join(m) for m in res.markers], dtype=str)
    if with_embedding:
        for name in ("embedding", "layout"):
            value = getattr(res, name)
            if value is not None:
                arrays[name] = np.asarray(value, dtype=np.float32)
    arrays["meta_json"] = np.frombuffer(dumps(meta), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_result(arrays: dict[str, np.ndarray], cell_ids=None) -> tuple[AnnotationResult, dict[str, Any]]:
    """Rebuild ``(AnnotationResult, meta)`` from the arrays of :func:`encode_result`.

    ``cell_ids`` replaces the encoded ids (the client keeps the caller's own ids).
    """
    meta = orjson.loads(arrays["meta_json"].tobytes())
    alternates = Alternates(arrays["alternate_label"].astype(object), arrays["alternate_score"])
    markers = [m.split(MARKER_SEP) if m else [] for m in arrays["markers"].tolist()]
    obj = {name: arrays[name].astype(object) for name in _STR}
    res = AnnotationResult(
        cell_ids=np.asarray(cell_ids, dtype=object) if cell_ids is not None else obj["cell_ids"],
        label=obj["label"],
        ontology_id=obj["ontology_id"],
        confidence=arrays["confidence"],
        level=obj["level"],
        alternates=alternates,
        markers=markers,
        knn_label=obj["knn_label"],
        knn_prob=arrays["knn_prob"],
        marker_label=obj["marker_label"],
        marker_score=arrays["marker_score"],
        agreement=arrays["agreement"],
        distance=arrays["distance"],
        novel=arrays["novel"],
        embedding=arrays.get("embedding"),
        layout=arrays.get("layout"),
        gene_report=meta.get("gene_report") or {},
        provenance=meta.get("provenance") or {},
    )
    return res, meta
