"""Build the one query object every later step reads: counts + mapped genes + report.

``prepare_query`` validates the matrix (``io``), detects what its values are
(counts, log-normalised, scaled), maps gene identifiers to approved human symbols
(``genes``) and merges columns that map to the same symbol (summing their
counts). Unmapped columns cannot be read by any atlas; they are counted and named
in the gene report, never dropped silently.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
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
    mito_columns: np.ndarray | None = field(default=None, repr=False)
    """Mask of the mitochondrial input columns when already known (a dataset's blocks share it)."""

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
        if self.mito_columns is not None:
            return self.mito_columns
        if self.mapping is None:
            return np.zeros(self.raw.shape[1], dtype=bool)
        return mito_mask(self.mapping.genes, self.mapping.symbols)

    def qc(self, start: int = 0, stop: int | None = None) -> CellQC:
        """Per-cell QC facts (:func:`cellatlas.io_qc.cell_qc`) of rows ``start:stop`` over every input column."""
        stop = self.n_cells if stop is None else stop
        return cell_qc(row_block(self.raw, start, stop), self.mito)

    def plan(self, gene_cols: np.ndarray) -> ColumnPlan:
        """How to read the symbols at positions ``gene_cols`` of :attr:`genes` from the input columns."""
        return column_plan(self.colmap, len(self.genes), gene_cols)

    def take(self, plan: ColumnPlan, start: int = 0, stop: int | None = None) -> sp.csr_matrix:
        """Rows ``start:stop`` read through ``plan`` (from :meth:`plan`)."""
        stop = self.n_cells if stop is None else stop
        return plan.apply(row_block(self.raw, start, stop))

    def subset(self, rows: slice | np.ndarray) -> "Query":
        return Query(self.raw[rows], self.colmap, self.genes, self.cell_ids[rows], self.report, self.mapping, self.mito)


def column_plan(colmap: np.ndarray, n_genes: int, gene_cols: np.ndarray) -> ColumnPlan:
    """How to read the symbols at positions ``gene_cols`` (of ``n_genes`` merged symbols) from input columns
    mapped by ``colmap`` (input column -> symbol, ``-1``: unmapped)."""
    to_out = np.full(n_genes + 1, -1, dtype=np.int64)  # last entry: where unmapped columns point
    to_out[np.asarray(gene_cols, dtype=np.int64)] = np.arange(len(gene_cols))
    return ColumnPlan.from_colmap(to_out[np.where(colmap >= 0, colmap, n_genes)], len(gene_cols))


@dataclass(frozen=True)
class GeneSpace:
    """Input gene names, validated and mapped once: what every chunk of the same columns shares.

    Gene mapping depends only on the names, so a file read in chunks, a Dask array's
    blocks and repeated requests with the same genes all reuse one ``GeneSpace``.
    """

    names: tuple[str, ...]
    """The input column names, as validated."""
    colmap: np.ndarray
    """Input column -> position in :attr:`genes` (``-1``: unmapped)."""
    genes: tuple[str, ...]
    """Unique approved symbols, in the order of their first input column."""
    mapping: Any
    report: dict[str, Any]
    """Mapping report plus the column counts (``n_genes_input``, ``n_genes_used``, ...)."""

    @cached_property
    def mito(self) -> np.ndarray:
        """Mask of the mitochondrial input columns (read-only; computed once per gene list)."""
        mask = mito_mask(self.mapping.genes, self.mapping.symbols)
        mask.flags.writeable = False
        return mask


def _stored_mapping(names: tuple[str, ...], species: str | None):
    """:func:`map_genes` of ``names``, kept on disk (``CELLATLAS_HOME/cache/genes``) for the next process.

    Loading the packaged gene tables costs most of a second per process; a dataset's
    gene list (a 10x panel, a lab's reference) recurs from run to run, so its mapping is
    stored under a hash of the names, the species and the tables' manifest. Anything
    unreadable is recomputed; an unwritable home only skips the store. The key also
    covers the mapping code (``genes.py``, ``gene_tables.py``), so a changed rule is never
    answered from an old store.
    """
    import hashlib
    import pickle

    from cellatlas.config import get_settings
    from cellatlas.gene_tables import TABLE_DIR

    from cellatlas import gene_tables, genes

    h = hashlib.sha256((TABLE_DIR / "manifest.json").read_bytes())
    for code in (genes.__file__, gene_tables.__file__):  # the mapping rules, as well as the tables
        h.update(Path(code).read_bytes())
    h.update(repr((species, _MAPPING_FORMAT)).encode())
    h.update("\0".join(names).encode("utf-8", "surrogatepass"))
    path = get_settings().home / "cache" / "genes" / f"{h.hexdigest()[:32]}.pkl"
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except Exception:  # noqa: BLE001 - missing, truncated or from another version: recompute
        pass
    mapping = map_genes(list(names), species=species)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(pickle.dumps(mapping, protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(tmp, path)
    except OSError:
        pass
    return mapping


_MAPPING_FORMAT = 1
"""Bump when GeneMapping changes shape: stored mappings of another format are not read."""


@lru_cache(maxsize=32)
def _gene_space(names: tuple[str, ...], species: str | None) -> GeneSpace:
    mapping = _stored_mapping(names, species)
    colmap, unique = _symbol_columns(tuple(mapping.symbols))
    n_kept = int((colmap >= 0).sum())
    report = mapping.report()
    report.update(
        {
            "n_genes_input": len(names),
            "n_genes_used": int(len(unique)),
            "n_genes_unmapped": int(len(names) - n_kept),
            "n_columns_merged": int(n_kept - len(unique)),
        }
    )
    return GeneSpace(names, colmap, unique, mapping, report)


def gene_space(genes: Sequence[str], species: str | None = None) -> GeneSpace:
    """Validate gene names and map them to approved human symbols (cached per name list).

    Raises
    ------
    InputError
        Empty, duplicated or non-string names (see :func:`cellatlas.io.validate_genes`).
    """
    if genes is None:
        raise InputError("No gene names were given.", fix="Pass genes=[...] with one identifier per column.", field="genes")
    return _gene_space(tuple(cio.validate_genes(genes)), species)


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
    space: GeneSpace | None = None,
    values: tuple[str, float | None] | None = None,
    row0: int = 0,
    gene_check: Any = None,
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
        Which AnnData matrix to read (see :func:`cellatlas.io.choose_matrix`).
    species
        Force ``"human"`` or ``"mouse"`` instead of detecting it.
    skip_gene_check
        Do not check that the gene names belong to the matrix columns
        (:func:`cellatlas.io_genecheck.check_gene_list`); for targeted panels or sorted
        populations without housekeeping genes. The gene report says it was skipped.
    space
        The columns' :class:`GeneSpace` when already mapped (chunks of one dataset);
        ``genes`` and ``species`` are then not read.
    values
        ``(kind, log_base)`` when already detected on the whole dataset (chunks: every
        chunk is then converted alike); detected on this matrix otherwise.
    row0
        Row of the first cell in the whole dataset (error messages name that row).
    gene_check
        The :class:`~cellatlas.io_genecheck.GeneCheck` of the whole dataset (chunks: checked
        once, on the value-detection sample); run on this matrix otherwise.

    Raises
    ------
    GeneListMismatchError
        The gene list looks shifted, reversed, shuffled or taken from another dataset
        (a weaker mismatch is a warning in ``report["gene_check"]``).
    """
    source = "matrix"
    if _is_anndata(X):
        adata = X
        X, adata_genes, source = cio.choose_matrix(adata, layer=layer, use_raw=use_raw)  # validated once, below
        genes = adata_genes if genes is None else genes
        cell_ids = adata.obs_names if cell_ids is None else cell_ids
    if space is None:
        space = gene_space(genes, species)
    counts = cio.validate_matrix(X, space.names, cell_ids, canonical=False, genes_valid=True, row0=row0)
    n = counts.shape[0]
    cell_ids = np.arange(row0, row0 + n).astype(str).astype(object) if cell_ids is None else np.asarray(cell_ids).astype(str).astype(object)
    if values is None:
        kind = cio.detect_values(counts)
        values = (kind, cio.detect_log_base(counts) if kind == "lognorm" else None)
    counts = cio.to_counts_like(counts, values[0], values[1])
    if gene_check is None:
        gene_check = run_gene_check(counts, space, skip_gene_check)
    report = copy.deepcopy(space.report)
    report.update({"matrix_source": source, "values": values[0], "n_cells": int(n), "gene_check": gene_check.report()})
    return Query(counts, space.colmap, list(space.genes), cell_ids, report, space.mapping, space.mito)


def run_gene_check(counts: sp.csr_matrix, space: GeneSpace, skip: bool = False):
    """The gene-list check of counts over ``space``'s columns: raises on a mismatch, warns on a weak one."""
    check = skipped_check() if skip else check_gene_list(counts, space.mapping.symbols)
    check.raise_for_error()
    if check.verdict == "warning":
        warnings.warn(f"{check.message} {check.fix}", UserWarning, stacklevel=3)
    return check
