"""Zero-shot annotation: the public in-process entry points.

``annotate`` reads a count matrix and gene names, scores every cell against an
atlas (kNN vote in the model's embedding + marker-signature score), fuses the two
signals, calls a label (a coarser one when only that level is supported), and
returns an :class:`~cellatlas.result.AnnotationResult` in input order.
"""

from __future__ import annotations

import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from importlib.metadata import version as _pkg_version
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from cellatlas.atlas import DEFAULT_ATLAS, Atlas, load_atlas
from cellatlas.config import get_settings
from cellatlas.errors import InputError, ModelUnavailableError
from cellatlas.io import choose_matrix
from cellatlas.query import GeneSpace, Query, _is_anndata, column_plan, prepare_query
from cellatlas.result import AnnotationResult
from cellatlas.sparse import row_block
from cellatlas.io_qc import UNASSIGNED, doublet_scores, unassigned_reasons

if TYPE_CHECKING:  # the runtime imports faiss: loaded on first use, not with ``import cellatlas``
    from cellatlas.runtime import AtlasRuntime

DEFAULT_MODEL = "default"


@lru_cache(maxsize=1)
def code_version() -> str:
    try:
        return _pkg_version("cellatlas")
    except Exception:  # pragma: no cover - running from a source tree without install
        return "0+unknown"


@lru_cache(maxsize=16)
def _runtime_cached(atlas_key: str, model: str, genes: tuple[str, ...], model_path: str | None) -> AtlasRuntime:
    from cellatlas.runtime import AtlasRuntime

    return AtlasRuntime(load_atlas(atlas_key), model, list(genes), model_path=model_path)


def get_runtime(atlas: Atlas, model: str, genes: Sequence[str], model_path=None) -> AtlasRuntime:
    """A cached runtime for files on disk; a fresh one for in-memory atlases."""
    if atlas.path is not None:
        return _runtime_cached(str(atlas.path), model, tuple(genes), str(model_path) if model_path else None)
    from cellatlas.runtime import AtlasRuntime

    return AtlasRuntime(atlas, model, genes, model_path=model_path)


class Annotator:
    """What every chunk of one dataset shares: atlas, model check, runtime and column plan.

    Built once per dataset (per worker on a Dask cluster); :meth:`score` annotates one
    :class:`~cellatlas.query.Query` over the same columns. In-memory, streamed and Dask
    annotation all go through it.

    Parameters
    ----------
    columns
        A :class:`~cellatlas.query.GeneSpace` or :class:`~cellatlas.query.Query`
        (anything with ``genes``, ``colmap`` and ``mapping``).
    runtime
        An already built runtime for these genes (Dask workers cache theirs).
    """

    def __init__(self, columns: GeneSpace | Query, *, model: str = DEFAULT_MODEL, atlas: str | Atlas = DEFAULT_ATLAS,
                 model_path=None, runtime: AtlasRuntime | None = None):
        t0 = time.perf_counter()
        self.model, self.model_path = (model or DEFAULT_MODEL).lower(), model_path
        self.atlas = load_atlas(atlas)
        _check_model(self.model, model_path)
        if self.model == DEFAULT_MODEL and columns.mapping is not None:
            from cellatlas.runtime import check_atlas_coverage

            # Names the likely cause (barcodes as genes, unmapped ids, wrong species, ...).
            check_atlas_coverage(columns.mapping, self.atlas)
        self.rt = runtime or get_runtime(self.atlas, self.model, list(columns.genes), model_path)
        self.plan = column_plan(columns.colmap, len(columns.genes), self.rt.q_cols)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self.setup_seconds = time.perf_counter() - t0

    def _threads(self, threads: int) -> ThreadPoolExecutor:
        """This dataset's engine threads, started once and reused by every block (a pool per
        block started new threads, and new malloc arenas with them, block after block)."""
        if self._pool is None or self._pool_size != threads:
            self.close()
            self._pool, self._pool_size = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cellatlas-engine"), threads
            weakref.finalize(self, self._pool.shutdown, wait=False)
        return self._pool

    def close(self) -> None:
        """Stop the engine threads (also done when the annotator is garbage-collected)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def score(self, query: Query, *, chunk_size: int | None = None, threads: int | None = None,
              progress: Callable[[int], None] | None = None) -> AnnotationResult:
        """Calls for every cell of ``query``, in order (no provenance; see :meth:`provenance`).

        Chunks of ``chunk_size`` cells (default ``Settings.chunk_size``) are independent
        (results do not depend on the chunking) and the heavy steps (sparse selection,
        ranks, faiss, matrix products) release the GIL, so they are scored in ``threads``
        threads (default ``Settings.threads``). Foundation models run serially (torch
        threads on its own, and device memory is per call). ``progress(cells)`` is called
        after each chunk with the number of cells it held.
        """
        rt = self.rt
        if threads is None:
            threads = get_settings().resolved_threads if self.model == DEFAULT_MODEL else 1
        chunks = chunk_slices(query.n_cells, chunk_size or get_settings().chunk_size, threads)
        if len(chunks) == 1 or threads <= 1:
            parts = []
            for rows in chunks:
                parts.append(_annotate_chunk(rt, query, self.plan, rows))
                if progress:
                    progress(len(parts[-1]))
            return AnnotationResult.concat(parts)
        parts = []
        with one_blas_thread():
            for part in self._threads(threads).map(lambda rows: _annotate_chunk(rt, query, self.plan, rows), chunks):
                parts.append(part)
                if progress:
                    progress(len(part))
        return AnnotationResult.concat(parts)

    def provenance(self, n_cells: int, seconds: float, *, cluster_vote: bool = False, changed: int | None = None,
                   unassigned: dict[str, Any] | None = None, doublets: dict[str, Any] | None = None) -> dict[str, Any]:
        """The provenance record of a run over ``n_cells`` cells that took ``seconds``."""
        at = self.atlas
        return {
            "code_version": code_version(),
            "model": self.model,
            "model_fingerprint": self.rt.encoder.fingerprint(),
            "atlas": at.name,
            "atlas_version": at.version,
            "atlas_sha256": at.sha256,
            "n_cells": int(n_cells),
            "seconds": round(seconds, 4),
            "setup_seconds": round(self.setup_seconds, 4),
            "cluster_vote": bool(cluster_vote),
            "cluster_vote_changed": changed,
            "unassigned": unassigned or {"n_cells": 0, "reasons": {}},
            "doublets": doublets or {"computed": False, "note": None},
            "bands": {"confident": 0.7, "review": 0.4},
        }


def annotate_query(
    query: Query,
    *,
    model: str = DEFAULT_MODEL,
    atlas: str | Atlas = DEFAULT_ATLAS,
    model_path=None,
    chunk_size: int | None = None,
    cluster_vote: bool = False,
    doublets: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> AnnotationResult:
    """Annotate an already prepared :class:`~cellatlas.query.Query`."""
    t0 = time.perf_counter()
    engine = Annotator(query, model=model, atlas=atlas, model_path=model_path)
    n = query.n_cells
    done = [0]

    def step(cells: int) -> None:
        done[0] += cells
        progress(done[0], n)

    try:
        res = engine.score(query, chunk_size=chunk_size, progress=step if progress else None)
    finally:
        engine.close()
    changed = None
    if cluster_vote:
        from cellatlas.voting import majority_vote

        changed = int(majority_vote(res).sum())
    unassigned = _leave_unassigned(res)
    doublet_note = None
    if doublets:
        res.doublet_score, doublet_note = doublet_scores(query.raw)
    res.gene_report = {**query.report, **engine.rt.report}
    res.provenance = engine.provenance(n, time.perf_counter() - t0, cluster_vote=cluster_vote, changed=changed,
                                       unassigned=unassigned, doublets={"computed": bool(doublets), "note": doublet_note})
    return res


def chunk_slices(n: int, size: int, threads: int = 1) -> list[slice]:
    """Row slices of at most ``size`` cells, in equal parts and a multiple of ``threads`` of them."""
    k = max(1, -(-n // max(1, size)))
    if threads > 1 and n >= 2 * threads * 256:  # parallel only where chunks stay worthwhile
        k = -(-k // threads) * threads
    bounds = np.linspace(0, n, k + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limits: Any = None


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS (numpy's and faiss's OpenBLAS) on one thread while engine threads score chunks in
    parallel: each engine thread already keeps a core busy, and BLAS threads on top of them
    oversubscribe the cores and spin. Process-wide (BLAS has no per-thread setting), so the
    previous limits come back when the last concurrent user leaves.
    """
    global _blas_users, _blas_limits
    from threadpoolctl import threadpool_limits

    with _blas_lock:
        if _blas_users == 0:
            _blas_limits = threadpool_limits(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limits.restore_original_limits()
                _blas_limits = None


def block_size(chunk_size: int | None = None) -> int:
    """Cells read at once from a file or taken as one Dask block: one chunk per engine thread.

    ``Settings.chunk_size`` stays the one setting: a block of ``chunk_size * threads`` cells
    is split back into ``threads`` chunks by :meth:`Annotator.score`.
    """
    s = get_settings()
    return int(chunk_size or s.chunk_size) * s.resolved_threads


def _check_model(model: str, model_path) -> None:
    """Unknown name -> 404; known but not runnable here -> 409 with how to install it."""
    from cellatlas.encoders import model_status

    status = model_status(model, model_path=model_path)  # raises UnknownModelError
    if not status["usable"]:
        raise ModelUnavailableError(
            f"Model '{model}' cannot run here: {status['reason']}",
            fix=f"Install its weights (see `cellatlas models list` and docs/foundation.md) or use model='{DEFAULT_MODEL}'.",
            field="model",
        )


def _chunk_input(rt: AtlasRuntime, query: Query, plan, rows: slice) -> tuple:
    """``(counts, stored)`` arguments of ``rt.score`` / ``rt.place`` for rows ``rows``.

    The default model reads only the atlas's genes, straight from the input columns;
    foundation models read every gene of the merged matrix.
    """
    if rt.model == DEFAULT_MODEL:
        return None, query.take(plan, rows.start, rows.stop)
    return row_block(query.counts, rows.start, rows.stop), None


def _leave_unassigned(res: AnnotationResult) -> dict[str, Any]:
    """Cells with a ``reason`` (too little information, :func:`cellatlas.io_qc.unassigned_reasons`)
    become ``"Unassigned"`` with confidence 0 (band low), in place, after scoring and any cluster vote.

    The evidence columns keep what the engine saw. Returns the count per reason, for provenance.
    """
    hit = np.asarray(res.reason, dtype=object) != ""
    if hit.any():
        res.label[hit] = UNASSIGNED
        res.ontology_id[hit] = ""
        res.level[hit] = "none"
        res.confidence = np.where(hit, 0.0, res.confidence).astype(np.float32)
        res.parent_label[hit] = ""
        res.parent_confidence = np.where(hit, np.nan, res.parent_confidence).astype(np.float32)
        res.novel = np.where(hit, False, res.novel)
        res.alternates.labels[hit] = ""
        res.alternates.scores[hit] = np.nan
        for i in np.flatnonzero(hit):
            res.markers[i] = []
    reasons, counts = np.unique(np.asarray(res.reason, dtype=object)[hit].astype(str), return_counts=True)
    return {"n_cells": int(hit.sum()), "reasons": dict(zip(reasons.tolist(), counts.tolist()))}


def _annotate_chunk(rt: AtlasRuntime, query: Query, plan, rows: slice) -> AnnotationResult:
    counts, stored = _chunk_input(rt, query, plan, rows)
    sc = rt.score(counts, stored)
    qc = query.qc(rows.start, rows.stop)
    read = np.asarray((stored if stored is not None else counts).sum(axis=1)).ravel()
    nodes = np.asarray(rt.hierarchy.nodes, dtype=object)
    cands = np.asarray(rt.candidates, dtype=object)
    ref_labels = np.asarray(rt.atlas.reference_labels, dtype=object)
    kl, ml = sc.vote.argmax(axis=1), sc.marker_prob.argmax(axis=1)
    r = np.arange(len(kl))
    above = rt.hierarchy.above
    voted = sc.vote[r, kl] > 0  # no neighbours when the atlas runs on markers alone: no neighbours' label
    # Both signals fall at or below the call: the neighbours' label and the markers' best label.
    agreement = voted & above[rt.ref_node[kl], sc.call] & above[ml, sc.call]
    return AnnotationResult(
        cell_ids=query.cell_ids[rows],
        label=nodes[sc.call],
        ontology_id=rt.ontology[sc.call],
        confidence=sc.confidence,
        level=np.where(sc.coarse, "coarse", "fine").astype(object),
        alternates=rt.alternates(sc),
        markers=rt.expressed_markers(sc),
        knn_label=np.where(voted, ref_labels[kl], ""),
        knn_prob=sc.vote[r, kl].astype(np.float32),
        marker_label=cands[ml],
        marker_score=sc.marker_prob[r, ml].astype(np.float32),
        agreement=agreement,
        distance=sc.distance,
        novel=sc.novel,
        parent_label=np.where(sc.parent >= 0, nodes[np.maximum(sc.parent, 0)], ""),
        parent_confidence=sc.parent_confidence,
        total_counts=qc.total_counts,
        n_genes=qc.n_genes,
        pct_mito=qc.pct_mito,
        reason=unassigned_reasons(qc, read, values=query.report.get("values", "counts")),
        embedding=sc.embedding,
        layout=rt.layout(sc),
    )


def annotate(
    X,
    genes: Sequence[str] | None = None,
    *,
    model: str = DEFAULT_MODEL,
    atlas: str | Atlas = DEFAULT_ATLAS,
    cell_ids: Sequence[str] | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    species: str | None = None,
    model_path=None,
    chunk_size: int | None = None,
    cluster_vote: bool = False,
    skip_gene_check: bool = False,
    doublets: bool = False,
    progress: Callable[[int, int], None] | None = None,
    scheduler=None,
) -> AnnotationResult:
    """Annotate cells zero-shot against a reference atlas.

    Parameters
    ----------
    X
        Counts, cells x genes: scipy sparse, dense numpy or AnnData (``X``, ``.raw`` or
        ``layer``). Log-normalised input is detected and handled; scaled input is refused.
        A matrix read on demand (backed AnnData, h5py/zarr array, dask array) is read,
        checked and scored block by block (:mod:`cellatlas.stream`); a dask array runs on
        the active ``dask.distributed`` client, if any.
    genes
        Column identifiers: HGNC symbols or Ensembl ids (human), or mouse symbols/ids
        (mapped through orthologs). Taken from ``var_names`` for AnnData.
    model
        ``"default"`` (built in), ``"geneformer"`` or ``"scgpt"`` (need weights).
    atlas
        Atlas name (``"human-core"``, alias ``"human-core-2026"``), path, or :class:`Atlas`.
    cell_ids
        Row identifiers for the result (default ``obs_names`` or ``0..n-1``).
    cluster_vote
        Smooth calls by majority vote within over-clusters of the query (optional).
    skip_gene_check
        Skip the check that the gene names belong to the matrix columns (for targeted
        panels or sorted populations without housekeeping genes; see
        :func:`cellatlas.io_genecheck.check_gene_list`).
    doublets
        Add scrublet doublet scores (``doublet_score``; 3-6 ms a cell, off by default).
    progress
        Callback ``(done, total)`` after every chunk.
    scheduler
        A ``dask.distributed`` scheduler address or ``Client`` to score a dask array's
        blocks on (the atlas is sent to each worker once).

    Returns
    -------
    AnnotationResult
        Calls in input order with calibrated confidence, alternates, markers,
        evidence, per-cell QC facts, embedding, layout, gene report and provenance. Cells
        with too little information (all-zero, fewer than ``io_qc.MIN_COUNTS`` counts or
        ``io_qc.MIN_GENES`` genes, nothing in the atlas's genes) are ``"Unassigned"``
        with confidence 0 and a ``reason``.

    Raises
    ------
    GeneListMismatchError
        The gene list does not belong to the matrix columns (shifted, reversed, shuffled,
        from another dataset); the message names the likely cause and the fix.
    """
    source = "matrix"
    if _is_anndata(X):
        adata = X
        X, var_genes, source = choose_matrix(adata, layer=layer, use_raw=use_raw)
        genes = var_genes if genes is None else genes
        cell_ids = adata.obs_names if cell_ids is None else cell_ids
    from cellatlas.stream import is_lazy

    if is_lazy(X):
        whole = [name for name, on in (("cluster_vote", cluster_vote), ("doublets", doublets)) if on]
        if whole:
            raise InputError(f"{whole[0]} needs every cell in memory; it is not available for a matrix read in blocks",
                             field=whole[0], fix=f"Load the matrix into memory (adata.to_memory()) or leave out {whole[0]}.")
        from cellatlas.stream import annotate_lazy

        return annotate_lazy(X, genes, cell_ids, source=source, species=species, scheduler=scheduler, chunk_size=chunk_size,
                             progress=progress, model=model, atlas=atlas, model_path=model_path, skip_gene_check=skip_gene_check)
    query = prepare_query(X, genes, cell_ids, species=species, skip_gene_check=skip_gene_check)
    query.report["matrix_source"] = source
    return annotate_query(
        query, model=model, atlas=atlas, model_path=model_path, chunk_size=chunk_size, cluster_vote=cluster_vote,
        doublets=doublets, progress=progress,
    )


def annotate_adata(
    adata,
    *,
    key_added: str = "cell_type",
    copy: bool = False,
    layer: str | None = None,
    use_raw: bool | None = None,
    **kwargs: Any,
):
    """Annotate an AnnData: ``obs[key_added]``, ``obs[key_added + "_confidence"]``, ``_band``, ...

    Parameters
    ----------
    adata
        Cells x genes; counts from ``X``, ``layer`` or ``.raw`` (see :func:`annotate`).
    key_added
        Name of the label column and prefix of the others (default ``"cell_type"``, the
        articles' name). An existing column of one of these names that cellatlas did not
        write (e.g. the authors' ``cell_type``) is moved to ``<name>_uploaded`` with a
        warning, never overwritten (:mod:`cellatlas.adata_out`).
    copy
        Annotate and return a copy, leaving ``adata`` untouched (as in scanpy).
    **kwargs
        Passed to :func:`annotate` (``model``, ``atlas``, ``species``, ...).

    Returns
    -------
    AnnotationResult or AnnData
        The result (in place), or the annotated copy when ``copy=True``. Also written:
        ``obsm["X_cellatlas"]`` (embedding), ``obsm["X_cellatlas_projection"]`` (placement
        on the atlas layout), ``uns["cellatlas"]``; ``cellatlas.pl`` draws from these.
    """
    from cellatlas.adata_out import annotate_into

    return annotate_into(adata, lambda a: annotate(a, layer=layer, use_raw=use_raw, **kwargs), key_added=key_added, copy=copy)


def embed(
    X, genes: Sequence[str] | None = None, *, model: str = DEFAULT_MODEL, atlas: str | Atlas = DEFAULT_ATLAS, model_path=None, **kwargs: Any
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Embeddings and atlas-layout coordinates of cells, with the gene report."""
    query = prepare_query(X, genes, kwargs.pop("cell_ids", None), **kwargs)
    at = load_atlas(atlas)
    model = (model or DEFAULT_MODEL).lower()
    _check_model(model, model_path)
    if model == DEFAULT_MODEL and query.mapping is not None:
        from cellatlas.runtime import check_atlas_coverage

        check_atlas_coverage(query.mapping, at)
    rt = get_runtime(at, model, query.genes, model_path)
    embs, lays = [], []
    plan = query.plan(rt.q_cols)
    for rows in chunk_slices(query.n_cells, get_settings().chunk_size):
        emb, lay = rt.place(*_chunk_input(rt, query, plan, rows))
        embs.append(emb)
        lays.append(lay)
    return np.concatenate(embs), np.concatenate(lays), {**query.report, **rt.report}


__all__ = ["Annotator", "annotate", "annotate_adata", "annotate_query", "embed"]
