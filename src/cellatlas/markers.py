"""Marker knowledge and rank-based marker scoring.

Two kinds of marker sets feed the marker signal of an annotation:

* **curated** sets shipped with the package (``data/markers_human_core.tsv``,
  one row per label, gene and sign, cross-checked against public marker
  databases by ``scripts/check_markers.py``) over the label hierarchy in
  ``data/labels_human_core.tsv``;
* **derived** sets computed from a labelled reference by
  :func:`derive_markers`, merged with the curated ones by :func:`merge_markers`.

Scoring is rank-based within each cell, so it does not depend on sequencing
depth, on the normalisation or on the size of the gene panel (a cell with
2,500 measured genes and one with 33,000 are scored on the same scale). Every
expressed gene gets a within-cell rank score in (0, 1] (:func:`rank_scores`).
A label's score is the sum of its positive markers' rank scores minus
``NEG_WEIGHT`` times the sum of its negative markers', divided by the number of
positive markers in its signature (:func:`score_markers`), clipped to [-1, 1]:
a cell expressing every positive marker at the top of its ranking scores 1.
Unexpressed markers count 0, and so do markers missing from the gene list:
matrices usually drop genes nobody expressed, and a label whose signature is
mostly unmeasured must not win on the one marker that is (the fraction that is
measured is reported as ``coverage``). Each negative marker weighs as much as a
positive one, so a label's lineage negatives are not diluted by its other
negatives. No "top 5% of genes" cutoff that would break on shallow data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas.errors import InputError
from cellatlas.ranks import as_csr, rank_chunk, rank_scores, row_chunks

__all__ = [
    "NEG_WEIGHT", "CompiledMarkers", "ancestors", "compile_markers", "derive_markers", "load_curated_markers",
    "load_labels", "marker_null_z", "merge_markers", "rank_scores", "score_markers",
]

NEG_WEIGHT = 1.0
"""Weight of one negative marker relative to one positive marker of the same label.

With 1.0, an expressed negative marker cancels an equally ranked positive one.
"""
MIN_DELTA = 0.1
"""A derived positive marker is expressed in at least this larger a fraction of its label's
cells than of the closest other label's."""
NEG_MAX_FRAC_IN = 0.05
NEG_MIN_FRAC_OUT = 0.5
HOUSEKEEPING_FRAC = 0.9
_EXCLUDED = re.compile(r"^(MT-|MT\.|RP[LS]\d|RPLP\d|RPSA$)", re.IGNORECASE)
_DATA = "data"
LABELS_FILE = "labels_human_core.tsv"
MARKERS_FILE = "markers_human_core.tsv"


# --------------------------------------------------------------------------- curated knowledge
def _data_path(name: str) -> Path:
    return Path(__file__).resolve().parent / _DATA / name


@lru_cache(maxsize=1)
def load_labels() -> pd.DataFrame:
    """The built-in label table (``human-core``).

    Returns
    -------
    pandas.DataFrame
        Index ``label``; columns ``ontology_id`` (Cell Ontology id), ``parent`` (another
        label, or ``""`` at the top of the hierarchy), ``lineage`` (immune, stromal,
        epithelial, endothelial, neural or parenchymal), ``tissue``, ``description`` and
        ``kind``: ``group`` for a label whose children make it up (never called itself when
        one of them can be), ``type`` for a cell type of its own, callable even with finer
        types below it ("Fibroblast" above "Pancreatic stellate cell").
        Cached and shared: do not modify it in place.
    """
    with _data_path(LABELS_FILE).open("r", encoding="utf-8") as fh:
        df = pd.read_csv(fh, sep="\t", dtype=str, keep_default_na=False)
    return df.set_index("label")


@lru_cache(maxsize=1)
def load_curated_markers() -> dict[str, dict[str, list[str]]]:
    """The curated marker sets of the built-in labels.

    Returns
    -------
    dict
        ``{label: {"positive": [...], "negative": [...]}}`` in table order, genes as
        approved HGNC symbols. Cached and shared: do not modify it in place.
    """
    with _data_path(MARKERS_FILE).open("r", encoding="utf-8") as fh:
        df = pd.read_csv(fh, sep="\t", dtype=str, keep_default_na=False)
    out: dict[str, dict[str, list[str]]] = {}
    for label, gene, sign in zip(df["label"], df["gene"], df["sign"]):
        entry = out.setdefault(label, {"positive": [], "negative": []})
        entry["positive" if sign == "+" else "negative"].append(gene)
    return out


def ancestors(label: str, labels_df: pd.DataFrame) -> list[str]:
    """Parent chain of ``label``, nearest first (empty for a top-level label).

    Parameters
    ----------
    label
        A label in ``labels_df``.
    labels_df
        A label table as returned by :func:`load_labels` (index = label, column ``parent``).
    """
    parents = labels_df["parent"]
    if label not in parents.index:
        raise InputError(
            f"Unknown label {label!r}: it is not in the label table.",
            fix="Use one of the labels of the atlas (see load_labels().index).",
            field="label",
        )
    return parent_chain(label, parents)


def parent_chain(label: str, parents: Mapping[str, str]) -> list[str]:
    """Ancestors of ``label`` in a ``{label: parent}`` mapping, nearest first (``""``/NaN: no parent)."""
    chain: list[str] = []
    p = parents.get(label, "")
    while isinstance(p, str) and p:
        if p in chain or p == label:
            raise InputError(f"The label hierarchy has a cycle through {p!r}.", fix="Give every label a parent higher up.")
        chain.append(p)
        p = parents.get(p, "")
    return chain


# --------------------------------------------------------------------------- compiled signatures
@dataclass
class CompiledMarkers:
    """Marker sets resolved against one gene list, ready for :func:`score_markers`.

    Attributes
    ----------
    labels
        Label of each column of ``W``.
    genes
        The gene list the sets were compiled against (columns of the scored matrices).
    W
        ``[n_genes, n_labels]`` CSR weights: ``+1 / n_pos_total`` for a present positive
        marker, ``-NEG_WEIGHT / n_pos_total`` for a present negative marker (a label
        without positive markers has an all-zero column).
    n_pos_present, n_pos_total, n_neg_present, n_neg_total
        Marker counts per label, present in ``genes`` and in the set.
    coverage
        ``n_pos_present / n_pos_total`` per label (0 for a label without positives).
    marker_idx, negative_idx
        Gene column indices of each label's present positive / negative markers.
    missing
        Per label, the positive markers absent from ``genes`` (not used in scores).
    """

    labels: list[str]
    genes: list[str]
    W: sp.csr_matrix
    n_pos_present: np.ndarray
    n_pos_total: np.ndarray
    n_neg_present: np.ndarray
    n_neg_total: np.ndarray
    coverage: np.ndarray
    marker_idx: list[np.ndarray]
    negative_idx: list[np.ndarray]
    missing: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def n_labels(self) -> int:
        return len(self.labels)


def _marker_lists(label: str, entry: Any) -> tuple[list[str], list[str]]:
    """(positives, negatives) of one marker-set entry, validated."""
    if isinstance(entry, Mapping):
        pos, neg = list(entry.get("positive", []) or []), list(entry.get("negative", []) or [])
    elif isinstance(entry, (list, tuple)):
        pos, neg = list(entry), []
    else:
        raise InputError(
            f"Marker set of {label!r} is a {type(entry).__name__}, not a list or a dict.",
            fix='Give each label {"positive": [genes], "negative": [genes]} or a list of positive genes.',
            field="markers",
        )
    both = sorted(set(pos) & set(neg))
    if both:
        raise InputError(
            f"Marker set of {label!r} lists {both} as both positive and negative.",
            fix="Keep each gene on one side of the label's signature.",
            field="markers",
        )
    return list(dict.fromkeys(pos)), list(dict.fromkeys(neg))


def compile_markers(marker_sets: Mapping[str, Any], genes: Sequence[str | None]) -> CompiledMarkers:
    """Resolve marker sets against a gene list.

    Parameters
    ----------
    marker_sets
        ``{label: {"positive": [...], "negative": [...]}}`` (other keys ignored) or
        ``{label: [positive genes]}``.
    genes
        Gene symbol of each matrix column (``None`` for an unmapped column). A symbol
        present in several columns is read from its first column.

    Returns
    -------
    CompiledMarkers
        Markers absent from ``genes`` are not used; they are reported through
        ``coverage`` and ``missing``.
    """
    labels = [str(lab) for lab in marker_sets]
    index: dict[str, int] = {}
    for i, g in enumerate(genes):
        if g is not None and g not in index:
            index[str(g)] = i
    rows, cols, vals = [], [], []
    stats = np.zeros((4, len(labels)), dtype=np.int64)
    pos_idx, neg_idx, missing = [], [], {}
    for j, lab in enumerate(labels):
        pos, neg = _marker_lists(lab, marker_sets[lab])
        p = np.array([index[g] for g in pos if g in index], dtype=np.int64)
        n = np.array([index[g] for g in neg if g in index], dtype=np.int64)
        stats[:, j] = len(p), len(pos), len(n), len(neg)
        pos_idx.append(p)
        neg_idx.append(n)
        missing[lab] = [g for g in pos if g not in index]
        if not pos:
            continue
        for idx, w in ((p, 1.0), (n, -NEG_WEIGHT)):
            rows.append(idx)
            cols.append(np.full(len(idx), j))
            vals.append(np.full(len(idx), w / len(pos), dtype=np.float32))
    cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dtype=dt))
    W = sp.csr_matrix(
        (cat(vals, np.float32), (cat(rows, np.int64), cat(cols, np.int64))), shape=(len(genes), len(labels)), dtype=np.float32
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        coverage = np.where(stats[1] > 0, stats[0] / np.maximum(stats[1], 1), 0.0)
    return CompiledMarkers(
        labels, [g for g in genes], W, stats[0], stats[1], stats[2], stats[3], coverage, pos_idx, neg_idx, missing
    )


def _select_columns(indptr: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of kept non-zeros and the indptr of the matrix made of them."""
    sel = np.flatnonzero(keep)
    return sel, np.searchsorted(sel, indptr - indptr[0])


def score_markers(counts: Any, compiled: CompiledMarkers, *, ranked: bool = False) -> np.ndarray:
    """Marker-signature score of every cell for every compiled label.

    Parameters
    ----------
    counts
        Cells x genes over ``compiled.genes`` (raw counts or log-normalised), or, with
        ``ranked=True``, the output of :func:`rank_scores` on such a matrix.
    compiled
        From :func:`compile_markers`.
    ranked
        ``counts`` already holds rank scores (saves recomputing them).

    Returns
    -------
    numpy.ndarray
        float32 ``[n_cells, n_labels]`` in [-1, 1]: (sum of the positive markers' rank
        scores - ``NEG_WEIGHT`` x sum of the negative markers') / number of positive
        markers in the signature; unexpressed and unmeasured markers count 0.
    """
    X = as_csr(counts, check=not ranked)
    if X.shape[1] != compiled.n_genes:
        raise InputError(
            f"The matrix has {X.shape[1]} gene columns but the markers were compiled for {compiled.n_genes} genes.",
            fix="Compile the markers against the matrix's own gene list (compile_markers(sets, genes)).",
            field="genes",
        )
    cols = np.flatnonzero(np.diff(compiled.W.indptr))
    is_marker = np.zeros(compiled.n_genes, dtype=bool)
    is_marker[cols] = True
    remap = np.cumsum(is_marker) - 1
    W = compiled.W[cols].tocsr()
    out = np.zeros((X.shape[0], compiled.n_labels), dtype=np.float32)
    if len(cols) == 0:
        return out
    nnz = np.diff(X.indptr)
    for start, stop in row_chunks(X.shape[0]):
        lo, hi = X.indptr[start], X.indptr[stop]
        ind = X.indices[lo:hi]
        sel, indptr = _select_columns(X.indptr[start : stop + 1], is_marker[ind])
        vals = (X.data[lo:hi] if ranked else rank_chunk(X.data[lo:hi], nnz[start:stop]))[sel]
        R = sp.csr_matrix((vals, remap[ind[sel]], indptr), shape=(stop - start, len(cols)))
        out[start:stop] = (R @ W).toarray()
    np.clip(out, -1.0, 1.0, out=out)
    return out


def marker_null_z(raw: np.ndarray, ranks: sp.csr_matrix, compiled: CompiledMarkers) -> np.ndarray:
    """z-score of each marker score against random gene sets of the same make-up in the same cell.

    A random gene of a cell expressing ``q`` of the scored genes has rank score 0 with
    probability ``1 - q`` and is otherwise uniform on (0, 1]: mean ``q / 2``, variance
    ``q / 3 - q**2 / 4``. A label's score sums its present positive markers minus its present
    negative ones over its number of positive markers (:func:`score_markers`), which fixes its
    null mean and variance. The z needs no reference cells, so labels with and without them
    are on one scale, and it grows with the evidence (more measured markers, deeper cells).

    Parameters
    ----------
    raw
        ``[n, n_labels]`` scores from :func:`score_markers`.
    ranks
        The rank scores they were computed from (``[n, n_genes]``; only the row counts are read).
    compiled
        The marker sets.
    """
    q = np.diff(ranks.indptr).astype(np.float64) / max(ranks.shape[1], 1)
    var1 = np.maximum(q / 3.0 - q**2 / 4.0, 0.0)
    p, n = compiled.n_pos_present.astype(np.float64), compiled.n_neg_present.astype(np.float64)
    t = np.maximum(compiled.n_pos_total, 1).astype(np.float64)
    mean = (q / 2.0)[:, None] * ((p - n) / t)[None, :]
    sd = np.sqrt(var1[:, None] * ((p + n) / t**2)[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sd > 0, (raw - mean) / np.where(sd > 0, sd, 1.0), 0.0)
    return z.astype(np.float32)


# --------------------------------------------------------------------------- derived markers
def _label_codes(labels: Any, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    lab = pd.Series(np.asarray(labels, dtype=object).ravel())
    if len(lab) != n_cells:
        raise InputError(
            f"Got {len(lab)} labels for {n_cells} cells.", fix="Give exactly one label per cell (row).", field="labels"
        )
    bad = lab.isna() | (lab.astype(str).str.strip() == "")
    if bad.any():
        raise InputError(
            f"{int(bad.sum())} cell(s) have no label (first at row {int(np.flatnonzero(bad.to_numpy())[0])}).",
            fix="Remove unlabelled cells from the reference or give them a label.",
            field="labels",
        )
    names, codes = np.unique(lab.astype(str).to_numpy(), return_inverse=True)
    if len(names) < 2:
        raise InputError("Markers are derived by contrasting labels, but the reference has only one.", fix="Use a reference with at least two labels.", field="labels")
    return names, codes


def _max_other(m: np.ndarray) -> np.ndarray:
    """``out[l, g] = max over k != l of m[k, g]``."""
    order = np.argsort(-m, axis=0, kind="stable")
    top, second = m[order[0], np.arange(m.shape[1])], m[order[1], np.arange(m.shape[1])]
    return np.where(np.arange(m.shape[0])[:, None] == order[0][None, :], second[None, :], top[None, :])


def _group_stats(X: sp.csr_matrix, R: sp.csr_matrix, codes: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per label and gene: fraction of cells expressing and mean rank score."""
    n = X.shape[0]
    ind = sp.csr_matrix((np.ones(n, dtype=np.float32), (codes, np.arange(n))), shape=(n_labels, n))
    size = np.bincount(codes, minlength=n_labels).astype(np.float64)[:, None]
    expressed = sp.csr_matrix(((X.data > 0).astype(np.float32), X.indices, X.indptr), shape=X.shape)
    return (ind @ expressed).toarray() / size, (ind @ R).toarray() / size


def derive_markers(
    counts: Any,
    genes: Sequence[str | None],
    labels: Any,
    n_pos: int = 15,
    n_neg: int = 8,
    min_frac: float = 0.25,
) -> dict[str, dict[str, list[str]]]:
    """Positive and negative markers of each label of a labelled reference.

    A positive marker is expressed in at least ``min_frac`` of the label's cells and in a
    fraction at least ``MIN_DELTA`` larger than in the closest other label; candidates are
    ordered by that difference (to 0.01), then by the difference of mean rank score. A
    negative marker is a positive marker of another label expressed in at least
    ``NEG_MIN_FRAC_OUT`` of that label's cells and in under ``NEG_MAX_FRAC_IN`` of this
    label's, taken in turn from each other label. Mitochondrial and ribosomal genes and
    genes expressed in more than ``HOUSEKEEPING_FRAC`` of all cells are never markers.

    Parameters
    ----------
    counts
        Reference cells x genes (raw counts or log-normalised), sparse or dense.
    genes
        Gene symbol of each column (``None`` for an unmapped column, never a marker).
    labels
        One label per cell; at least two distinct labels.
    n_pos, n_neg
        Maximum numbers of positive and negative markers per label.
    min_frac
        Minimum fraction of the label's cells expressing a positive marker.

    Returns
    -------
    dict
        ``{label: {"positive": [...], "negative": [...]}}`` in sorted label order.
    """
    X = as_csr(counts)
    genes = list(genes)
    if len(genes) != X.shape[1]:
        raise InputError(f"Got {len(genes)} gene names for {X.shape[1]} columns.", fix="Give one gene name per column.", field="genes")
    names, codes = _label_codes(labels, X.shape[0])
    frac, mrank = _group_stats(X, rank_scores(X), codes, len(names))
    overall = np.asarray((X > 0).sum(axis=0)).ravel() / max(X.shape[0], 1)
    eligible = np.array([g is not None and not _EXCLUDED.match(str(g)) for g in genes], dtype=bool)
    eligible &= overall <= HOUSEKEEPING_FRAC
    delta = frac - _max_other(frac)
    tie = mrank - _max_other(mrank)
    positives: list[np.ndarray] = []
    for k in range(len(names)):
        ok = np.flatnonzero(eligible & (frac[k] >= min_frac) & (delta[k] >= MIN_DELTA))
        order = np.lexsort((-tie[k, ok], -np.round(delta[k, ok], 2)))
        positives.append(ok[order])
    out: dict[str, dict[str, list[str]]] = {}
    for k, name in enumerate(names):
        cand, turn, gap = [], [], []
        for j in range(len(names)):
            if j == k:
                continue
            g = positives[j]
            g = g[(frac[j, g] >= NEG_MIN_FRAC_OUT) & (frac[k, g] < NEG_MAX_FRAC_IN)]
            cand.append(g)
            turn.append(np.arange(len(g)))
            gap.append(frac[j, g] - frac[k, g])
        cand_a, turn_a, gap_a = (np.concatenate(a) if a else np.zeros(0) for a in (cand, turn, gap))
        neg = list(dict.fromkeys(cand_a[np.lexsort((-gap_a, turn_a))].astype(np.int64).tolist()))
        out[str(name)] = {
            "positive": [str(genes[i]) for i in positives[k][:n_pos]],
            "negative": [str(genes[i]) for i in neg[:n_neg]],
        }
    return out


def merge_markers(
    curated: Mapping[str, Mapping[str, Sequence[str]]],
    derived: Mapping[str, Mapping[str, Sequence[str]]],
    label_map: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Union of curated and reference-derived marker sets, per label.

    Parameters
    ----------
    curated, derived
        ``{label: {"positive": [...], "negative": [...]}}``.
    label_map
        Optional renaming of derived labels to curated ones (e.g. ``{"CD14+ Mono":
        "CD14 monocyte"}``); derived sets mapped to the same label are united.

    Returns
    -------
    dict
        ``{label: {"positive", "negative", "sources"}}``: curated genes first, then
        derived ones, without duplicates; ``sources[gene]`` is ``"curated"``,
        ``"reference"`` or ``"curated+reference"``. Curated knowledge wins a conflict:
        a derived gene whose sign contradicts the curated set is left out. Curated
        labels come first, in their order, then labels known only from the reference.
    """
    label_map = dict(label_map or {})
    der: dict[str, dict[str, list[str]]] = {}
    for lab, entry in derived.items():
        tgt = der.setdefault(label_map.get(lab, lab), {"positive": [], "negative": []})
        for side in ("positive", "negative"):
            tgt[side] += [g for g in entry.get(side, []) if g not in tgt[side]]
    out: dict[str, dict[str, Any]] = {}
    for lab in list(curated) + [lab for lab in der if lab not in curated]:
        c = curated.get(lab, {})
        d = der.get(lab, {"positive": [], "negative": []})
        c_pos, c_neg = list(c.get("positive", [])), list(c.get("negative", []))
        pos = list(dict.fromkeys(c_pos + [g for g in d["positive"] if g not in c_neg]))
        neg = list(dict.fromkeys(c_neg + [g for g in d["negative"] if g not in pos]))
        sources: dict[str, str] = {}
        for g in pos + neg:
            in_c = g in c_pos or g in c_neg
            in_d = (g in d["positive"] and g in pos) or (g in d["negative"] and g in neg)
            sources[g] = "curated+reference" if in_c and in_d else ("curated" if in_c else "reference")
        out[lab] = {"positive": pos, "negative": neg, "sources": sources}
    return out
