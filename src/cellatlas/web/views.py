"""JSON views of a finished workspace run: plots, label table, review queue, cell detail.

A *run* is the dict the job stores in the session (see :mod:`cellatlas.web.jobs`):
``result`` (:class:`~cellatlas.result.AnnotationResult`), ``qc``
(:class:`~cellatlas.web.analysis.QCFlags`), ``expr``/``expr_genes`` (log1p CP10k of
marker genes), ``marker_sets``, ``ontology``, ``reference``, ``options``, ``timings``.
User relabels (cell index -> label) are applied on top; the result itself is never
changed.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from cellatlas import tl
from cellatlas.errors import InputError
from cellatlas.result import CONFIDENT, REVIEW
from cellatlas.web.analysis import dotplot_stats

BANDS = ("confident", "review", "low")
MAX_LABEL_CHARS = 120
MAX_DOTPLOT_LABELS = 16
HIST_BINS = 20


def current_labels(run: dict[str, Any], relabels: dict[int, str]) -> np.ndarray:
    """The engine's calls with the user's relabels applied."""
    labels = np.asarray(run["result"].label, dtype=object).copy()
    for i, lab in relabels.items():
        labels[i] = lab
    return labels


def _label_order(labels: np.ndarray) -> list[str]:
    """Labels by number of cells, ``Unassigned`` last (as in :mod:`cellatlas.pl`)."""
    return tl.call_order(pd.Series(labels))


def results_payload(run: dict[str, Any], relabels: dict[int, str]) -> dict[str, Any]:
    """Everything the results page draws, columnar so 100k cells stay compact."""
    res = run["result"]
    labels = current_labels(run, relabels)
    order = _label_order(labels)
    code = {lab: i for i, lab in enumerate(order)}
    conf = np.asarray(res.confidence, dtype=float)
    band = np.asarray(res.band, dtype=object)
    band_code = np.select([band == "confident", band == "review"], [0, 1], 2)
    relabelled = np.zeros(len(res), dtype=np.int8)
    relabelled[list(relabels)] = 1
    layout = np.asarray(res.layout if res.layout is not None else np.zeros((len(res), 2)), dtype=float)
    qc = run["qc"]
    n = len(res)
    return {
        "n_cells": n,
        "labels": order,
        "points": {
            "x": np.round(layout[:, 0], 3),
            "y": np.round(layout[:, 1], 3),
            "label": np.array([code[str(v)] for v in labels], dtype=np.int32),
            "confidence": np.round(conf, 3),
            "band": band_code.astype(np.int8),
            "qc_pass": qc.qc_pass.astype(np.int8),
            "relabelled": relabelled,
        },
        "label_table": label_table(run, labels, order),
        "histogram": confidence_histogram(conf),
        "dotplot": marker_dotplot(run, labels, order),
        "comparisons": comparisons(run, labels),
        "summary": {
            "n_cells": n,
            "n_labels": len(order),
            "bands": {b: int((band == b).sum()) for b in BANDS},
            "n_relabelled": len(relabels),
            "n_novel": int(np.asarray(res.novel, dtype=bool).sum()),
            "unassigned": (res.provenance or {}).get("unassigned") or {"n_cells": 0, "reasons": {}},
            "mean_confidence": round(float(conf.mean()), 4) if n else 0.0,
            "qc": qc.summary,
            "options": run["options"],
            "timings": run.get("timings", {}),
        },
        "reference": run.get("reference"),
        "atlas_labels": sorted(run.get("ontology", {})),
        "gene_report": res.gene_report,
        "provenance": res.provenance,
    }


def label_table(run: dict[str, Any], labels: np.ndarray, order: Sequence[str]) -> list[dict[str, Any]]:
    """One row per current label: cell count, per-band counts, mean confidence, relabelled count."""
    res = run["result"]
    conf = np.asarray(res.confidence, dtype=float)
    band = np.asarray(res.band, dtype=object)
    original = np.asarray(res.label, dtype=object)
    onto = run.get("ontology", {})
    rows = []
    lab_str = labels.astype(str)
    for lab in order:
        m = lab_str == lab
        rows.append(
            {
                "label": lab,
                "ontology_id": onto.get(lab, ""),
                "n": int(m.sum()),
                **{b: int((m & (band == b)).sum()) for b in BANDS},
                "mean_confidence": round(float(conf[m].mean()), 4),
                "relabelled": int((m & (original != labels)).sum()),
            }
        )
    return rows


def confidence_histogram(conf: np.ndarray, bins: int = HIST_BINS) -> dict[str, Any]:
    """Counts of cells per confidence bin, split by band, with the band thresholds."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin by arithmetic, not float edges, so 0.7 lands in the first "confident" bin as band_of says
    idx = np.clip(np.floor(np.round(np.asarray(conf, dtype=float) * bins, 9)).astype(int), 0, bins - 1)
    counts = np.bincount(idx, minlength=bins)
    return {
        "edges": np.round(edges, 4),
        "counts": counts.astype(np.int64),
        "thresholds": {"review": REVIEW, "confident": CONFIDENT},
    }


def marker_dotplot(run: dict[str, Any], labels: np.ndarray, order: Sequence[str]) -> dict[str, Any]:
    """Per label: fraction expressing and mean log1p(CP10k) of each shown label's own markers
    (its curated positives first, then those derived from the reference; never genes it
    only inherits, such as the pan-leukocyte ones)."""
    expr, genes = run.get("expr"), list(run.get("expr_genes", []))
    rows = list(order[:MAX_DOTPLOT_LABELS])
    pairs = tl.defining_markers(rows, run.get("marker_sets", {}), set(genes)) if expr is not None else []
    if not pairs:
        return {"labels": rows, "genes": [], "gene_label": [], "fraction": [], "mean": [], "scale": run.get("expr_scale")}
    cols = [genes.index(g) for _, g in pairs]
    frac, mean = dotplot_stats(expr[:, cols].tocsr(), labels.astype(str), rows)
    names = run.get("gene_names", {})
    return {
        "labels": rows,
        "genes": [names.get(g, g) for _, g in pairs],
        "gene_label": [lab for lab, _ in pairs],
        "fraction": np.round(frac, 4),
        "mean": np.round(mean, 4),
        "scale": run.get("expr_scale"),
    }


def comparisons(run: dict[str, Any], labels: np.ndarray) -> list[dict[str, Any]]:
    """The current labels against each label/cluster column of the upload (:func:`cellatlas.tl.crosstab`).

    Per column: rows (the upload's groups), cols (calls), ``share`` (row-normalised), cells
    per row, and per row the majority call, its share and the mean confidence.
    """
    conf = np.asarray(run["result"].confidence, dtype=float)
    out = []
    for column, g in (run.get("groupings") or {}).items():
        ref = pd.Series(pd.Categorical.from_codes(g["codes"], categories=g["groups"]))
        counts = tl.crosstab(ref, labels, normalize=False)
        summary = tl.summarise_groups(ref, labels, conf).reindex(counts.index)
        n = counts.sum(axis=1)
        out.append(
            {
                "column": column,
                "kind": g["kind"],
                "rows": [str(r) for r in counts.index],
                "cols": [str(c) for c in counts.columns],
                "share": np.ascontiguousarray(np.round(counts.div(n.replace(0, 1), axis=0).to_numpy(dtype=float), 4)),
                "n": n.to_numpy().astype(np.int64),
                "summary": [
                    {"group": str(k), "n": int(r.n_cells), "majority": r.majority_label, "share": round(r.majority_share, 4),
                     "second": r.second_label, "second_share": round(r.second_share, 4), "mean_confidence": round(r.mean_confidence, 4)}
                    for k, r in summary.iterrows()
                ],
            }
        )
    return out


def review_page(
    run: dict[str, Any],
    relabels: dict[int, str],
    *,
    band: str = "uncertain",
    label: str | None = None,
    offset: int = 0,
    limit: int = 50,
) -> dict[str, Any]:
    """The review queue: cells of the chosen band(s), least confident first.

    Parameters
    ----------
    band
        ``uncertain`` (review + low), ``review``, ``low``, ``confident``, ``relabelled`` or ``all``.
    label
        Only cells whose current label is this.
    """
    res = run["result"]
    labels = current_labels(run, relabels)
    b = np.asarray(res.band, dtype=object)
    masks = {
        "uncertain": b != "confident",
        "review": b == "review",
        "low": b == "low",
        "confident": b == "confident",
        "all": np.ones(len(res), bool),
        "relabelled": np.isin(np.arange(len(res)), list(relabels)),
    }
    if band not in masks:
        raise InputError(f"Unknown review filter '{band}'.", fix=f"Use one of: {', '.join(masks)}.", field="band")
    m = masks[band]
    if label:
        m = m & (labels.astype(str) == label)
    idx = np.flatnonzero(m)
    idx = idx[np.argsort(np.asarray(res.confidence)[idx], kind="stable")]
    page = idx[offset : offset + limit]
    return {"total": int(idx.size), "offset": offset, "limit": limit, "cells": [cell_detail(run, relabels, int(i)) for i in page]}


def cell_detail(run: dict[str, Any], relabels: dict[int, str], i: int) -> dict[str, Any]:
    """One cell's call, alternates, markers, evidence, QC and relabel state."""
    res = run["result"]
    if not 0 <= i < len(res):
        raise InputError(f"Cell index {i} is out of range (0..{len(res) - 1}).", fix="Pick a cell from the plot or the review queue.")
    qc = run["qc"]
    mito = float(qc.mito_fraction[i])
    return {
        "index": i,
        "cell_id": str(res.cell_ids[i]),
        "label": relabels.get(i, str(res.label[i])),
        "original_label": str(res.label[i]),
        "relabelled": i in relabels,
        "confidence": round(float(res.confidence[i]), 4),
        "band": str(res.band[i]),
        "level": str(res.level[i]),
        "parent": {"label": str(res.parent_label[i]), "confidence": _finite(res.parent_confidence[i])},
        "ontology_id": str(res.ontology_id[i]),
        # an alternate the evidence gives no weight (0.00 shown) is no one-click relabel
        "alternates": [{"label": str(lab), "score": round(float(s), 4)} for lab, s in res.alternates[i] if round(float(s), 2) > 0],
        "markers": [run.get("gene_names", {}).get(g, g) for g in list(res.markers[i])[:8]],  # mouse: the data's own names
        "novel": bool(res.novel[i]),
        "reason": str(res.reason[i]),
        "evidence": {
            "knn_label": str(res.knn_label[i]),
            "knn_prob": round(float(res.knn_prob[i]), 4),
            "marker_label": str(res.marker_label[i]),
            "marker_score": round(float(res.marker_score[i]), 4),
            "agreement": bool(res.agreement[i]),
            "atlas_distance": round(float(res.distance[i]), 4),
        },
        "qc": {
            "pass": bool(qc.qc_pass[i]),
            "reasons": str(qc.reasons[i]),
            "total_counts": float(qc.total_counts[i]),
            "mito_fraction": None if mito != mito else round(mito, 4),
        },
    }


def apply_relabel(
    run: dict[str, Any],
    relabels: dict[int, str],
    *,
    label: str | None,
    cells: Iterable[int] | None = None,
    group: str | None = None,
) -> tuple[dict[int, str], int]:
    """New relabel map after relabelling ``cells`` or every cell now called ``group``.

    ``label=None`` (or the cell's original call) reverts the cells to the engine's call.

    Returns
    -------
    relabels, n_changed
    """
    res = run["result"]
    n = len(res)
    if (cells is None) == (group is None):
        raise InputError("Say which cells to relabel.", fix="Send either `cells` (cell indices) or `group` (a current label), not both.")
    if label is not None:
        label = str(label).strip()
        if not label or len(label) > MAX_LABEL_CHARS:
            raise InputError(
                f"A label must be 1-{MAX_LABEL_CHARS} characters.", fix="Type the new cell-type name.", field="label"
            )
    if group is not None:
        cur = current_labels(run, relabels).astype(str)
        targets = np.flatnonzero(cur == group)
        if targets.size == 0:
            raise InputError(f"No cell is labelled '{group}'.", fix="Pick a label from the label table.", field="group")
    else:
        targets = np.asarray(list(cells), dtype=np.int64)
        bad = targets[(targets < 0) | (targets >= n)]
        if targets.size == 0 or bad.size:
            raise InputError(
                f"Cell indices must be in 0..{n - 1}" + (f" (got {bad[:5].tolist()})." if bad.size else "; none were given."),
                fix="Pick cells from the plot or the review queue.",
                field="cells",
            )
    out = dict(relabels)
    original = res.label
    for i in targets.tolist():
        if label is None or label == str(original[i]):
            out.pop(i, None)
        else:
            out[i] = label
    return out, int(targets.size)


def _finite(x) -> float | None:
    """A rounded float, or None for NaN (JSON has no NaN)."""
    x = float(x)
    return round(x, 4) if np.isfinite(x) else None
