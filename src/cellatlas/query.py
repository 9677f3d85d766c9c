"""Build the one query object every later step reads: counts + mapped genes + report.

``prepare_query`` validates the matrix (``io``), detects what its values are
(counts, log-normalised, scaled), maps gene identifiers to approved human symbols
(``genes``) and merges columns that map to the same symbol (summing their
counts). Unmapped columns cannot be read by any atlas; they are counted and named
in the gene report, never dropped silently.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from cellatlas import io as cio
from cellatlas.errors import InputError
from cellatlas.genes import map_genes
from cellatlas.io_genecheck import check_gene_list, skipped_check
from cellatlas.io_qc import CellQC, cell_qc, mito_mask
from cellatlas.sparse import ColumnPlan, row_block


@dataclass
class Query:
    """Validated input counts, their mapping to unique approved human symbols, and the gene report.

    The input matrix is kept as sent (``raw``, input columns); ``colmap`` maps each
    input column to its symbol in ``genes`` (``-1``: unmapped). Readers take only the
    columns they need with :meth:`plan` / :meth:`take`; :attr:`counts` is the full
    merged matrix, built on first use.
    """

    raw: sp.csr_matrix
    colmap: np.ndarray
    genes: list[str]
    cell_ids: np.ndarray
    report: dict[str, Any] = field(default_factory=dict)
    mapping: Any = None
    """The :class:`~cellatlas.genes.GeneMapping` of the input columns (for diagnoses)."""

    @property
    def n_cells(self) -> int:
        return int(self.raw.shape[0])

    @cached_property
    def counts(self) -> sp.csr_matrix:
        """Canonical CSR counts over :attr:`genes` (merged columns summed)."""
        return ColumnPlan.from_colmap(self.colmap, len(self.genes)).apply(self.raw)

    @cached_property
    def mito(self) -> np.ndarray:
        """Boolean mask of the mitochondrial input columns."""
        if self.mapping is None:
            return np.zeros(self.raw.shape[1], dtype=bool)
        return mito_mask(self.mapping.genes, self.mapping.symbols)

    def qc(self, start: int = 0, stop: int | None = None) -> CellQC:
        """Per-cell QC facts (:func:`cellatlas.io_qc.cell_qc`) of rows ``start:stop`` over every input column."""
        stop = self.n_cells if stop is None else stop
        return cell_qc(row_block(self.raw, start, stop), self.mito)

    def plan(self, gene_cols: np.ndarray) -> ColumnPlan:
        """How to read the symbols at positions ``gene_cols`` of :attr:`genes` from the input columns."""
        to_out = np.full(len(self.genes), -1, dtype=np.int64)
        to_out[np.asarray(gene_cols, dtype=np.int64)] = np.arange(len(gene_cols))
        mapped = self.colmap >= 0
        colmap = np.where(mapped, to_out[np.where(mapped, self.colmap, 0)], -1)
        return ColumnPlan.from_colmap(colmap, len(gene_cols))

    def take(self, plan: ColumnPlan, start: int = 0, stop: int | None = None) -> sp.csr_matrix:
        """Rows ``start:stop`` read through ``plan`` (from :meth:`plan`)."""
        stop = self.n_cells if stop is None else stop
        return plan.apply(row_block(self.raw, start, stop))

    def subset(self, rows: slice | np.ndarray) -> "Query":
        return Query(self.raw[rows], self.colmap, self.genes, self.cell_ids[rows], self.report, self.mapping)


@lru_cache(maxsize=32)
def _map_cached(genes: tuple[str, ...], species: str | None):
    """Gene mapping and its report are pure functions of the names: chunked requests reuse them."""
    mapping = map_genes(list(genes), species=species)
    return mapping, mapping.report()


@lru_cache(maxsize=32)
def _symbol_columns(symbols: tuple[str | None, ...]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Column map input column -> merged column (-1: unmapped) and the merged symbols.

    Symbols keep the order of their first column, so selecting symbols keeps the
    input's column order (no re-sorting of rows).
    """
    position: dict[str, int] = {}
    colmap = np.full(len(symbols), -1, dtype=np.int64)
    for j, sym in enumerate(symbols):
        if sym is not None:
            colmap[j] = position.setdefault(sym, len(position))
    colmap.flags.writeable = False
    return colmap, tuple(position)


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
    skip_gene_check: bool = False,
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
    skip_gene_check
        Do not check that the gene names belong to the matrix columns
        (:func:`cellatlas.io_genecheck.check_gene_list`); for targeted panels or sorted
        populations without housekeeping genes. The gene report says it was skipped.

    Raises
    ------
    GeneListMismatchError
        The gene list looks shifted, reversed, shuffled or taken from another dataset
        (a weaker mismatch is a warning in ``report["gene_check"]``).
    """
    source = "matrix"
    if _is_anndata(X):
        X, adata_genes, adata_cells, source = cio.counts_from_adata(X, layer=layer, use_raw=use_raw, canonical=False)
        genes = adata_genes if genes is None else genes
        cell_ids = adata_cells if cell_ids is None else cell_ids
    if genes is None:
        raise InputError("No gene names were given.", fix="Pass genes=[...] with one identifier per column.", field="genes")
    genes = [str(g) for g in genes]
    counts = cio.validate_matrix(X, genes, cell_ids, canonical=False)
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

    mapping, mapping_report = _map_cached(tuple(genes), species)
    colmap, unique = _symbol_columns(tuple(mapping.symbols))
    n_kept = int((colmap >= 0).sum())
    check = skipped_check() if skip_gene_check else check_gene_list(counts, mapping.symbols)
    check.raise_for_error()
    if check.verdict == "warning":
        warnings.warn(f"{check.message} {check.fix}", UserWarning, stacklevel=2)
    report = copy.deepcopy(mapping_report)
    report.update(
        {
            "matrix_source": source,
            "values": values,
            "n_cells": int(n),
            "n_genes_input": len(genes),
            "n_genes_used": int(len(unique)),
            "n_genes_unmapped": int(len(genes) - n_kept),
            "n_columns_merged": int(n_kept - len(unique)),
            "gene_check": check.report(),
        }
    )
    return Query(counts, colmap, list(unique), cell_ids, report, mapping)
