"""Per-cell QC facts and the rule that leaves cells without enough information unassigned.

:func:`cell_qc` reads the input columns of a block of cells (all genes the user sent,
not only those an atlas knows): total counts, genes detected, and the percentage of
counts in mitochondrial genes. :func:`unassigned_reasons` turns those facts, plus the
counts a cell has in the genes the atlas reads, into a reason per cell that is too
empty to call (``""`` for the rest). ``annotate`` applies it once after scoring: such a
cell gets the label ``"Unassigned"``, confidence 0 (band ``low``) and its reason, in its
place in the input order, instead of the nearest label.

The minimum (documented in README and docs/DESIGN.md): every all-zero cell; for count
data (``values == "counts"``) fewer than :data:`MIN_COUNTS` counts; fewer than
:data:`MIN_GENES` genes detected; no count in the genes the atlas reads. For
log-normalised or TPM-like input the total is not a count, so only the gene and atlas
rules apply there.

:func:`doublet_scores` is scanpy's scrublet, optional (``annotate(..., doublets=True)``)
because it simulates doublets and searches exact neighbours: 3-6 ms a cell on
two cores, scored in blocks of :data:`DOUBLET_BLOCK` cells.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp

__all__ = [
    "CellQC", "cell_qc", "doublet_scores", "mito_mask", "unassigned_reasons",
    "DOUBLET_BLOCK", "MIN_COUNTS", "MIN_DOUBLET_CELLS", "MIN_GENES", "UNASSIGNED",
]

UNASSIGNED = "Unassigned"
MIN_COUNTS = 10
"""Count data: a cell with fewer counts over all its genes is not called."""
MIN_GENES = 5
"""A cell with fewer genes detected is not called."""
MIN_DOUBLET_CELLS = 100
"""scrublet needs a population to simulate doublets from; smaller blocks get NaN."""
DOUBLET_BLOCK = 20_000
"""Cells scored together by scrublet (exact neighbours: memory and time grow with the block)."""
MITO_PREFIXES = ("MT-",)


@dataclass
class CellQC:
    """QC facts of a block of cells, one entry per cell (``pct_mito`` NaN where the data have no MT- genes)."""

    total_counts: np.ndarray
    n_genes: np.ndarray
    pct_mito: np.ndarray


def mito_mask(genes: Sequence[str], symbols: Sequence[str | None] | None = None) -> np.ndarray:
    """Boolean mask of mitochondrial genes (``MT-``/``mt-`` prefix on the symbol or the input name)."""
    names = [str(s) if s else str(g) for g, s in zip(genes, symbols)] if symbols is not None else [str(g) for g in genes]
    return np.array([n.upper().startswith(MITO_PREFIXES) for n in names], dtype=bool)


def cell_qc(X: sp.csr_matrix, mito: np.ndarray) -> CellQC:
    """Total counts, genes detected and percent mitochondrial counts of every row of ``X``.

    Parameters
    ----------
    X
        Cells x input columns (count-like values; never modified). Duplicate entries of a
        gene in a row count as one gene.
    mito
        Boolean mask of the mitochondrial columns (:func:`mito_mask`).
    """
    if not isinstance(X, sp.csr_matrix):  # a CSR block is read as it is: re-wrapping copies a view's arrays
        X = sp.csr_matrix(X)
    if _has_duplicates(X):
        X = X.copy()
        X.sum_duplicates()
    total = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    n_genes = np.diff(X.indptr).astype(np.int32)
    if X.nnz and not X.data.all():  # stored zeros are not genes detected
        zero_rows = np.searchsorted(X.indptr, np.flatnonzero(X.data == 0), side="right") - 1
        n_genes -= np.bincount(zero_rows, minlength=X.shape[0]).astype(np.int32)
    if mito.any():
        mt = np.asarray(X @ mito.astype(np.float32), dtype=np.float64).ravel()
        pct = np.where(total > 0, 100.0 * mt / np.where(total > 0, total, 1.0), 0.0)
    else:
        pct = np.full(X.shape[0], np.nan)
    return CellQC(total.astype(np.float32), n_genes, pct.astype(np.float32))


def _has_duplicates(X: sp.csr_matrix) -> bool:
    """Whether some row names a column twice, without copying the matrix.

    Sorted rows are checked in one pass (scipy's own check, on the arrays: a new matrix
    object over a block's views would copy them); unsorted ones (e.g. 10x v1 matrices
    converted from R) by one stable sort of ``row * n_cols + column`` keys, nearly linear
    because rows come in order.
    """
    n, indptr, indices = X.shape[0], X.indptr, X.indices
    if indptr.dtype != indices.dtype:
        indptr = indptr.astype(indices.dtype)
    try:
        from scipy.sparse import _sparsetools

        if _sparsetools.csr_has_canonical_format(n, indptr, indices):
            return False
        if _sparsetools.csr_has_sorted_indices(n, indptr, indices):
            return True  # sorted but not strictly increasing
    except (ImportError, AttributeError, TypeError, ValueError):  # pragma: no cover - scipy's private helpers moved
        pass
    wide = np.int32 if n * X.shape[1] < 2**31 else np.int64
    key = np.repeat(np.arange(n, dtype=wide) * wide(X.shape[1]), np.diff(indptr))
    key += indices
    key.sort(kind="stable")
    return bool((key[1:] == key[:-1]).any())


def unassigned_reasons(qc: CellQC, atlas_counts: np.ndarray, *, values: str = "counts") -> np.ndarray:
    """Why each cell is left unassigned (``""``: it is called), first rule that applies.

    Parameters
    ----------
    qc
        From :func:`cell_qc`.
    atlas_counts
        Per cell, the counts in the genes the atlas (or model) reads.
    values
        What the input holds (:func:`cellatlas.io.detect_values`); the count minimum
        applies to ``"counts"`` only.
    """
    total, genes = np.asarray(qc.total_counts), np.asarray(qc.n_genes)
    out = np.full(len(total), "", dtype=object)
    rules = [
        (np.asarray(atlas_counts) <= 0, "no counts in the genes the atlas reads"),
        (genes < MIN_GENES, f"fewer than {MIN_GENES} genes detected"),
    ]
    if values == "counts":
        rules.insert(0, (total < MIN_COUNTS, f"fewer than {MIN_COUNTS} counts"))
    rules.insert(0, (total <= 0, "no counts (all-zero cell)"))
    for hit, reason in reversed(rules):  # the first rule in the list wins
        out[hit] = reason
    return out


def doublet_scores(X: sp.csr_matrix, *, seed: int = 0, block: int = DOUBLET_BLOCK) -> tuple[np.ndarray, str | None]:
    """scrublet doublet score per cell (NaN where not computed) and a note saying why, if any.

    Cells are scored in consecutive blocks of at most ``block`` (scrublet simulates doublets
    within the block); blocks under :data:`MIN_DOUBLET_CELLS` cells, and every cell when
    scanpy's scrublet cannot run here, get NaN.
    """
    n = X.shape[0]
    out = np.full(n, np.nan, dtype=np.float32)
    try:
        import anndata as ad
        import scanpy as sc
    except ImportError as e:  # pragma: no cover - scanpy is a core dependency
        return out, f"doublet scores not computed: {e}"
    notes = []
    k = max(1, -(-n // block))
    bounds = np.linspace(0, n, k + 1).round().astype(int)
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a < MIN_DOUBLET_CELLS:
            notes.append(f"cells {a}-{b - 1}: fewer than {MIN_DOUBLET_CELLS} cells, no doublet score")
            continue
        sub = ad.AnnData(sp.csr_matrix(X[a:b], dtype=np.float32))
        try:
            # threshold given: scanpy would otherwise need scikit-image to pick one; only the score is kept
            # (its doublet-rate summary divides by zero when nothing passes the threshold: not used here).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                sc.pp.scrublet(sub, random_state=seed, threshold=0.25, use_approx_neighbors=False, verbose=False)
        except Exception as e:  # scrublet fails on degenerate blocks (e.g. too few genes for its PCA)
            notes.append(f"cells {a}-{b - 1}: scrublet failed ({type(e).__name__}: {e})")
            continue
        out[a:b] = sub.obs["doublet_score"].to_numpy(np.float32)
    return out, "; ".join(notes) or None
