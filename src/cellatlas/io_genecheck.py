"""Gene-list sanity check: do the gene names belong to the matrix's columns?

A gene list that is shifted by a few positions, reversed, shuffled or taken from another
dataset still maps perfectly to human symbols, so coverage checks cannot see it; the
engine would then call every cell confidently from the wrong genes. What can see it is
an expectation that holds in any tissue and technology: how highly a gene is expressed
is largely a property of the gene (mitochondrial, ribosomal and housekeeping genes near
the top, most transcription factors near the bottom). :func:`check_gene_list` takes the
mean relative expression of every column over a sample of cells and its rank correlation
with a packaged per-gene prior (``data/genes/expression_prior.tsv.gz``, derived by
``scripts/build_expression_prior.py``, see ``DATA.md``). Aligned data agree
(:data:`RHO_OK` or more), a misaligned list does not (near 0); the same correlation with
the names moved by ``-MAX_SHIFT..+MAX_SHIFT`` positions or reversed names the likely cause.

Verdicts: ``ok``; ``warning`` (weak agreement, reported in the gene report); ``error``
(:class:`~cellatlas.errors.GeneListMismatchError` from :meth:`GeneCheck.raise_for_error`);
``unchecked`` (too few cells or known genes to judge). Only gene names and counts are
read, from at most :data:`SAMPLE_CELLS` evenly spaced cells, so it costs the same at a
million cells as at two thousand.
"""

from __future__ import annotations

import gzip
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from cellatlas.errors import CellAtlasError, GeneListMismatchError
from cellatlas.io_values import sample_rows, to_counts_like

__all__ = [
    "GeneCheck", "check_gene_list", "column_log_means", "load_expression_prior", "skipped_check",
    "MAX_SHIFT", "MIN_CELLS", "MIN_KNOWN_GENES", "RHO_ERROR", "RHO_OK", "SAMPLE_CELLS",
]

PRIOR_PATH = Path(__file__).resolve().parent / "data" / "genes" / "expression_prior.tsv.gz"
SAMPLE_CELLS = 1000
"""Cells read (evenly spaced over the matrix, deterministic)."""
MIN_CELLS = 20
"""Fewer non-empty sampled cells: the column means are too noisy to judge (verdict ``unchecked``)."""
MIN_KNOWN_GENES = 50
"""Fewer columns whose gene is in the prior: nothing to judge (verdict ``unchecked``)."""
RHO_OK = 0.3
"""Rank correlation with the prior from which the list counts as aligned."""
RHO_ERROR = 0.15
"""Below this the list is refused; between the two it is a warning."""
ALT_MARGIN = 0.2
"""A shifted or reversed reading must beat the list as given by this much (and reach ``RHO_OK``) to be named."""
MAX_SHIFT = 100
"""Shifts tried: -MAX_SHIFT..+MAX_SHIFT columns."""
UBIQUITOUS_DETECTION = 0.9
"""Prior detection rate from which a gene counts as ubiquitous (MT-, ribosomal, ACTB, B2M, ...)."""
SKIP_NOTE = (
    "gene-list check skipped on request: nothing verified that the gene names belong to the matrix "
    "columns (no test for a shifted, reversed, shuffled or foreign gene list)"
)
_FIX_OPT_OUT = (
    "For a genuinely unusual panel (a targeted panel, a sorted population without housekeeping genes) turn the "
    "check off: skip_gene_check=True in Python, --skip-gene-check on the CLI, skip_gene_check=true in an HTTP "
    "request, 'Skip the gene-list check' in the workspace."
)
_FIX_ALIGN = (
    "Pass the gene names of this very matrix, in column order (e.g. adata.var_names of the same AnnData, after "
    "any subsetting). " + _FIX_OPT_OUT
)


@lru_cache(maxsize=1)
def load_expression_prior() -> dict[str, tuple[float, float]]:
    """Packaged prior: approved human symbol -> ``(log_mean, detection)``.

    ``log_mean`` is the typical log10 mean relative expression (per 10,000 counts) across
    tissues and technologies; ``detection`` the typical share of cells detecting the gene.
    """
    try:
        text = gzip.decompress(PRIOR_PATH.read_bytes()).decode("utf-8")
    except OSError as exc:
        raise CellAtlasError(
            f"The packaged expression prior {PRIOR_PATH.name} is missing or unreadable ({exc}).",
            fix="Reinstall cellatlas, or rebuild it with `python scripts/build_expression_prior.py`.",
        ) from exc
    rows = [line.split("\t") for line in text.splitlines()[1:] if line]
    return {r[0]: (float(r[1]), float(r[2])) for r in rows}


def column_log_means(X: sp.csr_matrix) -> tuple[np.ndarray, int]:
    """log10 of each column's mean relative expression (per 10,000) over the non-empty rows.

    Returns the per-column values and the number of non-empty rows used. The same
    statistic builds the prior (``scripts/build_expression_prior.py``).
    """
    X = sp.csr_matrix(X)
    data = X.data.astype(np.float64)
    nnz = np.diff(X.indptr)
    totals = np.zeros(X.shape[0])
    if data.size:
        totals[nnz > 0] = np.add.reduceat(data, X.indptr[:-1][nnz > 0])
    keep = totals > 0
    share = data / np.repeat(np.where(keep, totals, 1.0), nnz)
    mean = np.bincount(X.indices, weights=share, minlength=X.shape[1]) / max(int(keep.sum()), 1)
    return np.log10(mean * 1e4 + 0.01), int(keep.sum())


def _prior_arrays(prior: dict[str, tuple[float, float]], symbols: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the prior ``log_mean`` (NaN unknown) and whether the gene is ubiquitous."""
    rows = [prior.get(s) if s is not None else None for s in symbols]
    log_mean = np.array([r[0] if r else np.nan for r in rows], dtype=float)
    ubiquitous = np.array([bool(r) and r[1] >= UBIQUITOUS_DETECTION for r in rows], dtype=bool)
    return log_mean, ubiquitous


@lru_cache(maxsize=32)
def _packaged_arrays(symbols: tuple[str | None, ...]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_prior_arrays` of the packaged prior, cached: chunked requests repeat gene lists."""
    out = _prior_arrays(load_expression_prior(), symbols)
    for a in out:
        a.flags.writeable = False
    return out


def _scan(rq: np.ndarray, rp: np.ndarray, max_shift: int) -> dict[Any, float]:
    """Correlation of column ranks with prior ranks read ``s`` names further on, and reversed.

    Key ``s`` pairs column ``j`` with the name at ``j + s`` (a list rolled by ``s``,
    ``np.roll(genes, s)``, is read right at ``s``); key ``"reversed"`` pairs it with
    the name at ``G - 1 - j``. NaN where fewer than :data:`MIN_KNOWN_GENES` pairs. The
    sums behind every shift's Pearson correlation are cross-correlations, taken at once
    by FFT (ranks are centred and scaled to O(1) first, so float64 sums stay exact enough).
    """
    G = len(rq)
    known = ~np.isnan(rp)
    a = (rq - rq.mean()) / G
    b = np.where(known, (np.nan_to_num(rp) - np.nanmean(rp)) / G, 0.0)
    m = known.astype(float)

    def xcorr(x, y):  # c[s + G - 1] = sum_j x[j] * y[j + s], s = -(G-1)..G-1
        return fftconvolve(y, x[::-1])

    def pearson(n, sa, sb, saa, sbb, sab):
        with np.errstate(invalid="ignore", divide="ignore"):
            cov = sab - sa * sb / n
            den = np.sqrt(np.maximum((saa - sa * sa / n) * (sbb - sb * sb / n), 0.0))
            r = np.where(den > 1e-12, cov / np.where(den > 1e-12, den, 1.0), 0.0)
        return np.where(n >= MIN_KNOWN_GENES, r, np.nan)

    ones = np.ones(G)
    n = np.rint(xcorr(ones, m))
    r = pearson(n, xcorr(a, m), xcorr(ones, b), xcorr(a * a, m), xcorr(ones, b * b), xcorr(a, b))
    k = min(max_shift, G - 1)
    out: dict[Any, float] = {s: float(r[s + G - 1]) for s in range(-k, k + 1)}
    mr, br = m[::-1], b[::-1]
    out["reversed"] = float(pearson(mr.sum(), (a * mr).sum(), br.sum(), (a * a * mr).sum(), (br * br).sum(), (a * br).sum()))
    return out


@dataclass
class GeneCheck:
    """What the gene-list check found (see the module docstring for the verdicts).

    ``rho`` is the rank correlation of the columns' mean expression with the prior for the
    list as given; ``alternative``/``rho_alternative`` the best shifted or reversed reading
    (``"shift:+1"``, ``"reversed"``); ``ubiquitous_percentile`` the median percentile, among
    all columns, of the columns named after ubiquitous genes (near 90-100 when aligned,
    near 50 when not).
    """

    verdict: str
    cause: str | None = None
    message: str = ""
    fix: str | None = None
    rho: float | None = None
    alternative: str | None = None
    rho_alternative: float | None = None
    shift: int | None = None
    ubiquitous_percentile: float | None = None
    n_known_genes: int = 0
    n_cells_sampled: int = 0

    def report(self) -> dict[str, Any]:
        """JSON-ready dict for the gene report (``gene_report["gene_check"]``)."""
        out = asdict(self)
        for k in ("rho", "rho_alternative", "ubiquitous_percentile"):
            if out[k] is not None:
                out[k] = None if out[k] != out[k] else round(float(out[k]), 3)
        return out

    def raise_for_error(self) -> None:
        """Raise :class:`~cellatlas.errors.GeneListMismatchError` (HTTP 422, field ``genes``) on an ``error`` verdict."""
        if self.verdict == "error":
            raise GeneListMismatchError(self.message, fix=self.fix, field="genes", details={"gene_check": self.report()})


def skipped_check() -> GeneCheck:
    """The record of an opted-out check, saying what was not verified."""
    return GeneCheck(verdict="skipped", message=SKIP_NOTE)


def fftconvolve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Full linear convolution of two real 1-D arrays, computed as ``scipy.signal.fftconvolve`` does
    (real FFTs of a 5-smooth length), with numpy's FFT: importing ``scipy.signal`` costs ~1 s
    (it imports scipy.stats) and ``scipy.fft`` 0.13 s, paid by every fresh process."""
    n = len(a) + len(b) - 1
    size = _fast_len(n)
    return np.fft.irfft(np.fft.rfft(a, size) * np.fft.rfft(b, size), size)[:n]


def _fast_len(n: int) -> int:
    """Smallest ``2**i * 3**j * 5**k >= n`` (an FFT length without large prime factors)."""
    best, p5 = 2 * max(n, 1), 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties share their mean rank): ``scipy.stats.rankdata``'s algorithm, without
    importing scipy.stats (about 2 s of docstring parsing on first import, paid by every fresh process)."""
    x = np.asarray(x, dtype=float)
    if np.isnan(x).any():  # scipy's default nan_policy='propagate'
        return np.full(len(x), np.nan)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    obs = np.r_[True, xs[1:] != xs[:-1]]
    dense = obs.cumsum()
    count = np.r_[np.flatnonzero(obs), len(obs)]
    out = np.empty(len(x))
    out[order] = 0.5 * (count[dense] + count[dense - 1] + 1)
    return out


def check_gene_list(
    X: Any,
    symbols: Sequence[str | None],
    *,
    values: str = "counts",
    prior: dict[str, tuple[float, float]] | None = None,
    max_shift: int = MAX_SHIFT,
) -> GeneCheck:
    """Check that gene names belong to the matrix columns; name the likely cause if not.

    Parameters
    ----------
    X
        Cells x genes matrix as validated (:func:`cellatlas.io.validate_matrix`), input columns.
    symbols
        Approved human symbol of each column (``GeneMapping.symbols``; ``None`` unmapped).
        Mouse genes are checked through their human orthologs.
    values
        What ``X`` holds (:func:`cellatlas.io.detect_values`); log-normalised rows are
        turned back into relative expression first.
    prior
        Symbol -> ``(log_mean, detection)``; default the packaged prior.
    max_shift
        Largest shift tried when naming the cause.

    Returns
    -------
    GeneCheck
        Verdict, cause, message and fix, and the statistics behind them.
    """
    p, ubiq = _packaged_arrays(tuple(symbols)) if prior is None else _prior_arrays(prior, symbols)
    sample = sample_rows(X, SAMPLE_CELLS)
    if values != "counts":
        sample = to_counts_like(sample, values)
    q, n_cells = column_log_means(sample)
    known = ~np.isnan(p)
    base = dict(n_known_genes=int(known.sum()), n_cells_sampled=n_cells)
    if n_cells < MIN_CELLS or known.sum() < MIN_KNOWN_GENES:
        what = f"{n_cells} non-empty cells" if n_cells < MIN_CELLS else f"{int(known.sum())} genes with a known typical expression"
        return GeneCheck("unchecked", message=f"gene-list check not run: only {what} (needs {MIN_CELLS} cells and {MIN_KNOWN_GENES} genes).", **base)
    rq = rankdata(q)
    rp = np.full(len(p), np.nan)
    rp[known] = rankdata(p[known])
    scan = _scan(rq, rp, max_shift)
    rho = scan.pop(0)
    alt = max((k for k in scan if scan[k] == scan[k]), key=lambda k: scan[k], default=None)
    rho_alt = scan[alt] if alt is not None else float("nan")
    pct = float(np.median(rq[ubiq]) / len(rq) * 100) if ubiq.sum() >= 5 else None
    stats = dict(rho=rho, alternative=None if alt is None else (alt if alt == "reversed" else f"shift:{alt:+d}"),
                 rho_alternative=rho_alt, ubiquitous_percentile=pct, **base)
    evidence = f"rank correlation of the columns' mean expression with typical expression {rho:.2f} over {int(known.sum())} genes"
    if alt is not None and rho_alt >= RHO_OK and rho_alt >= rho + ALT_MARGIN:
        return _misaligned(alt, rho_alt, evidence, stats)
    if rho < RHO_ERROR:
        ub = f"; ubiquitous genes (MT-, ribosomal, ACTB, B2M, ...) sit at percentile {pct:.0f} of the columns instead of near the top" if pct is not None else ""
        return GeneCheck(
            "error", cause="mismatched",
            message=f"The gene names do not belong to the matrix columns: {evidence} (aligned data of any tissue score "
            f"{RHO_OK} or more){ub}. The list looks shuffled, sorted apart from the matrix, or taken from another dataset.",
            fix=_FIX_ALIGN, **stats)
    if rho < RHO_OK:
        return GeneCheck(
            "warning", cause="weak_match",
            message=f"The gene names match the matrix columns only weakly ({evidence}; aligned data of any tissue score "
            f"{RHO_OK} or more). Check that genes[i] names column i; calls may be unreliable.",
            fix=_FIX_ALIGN, **stats)
    return GeneCheck("ok", message=evidence, **stats)


def _misaligned(alt: Any, rho_alt: float, evidence: str, stats: dict[str, Any]) -> GeneCheck:
    if alt == "reversed":
        return GeneCheck(
            "error", cause="reversed",
            message=f"The gene list looks reversed relative to the matrix columns: read backwards it matches (rank "
            f"correlation {rho_alt:.2f}); as given it does not ({evidence}).",
            fix="Pass the names in column order (adata.var_names of the same AnnData); this list reversed is genes[::-1]. "
            + _FIX_OPT_OUT, **stats)
    k = int(alt)
    return GeneCheck(
        "error", cause="shifted", shift=k,
        message=f"The gene list looks shifted by {abs(k)} column{'s' if abs(k) != 1 else ''} relative to the matrix: "
        f"column j holds the gene named genes[j{k:+d}] (rank correlation {rho_alt:.2f} when read that way); as given, "
        f"{evidence}.",
        fix=f"Pass the names of this matrix in column order; a header line, an index column or a list cut from another "
        f"selection moves names by a few positions. Re-aligned, this list is genes[{k}:] + genes[:{k}]. "
        + _FIX_OPT_OUT, **stats)
