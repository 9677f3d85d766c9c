"""Per-cell QC metrics and marker dot-plot statistics computed from the uploaded counts.

Pure functions over plain arrays: no HTTP, no session state. Marker choice and expression
scaling are shared with the Python plots (:mod:`cellatlas.tl`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from cellatlas.io_qc import cell_qc, mito_mask  # one definition, shared with the engine's per-cell QC


@dataclass
class QCFlags:
    """Per-cell QC metrics and flags. Cells are flagged, never removed.

    Attributes
    ----------
    total_counts, mito_fraction
        Per-cell sums over all genes and the share of mitochondrial (``MT-``) genes
        (``NaN`` when the data have no mitochondrial genes).
    qc_pass
        ``True`` where the cell passes every filter that was set.
    reasons
        ``""``, ``"low_counts"``, ``"high_mito"`` or ``"low_counts;high_mito"``.
    summary
        JSON-ready dict: thresholds, counts of flagged cells, notes.
    """

    total_counts: np.ndarray
    mito_fraction: np.ndarray
    qc_pass: np.ndarray
    reasons: np.ndarray
    summary: dict[str, Any]


def qc_flags(
    X: sp.spmatrix | np.ndarray,
    genes: Sequence[str],
    symbols: Sequence[str | None] | None = None,
    *,
    min_counts: float | None = None,
    max_mito_fraction: float | None = None,
) -> QCFlags:
    """Compute total counts and mitochondrial fraction per cell and flag cells outside the limits.

    Parameters
    ----------
    X
        Cells x genes matrix as uploaded (raw counts expected).
    genes, symbols
        Input gene names and, optionally, their mapped HGNC symbols (``None`` = unmapped).
    min_counts
        Flag cells whose total counts are below this (``None``: no count filter).
    max_mito_fraction
        Flag cells whose mitochondrial fraction is above this, in [0, 1] (``None``: no filter).
        If the data contain no mitochondrial genes the filter cannot apply; this is said in
        ``summary["notes"]`` and no cell is flagged for it.
    """
    X = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
    mask = mito_mask(genes, symbols)
    facts = cell_qc(X, mask)
    total = facts.total_counts.astype(np.float64)
    frac = facts.pct_mito.astype(np.float64) / 100.0
    notes: list[str] = []
    if not mask.any() and max_mito_fraction is not None:
        notes.append("No mitochondrial (MT-) genes in the data: the mitochondrial filter was not applied.")
    low = total < min_counts if min_counts is not None else np.zeros(X.shape[0], bool)
    high = (frac > max_mito_fraction) if (max_mito_fraction is not None and mask.any()) else np.zeros(X.shape[0], bool)
    reasons = np.array(
        [";".join(r for r, f in (("low_counts", lo), ("high_mito", hi)) if f) for lo, hi in zip(low, high)], dtype=object
    )
    summary = {
        "min_counts": min_counts,
        "max_mito_fraction": max_mito_fraction,
        "n_mito_genes": int(mask.sum()),
        "n_flagged": int((low | high).sum()),
        "n_low_counts": int(low.sum()),
        "n_high_mito": int(high.sum()),
        "median_total_counts": float(np.median(total)) if total.size else 0.0,
        "median_mito_fraction": float(np.nanmedian(frac)) if mask.any() and total.size else None,
        "notes": notes,
    }
    return QCFlags(total, frac, ~(low | high), reasons, summary)


def dotplot_stats(expr: sp.csr_matrix, groups: Sequence[str], order: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per group: fraction of cells expressing each gene and the mean expression.

    Parameters
    ----------
    expr
        Cells x genes expression (e.g. from :func:`cellatlas.tl.expression_for_genes`).
    groups
        Group (label) of each cell.
    order
        Groups to report, one row each (a group with no cells gets zeros).

    Returns
    -------
    fraction, mean
        Arrays of shape ``[len(order), n_genes]``.
    """
    groups = np.asarray(groups, dtype=object)
    index = {g: i for i, g in enumerate(order)}
    rows = np.array([index.get(g, -1) for g in groups])
    keep = rows >= 0
    onehot = sp.csr_matrix(
        (np.ones(int(keep.sum()), np.float32), (rows[keep], np.flatnonzero(keep))), shape=(len(order), expr.shape[0])
    )
    n = np.asarray(onehot.sum(axis=1)).ravel()
    n_safe = np.where(n > 0, n, 1)[:, None]
    positive = expr.copy()
    positive.data = (positive.data > 0).astype(np.float32)
    frac = np.asarray((onehot @ positive).todense()) / n_safe
    mean = np.asarray((onehot @ expr).todense()) / n_safe
    return frac, mean
