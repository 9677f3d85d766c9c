"""CSR arrays from the wire, and what the values of a matrix are.

Public names are re-exported by :mod:`cellatlas.io` (import them from there):
:func:`validate_csr_arrays`, :func:`detect_values`, :func:`to_counts_like`,
:data:`VALUE_KINDS`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from cellatlas.errors import InputError

VALUE_KINDS = ("counts", "lognorm", "scaled", "nonint")
"""The kinds :func:`detect_values` returns."""

RAW_FIX = (
    "Send raw counts: for AnnData pass use_raw=True (adata.raw) or layer='counts'; "
    "do not send the output of sc.pp.scale / regress_out."
)
_CSR_HOWTO = (
    "Send the three arrays of a scipy CSR matrix of shape (n_cells, n_genes): "
    "X = scipy.sparse.csr_matrix(X); indptr=X.indptr.tolist(), indices=X.indices.tolist(), "
    "data=X.data.tolist(), shape=list(X.shape)."
)
_DETECT_ROWS = 2000
_DETECT_RUNS = 40
_MAX_DIM = 2**62
_LOG_MAX = 30.0


def as_matrix_like(X: Any) -> Any:
    """Return ``X`` as scipy sparse, a numpy ndarray, or a row-sliceable array (h5py, backed).

    Raises
    ------
    InputError
        ``X`` is ``None`` or cannot be turned into an array (ragged lists).
    """
    if X is None:
        raise InputError("matrix is missing (None)", field="matrix",
                         fix="Pass a cells x genes matrix: scipy sparse, numpy array or AnnData.")
    if sp.issparse(X) or (isinstance(X, np.ndarray) and not isinstance(X, np.matrix)):
        return X
    if hasattr(X, "shape") and hasattr(X, "dtype") and hasattr(X, "__getitem__") and not isinstance(X, np.matrix):
        return X  # h5py dataset / backed AnnData matrix: read by chunks
    try:
        return np.asarray(X)
    except (ValueError, TypeError) as exc:
        raise InputError(f"matrix could not be read as a 2-D numeric array: {exc}", field="matrix",
                         fix="Pass a rectangular cells x genes matrix of numbers.") from exc


# --------------------------------------------------------------------------- CSR arrays
def validate_csr_arrays(indptr: Any, indices: Any, data: Any, shape: Any) -> sp.csr_matrix:
    """Build a CSR matrix from its three arrays, checking their structure.

    For the HTTP JSON body (lists) and binary bodies (numpy arrays). Checks are
    vectorised numpy (fast for millions of non-zeros). Values (NaN, negatives) and
    genes are checked afterwards by :func:`cellatlas.io.validate_matrix`.

    Parameters
    ----------
    indptr, indices, data
        The arrays of a scipy CSR matrix (``X.indptr``, ``X.indices``, ``X.data``).
        Whole-number floats are accepted for ``indptr``/``indices``.
    shape
        ``[n_cells, n_genes]``.

    Returns
    -------
    scipy.sparse.csr_matrix
        float32 data, entries as sent (duplicates are summed by ``validate_matrix``).

    Raises
    ------
    InputError
        ``field`` is ``matrix.shape``, ``matrix.indptr``, ``matrix.indices`` or
        ``matrix.data``; ``fix`` explains how to build valid arrays.
    """
    n_rows, n_cols = _check_csr_shape(shape)
    ip = _int_array(indptr, "matrix.indptr")
    ix = _int_array(indices, "matrix.indices")
    dt = _numeric_array(data, "matrix.data")
    nnz = dt.shape[0]
    if ip.shape[0] != n_rows + 1:
        _csr_fail("matrix.indptr", f"has length {ip.shape[0]}, expected n_cells + 1 = {n_rows + 1}")
    if ip[0] != 0:
        _csr_fail("matrix.indptr", f"must start at 0, starts at {int(ip[0])}")
    if ip[-1] != nnz:
        _csr_fail("matrix.indptr", f"must end at len(data) = {nnz}, ends at {int(ip[-1])}")
    steps = np.diff(ip)
    if steps.size and steps.min() < 0:
        at = int(np.argmax(steps < 0))
        _csr_fail("matrix.indptr", f"must be non-decreasing, but indptr[{at + 1}] < indptr[{at}]")
    if ix.shape[0] != nnz:
        _csr_fail("matrix.indices", f"has length {ix.shape[0]} but data has length {nnz}")
    if nnz and (ix.min() < 0 or ix.max() >= n_cols):
        at = int(np.flatnonzero((ix < 0) | (ix >= n_cols))[0])
        _csr_fail("matrix.indices", f"must be column numbers in [0, {n_cols}), but indices[{at}] = {int(ix[at])}")
    idx_dtype = np.int32 if max(nnz, n_cols) < np.iinfo(np.int32).max else np.int64
    return sp.csr_matrix(
        (dt.astype(np.float32, copy=False), ix.astype(idx_dtype, copy=False), ip.astype(idx_dtype, copy=False)),
        shape=(n_rows, n_cols), copy=False,
    )


def _csr_fail(field: str, problem: str) -> None:
    raise InputError(f"{field} {problem}", field=field, fix=_CSR_HOWTO)


def _check_csr_shape(shape: Any) -> tuple[int, int]:
    """Two integers (Python or numpy; not bool, float or text) in [1, 2**62]."""
    try:
        dims = list(shape) if not isinstance(shape, (str, bytes, dict)) else None
        ok = dims is not None and len(dims) == 2 and all(
            isinstance(d, (int, np.integer)) and not isinstance(d, (bool, np.bool_)) for d in dims)
    except TypeError:
        ok = False
    if not ok:
        shown = repr(shape)
        _csr_fail("matrix.shape", f"must be two integers [n_cells, n_genes], got {shown[:80]}")
    n_rows, n_cols = int(dims[0]), int(dims[1])
    if n_rows < 1 or n_cols < 1:
        _csr_fail("matrix.shape", f"must be at least [1, 1], got [{n_rows}, {n_cols}]")
    if max(n_rows, n_cols) > _MAX_DIM:
        _csr_fail("matrix.shape", f"declares more than 2**62 rows or columns ({n_rows}, {n_cols})")
    return n_rows, n_cols


def _numeric_array(values: Any, field: str) -> np.ndarray:
    if isinstance(values, (list, tuple)) and bool in set(map(type, values)):
        _csr_fail(field, "must hold only numbers (true/false are not numbers)")
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError) as exc:
        _csr_fail(field, f"could not be read as a flat list of numbers ({exc})")
    if arr.ndim != 1:
        _csr_fail(field, f"must be a flat (1-D) list, got {arr.ndim} dimension(s)")
    if arr.size and arr.dtype.kind not in "iuf":
        _csr_fail(field, f"must hold only numbers, got dtype {arr.dtype}")
    return arr


def _int_array(values: Any, field: str) -> np.ndarray:
    arr = _numeric_array(values, field)
    if arr.size == 0:
        if field.endswith("indptr"):
            _csr_fail(field, "is empty; it must have n_cells + 1 entries")
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.floor(arr)):
            _csr_fail(field, "must hold whole numbers (integers)")
        if np.abs(arr).max() > 2**53:
            _csr_fail(field, "holds integers above 2**53 written as floats")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
        _csr_fail(field, f"holds a value above 2**63 ({int(arr.max())})")
    return arr


# --------------------------------------------------------------------------- values
def sample_index(n: int, n_rows: int = _DETECT_ROWS, n_runs: int = _DETECT_RUNS) -> np.ndarray:
    """The rows (increasing) that value detection reads of an ``n``-row matrix: up to 2000.

    Above ``n_rows`` rows they come as ``n_runs`` runs of consecutive rows, evenly spread: as
    representative as single rows for a matrix sorted by sample or cell type, and a file
    stored in chunks (HDF5, zarr) is read in ``n_runs`` small pieces instead of touching every
    chunk. A dataset read in blocks is judged on these same rows, so it is converted as the
    whole matrix in memory would be.
    """
    if n <= n_rows:
        return np.arange(n, dtype=np.int64)
    run = max(1, n_rows // n_runs)
    starts = np.linspace(0, n - run, n_rows // run).astype(np.int64)
    return np.unique((starts[:, None] + np.arange(run)).ravel())


def sample_rows(X: Any, n_rows: int = _DETECT_ROWS) -> sp.csr_matrix:
    """The rows :func:`sample_index` names (deterministic), as float32 CSR; NaN/inf read as 0."""
    X = as_matrix_like(X)
    if len(X.shape) != 2 or X.shape[0] == 0 or np.dtype(X.dtype).kind not in "biuf":
        return sp.csr_matrix((0, 0), dtype=np.float32)
    idx = sample_index(X.shape[0], n_rows)
    if sp.issparse(X) and X.format not in ("csr", "csc"):
        X = sp.csr_matrix(X)
    sub = X[idx]
    if hasattr(sub, "compute"):  # a dask array: read just these rows
        sub = sub.compute()
    sub = sp.csr_matrix(sub if sp.issparse(sub) else np.asarray(sub, dtype=np.float32), dtype=np.float32, copy=True)
    sub.data[~np.isfinite(sub.data)] = 0  # validate_matrix rejects these; here they are ignored
    sub.eliminate_zeros()
    return sub


def _integral_ratio_score(sub: sp.csr_matrix, values: np.ndarray) -> float:
    """Median over rows (>= 5 non-zeros) of the share of ``values`` that are integer multiples of the row minimum.

    Near 1 when ``values`` are counts times a per-cell factor (normalised counts);
    ``values`` is aligned with ``sub.data``. Returns 0 when no row has 5 non-zeros.
    """
    nnz_rows = np.diff(sub.indptr)
    has = nnz_rows > 0
    if not (nnz_rows >= 5).any():
        return 0.0
    starts = sub.indptr[:-1][has]
    row_min = np.repeat(np.minimum.reduceat(values, starts), nnz_rows[has])
    ratio = values / row_min
    near = (np.abs(ratio - np.rint(ratio)) < 0.02).astype(np.float64)
    per_row = np.add.reduceat(near, starts) / nnz_rows[has]
    return float(np.median(per_row[nnz_rows[has] >= 5]))


def _row_sum_cv(sub: sp.csr_matrix, values: np.ndarray) -> float:
    """Coefficient of variation of the row sums of ``values`` (rows with a non-zero)."""
    nnz_rows = np.diff(sub.indptr)
    sums = np.add.reduceat(values, sub.indptr[:-1][nnz_rows > 0]) if values.size else np.zeros(1)
    return float(sums.std() / sums.mean()) if sums.mean() > 0 else np.inf


def detect_log_base(X: Any) -> float:
    """Base of the ``log(1 + x)`` of log-normalised values: ``e``, ``2`` or ``10``.

    Parameters
    ----------
    X
        Log-normalised cells x genes matrix (see :func:`detect_values`).

    Returns
    -------
    float
        ``numpy.e``, ``2.0`` or ``10.0``. The base for which ``base**X - 1`` is, in
        each row, integer multiples of its smallest value (log of normalised counts,
        e.g. scanpy/Seurat log1p, scran log2 ``logcounts``, log2 CPM) wins; failing
        that (TPM-based values), the base whose back-transformed rows have the most
        constant sums; ``e`` when nothing stands out.
    """
    sub = sample_rows(X)
    data = np.clip(sub.data.astype(np.float64), 0.0, _LOG_MAX)
    if data.size == 0:
        return float(np.e)
    bases = (float(np.e), 2.0, 10.0)
    lins = [np.expm1(data * np.log(b)) for b in bases]
    integral = [_integral_ratio_score(sub, v) for v in lins]
    if max(integral) >= 0.9:
        return bases[int(np.argmax(integral))]
    cvs = [_row_sum_cv(sub, v) for v in lins]
    best = int(np.argmin(cvs))
    return bases[best] if cvs[best] < 0.5 * cvs[0] or best == 0 else float(np.e)


def detect_values(X: Any) -> str:
    """Say what the values of a matrix are, from a sample of up to 2000 rows.

    Parameters
    ----------
    X
        Cells x genes: scipy sparse, numpy, or a row-sliceable array.

    Returns
    -------
    str
        ``"counts"``: non-negative integers (also an all-zero sample).
        ``"scaled"``: some negative values (z-scored / regressed out; not usable).
        ``"lognorm"``: non-negative, mostly non-integer, maximum <= 30, and rows are
        not plain multiples of one count unit (i.e. log1p of normalised counts).
        ``"nonint"``: other non-integer values (TPM/RPKM/CPM, normalised but not
        logged, ambient-corrected counts).

    Notes
    -----
    Rows are sampled in runs spread evenly across the matrix (:func:`sample_index`;
    deterministic, sparse-aware: only the sampled rows are read). NaN/inf are ignored here
    (:func:`cellatlas.io.validate_matrix` rejects them). For ``"lognorm"`` the log
    base is found by :func:`detect_log_base`.
    """
    sub = sample_rows(X)
    v = sub.data
    if v.size == 0:
        return "counts"
    if v.min() < 0:
        return "scaled"
    frac_nonint = float(np.mean(np.abs(v - np.rint(v)) > 1e-3))
    if frac_nonint == 0.0:
        return "counts"
    if v.max() <= _LOG_MAX and frac_nonint > 0.5 and _integral_ratio_score(sub, sub.data) <= 0.95:
        return "lognorm"
    return "nonint"


def to_counts_like(X: Any, kind: str, base: float | None = None) -> sp.csr_matrix:
    """Turn validated values of the given kind into count-like values.

    Parameters
    ----------
    X
        Usually the output of :func:`cellatlas.io.validate_matrix` (float32 CSR).
    kind
        From :func:`detect_values`.
    base
        Log base of ``"lognorm"`` values; ``None`` detects it (:func:`detect_log_base`).

    Returns
    -------
    scipy.sparse.csr_matrix
        float32. ``"lognorm"``: ``base**X - 1`` as a new matrix (``expm1(X)`` for
        natural-log data), i.e. depth-normalised relative expression, which the
        rank/log pipeline handles like counts. ``"counts"`` / ``"nonint"``: ``X``
        itself (converted only if not float32 CSR).

    Raises
    ------
    InputError
        ``"scaled"`` values cannot be turned back into expression; unknown ``kind``.

    Notes
    -----
    ``log1p`` base e (scanpy ``sc.pp.log1p``, Seurat ``LogNormalize``) is the
    default assumption; base 2 (scran ``logcounts``, ``log2(CPM + 1)``,
    ``log2(TPM + 1)``) and 10 are recognised from the data when ``base`` is None.
    Values above 30 are not expected for log data (``detect_values`` calls them
    ``nonint``).
    """
    if kind not in VALUE_KINDS:
        raise InputError(f"unknown value kind {kind!r}", field="values", fix=f"Use one of {', '.join(VALUE_KINDS)}.")
    if kind == "scaled":
        raise InputError("matrix holds scaled values (negative numbers), which cannot be annotated",
                         field="matrix", fix=RAW_FIX)
    X = as_matrix_like(X)
    Y = X if isinstance(X, sp.csr_matrix) and X.dtype == np.float32 else sp.csr_matrix(X, dtype=np.float32)
    if kind != "lognorm":
        return Y
    base = detect_log_base(Y) if base is None else float(base)
    if base <= 1:
        raise InputError(f"log base must be > 1, got {base}", field="base", fix="Use e (2.718...), 2 or 10.")
    out = Y.copy()
    np.expm1(out.data * np.float32(np.log(base)), out=out.data)
    return out
