"""Annotation of datasets larger than memory: cells read, checked and scored in blocks.

A :class:`~cellatlas.stream_sources.CellSource` reads rows of a cells x genes matrix on
demand (``.h5ad``, AnnData ``.zarr``, 10x ``.h5``, backed/h5py/zarr/dask matrices;
:mod:`cellatlas.stream_sources`).

:func:`iter_annotated` validates and scores one block at a time through the same
:class:`~cellatlas.annotate.Annotator` as the in-memory path (gene mapping and value
detection once per dataset, reading and checking the next block while the current one is scored),
so peak memory depends on the block size, not on the number of cells.
:func:`annotate_file` adds the outputs, written block by block
(:mod:`cellatlas.stream_write`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas import io as cio
from cellatlas.annotate import DEFAULT_MODEL, Annotator, _leave_unassigned, block_size
from cellatlas.atlas import DEFAULT_ATLAS, Atlas
from cellatlas.errors import InputError
from cellatlas.io_values import sample_index
from cellatlas.query import GeneSpace, Query, gene_space, prepare_query, run_gene_check
from cellatlas.result import AnnotationResult, summarise
from cellatlas.stream_sources import ArraySource, CellSource, StoreSource, TenxH5Source, is_dask, is_lazy, open_file

__all__ = ["ArraySource", "CellSource", "FileAnnotation", "Run", "StoreSource", "TenxH5Source", "annotate_file",
           "annotate_lazy", "is_dask", "is_lazy", "iter_annotated", "open_file"]


# --------------------------------------------------------------------------- engine
def detect_source_values(src: CellSource) -> tuple[tuple[str, float | None], Any]:
    """``(kind, log_base)`` of a source, judged on the rows the in-memory path samples, and those rows."""
    sample = src.sample(sample_index(src.n_cells))
    kind = cio.detect_values(sample)
    return (kind, (cio.detect_log_base(sample) if kind == "lognorm" else None)), sample


def _blocks(src: CellSource, size: int, prepare: Callable[[int, Any, np.ndarray], Query]) -> Iterator[Query]:
    """``prepare(start, rows, cell_ids)`` of consecutive blocks, read and prepared in a thread of
    their own while the consumer scores the previous block (at most one waits)."""
    q: Queue = Queue(maxsize=1)

    def read() -> None:
        try:
            for start in range(0, src.n_cells, size):
                stop = min(start + size, src.n_cells)
                q.put(prepare(start, src.rows(start, stop), src.cell_ids(start, stop)))
        except BaseException as exc:  # re-raised in the consumer
            q.put(exc)
        q.put(None)

    t = threading.Thread(target=read, name="cellatlas-reader", daemon=True)
    t.start()
    while (item := q.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item
    t.join()


def iter_annotated(
    src: CellSource,
    *,
    space: GeneSpace,
    values: tuple[str, float | None],
    annotator: Annotator,
    gene_check: Any = None,
    chunk_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[AnnotationResult]:
    """Results of consecutive blocks of ``src``, in order (each validated and scored on its own;
    cells with too little information left ``Unassigned`` as in memory)."""
    def prepare(start: int, rows: Any, ids: np.ndarray) -> Query:
        return prepare_query(rows, cell_ids=ids, space=space, values=values, row0=start, gene_check=gene_check)

    nonzero = False
    for query in _blocks(src, block_size(chunk_size), prepare):
        nonzero = nonzero or bool(query.raw.nnz and query.raw.data.any())
        part = annotator.score(query, chunk_size=chunk_size, progress=progress)
        _leave_unassigned(part)
        yield part
    if not nonzero:
        raise InputError(f"matrix has no non-zero value ({src.n_cells} cells x {len(src.genes)} genes)", field="matrix",
                         fix="Check that the matrix was filled with counts (not an empty or all-zero subset).")


@dataclass
class Run:
    """Setup of one streamed run: the source's gene space, value kind and the annotator."""

    src: CellSource
    space: GeneSpace
    values: tuple[str, float | None]
    annotator: Annotator
    gene_check: Any = None
    t0: float = field(default_factory=time.perf_counter)
    unassigned: Counter = field(default_factory=Counter)

    @classmethod
    def start(cls, src: CellSource, *, model: str = DEFAULT_MODEL, atlas: str | Atlas = DEFAULT_ATLAS,
              species: str | None = None, model_path=None, skip_gene_check: bool = False) -> "Run":
        """Map the genes, judge the values and check the gene list once (on the value-detection sample)."""
        t0 = time.perf_counter()
        space = gene_space(src.genes, species)
        values, sample = detect_source_values(src)
        sample = sp.csr_matrix(sample, dtype=np.float32, copy=True)
        sample.data[~np.isfinite(sample.data)] = 0  # the blocks name such values with their rows
        sample = cio.to_counts_like(sample, *values)  # scaled values: the usual error
        check = run_gene_check(sample, space, skip_gene_check)
        annotator = Annotator(space, model=model, atlas=atlas, model_path=model_path)
        return cls(src, space, values, annotator, check, t0)

    def parts(self, *, scheduler=None, chunk_size: int | None = None,
              progress: Callable[[int], None] | None = None) -> Iterator[AnnotationResult]:
        """Block results in order: in this process, or on a Dask cluster when ``scheduler`` is given."""
        if scheduler is not None:
            from cellatlas.cluster import iter_annotated_dask

            parts = iter_annotated_dask(self, scheduler, chunk_size=chunk_size, progress=progress)
        else:
            parts = iter_annotated(self.src, space=self.space, values=self.values, annotator=self.annotator,
                                   gene_check=self.gene_check, chunk_size=chunk_size, progress=progress)
        for part in parts:
            reasons = np.asarray(part.reason, dtype=object)
            self.unassigned.update(reasons[reasons != ""].astype(str).tolist())
            yield part

    def finish(self, res: AnnotationResult, n_cells: int) -> AnnotationResult:
        """Set the gene report and provenance of the whole run on ``res`` (and stop the engine threads)."""
        self.annotator.close()
        res.gene_report = {**self.space.report, "matrix_source": self.src.source, "values": self.values[0],
                           "n_cells": int(n_cells), "gene_check": self.gene_check.report(), **self.annotator.rt.report}
        unassigned = {"n_cells": int(sum(self.unassigned.values())), "reasons": dict(sorted(self.unassigned.items()))}
        res.provenance = self.annotator.provenance(n_cells, time.perf_counter() - self.t0, unassigned=unassigned)
        return res


def annotate_lazy(X: Any, genes: Sequence[str], cell_ids: Sequence[str] | None = None, *, source: str = "matrix",
                  species: str | None = None, scheduler=None, chunk_size: int | None = None,
                  progress: Callable[[int, int], None] | None = None, **engine: Any) -> AnnotationResult:
    """:func:`cellatlas.annotate` for a matrix read on demand (backed AnnData, h5py/zarr, dask)."""
    src = ArraySource(X, genes, cell_ids, source=source)
    if scheduler is None and src.is_dask:
        scheduler = _active_client()
    run = Run.start(src, species=species, **engine)
    parts = list(run.parts(scheduler=scheduler, chunk_size=chunk_size, progress=_counter(progress, src.n_cells)))
    return run.finish(AnnotationResult.concat(parts), src.n_cells)


def _active_client():
    """The dask.distributed client in use, if any (a dask array is then computed on its cluster)."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _counter(progress: Callable[[int, int], None] | None, total: int) -> Callable[[int], None] | None:
    if progress is None:
        return None
    done = [0]

    def step(cells: int) -> None:
        done[0] += cells
        progress(done[0], total)

    return step


# --------------------------------------------------------------------------- files
@dataclass
class FileAnnotation:
    """What :func:`annotate_file` returns: compact per-cell calls, reports and the files written.

    The full per-cell result (cell ids, alternates, markers, evidence, embedding) goes to
    the outputs; only label, confidence, band and the novel flag are kept here, one row per
    cell in input order (about 10 bytes a cell), so memory stays small for millions of cells.
    """

    calls: pd.DataFrame
    gene_report: dict[str, Any]
    provenance: dict[str, Any]
    outputs: dict[str, str]
    moved_columns: dict[str, str] = field(default_factory=dict)
    """The input's own obs columns kept under new names in the annotated .h5ad (``{old: new}``)."""

    def __len__(self) -> int:
        return len(self.calls)

    def summary(self) -> pd.DataFrame:
        """Counts per label with mean confidence and band shares (as :meth:`AnnotationResult.summary`)."""
        return summarise(self.calls)


class _Calls:
    """Accumulates the compact columns of :class:`FileAnnotation` block by block."""

    def __init__(self) -> None:
        self.labels: dict[str, int] = {}
        self.codes, self.conf, self.novel = [], [], []

    def add(self, res: AnnotationResult) -> None:
        inverse, names = pd.factorize(np.asarray(res.label, dtype=object), use_na_sentinel=False)
        codes = np.array([self.labels.setdefault(str(lab), len(self.labels)) for lab in names], dtype=np.int32)
        self.codes.append(codes[inverse] if len(inverse) else np.zeros(0, np.int32))
        self.conf.append(np.asarray(res.confidence, dtype=np.float32))
        self.novel.append(np.asarray(res.novel, dtype=bool))

    def frame(self) -> pd.DataFrame:
        from cellatlas.result import CONFIDENT, REVIEW

        cat = lambda parts, empty: np.concatenate(parts) if parts else empty  # noqa: E731
        conf = cat(self.conf, np.zeros(0, np.float32))
        band = np.where(conf >= CONFIDENT, 0, np.where(conf >= REVIEW, 1, 2)).astype(np.int8)  # band_of, as codes
        return pd.DataFrame(
            {
                "cell_type": pd.Categorical.from_codes(cat(self.codes, np.zeros(0, np.int32)), categories=list(self.labels)),
                "cell_type_confidence": conf,
                "cell_type_band": pd.Categorical.from_codes(band, categories=["confident", "review", "low"]),
                "novel": cat(self.novel, np.zeros(0, bool)),
            },
        )


def annotate_file(
    path: str | Path,
    *,
    output: str | Path | None = None,
    calls: str | Path | Sequence[str | Path] | None = None,
    in_place: bool = False,
    copy_x: bool = False,
    key_added: str = "cell_type",
    layer: str | None = None,
    use_raw: bool | None = None,
    model: str = DEFAULT_MODEL,
    atlas: str | Atlas = DEFAULT_ATLAS,
    species: str | None = None,
    model_path=None,
    skip_gene_check: bool = False,
    scheduler=None,
    chunk_size: int | None = None,
    fmt: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FileAnnotation:
    """Annotate a file block by block, writing the outputs as the blocks are scored.

    Parameters
    ----------
    path
        ``.h5ad``, AnnData ``.zarr``, 10x ``.h5`` (read in blocks), or any format
        :func:`cellatlas.io.read` reads (read whole).
    output
        Annotated ``.h5ad``: the input's obs, var and uns with the calls added (obs
        ``key_added``, ``key_added + '_confidence'``, ...; obsm ``X_cellatlas``,
        ``X_cellatlas_umap``; uns ``cellatlas``). For an ``.h5ad`` input, ``X``, layers,
        raw and the other large elements are HDF5 links to the input file: nothing is
        rewritten, and the two files must stay side by side. Other inputs have their counts
        written into it (block by block).
    calls
        Per-cell calls as ``.csv`` (``.csv.gz``, ``.tsv``) or ``.parquet``, one row per cell
        (several paths: one file each).
    in_place
        Write the annotations into the input ``.h5ad`` itself (``output`` must be unset).
    copy_x
        Make ``output`` self-contained: copy ``X`` and every other element of the input
        (stored bytes copied as they are, not re-encoded).
    key_added
        Name of the label column and prefix of the others.
    layer, use_raw, model, atlas, species, model_path, skip_gene_check
        As for :func:`cellatlas.annotate` (the gene-list check runs once, on the 2,000 rows
        value detection reads).
    scheduler
        A ``dask.distributed`` scheduler address or ``Client``: blocks are scored on that
        cluster (the workers read the input from its path, so it must be on storage they share).
    chunk_size
        Cells per engine chunk (default ``Settings.chunk_size``); a block is one chunk per thread.
    progress
        Callback ``(done, total)`` after each chunk.

    Returns
    -------
    FileAnnotation
        Compact calls (label, confidence, band, novel), gene report, provenance and the
        paths written.
    """
    from cellatlas.stream_write import CallsWriter, H5adWriter, WriteBehind

    if in_place and output is not None:
        raise InputError("in_place=True and an output path were both given", field="output",
                         fix="Either write into the input (in_place=True) or into a new file (output=...).")
    src = open_file(path, layer=layer, use_raw=use_raw, fmt=fmt, writable=in_place)
    writers: list = []
    behind = None
    try:
        run = Run.start(src, model=model, atlas=atlas, species=species, model_path=model_path, skip_gene_check=skip_gene_check)
        calls = [] if calls is None else [calls] if isinstance(calls, (str, Path)) else list(calls)
        writers.extend(CallsWriter(Path(c)) for c in calls)
        if output is not None or in_place:
            writers.append(H5adWriter(src, Path(output) if output is not None else None, key_added=key_added, copy_x=copy_x))
        acc = _Calls()
        last = None
        behind = WriteBehind(writers)
        for part in run.parts(scheduler=scheduler, chunk_size=chunk_size, progress=_counter(progress, src.n_cells)):
            acc.add(part)
            behind.put(part)
            last = part
        behind.join()
        if last is None:
            raise InputError(f"{Path(path).name} holds no cells", field="file", fix="Annotate a file with at least one cell.")
        run.finish(last, src.n_cells)
        moved: dict[str, str] = {}
        for w in writers:
            moved.update(w.close(last) or {})
        writers = []
    finally:
        if behind is not None and writers:  # stop writing before the outputs are aborted
            try:
                behind.join()
            except BaseException:
                pass
        for w in writers:
            w.abort()
        src.close()
    outputs = {f"calls{i or ''}": str(c) for i, c in enumerate(calls)}
    if output is not None or in_place:
        outputs["h5ad"] = str(output if output is not None else path)
    return FileAnnotation(acc.frame(), last.gene_report, last.provenance, outputs, moved)
