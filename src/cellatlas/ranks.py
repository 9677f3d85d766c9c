"""Within-cell rank scores of expressed genes, fast and without densifying.

Used by marker scoring (:mod:`cellatlas.markers`) and by the default encoder's ``rank``
transform. A cell's expressed genes are ranked by one histogram per cell over
log-spaced expression bins (no per-row sort), rows in chunks of
``Settings.chunk_size`` and blocks of ``_BLOCK_ROWS`` that keep the histogram in cache.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import scipy.sparse as sp

from cellatlas.config import get_settings
from cellatlas.errors import InputError

N_BINS = 512
"""Expression levels per cell are quantised into this many bins before ranking."""
BINS_PER_OCTAVE = 16
"""Bins per doubling of the value: integer counts up to 32 fall in distinct bins."""
LOWEST_LEVEL = 2.0**-8
"""Positive values below this share the lowest bin; the top bin starts at ``2**24``."""
_BLOCK_ROWS = 256
"""Rows histogrammed at once inside a chunk (keeps the histogram in cache)."""
_SHIFT = 23 - int(np.log2(BINS_PER_OCTAVE))
_LO = (127 + int(np.log2(LOWEST_LEVEL))) * BINS_PER_OCTAVE


def as_csr(counts: Any, *, check: bool = True) -> sp.csr_matrix:
    """``counts`` as a float32 CSR matrix (no copy when it already is one).

    Parameters
    ----------
    counts
        Cells x genes, scipy sparse or dense.
    check
        Reject negative or non-finite values (raises :class:`~cellatlas.errors.InputError`).
    """
    if sp.issparse(counts):
        X = counts.tocsr()
    else:
        arr = np.asarray(counts)
        if arr.ndim != 2:
            raise InputError(f"Expected a 2-D cells x genes matrix, got {arr.ndim} dimension(s).", fix="Pass a (cells x genes) matrix.")
        X = sp.csr_matrix(arr)
    if X.dtype != np.float32:
        X = X.astype(np.float32)
    if check and X.nnz:
        low, high = X.data.min(), X.data.max()  # NaN propagates into both
        if not (np.isfinite(low) and np.isfinite(high)):
            raise InputError("The matrix holds NaN or infinite values.", fix="Pass raw counts (or log-normalised values) without NaN/inf.")
        if low < 0:
            raise InputError(
                "The matrix holds negative values; ranks are computed on expression levels.",
                fix="Pass raw counts or log-normalised values, not scaled/centred data (e.g. adata.raw or a counts layer).",
            )
    return X


def row_chunks(n: int, size: int | None = None) -> Iterable[tuple[int, int]]:
    """``(start, stop)`` of consecutive row chunks of ``size`` (default ``Settings.chunk_size``)."""
    size = max(1, int(size or get_settings().chunk_size))
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _block_keys(data: np.ndarray, row_nnz: np.ndarray, buf: np.ndarray) -> tuple[np.ndarray, int]:
    """``row * width + bin`` of each value and the histogram ``width`` (last bin: zeros).

    The bin is ``floor(BINS_PER_OCTAVE * log2(x))`` (log2 interpolated linearly within
    each octave), clipped to ``N_BINS`` bins from ``LOWEST_LEVEL`` up, read off the float32
    exponent and top mantissa bits: monotone in ``x``, exact for small integers, and
    scaling a cell by a power of two shifts all its bins equally. Only the range of bins
    the block uses is histogrammed.
    """
    np.right_shift(data.view(np.int32), _SHIFT, out=buf)
    np.clip(buf, _LO, _LO + N_BINS - 1, out=buf)
    lo, hi = (int(buf.min()), int(buf.max())) if len(buf) else (0, 0)
    if not data.all():
        buf[data == 0] = hi + 1
    width = hi - lo + 2
    key = np.repeat(np.arange(-lo, len(row_nnz) * width - lo, width, dtype=np.int64), row_nnz)
    key += buf
    return key, width


def _score_table(hist: np.ndarray) -> np.ndarray:
    """Rank score per (cell, bin) from per-cell bin counts ``[n, width]`` (last bin: zeros, scored 0).

    With ``c`` the cumulative count up to and including a bin, ``h`` its count and ``n``
    the cell's expressed genes, ``n_greater = n - c`` and ``n_equal_others = h - 1``, so
    ``s = (2c - h + 1) / 2n``.
    """
    c = np.cumsum(hist, axis=1)
    half_inv_n = 0.5 / np.maximum(c[:, -2:-1], 1).astype(np.float32)
    c *= 2
    c -= hist
    c += 1
    table = c.astype(np.float32)
    table *= half_inv_n
    table[:, -1] = 0.0
    return table


def rank_chunk(data: np.ndarray, row_nnz: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rank scores of the non-zeros of consecutive rows (see :func:`rank_scores`).

    Parameters
    ----------
    data
        float32 non-zero values of the rows, row after row (a CSR ``data`` slice), >= 0.
    row_nnz
        Number of values of each row.
    out
        Optional float32 array of ``len(data)`` to write into.
    """
    ends = np.concatenate(([0], np.cumsum(row_nnz)))
    starts = range(0, len(row_nnz), _BLOCK_ROWS)
    buf = np.empty(max((ends[min(r + _BLOCK_ROWS, len(row_nnz))] - ends[r] for r in starts), default=0), dtype=np.int32)
    out = np.empty(len(data), dtype=np.float32) if out is None else out
    for r0 in starts:
        r1 = min(len(row_nnz), r0 + _BLOCK_ROWS)
        lo, hi = ends[r0], ends[r1]
        key, width = _block_keys(data[lo:hi], row_nnz[r0:r1], buf[: hi - lo])
        table = _score_table(np.bincount(key, minlength=(r1 - r0) * width).reshape(r1 - r0, width)).ravel()
        np.take(table, key, out=out[lo:hi], mode="clip")  # keys are in range by construction
    return out


def rank_scores(counts: Any) -> sp.csr_matrix:
    """Within-cell rank score of every expressed gene.

    For a non-zero value, ``s = 1 - (n_greater + 0.5 * n_equal_others) / n_expressed``
    where the counts are over the cell's expressed genes: the cell's highest gene
    scores 1, ties share the average. Values are compared after quantising them
    into ``N_BINS`` log-spaced bins (``BINS_PER_OCTAVE`` per doubling: exact for
    integer counts up to 32, within ~4% for any other value, exactly invariant to
    scaling a cell by a power of two), with one histogram per cell, so no row is
    sorted and nothing is densified.

    Parameters
    ----------
    counts
        Cells x genes, sparse or dense, non-negative (raw counts or log-normalised).

    Returns
    -------
    scipy.sparse.csr_matrix
        float32, same shape and sparsity pattern as ``counts``; stored zeros score 0.
    """
    X = as_csr(counts)
    out = np.empty(X.nnz, dtype=np.float32)
    nnz = np.diff(X.indptr)
    for start, stop in row_chunks(X.shape[0]):
        lo, hi = X.indptr[start], X.indptr[stop]
        rank_chunk(X.data[lo:hi], nnz[start:stop], out[lo:hi])
    return sp.csr_matrix((out, X.indices.copy(), X.indptr.copy()), shape=X.shape)
