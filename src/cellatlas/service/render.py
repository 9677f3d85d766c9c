"""Response bodies of the single-cell routes (JSON via orjson, TSV, npz)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

from cellatlas.atlas import DEFAULT_ATLAS
from cellatlas.result import AnnotationResult
from cellatlas.service.columnar import encode_result
from cellatlas.service.ledger import Charge
from cellatlas.service.payload import Parsed

_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def dumps(obj: Any) -> bytes:
    """orjson with numpy arrays/scalars, sets and paths."""
    return orjson.dumps(obj, option=_OPTS, default=_default)


def _default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _f32(a) -> np.ndarray | None:
    return None if a is None else np.ascontiguousarray(a, dtype=np.float32)


def warnings(fallback: dict[str, Any] | None) -> list[dict[str, str]]:
    """The response's ``warnings``: ``{"code", "message"}`` entries (a model fallback, for now)."""
    return [{"code": "model_fallback", "message": fallback["message"]}] if fallback else []


def annotate_body(res: AnnotationResult, parsed: Parsed, charge: Charge, cells_per_credit: int, fmt: str = "json") -> bytes:
    """The annotate response: the seeds' ``calls`` plus band, ontology id, evidence,
    gene report, provenance and usage (embedding/layout when asked for).

    ``fmt="npz"`` gives the same content column by column (see :mod:`~cellatlas.service.columnar`).
    """
    prov = res.provenance or {}
    meta: dict[str, Any] = {
        "n_cells": len(res),
        "model": prov.get("model", parsed.model),
        "reference_atlas": prov.get("atlas", parsed.atlas),
        "warnings": warnings(prov.get("fallback")),
        "gene_report": res.gene_report,
        "provenance": prov,
        "usage": charge.usage_dict(cells_per_credit),
    }
    with_embedding = bool(parsed.options.get("return_embedding"))
    if fmt == "npz":
        return encode_result(res, meta, with_embedding=with_embedding, dumps=dumps)
    out: dict[str, Any] = {"calls": res.to_calls(evidence=True), **meta}
    if parsed.cell_ids is not None or parsed.body_format == "h5ad":
        out["cell_ids"] = [str(c) for c in res.cell_ids]
    if with_embedding:
        out["embedding"] = _f32(res.embedding)
        out["layout"] = _f32(res.layout)
    return dumps(out)


def embed_body(output: tuple, parsed: Parsed, charge: Charge, cells_per_credit: int, fmt: str) -> bytes:
    """The embed response as JSON or npz (``embedding``, ``layout``, ``meta_json``)."""
    emb, layout, gene_report, model = output
    emb = _f32(emb)
    fallback = model.get("fallback")
    meta = {
        "n_cells": int(emb.shape[0]),
        "dim": int(emb.shape[1]) if emb.ndim == 2 else 0,
        "model": model["model_used"],
        "model_requested": model["model_requested"],
        "model_used": model["model_used"],
        "warnings": warnings(fallback),
        "reference_atlas": parsed.atlas or DEFAULT_ATLAS,
        "gene_report": gene_report,
        "usage": charge.usage_dict(cells_per_credit),
    }
    if fallback:
        meta["fallback"] = fallback
    if parsed.cell_ids is not None:
        meta["cell_ids"] = list(parsed.cell_ids)
    with_layout = bool(parsed.options.get("layout", True))
    if fmt == "npz":
        arrays = {"embedding": emb, "meta_json": np.frombuffer(dumps(meta), dtype=np.uint8)}
        if with_layout:
            arrays["layout"] = _f32(layout)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()
    out = {**meta, "embedding": emb}
    if with_layout:
        out["layout"] = _f32(layout)
    return dumps(out)


def atlas_markers(table: pd.DataFrame, atlas_name: str, fmt: str) -> bytes:
    """Marker genes per label of an atlas, with sources (JSON or TSV)."""
    if fmt == "tsv":
        return table.to_csv(sep="\t", index=False).encode()
    return dumps({"reference_atlas": atlas_name, "n_labels": int(table["label"].nunique()), "labels": _group(table)})


def query_markers(res: AnnotationResult, table: pd.DataFrame, parsed: Parsed, charge: Charge, cells_per_credit: int, fmt: str) -> bytes:
    """Per cell, the markers behind its call; per called label, its signature (JSON or TSV)."""
    conf = np.asarray(res.confidence, dtype=float)
    band = res.band
    if fmt == "tsv":
        df = pd.DataFrame(
            {
                "cell_id": np.asarray(res.cell_ids).astype(str),
                "label": res.label,
                "ontology_id": res.ontology_id,
                "confidence": np.round(conf, 4),
                "band": band,
                "markers": [",".join(m) for m in res.markers],
            }
        )
        return df.to_csv(sep="\t", index=False).encode()
    called = set(map(str, res.label))
    cells = [
        {"cell_id": str(cid), "label": str(lab), "confidence": round(float(c), 4), "band": str(b), "markers": list(m)}
        for cid, lab, c, b, m in zip(res.cell_ids, res.label, conf, band, res.markers)
    ]
    prov = res.provenance or {}
    return dumps(
        {
            "cells": cells,
            "labels": _group(table[table["label"].astype(str).isin(called)]),
            "reference_atlas": prov.get("atlas", parsed.atlas),
            "warnings": warnings(prov.get("fallback")),
            "provenance": prov,
            "usage": charge.usage_dict(cells_per_credit),
        }
    )


def _group(table: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for (label, oid), g in table.groupby(["label", "ontology_id"], sort=True, dropna=False):
        out.append(
            {
                "label": str(label),
                "ontology_id": "" if oid is None or oid != oid else str(oid),
                "markers": [{"gene": str(r.gene), "sign": str(r.sign), "source": str(r.source)} for r in g.itertuples(index=False)],
            }
        )
    return out
