"""Columnar (npz) encoding of an :class:`~cellatlas.result.AnnotationResult`.

The binary response of ``POST /v1/singlecell/annotate`` (``Accept: application/x-npz``
or ``?format=npz``): one array per per-cell field instead of one JSON object per
cell, so neither side loops over cells in Python to build or read dicts. JSON
metadata (gene report, provenance, usage) travels as a uint8 array ``meta_json``.
Text columns are categorical (integer codes into a small table of strings, see
:func:`encode_result`), and every string array is fixed-width unicode, so the archive
is small and loads with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import orjson
import pandas as pd

from cellatlas.result import Alternates, AnnotationResult

FORMAT = 4
"""Version of the layout below (``meta_json["columnar"]``; 3 added ``parent_label`` and ``parent_confidence``,
4 the per-cell QC facts and ``reason``)."""

_STR = ("cell_ids", "label", "ontology_id", "level", "knn_label", "marker_label", "parent_label", "reason")
_F32 = ("confidence", "knn_prob", "marker_score", "distance", "parent_confidence", "total_counts", "pct_mito", "doublet_score")
_BOOL = ("agreement", "novel")


def _categorical(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, categories)`` with ``categories[codes] == values`` (first-seen order)."""
    codes, cats = pd.factorize(np.asarray(values, dtype=object).ravel(), sort=False, use_na_sentinel=False)
    dtype = np.int16 if len(cats) < 2**15 else np.int32
    return codes.astype(dtype).reshape(np.shape(values)), np.asarray(cats, dtype=str)


def encode_result(res: AnnotationResult, meta: dict[str, Any], *, with_embedding: bool, dumps) -> bytes:
    """npz bytes holding every per-cell field of ``res`` plus ``meta`` as ``meta_json``.

    Strings are sent once: each text column ``name`` is ``name_codes`` (int16/int32 per
    cell) into ``name_categories`` (cell ids are plain strings); the alternates are
    ``alternate_label_codes`` ``[n, k]`` into ``alternate_label_categories`` plus
    ``alternate_score``; the markers of cell ``i`` are
    ``marker_genes[marker_codes[marker_offsets[i]:marker_offsets[i + 1]]]``.

    Parameters
    ----------
    res
        The result to encode.
    meta
        JSON-ready metadata (gene report, provenance, usage, ...); ``columnar`` is added.
    with_embedding
        Include ``embedding`` and ``layout``.
    dumps
        JSON encoder for ``meta`` (bytes).
    """
    alts = res.alternates if isinstance(res.alternates, Alternates) else Alternates.from_lists(list(res.alternates))
    arrays: dict[str, np.ndarray] = {"cell_ids": np.asarray(res.cell_ids).astype(str)}
    for name in _STR[1:]:
        arrays[name + "_codes"], arrays[name + "_categories"] = _categorical(getattr(res, name))
    arrays.update({name: np.asarray(getattr(res, name), dtype=np.float32) for name in _F32})
    arrays.update({name: np.asarray(getattr(res, name), dtype=bool) for name in _BOOL})
    arrays["n_genes"] = np.asarray(res.n_genes, dtype=np.int32)
    arrays["alternate_label_codes"], arrays["alternate_label_categories"] = _categorical(alts.labels)
    arrays["alternate_score"] = np.asarray(alts.scores, dtype=np.float32)
    lengths = np.fromiter((len(m) for m in res.markers), dtype=np.int64, count=len(res.markers))
    arrays["marker_offsets"] = np.concatenate(([0], np.cumsum(lengths)))
    flat = [g for m in res.markers for g in m]
    arrays["marker_codes"], arrays["marker_genes"] = _categorical(np.asarray(flat, dtype=object))
    if with_embedding:
        for name in ("embedding", "layout"):
            value = getattr(res, name)
            if value is not None:
                arrays[name] = np.asarray(value, dtype=np.float32)
    arrays["meta_json"] = np.frombuffer(dumps({**meta, "columnar": FORMAT}), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_result(arrays: dict[str, np.ndarray], cell_ids=None) -> tuple[AnnotationResult, dict[str, Any]]:
    """Rebuild ``(AnnotationResult, meta)`` from the arrays of :func:`encode_result`.

    ``cell_ids`` replaces the encoded ids (the client keeps the caller's own ids).
    """
    meta = orjson.loads(arrays["meta_json"].tobytes())
    meta.pop("columnar", None)

    def text(name: str) -> np.ndarray:
        return arrays[name + "_categories"].astype(object)[arrays[name + "_codes"]]

    alternates = Alternates(text("alternate_label"), arrays["alternate_score"])
    genes = arrays["marker_genes"].astype(object)[arrays["marker_codes"]].tolist()
    bounds = arrays["marker_offsets"].tolist()
    markers = [genes[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    obj = {name: text(name) for name in _STR[1:] if name + "_codes" in arrays}  # older formats lack some
    obj["cell_ids"] = arrays["cell_ids"].astype(object)
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
        parent_label=obj.get("parent_label"),
        parent_confidence=arrays.get("parent_confidence"),
        total_counts=arrays.get("total_counts"),
        n_genes=arrays.get("n_genes"),
        pct_mito=arrays.get("pct_mito"),
        doublet_score=arrays.get("doublet_score"),
        reason=obj.get("reason"),
        embedding=arrays.get("embedding"),
        layout=arrays.get("layout"),
        gene_report=meta.get("gene_report") or {},
        provenance=meta.get("provenance") or {},
    )
    return res, meta
