"""Input: reading files, validating matrices, detecting what the values are.

Every door (Python, CLI, HTTP, browser) funnels user data through this module:

- :func:`read` turns a file (``.h5ad``, 10x ``.h5``, a 10x ``.mtx`` directory or a
  ``.zip`` of one, ``.csv``/``.tsv``) into an :class:`anndata.AnnData`.
- :func:`counts_from_adata` / :func:`choose_matrix` pick the counts matrix of an
  AnnData (``X``, ``.raw`` or a layer) and say which one was used.
- :func:`validate_matrix` / :func:`validate_csr_arrays` check a matrix and return a
  canonical float32 CSR, raising :class:`~cellatlas.errors.InputError` (with
  ``field`` and ``fix``) for anything malformed.
- :func:`detect_values` tells raw counts from log-normalised, scaled or TPM-like
  values (:func:`detect_log_base` finds the log base); :func:`to_counts_like`
  undoes the log; :func:`prepare_counts` chains validation, detection and
  conversion.

Dense input is processed in chunks of rows (:func:`iter_chunks`, size
``Settings.chunk_size``): no more than one chunk is ever densified or up-cast.
The CSR-array and value-detection helpers live in :mod:`cellatlas.io_values`.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from cellatlas.config import get_settings
from cellatlas.sparse import canonicalize
from cellatlas.errors import InputError
from cellatlas.io_values import (
    RAW_FIX,
    VALUE_KINDS,
    as_matrix_like,
    detect_log_base,
    detect_values,
    to_counts_like,
    validate_csr_arrays,
)

__all__ = [
    "read",
    "choose_matrix",
    "counts_from_adata",
    "validate_matrix",
    "validate_genes",
    "validate_csr_arrays",
    "detect_values",
    "detect_log_base",
    "to_counts_like",
    "prepare_counts",
    "iter_chunks",
    "VALUE_KINDS",
]

_COUNTS_LAYERS = ("counts", "raw_counts")


# --------------------------------------------------------------------------- chunks
def iter_chunks(n: int, size: int | None = None) -> Iterator[slice]:
    """Yield consecutive row slices covering ``range(n)``.

    Parameters
    ----------
    n
        Number of rows (cells).
    size
        Rows per chunk; default ``get_settings().chunk_size`` (the one place the
        chunk size is configured).

    Yields
    ------
    slice
        ``slice(start, stop)`` with ``stop - start <= size``; nothing when ``n == 0``.
    """
    size = get_settings().chunk_size if size is None else int(size)
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for start in range(0, int(n), size):
        yield slice(start, min(start + size, int(n)))


# --------------------------------------------------------------------------- reading
def read(path: str | Path, fmt: str | None = None, *, untrusted: bool = False) -> Any:
    """Read a single-cell file into an AnnData (values as stored in the file).

    Parameters
    ----------
    path
        ``.h5ad``; 10x ``.h5`` (v2 or v3); a directory holding ``matrix.mtx(.gz)`` +
        ``features.tsv(.gz)``/``genes.tsv(.gz)`` + ``barcodes.tsv(.gz)`` (optionally
        with a common file prefix, or in a nested folder); a ``.zip`` of such a
        directory (or of one supported file); ``.csv``/``.tsv``/``.txt`` (``.gz``)
        tables with genes in the header row and cell ids in the first column (the
        genes x cells orientation is detected and transposed, with a warning).
    fmt
        Force a format (``"h5ad"``, ``"10x_h5"``, ``"mtx"``, ``"zip"``, ``"csv"``,
        ``"tsv"``) when the file name carries no usable suffix (e.g. uploads).
        Without it the suffix decides, then the file's leading bytes.
    untrusted
        The file came from someone else (an upload): HDF5 files with links to other files,
        external storage, virtual datasets or datasets declaring more than the data
        justifies are refused before any reader opens them (:func:`cellatlas.io_h5ad.check_hdf5`).

    Returns
    -------
    anndata.AnnData
        Cells x genes. 10x readers put gene symbols in ``var_names`` and Ensembl
        ids in ``var['gene_ids']``. ``uns['cellatlas_io']`` records the format and
        every change made while reading (transposition, renamed duplicate names,
        dropped non-RNA features) in ``notes``; each change is also warned about.

    Raises
    ------
    InputError
        Missing file, unknown format (the message lists supported formats) or a
        file that cannot be parsed (``field="file"``).
    """
    from cellatlas.io_readers import read_any

    adata = read_any(Path(path), fmt, untrusted)
    for note in adata.uns["cellatlas_io"].get("notes", []):
        warnings.warn(f"{Path(path).name}: {note}", UserWarning, stacklevel=2)
    return adata


# --------------------------------------------------------------------------- AnnData
def choose_matrix(adata: Any, layer: str | None = None, use_raw: bool | None = None) -> tuple[Any, list[str], str]:
    """Pick the matrix of ``adata`` that holds counts.

    Parameters
    ----------
    adata
        An :class:`anndata.AnnData`.
    layer
        Use ``adata.layers[layer]`` (with ``adata.var_names``).
    use_raw
        ``True``: ``adata.raw.X`` with ``adata.raw.var_names``; ``False``: ``adata.X``.
        ``None`` (default) chooses: ``X`` if it holds counts; else a layer named
        ``counts``/``raw_counts`` holding counts; else ``.raw`` holding counts; else,
        if ``X`` is scaled (negative values), ``.raw`` whatever it holds (typically
        log-normalised, handled downstream); else ``X``.

    Returns
    -------
    X, genes, source
        The chosen matrix (as stored, not validated), its gene names, and where it
        came from: ``"X"``, ``"raw.X"`` or ``"layers['<name>']"``.

    Raises
    ------
    InputError
        Not an AnnData, unknown layer, ``use_raw=True`` without ``.raw``, both
        ``layer`` and ``use_raw=True``, or (automatic choice) only scaled values.
    """
    if not hasattr(adata, "obs_names") or not hasattr(adata, "layers"):
        raise InputError(
            f"expected an AnnData object, got {type(adata).__name__}", field="adata",
            fix="Pass an anndata.AnnData, or call annotate(X, genes) with a matrix.",
        )
    var_genes = [str(g) for g in adata.var_names]
    if layer is not None:
        if use_raw:
            raise InputError("layer and use_raw=True were both given", field="layer",
                             fix="Choose one: a layer of adata (layer=...) or adata.raw (use_raw=True).")
        if layer not in adata.layers:
            raise InputError(f"adata has no layer {layer!r}; layers: {sorted(adata.layers.keys())}",
                             field="layer", fix="Pass one of the listed layer names, or layer=None.")
        return adata.layers[layer], var_genes, f"layers[{layer!r}]"
    if use_raw:
        if adata.raw is None:
            raise InputError("use_raw=True but adata.raw is not set", field="use_raw",
                             fix="Pass use_raw=None/False, or a layer holding counts (layer='counts').")
        return adata.raw.X, [str(g) for g in adata.raw.var_names], "raw.X"
    if adata.X is None:
        if use_raw is None and adata.raw is not None:
            return adata.raw.X, [str(g) for g in adata.raw.var_names], "raw.X"
        raise InputError("adata.X is empty (None)", field="matrix",
                         fix="Put counts in adata.X, or pass layer=... / use_raw=True.")
    if use_raw is False:
        return adata.X, var_genes, "X"
    return _auto_choose(adata, var_genes)


def _auto_choose(adata: Any, var_genes: list[str]) -> tuple[Any, list[str], str]:
    kind_x = detect_values(adata.X)
    if kind_x == "counts":
        return adata.X, var_genes, "X"
    for name in _COUNTS_LAYERS:
        if name in adata.layers and detect_values(adata.layers[name]) == "counts":
            return adata.layers[name], var_genes, f"layers[{name!r}]"
    raw = adata.raw
    if raw is not None and (kind_x == "scaled" or detect_values(raw.X) == "counts"):
        return raw.X, [str(g) for g in raw.var_names], "raw.X"
    if kind_x == "scaled":
        raise InputError(
            "adata.X holds scaled values (negative numbers) and adata has no .raw and no counts layer "
            f"(layers: {sorted(adata.layers.keys())})", field="matrix",
            fix="Annotate the AnnData as it was before sc.pp.scale (raw counts), or pass layer=... naming "
            "a layer with counts.",
        )
    return adata.X, var_genes, "X"


def counts_from_adata(
    adata: Any, layer: str | None = None, use_raw: bool | None = None, *, canonical: bool = True
) -> tuple[sp.csr_matrix, list[str], list[str], str]:
    """Validated counts matrix of an AnnData plus its gene names, cell ids and source.

    Parameters
    ----------
    adata, layer, use_raw
        As for :func:`choose_matrix`.
    canonical
        As for :func:`validate_matrix`.

    Returns
    -------
    X, genes, cell_ids, source
        ``X`` is the float32 CSR returned by :func:`validate_matrix` (values not yet
        transformed: run :func:`detect_values` / :func:`to_counts_like`);
        ``source`` is ``"X"``, ``"raw.X"`` or ``"layers['<name>']"``.
    """
    X, genes, source = choose_matrix(adata, layer=layer, use_raw=use_raw)
    cell_ids = [str(c) for c in adata.obs_names]
    return validate_matrix(X, genes, cell_ids, canonical=canonical), genes, cell_ids, source


# --------------------------------------------------------------------------- validation
def validate_genes(genes: Any, n_genes: int | None = None) -> list[str]:
    """Check a gene list and return it as a list of ``str``.

    Parameters
    ----------
    genes
        One name per matrix column (list, tuple, numpy array, pandas Index).
        ``bytes`` are decoded as UTF-8.
    n_genes
        Expected length (number of matrix columns); not checked when ``None``.

    Returns
    -------
    list of str

    Raises
    ------
    InputError
        ``field="genes"``: not a sequence, non-string or empty names, duplicates,
        or a length different from ``n_genes``.
    """
    if genes is None or isinstance(genes, (str, bytes)) or not hasattr(genes, "__len__"):
        raise InputError(f"genes must be a list of gene names, got {type(genes).__name__}", field="genes",
                         fix="Pass one gene symbol or Ensembl id per matrix column, e.g. list(adata.var_names).")
    out = [g.decode("utf-8", errors="replace") if isinstance(g, bytes) else g for g in genes]
    ok = set(map(type, out)) <= {str} and (not out or min(map(len, map(str.strip, out))) > 0)  # C loops only
    bad = [] if ok else [
        f"genes[{i}]={g!r}" for i, g in enumerate(out) if not isinstance(g, str) or not g.strip()]
    out = out if ok else [str(g) for g in out]
    if bad:
        raise InputError(f"{len(bad)} gene names are empty or not strings: {', '.join(bad[:5])}", field="genes",
                         fix="Give every matrix column a non-empty gene symbol or Ensembl id.")
    if n_genes is not None and len(out) != n_genes:
        raise InputError(f"genes has {len(out)} names but the matrix has {n_genes} gene columns",
                         field="genes", fix="Pass exactly one name per matrix column, in column order.")
    dups = [(g, c) for g, c in Counter(out).items() if c > 1] if len(set(out)) != len(out) else []
    if dups:
        shown = ", ".join(f"{g!r} (x{c})" for g, c in dups[:5])
        raise InputError(f"{len(dups)} gene names occur more than once: {shown}", field="genes",
                         details={"duplicates": [g for g, _ in dups[:100]]},
                         fix="Make names unique (adata.var_names_make_unique()) or sum the duplicated "
                         "columns into one before sending.")
    return out


def _check_shape_and_dtype(X: Any, n_names: int) -> int:
    shape = tuple(getattr(X, "shape", ()))
    if len(shape) != 2:
        tip = "; for a single cell use X.reshape(1, -1)." if len(shape) == 1 else "."
        raise InputError(f"matrix must be 2-D (cells x genes), got {len(shape)} dimension(s)",
                         field="matrix", fix="Pass a 2-D cells x genes matrix" + tip)
    if np.dtype(X.dtype).kind not in "iuf":
        raise InputError(f"matrix has non-numeric dtype {np.dtype(X.dtype)}", field="matrix",
                         fix="Send numbers (counts); fix text cells, then convert with X.astype('float32').")
    n_cells, n_genes = int(shape[0]), int(shape[1])
    if n_cells == 0 or n_genes == 0:
        raise InputError(f"matrix is empty: {n_cells} cells x {n_genes} genes", field="matrix",
                         fix="Send at least one cell (row) and one gene (column).")
    if n_genes != n_names:
        if n_cells == n_names:
            raise InputError(
                f"matrix looks transposed: it has {n_cells} rows and {n_genes} columns, and genes lists "
                f"{n_names} names, matching the rows", field="matrix",
                fix="Rows must be cells and columns genes: pass X.T (e.g. X.T.tocsr()).")
        raise InputError(
            f"matrix has {n_genes} gene columns but genes lists {n_names} names", field="genes",
            fix="Pass one gene name per column, in column order (e.g. adata.var_names of the same object); "
            "a gene list from another subset, a different gene order or a transposed matrix is the usual cause.")
    return n_cells


def _check_cell_ids(cell_ids: Sequence[Any], n_cells: int) -> list[str]:
    ids = [str(c) for c in cell_ids]
    if len(ids) != n_cells:
        raise InputError(f"cell_ids has {len(ids)} ids but the matrix has {n_cells} rows (cells)",
                         field="cell_ids", fix="Pass one id per matrix row, or omit cell_ids.")
    dups = [c for c, k in Counter(ids).items() if k > 1]
    if dups:
        warnings.warn(f"{len(dups)} cell ids occur more than once (e.g. {dups[:3]}); results follow row order, "
                      "so look cells up by position or call adata.obs_names_make_unique()", UserWarning, stacklevel=4)
    return ids


def _check_values(X: sp.csr_matrix, genes: Sequence[str], cell_ids: Sequence[str] | None,
                  row0: int, whole: bool, offset: int = 0) -> None:
    """Raise on NaN/inf, then on negative values, naming the first offending cell and gene.

    ``row0``: row of ``X[0]`` in ``cell_ids``; ``offset``: row of ``cell_ids[0]`` in the whole dataset.
    """
    data = X.data
    bad = ~np.isfinite(data)
    what, fix, extra = "NaN or infinite", "Replace missing values by 0, or drop those cells/genes.", ""
    if not bad.any():
        bad = data < 0
        if not bad.any():
            return
        what, fix = "negative", RAW_FIX
        extra = f"; minimum {float(data[bad].min()):g}: the values look scaled/z-scored, not counts"
    first = int(np.flatnonzero(bad)[0])
    row = int(np.searchsorted(X.indptr, first, side="right") - 1) + row0
    cell = cell_ids[row] if cell_ids is not None else f"row {row + offset}"
    row += offset
    count = str(int(bad.sum())) if whole else f"at least {int(bad.sum())}"
    raise InputError(
        f"matrix has {count} {what} values (first at cell {cell!r}, gene {genes[int(X.indices[first])]!r}){extra}",
        field="matrix", fix=fix, details={"row": row, "column": int(X.indices[first])})


def _canonical_csr(X: Any, owned: bool, canonical: bool = True) -> sp.csr_matrix:
    """CSR float32 with sorted, summed indices and no explicit zeros; never mutates a caller's matrix."""
    Y = X if isinstance(X, sp.csr_matrix) else sp.csr_matrix(X)
    owned = owned or Y is not X
    if Y.dtype != np.float32:
        Y, owned = Y.astype(np.float32), True
    return canonicalize(Y, copy=not owned) if canonical else Y


def validate_matrix(
    X: Any, genes: Any, cell_ids: Sequence[str] | None = None, *, canonical: bool = True, genes_valid: bool = False,
    row0: int | None = None,
) -> sp.csr_matrix:
    """Check a cells x genes matrix and return it as canonical float32 CSR.

    Parameters
    ----------
    X
        scipy sparse (CSR, CSC, COO, ...), dense numpy array, ``np.matrix``, nested
        lists, or a row-sliceable array (h5py dataset, backed AnnData matrix).
    genes
        One name per column (see :func:`validate_genes`).
    cell_ids
        Optional, one id per row (duplicates are allowed, with a warning).
    canonical
        Sort indices, sum duplicate entries and drop explicit zeros. ``False`` leaves
        that to the caller (e.g. :func:`cellatlas.sparse.remap_columns`, which does it
        while selecting columns); values are checked either way.
    genes_valid
        ``genes`` were already checked by :func:`validate_genes` (chunks of one dataset).
    row0
        ``X`` is one chunk of a larger dataset starting at this row: errors name rows of
        the whole dataset, and an all-zero chunk is accepted (other chunks may hold counts).

    Returns
    -------
    scipy.sparse.csr_matrix
        float32, sorted indices, duplicate entries summed, explicit zeros removed.
        A canonical float32 CSR input is returned as is (shared: treat as
        read-only); anything needing a change is copied, the input is never modified.

    Raises
    ------
    InputError
        ``field="matrix"``: not 2-D, non-numeric, empty, transposed, NaN/inf or
        negative values, no non-zero value at all. ``field="genes"``: count
        mismatch, duplicates, empty names. ``field="cell_ids"``: wrong length.

    Notes
    -----
    Dense and array-like input is converted chunk by chunk (:func:`iter_chunks`),
    so only one chunk of rows is ever densified or cast to float32.
    """
    X = as_matrix_like(X)
    names = list(genes) if genes_valid else validate_genes(genes)
    n_cells = _check_shape_and_dtype(X, len(names))
    if cell_ids is not None:
        cell_ids = _check_cell_ids(cell_ids, n_cells)
    chunk = row0 is not None
    if sp.issparse(X):
        out = _canonical_csr(X, owned=False, canonical=canonical)
        _check_values(out, names, cell_ids, 0, not chunk, row0 or 0)
    else:
        # Dense numpy is densified one chunk at a time; lazily read matrices (backed AnnData,
        # h5py, dask) are annotated chunk by chunk by the engine (cellatlas.stream) and only
        # reach this stacking when a whole in-memory CSR is asked for explicitly.
        parts = []
        for sl in iter_chunks(n_cells):
            block = X[sl]
            part = (_canonical_csr(block, owned=True) if sp.issparse(block)
                    else sp.csr_matrix(np.asarray(block, dtype=np.float32)))
            _check_values(part, names, cell_ids, sl.start, not chunk and sl.start == 0 and sl.stop == n_cells, row0 or 0)
            parts.append(part)
        out = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
    if not chunk and (out.nnz == 0 or not out.data.any()):
        raise InputError(f"matrix has no non-zero value ({n_cells} cells x {len(names)} genes)", field="matrix",
                         fix="Check that the matrix was filled with counts (not an empty or all-zero subset).")
    return out


def prepare_counts(X: Any, genes: Any, cell_ids: Sequence[str] | None = None) -> tuple[sp.csr_matrix, str]:
    """Validate, detect and convert in one call: what every door does with user input.

    Parameters
    ----------
    X, genes, cell_ids
        As for :func:`validate_matrix`.

    Returns
    -------
    counts, kind
        Count-like float32 CSR (:func:`to_counts_like`) and the detected kind
        (:func:`detect_values`).

    Raises
    ------
    InputError
        Anything :func:`validate_matrix` rejects, or scaled values.
    """
    Y = validate_matrix(X, genes, cell_ids)
    kind = detect_values(Y)
    return to_counts_like(Y, kind), kind

