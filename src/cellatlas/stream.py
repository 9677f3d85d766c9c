"""Annotation of datasets larger than memory: cells read, checked and scored in blocks.

A :class:`CellSource` reads rows of a cells x genes matrix on demand: an ``.h5ad`` or
AnnData ``.zarr`` store (``X``, a layer or ``raw``; anndata's own readers for the
matrix, the obs index read block by block), a 10x ``.h5`` (its CSC genes x barcodes
arrays are a CSR of cells, read slice by slice), or any row-sliceable matrix (backed
AnnData, h5py or zarr arrays, a dask array). Formats that cannot be read in parts
(``.mtx``, ``.csv``, ``.zip``) are read whole.

:func:`iter_annotated` validates and scores one block at a time through the same
:class:`~cellatlas.annotate.Annotator` as the in-memory path (gene mapping and value
detection once per dataset, reading the next block while the current one is scored),
so peak memory depends on the block size, not on the number of cells.
:func:`annotate_file` adds the outputs, written block by block
(:mod:`cellatlas.stream_write`).
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas import io as cio
from cellatlas.annotate import DEFAULT_MODEL, Annotator, block_size
from cellatlas.atlas import DEFAULT_ATLAS, Atlas
from cellatlas.errors import InputError
from cellatlas.io_values import sample_index
from cellatlas.query import GeneSpace, gene_space, prepare_query
from cellatlas.result import AnnotationResult, summarise

_STORE_SUFFIXES = (".h5ad", ".zarr")


# --------------------------------------------------------------------------- sources
class CellSource:
    """Rows of a cells x genes matrix, read on demand.

    Attributes
    ----------
    genes
        Column names, as stored.
    n_cells
        Number of rows.
    source
        Which matrix of the file or AnnData is read (``"X"``, ``"raw.X"``, ``"layers['counts']"``).
    path
        The file, when read from one.
    fmt
        ``"h5ad"``, ``"zarr"``, ``"10x_h5"``, ``"array"`` or the in-memory reader's format.
    """

    genes: list[str]
    n_cells: int
    source: str = "X"
    path: Path | None = None
    fmt: str = "array"

    def rows(self, start: int, stop: int) -> Any:
        """Rows ``start:stop`` as stored (scipy sparse or numpy)."""
        raise NotImplementedError

    def cell_ids(self, start: int, stop: int) -> np.ndarray:
        """Identifiers of rows ``start:stop`` (``"start"``, ... when the input has none)."""
        return np.arange(start, stop).astype(str).astype(object)

    open_args: dict[str, Any] | None = None
    """How :func:`open_file` opened it (a Dask worker opens its own copy from these)."""

    def sample(self, idx: np.ndarray) -> Any:
        """Rows ``idx`` (increasing) for value detection."""
        return _stack([self.rows(int(i), int(i) + 1) for i in idx])

    def close(self) -> None:
        """Release the file (no-op for in-memory sources)."""

    def __enter__(self) -> "CellSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stack(parts: list) -> Any:
    return sp.vstack([sp.csr_matrix(p) for p in parts], format="csr") if any(sp.issparse(p) for p in parts) else np.vstack(parts)


class ArraySource(CellSource):
    """A row-sliceable matrix already opened: backed AnnData, h5py/zarr array, anndata sparse dataset, dask array."""

    def __init__(self, X: Any, genes: Sequence[str], cell_ids: Sequence[str] | None = None, *, source: str = "matrix"):
        self.X, self.genes, self.source = X, [str(g) for g in genes], source
        self.n_cells = int(X.shape[0])
        self._ids = cell_ids
        self.is_dask = is_dask(X)

    def rows(self, start: int, stop: int) -> Any:
        block = self.X[start:stop]
        return block.compute() if self.is_dask else block

    def cell_ids(self, start: int, stop: int) -> np.ndarray:
        if self._ids is None:
            return super().cell_ids(start, stop)
        return np.asarray(self._ids[start:stop]).astype(str).astype(object)

    def sample(self, idx: np.ndarray) -> Any:
        sub = self.X[idx]
        return sub.compute() if self.is_dask else sub


class StoreSource(CellSource):
    """An AnnData ``.h5ad`` (read with h5py) or ``.zarr`` store (anndata's readers), read without loading it.

    The matrix is chosen as :func:`cellatlas.io.choose_matrix` chooses it, each candidate
    judged on a sample of rows. An ``.h5ad``'s CSR matrices and string indexes are read
    with h5py directly (anndata, which imports dask and zarr, is loaded only for other
    encodings).
    """

    def __init__(self, path: Path, layer: str | None = None, use_raw: bool | None = None, *, writable: bool = False):
        url = _is_url(path)
        self.path, self.fmt = (str(path) if url else Path(path)), "zarr" if url or _is_zarr(path) else "h5ad"
        try:
            if self.fmt == "zarr":
                import zarr

                self._file = None
                self.root = zarr.open_group(str(path), mode="r")
            else:
                import h5py

                self._file = self.root = h5py.File(path, "r+" if writable else "r")
            self._var = _frame_index(self.root["var"])
            self._raw_var = _frame_index(self.root["raw/var"]) if "raw" in self.root and "var" in self.root["raw"] else None
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"could not read {Path(path).name} as an AnnData {self.fmt} store: {exc}", field="file",
                             fix="Check that the file is a complete .h5ad (or AnnData .zarr) written by anndata.") from exc
        shim = _StoreShim(self)
        X, genes, self.source = cio.choose_matrix(shim, layer=layer, use_raw=use_raw)
        self.X, self.genes = X, genes
        self.n_cells = int(X.shape[0])
        obs = self.root["obs"]
        self._index = obs[obs.attrs["_index"]] if "_index" in obs.attrs else None

    def element(self, key: str) -> Any:
        """A lazily read matrix element of the store (``X``, ``raw/X``, ``layers/NAME``)."""
        el = self.root[key]
        enc = _encoding(el)
        if enc == "csr_matrix" and self.fmt == "h5ad":
            return CsrRows(el["data"], el["indices"], el["indptr"], tuple(int(v) for v in el.attrs["shape"]))
        if enc in ("csr_matrix", "csc_matrix"):
            from anndata.io import sparse_dataset

            ds = sparse_dataset(el)
            if ds.format == "csc":
                warnings.warn(f"{Path(str(self.path)).name}:{key} is stored column by column (CSC): it is read whole into memory "
                              "to be annotated; store it as CSR (adata.X = adata.X.tocsr()) to read it in chunks.",
                              UserWarning, stacklevel=3)
                return ds.to_memory().tocsr()
            return ds
        return el  # dense: an h5py dataset / zarr array, sliced by rows

    def rows(self, start: int, stop: int) -> Any:
        return self.X[start:stop]

    def sample(self, idx: np.ndarray) -> Any:
        return self.X[idx]

    def cell_ids(self, start: int, stop: int) -> np.ndarray:
        if self._index is None:
            return super().cell_ids(start, stop)
        if _encoding(self._index) == "string-array":
            return _decode(self._index[start:stop])
        if not hasattr(self, "_all_ids"):  # a categorical or numeric index: read once
            from anndata.io import read_elem

            self._all_ids = np.asarray(read_elem(self._index)).astype(str).astype(object)
        return self._all_ids[start:stop]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class CsrRows:
    """Rows of a CSR matrix stored as ``data``/``indices``/``indptr`` arrays (h5py or zarr), read on demand.

    Slicing rows reads ``indptr`` for those rows and one contiguous range of the other
    two arrays: an .h5ad's ``X`` and a 10x ``.h5``'s barcodes x features matrix alike.
    """

    def __init__(self, data, indices, indptr, shape: tuple[int, int]):
        self._data, self._indices, self._indptr = data, indices, indptr
        self.shape, self.dtype = (int(shape[0]), int(shape[1])), np.dtype(data.dtype)

    def _rows(self, start: int, stop: int) -> sp.csr_matrix:
        ptr = np.asarray(self._indptr[start:stop + 1], dtype=np.int64)
        lo, hi = int(ptr[0]), int(ptr[-1])
        return sp.csr_matrix((self._data[lo:hi], self._indices[lo:hi], ptr - lo), shape=(stop - start, self.shape[1]))

    def __getitem__(self, key) -> sp.csr_matrix:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            block = self._rows(start, max(start, stop))
            return block if step == 1 else block[::step]
        idx = np.asarray(key, dtype=np.int64).ravel()
        if getattr(self, "_last", (None,))[0] is not None and np.array_equal(self._last[0], idx):
            return self._last[1]  # value detection reads the same sample rows twice
        if len(idx) * 4 >= self.shape[0]:  # most rows asked for: one read
            out = self._rows(0, self.shape[0])[idx]
        else:
            ptr = np.asarray(self._indptr[:], dtype=np.int64)
            lo, hi = ptr[idx], ptr[idx + 1]
            indptr = np.concatenate([[0], np.cumsum(hi - lo)])
            out = sp.csr_matrix((_read_ranges(self._data, lo, hi), _read_ranges(self._indices, lo, hi), indptr),
                                shape=(len(idx), self.shape[1]))
        self._last = (idx, out)
        return out


def _read_ranges(ds, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``concatenate([ds[a:b] for a, b in zip(lo, hi)])`` in one HDF5 read for h5py datasets."""
    keep = hi > lo
    lo, hi = lo[keep], hi[keep]
    out = np.empty(int((hi - lo).sum()), dtype=ds.dtype)
    if not len(out):
        return out
    if type(ds).__module__.startswith("h5py"):
        import h5py

        space = ds.id.get_space()
        space.select_hyperslab((int(lo[0]),), (int(hi[0] - lo[0]),), op=h5py.h5s.SELECT_SET)
        for a, b in zip(lo[1:].tolist(), hi[1:].tolist()):
            space.select_hyperslab((a,), (b - a,), op=h5py.h5s.SELECT_OR)
        ds.id.read(h5py.h5s.create_simple((len(out),)), space, out)
        return out
    return np.concatenate([np.asarray(ds[a:b]) for a, b in zip(lo.tolist(), hi.tolist())])


def _frame_index(group) -> pd.Index:
    """The index of an AnnData dataframe group (h5py or zarr)."""
    el = group[group.attrs["_index"]]
    if _encoding(el) == "string-array":
        return pd.Index(_decode(el[...]))
    from anndata.io import read_elem

    return pd.Index(np.asarray(read_elem(el)).astype(str))


class _StoreShim:
    """Just enough of an AnnData for :func:`cellatlas.io.choose_matrix`, backed by a store."""

    def __init__(self, src: StoreSource):
        root = src.root
        self.obs_names = None  # present for the AnnData check; never read by choose_matrix
        self.var_names = src._var
        self.X = src.element("X") if "X" in root else None
        names = list(root["layers"].keys()) if "layers" in root else []
        self.layers = _LazyMapping({n: (lambda n=n: src.element(f"layers/{n}")) for n in names})
        self.raw = None
        if src._raw_var is not None and "X" in root["raw"]:
            self.raw = type("Raw", (), {"X": src.element("raw/X"), "var_names": src._raw_var})()


class _LazyMapping(dict):
    """A dict of loaders, each called on first access (layers are opened only when read)."""

    def __getitem__(self, key):
        val = super().__getitem__(key)
        if callable(val):
            val = val()
            super().__setitem__(key, val)
        return val


class TenxH5Source(CellSource):
    """A 10x Genomics ``.h5`` (Cell Ranger v2 or v3): its genes x barcodes CSC is a CSR of cells.

    Only 'Gene Expression' features are read (as :func:`cellatlas.io.read` does); duplicated
    gene symbols are renamed alike (``X``, ``X-1``, ...).
    """

    fmt = "10x_h5"

    def __init__(self, path: Path):
        import h5py

        from cellatlas.io_readers import _gene_expression_mask, _make_unique

        self.path = Path(path)
        self._file = h5py.File(path, "r")
        f = self._file
        grp = f["matrix"] if "matrix" in f else f[next(iter(f.keys()))]
        if "features" in grp:
            names = _decode(grp["features/name"][:])
            types = _decode(grp["features/feature_type"][:]).astype(str) if "feature_type" in grp["features"] else None
        else:
            names, types = _decode(grp["gene_names"][:]), None
        keep = _gene_expression_mask(types, [], self.path)
        self._keep = None if keep is None else np.flatnonzero(keep)
        genes = [str(g) for g in (names if keep is None else names[keep])]
        self.genes = _make_unique(genes, "gene names", [])[0]
        self._barcodes = grp["barcodes"]
        n_cells = int(grp["indptr"].shape[0] - 1)
        self.X = CsrRows(grp["data"], grp["indices"], grp["indptr"], (n_cells, len(names)))
        self.n_cells = n_cells
        self.source = "X"

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        X = self.X[start:stop]
        return X if self._keep is None else X[:, self._keep]

    def sample(self, idx: np.ndarray) -> sp.csr_matrix:
        X = self.X[idx]
        return X if self._keep is None else X[:, self._keep]

    def cell_ids(self, start: int, stop: int) -> np.ndarray:
        return _decode(self._barcodes[start:stop])

    def close(self) -> None:
        self._file.close()


def open_file(path: str | Path, *, layer: str | None = None, use_raw: bool | None = None, fmt: str | None = None,
              writable: bool = False) -> CellSource:
    """Open a single-cell file for reading in blocks of cells.

    ``.h5ad`` and AnnData ``.zarr`` stores and 10x ``.h5`` files are read block by block
    (a zarr store may be a URL, e.g. ``s3://bucket/data.zarr``, read through fsspec);
    other formats (``.mtx`` directories, ``.zip``, ``.csv``) are read whole with
    :func:`cellatlas.io.read` (memory then grows with the dataset).

    ``writable=True`` opens an ``.h5ad`` for writing annotations into it.

    Raises
    ------
    InputError
        Missing or unreadable file, unknown format, unknown layer, ``use_raw`` without ``.raw``.
    """
    from cellatlas.io_readers import _detect_format, _normalise_fmt

    if _is_url(path):  # a zarr store on object storage (s3://, gs://, ... through fsspec)
        src = StoreSource(path, layer=layer, use_raw=use_raw)
        src.open_args = {"path": str(path), "layer": layer, "use_raw": use_raw, "fmt": fmt}
        return src
    p = Path(path)
    if not p.exists():
        cio.read(p)  # raises the reader's "no such file" error
    kind = "zarr" if _is_zarr(p) else (_normalise_fmt(fmt) if fmt else _detect_format(p))
    if kind == "h5":
        import h5py

        with h5py.File(p, "r") as f:
            kind = "h5ad" if {"X", "obs", "var"} <= set(f.keys()) else "10x_h5"
    if kind in ("h5ad", "zarr"):
        src: CellSource = StoreSource(p, layer=layer, use_raw=use_raw, writable=writable and kind == "h5ad")
    elif kind == "10x_h5":
        if layer is not None or use_raw:
            raise InputError("a 10x .h5 file has no layers and no .raw", field="layer" if layer else "use_raw",
                             fix="Leave out layer/use_raw for 10x files.")
        src = TenxH5Source(p)
    else:
        adata = cio.read(p, fmt)
        X, genes, source = cio.choose_matrix(adata, layer=layer, use_raw=use_raw)
        src = ArraySource(X, genes, adata.obs_names, source=source)
        src.path, src.fmt = p, adata.uns["cellatlas_io"]["format"]
    src.open_args = {"path": str(p.resolve()), "layer": layer, "use_raw": use_raw, "fmt": fmt}
    return src


def is_dask(X: Any) -> bool:
    return type(X).__module__.split(".")[0] == "dask"


def is_lazy(X: Any) -> bool:
    """Whether ``X`` is read on demand (backed AnnData, h5py/zarr, dask) rather than held in memory."""
    return not (X is None or sp.issparse(X) or isinstance(X, (np.ndarray, list, tuple))) and all(
        hasattr(X, a) for a in ("shape", "dtype", "__getitem__"))


def _is_url(path) -> bool:
    return "://" in str(path)


def _is_zarr(p: Path) -> bool:
    p = Path(p)
    return p.suffix == ".zarr" or (p.is_dir() and ((p / ".zgroup").exists() or (p / "zarr.json").exists()))


def _encoding(el: Any) -> str:
    enc = el.attrs.get("encoding-type", "array")
    return enc.decode() if isinstance(enc, bytes) else str(enc)


def _decode(values: Any) -> np.ndarray:
    """Strings as an object array, whatever the store returned (bytes, fixed width, numpy StringDType)."""
    items = np.asarray(values).tolist()
    return np.array([v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in items], dtype=object)


# --------------------------------------------------------------------------- engine
def detect_source_values(src: CellSource) -> tuple[str, float | None]:
    """``(kind, log_base)`` of a source, judged on the rows the in-memory path samples."""
    sample = src.sample(sample_index(src.n_cells))
    kind = cio.detect_values(sample)
    return kind, (cio.detect_log_base(sample) if kind == "lognorm" else None)


def _blocks(src: CellSource, size: int) -> Iterator[tuple[int, Any, np.ndarray]]:
    """``(start, rows, cell_ids)`` of consecutive blocks, the next read while the last is scored."""
    q: Queue = Queue(maxsize=1)

    def read() -> None:
        try:
            for start in range(0, src.n_cells, size):
                stop = min(start + size, src.n_cells)
                q.put((start, src.rows(start, stop), src.cell_ids(start, stop)))
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
    chunk_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[AnnotationResult]:
    """Results of consecutive blocks of ``src``, in order (each validated and scored on its own)."""
    nonzero = False
    for start, rows, ids in _blocks(src, block_size(chunk_size)):
        query = prepare_query(rows, cell_ids=ids, space=space, values=values, row0=start)
        nonzero = nonzero or bool(query.raw.nnz and query.raw.data.any())
        yield annotator.score(query, chunk_size=chunk_size, progress=progress)
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
    t0: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, src: CellSource, *, model: str = DEFAULT_MODEL, atlas: str | Atlas = DEFAULT_ATLAS,
              species: str | None = None, model_path=None) -> "Run":
        t0 = time.perf_counter()
        space = gene_space(src.genes, species)
        values = detect_source_values(src)
        if values[0] == "scaled":
            cio.to_counts_like(sp.csr_matrix((1, 1), dtype=np.float32), "scaled")  # raises the usual error
        annotator = Annotator(space, model=model, atlas=atlas, model_path=model_path)
        return cls(src, space, values, annotator, t0)

    def parts(self, *, scheduler=None, chunk_size: int | None = None,
              progress: Callable[[int], None] | None = None) -> Iterator[AnnotationResult]:
        """Block results in order: in this process, or on a Dask cluster when ``scheduler`` is given."""
        if scheduler is not None:
            from cellatlas.cluster import iter_annotated_dask

            return iter_annotated_dask(self, scheduler, chunk_size=chunk_size, progress=progress)
        return iter_annotated(self.src, space=self.space, values=self.values, annotator=self.annotator,
                              chunk_size=chunk_size, progress=progress)

    def finish(self, res: AnnotationResult, n_cells: int) -> AnnotationResult:
        """Set the gene report and provenance of the whole run on ``res``."""
        res.gene_report = {**self.space.report, "matrix_source": self.src.source, "values": self.values[0],
                           "n_cells": int(n_cells), **self.annotator.rt.report}
        res.provenance = self.annotator.provenance(n_cells, time.perf_counter() - self.t0)
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
        names, inverse = np.unique(np.asarray(res.label, dtype=str), return_inverse=True)
        codes = np.array([self.labels.setdefault(str(lab), len(self.labels)) for lab in names], dtype=np.int32)
        self.codes.append(codes[inverse.ravel()])
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
    layer, use_raw, model, atlas, species, model_path
        As for :func:`cellatlas.annotate`.
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
    from cellatlas.stream_write import CallsWriter, H5adWriter

    if in_place and output is not None:
        raise InputError("in_place=True and an output path were both given", field="output",
                         fix="Either write into the input (in_place=True) or into a new file (output=...).")
    src = open_file(path, layer=layer, use_raw=use_raw, fmt=fmt, writable=in_place)
    writers: list = []
    try:
        run = Run.start(src, model=model, atlas=atlas, species=species, model_path=model_path)
        calls = [] if calls is None else [calls] if isinstance(calls, (str, Path)) else list(calls)
        writers.extend(CallsWriter(Path(c)) for c in calls)
        if output is not None or in_place:
            writers.append(H5adWriter(src, Path(output) if output is not None else None, key_added=key_added, copy_x=copy_x))
        acc = _Calls()
        last = None
        for part in run.parts(scheduler=scheduler, chunk_size=chunk_size, progress=_counter(progress, src.n_cells)):
            acc.add(part)
            for w in writers:
                w.write(part)
            last = part
        if last is None:
            raise InputError(f"{Path(path).name} holds no cells", field="file", fix="Annotate a file with at least one cell.")
        run.finish(last, src.n_cells)
        for w in writers:
            w.close(last)
        writers = []
    finally:
        for w in writers:
            w.abort()
        src.close()
    outputs = {f"calls{i or ''}": str(c) for i, c in enumerate(calls)}
    if output is not None or in_place:
        outputs["h5ad"] = str(output if output is not None else path)
    return FileAnnotation(acc.frame(), last.gene_report, last.provenance, outputs)
