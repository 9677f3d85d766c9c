"""Build the one query object every later step reads: counts + mapped genes + report.

``prepare_query`` validates the matrix (``io``), detects what its values are
(counts, log-normalised, scaled), maps gene identifiers to approved human symbols
(``genes``) and merges columns that map to the same symbol (summing their
counts). Unmapped columns cannot be read by any atlas; they are counted and named
in the gene report, never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from cellatlas import io as cio
from cellatlas.errors import InputError
from cellatlas.genes import map_genes


@dataclass
class Query:
    """Cells x genes counts on unique approved human symbols, with the gene report."""

    counts: sp.csr_matrix
    genes: list[str]
    cell_ids: np.ndarray
    report: dict[str, Any] = field(default_factory=dict)
    mapping: Any = None
    """The :class:`~cellatlas.genes.GeneMapping` of the input columns (for diagnoses)."""

    @property
    def n_cells(self) -> int:
        return int(self.counts.shape[0])

    def subset(self, rows: slice | np.ndarray) -> "Query":
        return Query(self.counts[rows], self.genes, self.cell_ids[rows], self.report, self.mapping)


@lru_cache(maxsize=32)
def _map_cached(genes: tuple[str, ...], species: str | None):
    """Gene mapping is a pure function of the names: chunked requests reuse it."""
    return map_genes(list(genes), species=species)


def _is_anndata(x) -> bool:
    return type(x).__name__ == "AnnData" and hasattr(x, "obs_names")


def prepare_query(
    X,
    genes: Sequence[str] | None = None,
    cell_ids: Sequence[str] | None = None,
    *,
    layer: str | None = None,
    use_raw: bool | None = None,
    species: str | None = None,
) -> Query:
    """Validate, normalise identifiers and merge duplicates.

    Parameters
    ----------
    X
        AnnData, scipy sparse matrix or dense array (cells x genes), raw counts preferred.
    genes
        Gene identifiers for the columns (symbols or Ensembl ids, human or mouse);
        taken from ``var_names`` when ``X`` is AnnData.
    cell_ids
        Identifiers for the rows (default: ``obs_names`` or ``0..n-1``).
    layer, use_raw
        Which AnnData matrix to read (see :func:`cellatlas.io.counts_from_adata`).
    species
        Force ``"human"`` or ``"mouse"`` instead of detecting it.
    """
    source = "matrix"
    if _is_anndata(X):
        X, adata_genes, adata_cells, source = cio.counts_from_adata(X, layer=layer, use_raw=use_raw)
        genes = adata_genes if genes is None else genes
        cell_ids = adata_cells if cell_ids is None else cell_ids
    if genes is None:
        raise InputError("No gene names were given.", fix="Pass genes=[...] with one identifier per column.", field="genes")
    genes = [str(g) for g in genes]
    counts = cio.validate_matrix(X, genes, cell_ids)
    n = counts.shape[0]
    if cell_ids is None:
        cell_ids = np.arange(n).astype(str)
    cell_ids = np.asarray(cell_ids).astype(str).astype(object)
    if len(cell_ids) != n:
        raise InputError(
            f"{len(cell_ids)} cell ids for {n} cells.", fix="Pass one cell id per matrix row.", field="cell_ids"
        )
    values = cio.detect_values(counts)
    counts = cio.to_counts_like(counts, values)

    mapping = _map_cached(tuple(genes), species)
    symbols = mapping.symbols
    keep = np.array([sym is not None for sym in symbols])
    unique, first, inverse = np.unique(
        np.asarray([sym for sym in symbols if sym is not None], dtype=object), return_index=True, return_inverse=True
    )
    cols = np.nonzero(keep)[0]
    merged = counts[:, cols[first]].tocsr()  # one column per symbol (its first column)
    extra = np.setdiff1d(np.arange(len(cols)), first)
    if len(extra):  # columns mapping to an already taken symbol are summed into it
        agg = sp.csr_matrix(
            (np.ones(len(extra), dtype=np.float32), (np.arange(len(extra)), inverse[extra])), shape=(len(extra), len(unique))
        )
        merged = (merged + counts[:, cols[extra]] @ agg).tocsr()
    report = dict(mapping.report())
    report.update(
        {
            "matrix_source": source,
            "values": values,
            "n_cells": int(n),
            "n_genes_input": len(genes),
            "n_genes_used": int(len(unique)),
            "n_genes_unmapped": int((~keep).sum()),
            "n_columns_merged": int(len(extra)),
        }
    )
    return Query(merged, [str(g) for g in unique], cell_ids, report, mapping)
