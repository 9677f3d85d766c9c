"""Scoring blocks of cells on a ``dask.distributed`` cluster.

The client prepares what every block shares (gene mapping, value kind, the atlas, the
runtime's depth levels and marker centres) and broadcasts the atlas, the gene space and
those precomputed arrays to every worker once (``Client.scatter(..., broadcast=True)``);
each worker builds its :class:`~cellatlas.annotate.Annotator` (the atlas runtime) from them
on its first block and keeps it for the next. A block is either a row
block of a dask array (``cellatlas.annotate(adata)`` with ``adata.X`` a dask array) or a
row range of a file, which the worker opens from its path (``annotate_file(...,
scheduler=...)``; the file must be on storage every worker reads: a shared file system,
or an object store mounted on each worker). Blocks are validated and scored exactly as
in-process (:meth:`Annotator.score`), each in its share of its machine's cores
(:func:`task_threads`), and results come back in input order with a bounded number of
blocks in flight.
"""

from __future__ import annotations

import os
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from cellatlas.annotate import Annotator
from cellatlas.config import get_settings
from cellatlas.errors import InputError
from cellatlas.query import GeneSpace, prepare_query
from cellatlas.result import AnnotationResult

if TYPE_CHECKING:
    from cellatlas.stream import Run

_WORKER: dict[Any, Any] = {}
"""Per worker process: annotators by (atlas sha256, model, model path, genes) and open files by their arguments."""


def connect(scheduler: Any) -> tuple[Any, bool]:
    """``(client, owned)`` for a scheduler address (``"tcp://host:8786"``) or an existing ``Client``."""
    try:
        from distributed import Client
    except ImportError as exc:  # pragma: no cover - distributed is a dependency of the scale extra
        raise InputError("running on a Dask cluster needs dask.distributed", field="scheduler",
                         fix="pip install 'cellatlas[scale]' (dask[array], distributed, zarr).") from exc
    if isinstance(scheduler, str):
        try:
            return Client(scheduler, timeout="30s"), True
        except OSError as exc:
            raise InputError(f"could not reach the Dask scheduler at {scheduler}: {exc}", field="scheduler",
                             fix="Start it (`dask scheduler`) and its workers (`dask worker ADDRESS`), or check the address.") from exc
    return scheduler, False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
WORKER_MMAP_THRESHOLD = 32 * 2**20
"""Allocations from this size up are mapped fresh from the kernel on a worker (glibc's own ceiling
for its adaptive threshold); smaller ones reuse freed heap memory (see :func:`_worker_malloc`)."""


def _worker_malloc() -> bool:
    """Let this worker process reuse freed memory for a block's large temporary arrays.

    A nanny-started ``dask.distributed`` worker runs with ``MALLOC_TRIM_THRESHOLD_=65536``
    (``distributed.nanny.pre-spawn-environ``), which also switches off glibc's adaptive mmap
    threshold: every array over 128 kB of every block is then mapped, faulted in and unmapped
    again. Scoring 1M cells on two such workers took 6M page faults and 17 s of system time
    each, 1.6x the in-process run. This restores what glibc itself settles on without the variable
    (mmap from :data:`WORKER_MMAP_THRESHOLD`, trim above twice that), once per worker process, and
    only where the variable is set: a worker started without it is left alone. Returns whether it changed anything.
    """
    if not os.environ.get("MALLOC_TRIM_THRESHOLD_") or _WORKER.get("malloc") is not None:
        return False
    _WORKER["malloc"] = False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _WORKER["malloc"] = bool(libc.mallopt(_M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD)
                                 and libc.mallopt(_M_TRIM_THRESHOLD, 2 * WORKER_MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to change
        pass
    return _WORKER["malloc"]


def _annotator(atlas, space: GeneSpace, model: str, model_path, precomputed: dict | None = None) -> Annotator:
    """This worker's annotator for the broadcast atlas and genes, built once (from the client's
    precomputed depth levels and marker centres, so no worker builds them again)."""
    key = ("annotator", atlas.sha256, model, str(model_path), hash(space.names))
    if key not in _WORKER:
        from cellatlas.runtime import AtlasRuntime

        _worker_malloc()

        rt = AtlasRuntime(atlas, model, list(space.genes), model_path=model_path, preloaded=precomputed)
        _WORKER[key] = Annotator(space, model=model, atlas=atlas, model_path=model_path, runtime=rt)
    return _WORKER[key]


def task_threads(client) -> dict[str, int]:
    """Engine threads per task for each worker: its machine's cores shared among the task threads
    of every worker on that machine (two 1-thread workers on 2 cores get 1 each, not 2: more
    threads than cores made the 2-worker run ~10% slower)."""
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:  # distributed before 2025 lists every worker without the argument
        workers = client.scheduler_info()["workers"]
    cores = client.run(os.cpu_count)
    on_host: dict[str, int] = {}
    for w in workers.values():
        on_host[w["host"]] = on_host.get(w["host"], 0) + int(w["nthreads"])
    return {a: max(1, int(cores.get(a) or 1) // max(1, on_host[w["host"]])) for a, w in workers.items()}


def _threads(table: dict[str, int] | None) -> int:
    """This worker's entry of :func:`task_threads` (1 for a worker that joined after the run started)."""
    try:
        from distributed import get_worker

        return int((table or {}).get(get_worker().address, 1))
    except (ImportError, ValueError, AttributeError):
        return 1


def _score(rows, ids, start: int, atlas, space: GeneSpace, values, check, model: str, model_path, chunk_size,
           precomputed=None, threads=None) -> AnnotationResult:
    from cellatlas.annotate import _leave_unassigned

    engine = _annotator(atlas, space, model, model_path, precomputed)
    query = prepare_query(rows, cell_ids=ids, space=space, values=values, row0=start, gene_check=check)
    part = engine.score(query, chunk_size=chunk_size, threads=_threads(threads))
    _leave_unassigned(part)
    return part


def _score_array_block(rows, ids, start, atlas, space, values, check, model, model_path, chunk_size,
                       precomputed=None, threads=None) -> AnnotationResult:
    """One row block of a dask array (the block itself arrives as the task's input)."""
    return _score(rows, ids, start, atlas, space, values, check, model, model_path, chunk_size, precomputed, threads)


def _score_file_block(open_args: dict, start: int, stop: int, atlas, space, values, check, model, model_path,
                      chunk_size, precomputed=None, threads=None) -> AnnotationResult:
    """Rows ``start:stop`` of a file the worker opens itself (kept open for its next blocks)."""
    from cellatlas.stream import open_file

    key = ("file", tuple(sorted(open_args.items())))
    if key not in _WORKER:
        _WORKER[key] = open_file(**open_args)
    src = _WORKER[key]
    return _score(src.rows(start, stop), src.cell_ids(start, stop), start, atlas, space, values, check, model, model_path,
                  chunk_size, precomputed, threads)


def _chosen(source: str) -> dict[str, Any]:
    """The matrix the client chose, named explicitly, so workers open it without judging the candidates again."""
    if source == "raw.X":
        return {"layer": None, "use_raw": True}
    if source.startswith("layers["):
        return {"layer": source[len("layers['"):-2], "use_raw": None}
    return {"layer": None, "use_raw": False}


def iter_annotated_dask(run: Run, scheduler: Any, *, chunk_size: int | None = None,
                        progress: Callable[[int], None] | None = None) -> Iterator[AnnotationResult]:
    """Block results of ``run``'s source computed on a Dask cluster, in input order."""
    client, owned = connect(scheduler)
    try:
        ann = run.annotator
        atlas_f, space_f, pre_f = client.scatter([ann.atlas, run.space, ann.rt.precomputed()], broadcast=True, hash=False)
        common = (atlas_f, space_f, run.values, run.gene_check, ann.model, ann.model_path, chunk_size, pre_f,
                  task_threads(client))
        src = run.src
        # One engine chunk per task (not one per client thread): the blocks spread evenly over
        # the workers, and a worker with several cores still splits each block among them.
        size = int(chunk_size or get_settings().chunk_size)
        if getattr(src, "is_dask", False):
            import dask

            X = src.X.rechunk({0: size, 1: -1})
            starts = np.concatenate([[0], np.cumsum(X.chunks[0])]).astype(int).tolist()
            tasks = [dask.delayed(_score_array_block)(b, src.cell_ids(starts[i], starts[i + 1]), starts[i], *common)
                     for i, b in enumerate(X.to_delayed().ravel())]
            submit = lambda batch: client.compute(batch)  # noqa: E731 - one graph per batch of blocks
        elif src.open_args is not None:
            tasks = [(a, min(a + size, src.n_cells)) for a in range(0, src.n_cells, size)]
            args = {**src.open_args, **_chosen(src.source)}
            submit = lambda batch: [client.submit(_score_file_block, args, a, b, *common, pure=False) for a, b in batch]  # noqa: E731
        else:
            raise InputError("only dask arrays and files can be annotated on a Dask cluster", field="scheduler",
                             fix="Pass adata with a dask X (anndata.experimental.read_elem_lazy) or a file path, or leave out scheduler.")
        # At most two batches of one block per worker thread are in flight: results wait on the
        # workers only until the blocks before them are written.
        width = max(1, sum(client.nthreads().values()))
        pending: deque = deque(submit(tasks[:width]))
        nxt = width
        while pending:
            if len(pending) <= width and nxt < len(tasks):
                pending.extend(submit(tasks[nxt:nxt + width]))
                nxt += width
            part = pending.popleft().result()
            if progress:
                progress(len(part))
            yield part
    finally:
        if owned:
            client.close()
