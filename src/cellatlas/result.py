"""The annotation result: per-cell arrays plus provenance and the gene report.

One type, three views: :meth:`AnnotationResult.to_dataframe`,
:meth:`AnnotationResult.write_adata` (obs/obsm/uns columns) and
:meth:`AnnotationResult.to_calls` (the wire JSON of the HTTP API).
:meth:`AnnotationResult.from_calls` rebuilds the object from the wire JSON so
the HTTP client returns the same type as in-process annotation.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

CONFIDENT = 0.7
REVIEW = 0.4
N_ALTERNATES = 3


class Alternates:
    """Runner-up labels per cell, held as arrays and read as ``[(label, score), ...]`` lists.

    ``labels`` is an object array ``[n, k]`` (``""`` for no alternate), ``scores`` a float
    array ``[n, k]``. Indexing gives one cell's list; assignment replaces it.
    """

    def __init__(self, labels: np.ndarray, scores: np.ndarray):
        self.labels = np.asarray(labels, dtype=object)
        self.scores = np.asarray(scores, dtype=np.float32)

    @classmethod
    def from_lists(cls, lists: list[list[tuple[str, float]]], k: int = N_ALTERNATES) -> "Alternates":
        labels = np.full((len(lists), k), "", dtype=object)
        scores = np.full((len(lists), k), np.nan, dtype=np.float32)
        for i, alts in enumerate(lists):
            for j, (lab, sc) in enumerate(alts[:k]):
                labels[i, j], scores[i, j] = lab, sc
        return cls(labels, scores)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> list[tuple[str, float]]:
        return [(str(lab), float(sc)) for lab, sc in zip(self.labels[i], self.scores[i]) if lab != ""]

    def __setitem__(self, i: int, alts: list[tuple[str, float]]) -> None:
        self.labels[i] = ""
        self.scores[i] = np.nan
        for j, (lab, sc) in enumerate(alts[: self.labels.shape[1]]):
            self.labels[i, j], self.scores[i, j] = lab, sc

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def text(self) -> np.ndarray:
        """``"label:0.123; label:0.045"`` per cell (object array), as ``f"{label}:{score:.3f}"``
        joined by ``"; "``, built column by column from each distinct label and score text once."""
        out = np.full(len(self), "", dtype=object)
        for j in range(self.labels.shape[1]):
            has = np.nonzero(self.labels[:, j] != "")[0]
            if not len(has):
                continue
            inv, labs = pd.factorize(self.labels[has, j])
            # float32 x 1000 is exact in float64, so rint rounds as format's .3f does
            score = self.scores[has, j].astype(np.float64)
            milli = np.rint(score * 1000.0)
            ok = np.isfinite(milli) & (np.abs(milli) < 1e6) & ~((milli == 0) & np.signbit(score))  # "-0.000" kept
            sinv, uniq = pd.factorize(np.where(ok, milli, 0).astype(np.int64))
            item = (np.array([f"{lab}:" for lab in labs], dtype=object)[inv]
                    + np.array([f"{m / 1000:.3f}" for m in uniq], dtype=object)[sinv])
            if not ok.all():  # out-of-range or NaN scores: formatted one by one
                bad = np.nonzero(~ok)[0]
                item[bad] = [f"{labs[inv[b]]}:{score[b]:.3f}" for b in bad]
            out[has] = np.where(out[has] == "", item, out[has] + "; " + item)
        return out

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


def _str_categorical(values, categories=None) -> pd.Categorical:
    """``pd.Categorical(np.asarray(values).astype(str), categories=categories)`` without copying
    every cell's string: strings are factorised as they are and only the distinct ones sorted."""
    arr = np.asarray(values)
    if categories is None and arr.dtype == object and arr.ndim == 1:
        codes, uniq = pd.factorize(arr, use_na_sentinel=False)
        if all(isinstance(u, str) for u in uniq):  # the usual case; None, numbers: as text, below
            text = np.asarray(uniq, dtype=object)
            order = np.argsort(text, kind="stable")
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(len(order))
            return pd.Categorical.from_codes(rank[codes] if len(codes) else codes, categories=text[order])
    return pd.Categorical(arr.astype(str), categories=categories)


def band_of(confidence: np.ndarray) -> np.ndarray:
    """Map confidence to ``confident`` (>= 0.7), ``review`` (0.4-0.7) or ``low`` (< 0.4)."""
    c = np.asarray(confidence, dtype=float)
    return np.where(c >= CONFIDENT, "confident", np.where(c >= REVIEW, "review", "low")).astype(object)


@dataclass(repr=False)
class AnnotationResult:
    """Per-cell calls, in input order.

    Attributes
    ----------
    cell_ids
        Cell identifiers (``obs_names`` or ``0..n-1`` as strings).
    label
        Final call per cell (may be a coarser parent label, see ``level``).
    ontology_id
        Cell Ontology id of ``label`` (``""`` where unknown).
    confidence
        Calibrated probability that ``label`` is right, in [0, 1].
    band
        ``confident`` / ``review`` / ``low``.
    level
        ``fine`` or ``coarse`` (rolled up to the parent because only that level agreed).
    alternates
        Up to three runner-up ``(label, score)`` pairs per cell (:class:`Alternates`;
        a list of lists is converted).
    markers
        The label's marker genes this cell expresses, strongest first.
    knn_label, knn_prob
        Top label of the neighbour vote and its vote share.
    marker_label, marker_score
        Top label of the marker-signature score and its softmaxed score.
    agreement
        Whether both signals point to the same label (or lineage).
    distance
        Mean distance to the nearest reference neighbours, in units of the
        atlas's own neighbour-distance distribution (a robust z-score).
    novel
        Cell unlike anything in the atlas (flagged, label still reported).
    parent_label, parent_confidence
        The label one level above ``label`` in the atlas hierarchy (``""`` at a top-level
        label) and the calibrated probability that the cell belongs to it (NaN where there is
        no parent, or the atlas predates this calibration). A "Naive CD4 T cell" under review
        may be a confident "CD4 T cell": the parent is what to read when the fine call is under review.
    total_counts, n_genes, pct_mito
        Per-cell QC facts over every input gene: total counts (count-like values for
        log-normalised input), genes detected, percent of counts in MT- genes (NaN when the
        data have none); NaN/-1 when unknown (results rebuilt from older wire data).
    doublet_score
        scrublet doublet score (NaN unless ``annotate(..., doublets=True)``).
    reason
        Why the cell is ``"Unassigned"`` (too few counts or genes, nothing in the genes the
        atlas reads; see :mod:`cellatlas.io_qc`); ``""`` for called cells.
    embedding, layout
        Query embedding ``[n, d]`` and the cells' 2-D placement on the atlas's reference
        layout ``[n, 2]`` (a projection, not a UMAP of the query; see ``cellatlas.pl``).
    gene_report
        Dict describing id detection, mapping and coverage.
    provenance
        Dict: code version, model, atlas name/version/hash, timings.
    """

    cell_ids: np.ndarray
    label: np.ndarray
    ontology_id: np.ndarray
    confidence: np.ndarray
    level: np.ndarray
    alternates: Alternates
    markers: list[list[str]]
    knn_label: np.ndarray
    knn_prob: np.ndarray
    marker_label: np.ndarray
    marker_score: np.ndarray
    agreement: np.ndarray
    distance: np.ndarray
    novel: np.ndarray
    parent_label: np.ndarray | None = None
    parent_confidence: np.ndarray | None = None
    total_counts: np.ndarray | None = None
    n_genes: np.ndarray | None = None
    pct_mito: np.ndarray | None = None
    doublet_score: np.ndarray | None = None
    reason: np.ndarray | None = None
    embedding: np.ndarray | None = None
    layout: np.ndarray | None = None
    gene_report: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.alternates, Alternates):
            self.alternates = Alternates.from_lists(list(self.alternates))
        n = len(self.label)
        if self.parent_label is None:
            self.parent_label = np.full(n, "", dtype=object)
        if self.parent_confidence is None:
            self.parent_confidence = np.full(n, np.nan, dtype=np.float32)
        for name in ("total_counts", "pct_mito", "doublet_score"):
            if getattr(self, name) is None:
                setattr(self, name, np.full(n, np.nan, dtype=np.float32))
        if self.n_genes is None:
            self.n_genes = np.full(n, -1, dtype=np.int32)
        if self.reason is None:
            self.reason = np.full(n, "", dtype=object)

    @property
    def band(self) -> np.ndarray:
        return band_of(self.confidence)

    def __len__(self) -> int:
        return len(self.label)

    def __repr__(self) -> str:
        """A few lines (the per-cell arrays are for ``to_dataframe()``, not for printing)."""
        n, prov = len(self), self.provenance or {}
        labels, counts = np.unique(np.asarray(self.label, dtype=str), return_counts=True)
        top = ", ".join(f"{labels[i]} {counts[i]:,}" for i in np.argsort(-counts, kind="stable")[:5])
        bands = self.band
        shares = ", ".join(f"{b} {np.mean(bands == b):.0%}" for b in ("confident", "review", "low")) if n else "-"
        more = f" (+{len(labels) - 5} more)" if len(labels) > 5 else ""
        return (
            f"AnnotationResult: {n:,} cells, {len(labels)} labels; model {prov.get('model', '?')}, "
            f"atlas {prov.get('atlas', '?')}\n  bands: {shares}; novel {int(np.sum(self.novel)):,}\n"
            f"  labels: {top}{more}\n  per cell: .to_dataframe(); per label: .summary()"
        )

    # ------------------------------------------------------------------ views
    def to_dataframe(self) -> pd.DataFrame:
        """One row per cell, indexed by cell id."""
        k_max = self.alternates.labels.shape[1]
        alt = {f"alternate_{k + 1}": self.alternates.labels[:, k] for k in range(k_max)}
        alt_s = {f"alternate_{k + 1}_score": self.alternates.scores[:, k].astype(float) for k in range(k_max)}
        df = pd.DataFrame(
            {
                "cell_type": self.label,
                "cell_type_confidence": np.asarray(self.confidence, dtype=float),
                "cell_type_band": self.band,
                "cell_type_ontology_id": self.ontology_id,
                "cell_type_level": self.level,
                "cell_type_parent": self.parent_label,
                "cell_type_parent_confidence": np.asarray(self.parent_confidence, dtype=float),
                **alt,
                **alt_s,
                "markers": [",".join(m) for m in self.markers],
                "knn_label": self.knn_label,
                "knn_prob": np.asarray(self.knn_prob, dtype=float),
                "marker_label": self.marker_label,
                "marker_score": np.asarray(self.marker_score, dtype=float),
                "agreement": np.asarray(self.agreement, dtype=bool),
                "atlas_distance": np.asarray(self.distance, dtype=float),
                "novel": np.asarray(self.novel, dtype=bool),
                "reason": np.asarray(self.reason, dtype=object),
                "total_counts": np.asarray(self.total_counts, dtype=float),
                "n_genes": np.asarray(self.n_genes, dtype=np.int64),
                "pct_mito": np.asarray(self.pct_mito, dtype=float),
                "doublet_score": np.asarray(self.doublet_score, dtype=float),
            },
            index=pd.Index(np.asarray(self.cell_ids).astype(str), name="cell_id"),
        )
        return df

    def write_adata(self, adata, key_added: str = "cell_type", *, reserve=()) -> dict[str, str]:
        """Write the calls into ``adata`` in place; returns the user's columns moved aside.

        obs: ``{key_added}``, ``{key_added}_confidence``, ``_band``, ``_ontology_id``, ``_level``,
        ``_parent``, ``_parent_confidence``, ``_alternates``, ``_markers``, ``_novel``,
        ``_agreement``, ``_reason``, ``_total_counts``, ``_n_genes``, ``_pct_mito``, ``_doublet_score``;
        obsm: ``X_cellatlas`` (embedding), ``X_cellatlas_projection`` (the
        cells placed on the atlas's 2-D reference layout: not a UMAP of these cells); uns:
        ``cellatlas`` (provenance, gene report, ``key_added``, the columns written). An existing
        column of the same name that cellatlas did not write is moved to ``<name>_uploaded``
        (:mod:`cellatlas.adata_out`), never overwritten.
        """
        from cellatlas.adata_out import put_obs, record

        if adata.n_obs != len(self):
            raise ValueError(f"adata has {adata.n_obs} cells but the result has {len(self)}")
        key = key_added

        def cat(values, categories=None) -> pd.Categorical:  # few distinct values: as anndata stores strings anyway
            return _str_categorical(values, categories)

        def num(values, dtype=float) -> np.ndarray:
            return np.asarray(values, dtype=dtype)

        columns = {
            key: cat(self.label),
            f"{key}_confidence": num(self.confidence),
            f"{key}_band": cat(self.band, ["confident", "review", "low"]),
            f"{key}_ontology_id": cat(self.ontology_id),
            f"{key}_level": cat(self.level),
            f"{key}_parent": cat(self.parent_label),
            f"{key}_parent_confidence": num(self.parent_confidence),
            f"{key}_alternates": self.alternates.text(),
            f"{key}_markers": np.array([",".join(m) for m in self.markers], dtype=object).astype(str),
            f"{key}_novel": num(self.novel, bool),
            f"{key}_agreement": num(self.agreement, bool),
            f"{key}_reason": cat(self.reason),
            f"{key}_total_counts": num(self.total_counts),
            f"{key}_n_genes": num(self.n_genes, np.int64),
            f"{key}_pct_mito": num(self.pct_mito),
            f"{key}_doublet_score": num(self.doublet_score),
        }
        obs = pd.DataFrame(columns, index=adata.obs.index)
        renamed = put_obs(adata, obs, reserve=reserve)
        if self.embedding is not None:
            adata.obsm["X_cellatlas"] = np.asarray(self.embedding, dtype=np.float32)
        if self.layout is not None:
            adata.obsm["X_cellatlas_projection"] = np.asarray(self.layout, dtype=np.float32)
        before = adata.uns.get("cellatlas", {})
        uns = {"provenance": self.provenance, "gene_report": self.gene_report,
               "moved_columns": before.get("moved_columns", {}) if isinstance(before, dict) else {}}
        adata.uns["cellatlas"] = _jsonable(record(uns, obs.columns, key, renamed))
        return renamed

    def to_calls(self, evidence: bool = True) -> list[dict[str, Any]]:
        """The wire format: one dict per cell, in input order (columns converted once, not per cell)."""
        with _gc_paused():  # ~10 acyclic containers per cell would trigger full collections
            return self._calls(evidence)

    def _calls(self, evidence: bool) -> list[dict[str, Any]]:

        def col(a, digits=None):
            a = np.asarray(a)
            return np.round(a.astype(float), digits).tolist() if digits is not None else a.tolist()

        alt_labels = self.alternates.labels.tolist()
        alt_scores = col(self.alternates.scores, 4)
        alternates = [
            [{"label": str(lab), "score": sc} for lab, sc in zip(labs, scs) if lab != ""]
            for labs, scs in zip(alt_labels, alt_scores)
        ]
        parent_conf = _nullable(self.parent_confidence, 4)
        base = zip(
            col(self.label), col(self.confidence, 4), alternates, self.markers, col(self.band),
            col(self.ontology_id), col(self.level), col(np.asarray(self.novel, dtype=bool)),
            col(self.parent_label), parent_conf,
        )
        n_genes = [None if g < 0 else g for g in col(np.asarray(self.n_genes, dtype=np.int64))]  # -1: unknown
        qc = zip(col(self.reason), _nullable(self.total_counts, 1), n_genes,
                 _nullable(self.pct_mito, 3), _nullable(self.doublet_score, 4))
        calls = [
            {"label": str(lab), "confidence": conf, "alternates": alts, "markers": list(mk), "band": band,
             "ontology_id": str(oid), "level": str(lvl), "novel": nov, "parent_label": str(pl), "parent_confidence": pcf,
             "reason": str(why), "qc": {"total_counts": tc, "n_genes": ng, "pct_mito": pm, "doublet_score": ds}}
            for (lab, conf, alts, mk, band, oid, lvl, nov, pl, pcf), (why, tc, ng, pm, ds) in zip(base, qc)
        ]
        if evidence:
            ev = zip(
                col(self.knn_label), col(self.knn_prob, 4), col(self.marker_label), col(self.marker_score, 4),
                col(np.asarray(self.agreement, dtype=bool)), col(self.distance, 4),
            )
            for c, (kl, kp, ml, ms, ag, d) in zip(calls, ev):
                c["evidence"] = {"knn_label": str(kl), "knn_prob": kp, "marker_label": str(ml), "marker_score": ms, "agreement": ag, "atlas_distance": d}
        return calls

    @classmethod
    def from_calls(
        cls,
        calls: list[dict[str, Any]],
        *,
        cell_ids=None,
        gene_report: dict | None = None,
        provenance: dict | None = None,
        embedding: np.ndarray | None = None,
        layout: np.ndarray | None = None,
    ) -> "AnnotationResult":
        """Rebuild a result from wire calls (the inverse of :meth:`to_calls`)."""
        n = len(calls)
        ev = [c.get("evidence") or {} for c in calls]
        qc = [c.get("qc") or {} for c in calls]

        def num(rows, key, dtype, missing):
            return np.array([missing if r.get(key) is None else r[key] for r in rows], dtype=dtype)

        conf = np.array([c["confidence"] for c in calls], dtype=np.float32)
        return cls(
            cell_ids=np.asarray(cell_ids if cell_ids is not None else [str(i) for i in range(n)], dtype=object),
            label=np.array([c["label"] for c in calls], dtype=object),
            ontology_id=np.array([c.get("ontology_id", "") for c in calls], dtype=object),
            confidence=conf,
            level=np.array([c.get("level", "fine") for c in calls], dtype=object),
            alternates=[[(a["label"], float(a["score"])) for a in c.get("alternates", [])] for c in calls],
            markers=[list(c.get("markers", [])) for c in calls],
            knn_label=np.array([e.get("knn_label", "") for e in ev], dtype=object),
            knn_prob=np.array([e.get("knn_prob", np.nan) for e in ev], dtype=np.float32),
            marker_label=np.array([e.get("marker_label", "") for e in ev], dtype=object),
            marker_score=np.array([e.get("marker_score", np.nan) for e in ev], dtype=np.float32),
            agreement=np.array([e.get("agreement", False) for e in ev], dtype=bool),
            distance=np.array([e.get("atlas_distance", np.nan) for e in ev], dtype=np.float32),
            novel=np.array([c.get("novel", False) for c in calls], dtype=bool),
            parent_label=np.array([c.get("parent_label", "") for c in calls], dtype=object),
            parent_confidence=num(calls, "parent_confidence", np.float32, np.nan),
            total_counts=num(qc, "total_counts", np.float32, np.nan),
            n_genes=num(qc, "n_genes", np.int32, -1),
            pct_mito=num(qc, "pct_mito", np.float32, np.nan),
            doublet_score=num(qc, "doublet_score", np.float32, np.nan),
            reason=np.array([c.get("reason", "") for c in calls], dtype=object),
            embedding=embedding,
            layout=layout,
            gene_report=gene_report or {},
            provenance=provenance or {},
        )

    @classmethod
    def concat(cls, parts: list["AnnotationResult"]) -> "AnnotationResult":
        """Join results of consecutive chunks, order preserved (provenance from the first)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]

        def cat(name):
            vals = [getattr(p, name) for p in parts]
            if any(v is None for v in vals):
                return None
            return np.concatenate(vals)

        return cls(
            cell_ids=cat("cell_ids"),
            label=cat("label"),
            ontology_id=cat("ontology_id"),
            confidence=cat("confidence"),
            level=cat("level"),
            alternates=Alternates(
                np.concatenate([p.alternates.labels for p in parts]), np.concatenate([p.alternates.scores for p in parts])
            ),
            markers=[m for p in parts for m in p.markers],
            knn_label=cat("knn_label"),
            knn_prob=cat("knn_prob"),
            marker_label=cat("marker_label"),
            marker_score=cat("marker_score"),
            agreement=cat("agreement"),
            distance=cat("distance"),
            novel=cat("novel"),
            parent_label=cat("parent_label"),
            parent_confidence=cat("parent_confidence"),
            total_counts=cat("total_counts"),
            n_genes=cat("n_genes"),
            pct_mito=cat("pct_mito"),
            doublet_score=cat("doublet_score"),
            reason=cat("reason"),
            embedding=cat("embedding"),
            layout=cat("layout"),
            gene_report=first.gene_report,
            provenance=first.provenance,
        )

    def summary(self) -> pd.DataFrame:
        """Counts per label with mean confidence and band shares."""
        return summarise(self.to_dataframe())


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Counts per label with mean confidence, band and novel shares, from the columns
    ``cell_type``, ``cell_type_confidence``, ``cell_type_band`` and ``novel`` of ``df``."""
    g = df.groupby("cell_type", observed=True)
    band = df["cell_type_band"].astype(str)
    return pd.DataFrame(
        {
            "cells": g.size(),
            "mean_confidence": g["cell_type_confidence"].mean().round(3),
            "confident": (band == "confident").groupby(df["cell_type"], observed=True).mean().round(3),
            "review": (band == "review").groupby(df["cell_type"], observed=True).mean().round(3),
            "low": (band == "low").groupby(df["cell_type"], observed=True).mean().round(3),
            "novel": g["novel"].mean().round(3),
        }
    ).sort_values("cells", ascending=False)


@contextmanager
def _gc_paused():
    """Cyclic garbage collection off while building many acyclic objects (restored after)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _nullable(values, digits: int) -> list:
    """Rounded floats with NaN as ``None`` (JSON null)."""
    a = np.round(np.asarray(values, dtype=float), digits)
    return [None if v != v else v for v in a.tolist()]


def _jsonable(obj):
    """Make nested provenance storable in AnnData ``uns`` (no None, no tuples)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj if v is not None]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    return obj
