"""Reference neighbours of query cells: search, distance statistics and depth matching.

The kNN signal compares a query cell with reference cells in the encoder's embedding.
Sequencing depth changes where a cell lands there, so the reference is also searched
downsampled to each query cell's own depth (:class:`DepthMatchedIndex`).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import faiss
import numpy as np
import scipy.sparse as sp

from cellatlas import fusion

KNN_DEPTH_STEP = 0.5
"""Neighbours are searched among reference cells downsampled to the query cell's depth, in steps of
this many doublings (0.5: every factor sqrt(2)), down to 1/32 of the reference's median depth (``KNN_DEPTH_LEVELS`` levels).
Measured on benchmarks/accuracy.py: PBMC3k -> Kang (Kang cells are 2-3x shallower) macro-F1
0.951 -> 0.975 and the built-in atlas on Kang 0.941 -> 0.971; whole steps (factor 2) gave 0.971."""
KNN_DEPTH_LEVELS = 11
"""Level 0 is the reference as stored; level 10 is 2**-5 = 1/32 of its median depth."""

FAISS_BLAS_THRESHOLD = 20
"""Query batch size from which faiss computes distances with BLAS. The faiss-cpu wheel in use
(1.15) sets 128,000 and only switches near 4,096 queries; splitting a chunk by depth level gives
smaller batches, which then ran 4-5x slower per query (57 vs 13 us against 2,638 cells,
2 cores). 20 is faiss's long-standing default; results are the same either way. This is a
process-wide faiss setting, lowered (never raised) when this module is imported."""
if faiss.cvar.distance_compute_blas_threshold > FAISS_BLAS_THRESHOLD:
    faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_THRESHOLD


@contextmanager
def faiss_threads(n: int = 1) -> Iterator[None]:
    """Let faiss use ``n`` OpenMP threads in the calling thread for the duration (restored after).

    The engine scores chunks in its own threads, each searching one chunk: faiss's default
    (one OpenMP thread per core inside every search) then runs cores x threads busy-waiting
    threads, which cost 40% of the CPU time of a whole annotation on a loaded 2-core machine
    (``benchmarks/throughput.py``). OpenMP's thread count is per calling thread, so this
    changes nothing for other threads or for the user's own faiss calls.
    """
    prev = faiss.omp_get_max_threads()
    if prev == n:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(prev)


STATS_MAX_CELLS = 1500
"""Reference cells whose neighbour distances estimate the statistics (all of them up to this many;
a seeded sample beyond, so a 100,000-cell level costs 1,500 searches, not 100,000: a median and a
MAD are estimated to about 2-3% of their value from that many)."""


def neighbour_stats(emb: np.ndarray, k: int = fusion.K_NEIGHBOURS, max_cells: int = STATS_MAX_CELLS) -> dict[str, float]:
    """Median and MAD of reference cells' mean distance to their k nearest other cells (exact search,
    without copying ``emb`` into an index)."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    queries = emb
    if len(emb) > max_cells:
        queries = emb[np.sort(np.random.default_rng(0).choice(len(emb), max_cells, replace=False))]
    with faiss_threads(1):
        sim, _ = faiss.knn(queries, emb, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    d = (1.0 - sim[:, 1:]).mean(axis=1)
    med = float(np.median(d))
    return {"median": med, "mad": float(np.median(np.abs(d - med))), "bandwidth": max(med, 1e-3)}


def thin(counts: sp.csr_matrix, fraction: float | np.ndarray, seed: int = 0) -> sp.csr_matrix:
    """Binomial thinning of counts to ``fraction`` of their depth (deterministic).

    ``fraction`` is one number for every cell or one per row of ``counts``.
    """
    out = counts.copy()
    rng = np.random.default_rng(seed)
    if np.ndim(fraction):
        fraction = np.repeat(np.asarray(fraction, dtype=np.float64), np.diff(out.indptr))
    out.data = rng.binomial(np.rint(out.data).astype(np.int64), fraction).astype(np.float32)
    out.eliminate_zeros()
    return out


def downsample(counts: sp.csr_matrix, target: float, seed: int = 0) -> sp.csr_matrix:
    """Thin every cell deeper than ``target`` total counts down to about ``target``; shallower cells are kept.

    Unlike :func:`thin` with one fraction, cells that are already shallow are not made shallower,
    so every label ends up near the same depth.
    """
    depth = np.asarray(counts.sum(axis=1)).ravel()
    return thin(counts, np.minimum(1.0, target / np.maximum(depth, 1.0)), seed=seed)


def fill_missing(sim: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours an approximate (IVF) index did not find (index -1) replaced by the nearest one found.

    A row with none found points at reference cell 0 at the largest cosine distance (2), so the
    cell reads as far from the reference rather than carrying faiss's -3.4e38 sentinel along.
    """
    missing = idx < 0
    if not missing.any():
        return sim, idx
    sim, idx = sim.copy(), idx.copy()
    none = missing[:, 0]
    sim[none, 0], idx[none, 0] = -1.0, 0
    sim = np.where(missing, sim[:, :1], sim)
    idx = np.where(missing, idx[:, :1], idx)
    return sim, idx


class DepthMatchedIndex:
    """Nearest reference neighbours at the query cell's sequencing depth.

    A query cell several times shallower than the reference lands, in the embedding,
    next to whichever reference cells look least informative (e.g. shallow NK cells next
    to naive T cells). Searching reference cells downsampled to the cell's own depth
    compares like with like. Level ``l`` holds the reference downsampled to
    ``median_depth * 2**(-l * KNN_DEPTH_STEP)``; it is built (with its own neighbour-distance
    statistics for the out-of-distribution score) the first time a query cell needs it.

    Parameters
    ----------
    embed
        Maps reference counts (over the runtime's universe) to the encoder's embedding.
    ref_counts
        Reference counts over the same genes.
    base_index, base_stats
        The full-depth index and its :func:`neighbour_stats` (level 0).
    store
        A :class:`~cellatlas.runtime_store.RuntimeStore` where built levels are kept (and
        looked up first): later processes and Dask workers then skip building them.
    approximate
        Index each level like a large reference's base index (:func:`cellatlas.refindex.make`,
        tuned on the level's cells thinned to half depth); its measured recall goes to
        :attr:`recall` (level -> recall@15).
    """

    def __init__(self, embed: Callable[[sp.csr_matrix], np.ndarray], ref_counts: sp.csr_matrix, base_index, base_stats: dict[str, float],
                 store=None, approximate: bool = False):
        self._embed, self._ref, self._store, self._approximate = embed, ref_counts, store, approximate
        self.recall: dict[str, float] = {}
        self.median_depth = float(np.median(np.asarray(ref_counts.sum(axis=1)).ravel()))
        self.n_levels = KNN_DEPTH_LEVELS
        self._levels: dict[int, tuple[Any, dict[str, float]]] = {0: (base_index, base_stats)}
        self._lock = threading.Lock()

    def levels(self, depth: np.ndarray) -> np.ndarray:
        """The level whose target depth is nearest (in log scale) to each cell's depth."""
        steps = np.log2(self.median_depth / np.maximum(depth, 1.0)) / KNN_DEPTH_STEP
        return np.clip(np.rint(steps), 0, self.n_levels - 1).astype(int)

    def level(self, lv: int) -> tuple[Any, dict[str, float]]:
        """The faiss index and neighbour statistics of level ``lv`` (built once, thread-safe)."""
        with self._lock:
            if lv not in self._levels:
                self._levels[lv] = self._stored(lv) or self._build(lv)
            return self._levels[lv]

    def build_all(self) -> None:
        """Build (or load) every level now, e.g. before sending them to Dask workers."""
        for lv in range(self.n_levels):
            self.level(lv)

    def _build(self, lv: int) -> tuple[Any, dict[str, float]]:
        from cellatlas import refindex
        from cellatlas.runtime_store import pack_json

        target = self.median_depth * 2.0 ** (-lv * KNN_DEPTH_STEP)
        counts = downsample(self._ref, target, seed=lv)
        emb = np.ascontiguousarray(self._embed(counts), dtype=np.float32)
        info: dict[str, Any] = {"kind": "flat"}
        if self._approximate:
            rows = np.sort(np.random.default_rng(lv).choice(len(emb), min(len(emb), refindex.RECALL_QUERIES), replace=False))
            queries = self._embed(thin(counts[rows], 0.5, seed=lv))
            index, info = refindex.make(emb, queries, seed=lv)
            self.recall[str(lv)] = info["recall_at_15"]
        else:
            index = faiss.IndexFlatIP(emb.shape[1])
            index.add(emb)
        stats = neighbour_stats(emb)
        if self._store is not None:
            self._store.put(f"level{lv}", {"index": faiss.serialize_index(index), "stats": pack_json(stats),
                                           "info": pack_json(info)})
        return index, stats

    def _stored(self, lv: int) -> tuple[Any, dict[str, float]] | None:
        group = self._store.get(f"level{lv}") if self._store is not None else None
        if group is None:
            return None
        from cellatlas import refindex
        from cellatlas.runtime_store import unpack_json

        info = unpack_json(group["info"]) if "info" in group else {"kind": "flat"}
        if info.get("kind") == "ivf":
            self.recall[str(lv)] = info["recall_at_15"]
        return refindex.deserialize(group["index"], info), unpack_json(group["stats"])

    def search(self, emb: np.ndarray, depth: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Similarities, reference indices and robust distance z of each cell's ``k`` neighbours at its depth."""
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        level = self.levels(depth)
        sim = np.empty((len(emb), k), dtype=np.float32)
        idx = np.empty((len(emb), k), dtype=np.int64)
        z = np.empty(len(emb), dtype=np.float32)
        for lv in np.unique(level):
            rows = np.nonzero(level == lv)[0]
            index, stats = self.level(int(lv))
            with faiss_threads(1):
                sim[rows], idx[rows] = fill_missing(*index.search(emb[rows], k))
            z[rows] = fusion.ood_z((1.0 - sim[rows]).mean(axis=1), stats["median"], stats["mad"])
        return sim, idx, z
