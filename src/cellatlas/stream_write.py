"""Outputs of :func:`cellatlas.stream.annotate_file`, written block by block.

:class:`CallsWriter` appends each block's :meth:`AnnotationResult.to_dataframe` rows to a
``.csv`` (``.csv.gz``) or ``.parquet`` file. :class:`H5adWriter` writes the annotations
into an ``.h5ad``: each block's columns come from :meth:`AnnotationResult.write_adata` on
a small AnnData of that block's cells (so the column list lives in one place) and are
written into preallocated HDF5 datasets in anndata's on-disk encoding.

For an ``.h5ad`` input nothing of the input's matrices is rewritten: the output keeps the
input's obs, var and uns (copied; obs gains the new columns) and reaches ``X``, layers,
raw, obsm, varm, obsp and varp through HDF5 external links (``copy_x=True`` copies them,
stored bytes as they are), or the annotations go into the input file itself. New columns
are written under temporary names and renamed at the end, so an interrupted run leaves
earlier annotations of the same name in place. Every output is written to a temporary
name first and renamed when complete. :class:`WriteBehind` writes each block in a thread of
its own while the next block is scored.
"""

from __future__ import annotations

import gzip
import os
import threading
from pathlib import Path
from queue import Queue
from typing import Any

import numpy as np
import pandas as pd

from cellatlas.errors import InputError
from cellatlas.result import AnnotationResult

_LINKED = ("X", "layers", "raw", "varm", "obsp", "varp")
"""Input elements an output .h5ad reaches through links (obsm too, member by member)."""
_TMP = "__cellatlas_tmp__"


class WriteBehind:
    """Hands scored blocks to ``writers`` in a thread of its own, in order, so writing one
    block overlaps scoring the next (at most ``depth`` blocks wait).

    A writer's error is raised by the next :meth:`put` or by :meth:`join`; blocks after it
    are dropped unwritten (the outputs are aborted by the caller anyway).
    """

    def __init__(self, writers: list, depth: int = 2) -> None:
        self.writers = writers
        self._q: Queue = Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cellatlas-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (part := self._q.get()) is not None:
            if self._error is None:
                try:
                    for w in self.writers:
                        w.write(part)
                except BaseException as exc:  # re-raised in the caller's thread
                    self._error = exc

    def put(self, part: AnnotationResult) -> None:
        self._raise()
        self._q.put(part)

    def join(self) -> None:
        """Wait until every block handed over is written; raise a writer's error."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


class CallsWriter:
    """Per-cell calls as CSV (``.csv``, ``.csv.gz``, ``.tsv``) or Parquet (``.parquet``), block by block."""

    def __init__(self, path: Path):
        self.path, self.tmp = Path(path), _tmp_path(Path(path))
        name = self.path.name.lower()
        self.parquet = name.endswith(".parquet")
        if not self.parquet and not name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
            raise InputError(f"unknown calls file type: {self.path.name}", field="calls",
                             fix="Name it .csv, .csv.gz, .tsv or .parquet.")
        self._sep = "\t" if ".tsv" in name else ","
        self._fh: Any = None
        self._pq: Any = None
        if self.parquet:
            try:
                import pyarrow  # noqa: F401
            except ImportError as exc:
                raise InputError("writing Parquet needs pyarrow", field="calls",
                                 fix="pip install pyarrow (or 'cellatlas[scale]'), or write .csv.") from exc

    def write(self, part: AnnotationResult) -> None:
        df = part.to_dataframe()
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(df, preserve_index=True)
            if self._pq is None:
                self._pq = pq.ParquetWriter(self.tmp, table.schema)
            self._pq.write_table(table.cast(self._pq.schema))
            return
        if self._fh is None:
            self._fh = gzip.open(self.tmp, "wt", newline="") if self.path.name.lower().endswith(".gz") else open(self.tmp, "w", newline="")
            df.to_csv(self._fh, sep=self._sep)
        else:
            df.to_csv(self._fh, sep=self._sep, header=False)

    def close(self, last: AnnotationResult | None = None) -> None:
        for h in (self._pq, self._fh):
            if h is not None:
                h.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        for h in (self._pq, self._fh):
            if h is not None:
                h.close()
        self.tmp.unlink(missing_ok=True)


class H5adWriter:
    """Annotations of a streamed run into an ``.h5ad`` (see the module docstring).

    Parameters
    ----------
    src
        The :class:`~cellatlas.stream.CellSource` being annotated.
    output
        New ``.h5ad`` path, or ``None`` to write into the input ``.h5ad`` (opened for writing).
    key_added
        Passed to :meth:`AnnotationResult.write_adata`.
    copy_x
        Copy the input's elements instead of linking them.
    """

    def __init__(self, src, output: Path | None, *, key_added: str = "cell_type", copy_x: bool = False):
        import h5py

        self.src, self.key, self.n, self.pos = src, key_added, src.n_cells, 0
        self.output, self.columns, self.cats, self._open = output, [], {}, {}
        from_h5ad = getattr(src, "fmt", None) == "h5ad"
        if output is None:
            if not from_h5ad or src.root.file.mode != "r+":
                raise InputError("annotating in place needs an .h5ad input opened for writing", field="in_place",
                                 fix="Pass an .h5ad file, or write a new file with output=... (-o).")
            self.f, self.tmp = src.root, None
        else:
            if output.suffix.lower() != ".h5ad":
                raise InputError(f"the annotated output must be an .h5ad file, got {output.name}", field="output",
                                 fix="Name the output NAME.h5ad (calls alone: calls=NAME.csv or .parquet).")
            if src.path is not None and output.resolve() == Path(src.path).resolve():
                raise InputError("the output is the input file", field="output",
                                 fix="Use in_place=True (--in-place) to write into the input, or choose another output path.")
            self.tmp = _tmp_path(output)
            self.f = h5py.File(self.tmp, "w")
            if from_h5ad:
                self._from_h5ad(src.root, output, copy_x)
            else:
                self._fresh(src)
        for name in ("obsm", "uns"):
            if name not in self.f:
                _dict_group(self.f, name)

    # ------------------------------------------------------------------ layout
    def _from_h5ad(self, inp, output: Path, copy_x: bool) -> None:
        """The input's small elements copied, its large ones linked (or copied when ``copy_x``)."""
        import h5py

        for k, v in inp.attrs.items():
            self.f.attrs[k] = v
        target = os.path.relpath(Path(self.src.path).resolve(), output.resolve().parent)
        for name in inp.keys():
            if copy_x or name not in (*_LINKED, "obsm"):
                inp.copy(inp[name], self.f, name)
            elif name == "obsm":
                g = self.f.create_group("obsm")
                for k, v in inp["obsm"].attrs.items():
                    g.attrs[k] = v
                for member in inp["obsm"].keys():
                    g[member] = h5py.ExternalLink(target, f"/obsm/{member}")
            else:
                self.f[name] = h5py.ExternalLink(target, f"/{name}")

    def _fresh(self, src) -> None:
        """A new .h5ad for a non-h5ad input: the matrix read (written block by block), cell ids, genes."""
        import h5py

        self.f.attrs["encoding-type"], self.f.attrs["encoding-version"] = "anndata", "0.1.0"
        obs = _frame_group(self.f, "obs")
        obs.create_dataset("_index", shape=(self.n,), dtype=h5py.string_dtype())
        _attrs(obs["_index"], "string-array")
        var = _frame_group(self.f, "var")
        var.create_dataset("_index", data=np.asarray(src.genes, dtype=object), dtype=h5py.string_dtype())
        _attrs(var["_index"], "string-array")
        X = self.f.create_group("X")
        _attrs(X, "csr_matrix", "0.1.0")
        X.attrs["shape"] = np.array([self.n, len(src.genes)], dtype=np.int64)
        X.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 18,))
        X.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        X.create_dataset("indptr", shape=(self.n + 1,), dtype=np.int64)
        self._fresh_x = True

    def _copy_rows(self, start: int, stop: int) -> None:
        import scipy.sparse as sp

        block = self.src.rows(start, stop)
        block = block.tocsr() if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
        X = self.f["X"]
        lo = X["data"].shape[0]
        for name, arr in (("data", block.data.astype(np.float32)), ("indices", block.indices.astype(np.int32))):
            X[name].resize((lo + len(arr),))
            X[name][lo:] = arr
        X["indptr"][start:stop + 1] = block.indptr.astype(np.int64) + lo
        self.f["obs/_index"][start:stop] = np.asarray(self.src.cell_ids(start, stop), dtype=object)

    # ------------------------------------------------------------------ blocks
    def write(self, part: AnnotationResult) -> None:
        """Write one block's annotations (rows ``pos:pos + len(part)``)."""
        a, b = self.pos, self.pos + len(part)
        if getattr(self, "_fresh_x", False):
            self._copy_rows(a, b)
        stub = _Stub(len(part))
        part.write_adata(stub, self.key)
        for col in stub.obs.columns:
            self._column(col, stub.obs[col], a, b)
        for name, arr in stub.obsm.items():
            ds = self._dataset("obsm", name, (self.n, *np.shape(arr)[1:]), np.asarray(arr).dtype)
            ds[a:b] = np.asarray(arr)
        self.pos = b

    def _dataset(self, group: str, name: str, shape, dtype, encoding: str = "array"):
        """The temporary dataset for ``group/name``, created on first use (its handle kept: looking
        it up again for each column of each block cost a second of h5py calls per million cells)."""
        ds = self._open.get((group, name))
        if ds is None:
            g = self.f[group]
            tmp = _TMP + name
            if tmp not in g:
                g.create_dataset(tmp, shape=shape, dtype=dtype)
                _attrs(g[tmp], encoding)
                if group == "obs":
                    self.columns.append(name)
            ds = self._open[(group, name)] = g[tmp]
        return ds

    def _column(self, col: str, values, a: int, b: int) -> None:
        import h5py

        if isinstance(values, pd.Categorical):
            cats = self.cats.setdefault(col, {})
            lookup = np.array([cats.setdefault(str(c), len(cats)) for c in values.categories], dtype=np.int32)
            codes = np.asarray(values.codes)
            ds = self._dataset("obs", col, (self.n,), np.int32, "categorical-codes")
            ds[a:b] = np.where(codes >= 0, lookup[np.maximum(codes, 0)], -1)
        elif np.asarray(values).dtype.kind in "biuf":
            values = np.asarray(values)
            self._dataset("obs", col, (self.n,), values.dtype)[a:b] = values
        else:
            ds = self._dataset("obs", col, (self.n,), h5py.string_dtype(), "string-array")
            ds[a:b] = pd.Series(values, copy=False).astype(str).to_numpy(dtype=object)

    # ------------------------------------------------------------------ finish
    def close(self, last: AnnotationResult) -> dict[str, str]:
        """Move the new columns into place, write uns and the column order; rename the file.

        Returns the input's own columns moved aside (``{old: new}``)."""
        import h5py

        if self.pos != self.n:
            raise RuntimeError(f"wrote {self.pos} of {self.n} cells")
        obs, obsm, uns = self.f["obs"], self.f["obsm"], self.f["uns"]
        renamed = self._move_aside(obs, uns)
        for col in self.columns:
            if col in obs:
                del obs[col]  # a column an earlier cellatlas run wrote: replaced, as in memory
            if col in self.cats:
                g = obs.create_group(col)
                _attrs(g, "categorical")
                g.attrs["ordered"] = False
                obs.move(_TMP + col, f"{col}/codes")
                _attrs(g["codes"], "array")
                g.create_dataset("categories", data=np.asarray(list(self.cats[col]), dtype=object), dtype=h5py.string_dtype())
                _attrs(g["categories"], "string-array")
            else:
                obs.move(_TMP + col, col)
        order = [renamed.get(str(c), str(c)) for c in obs.attrs.get("column-order", [])]
        order = [c for c in order if c not in self.columns]
        obs.attrs["column-order"] = np.asarray(order + self.columns, dtype=object)
        for name in [k for k in obsm.keys() if k.startswith(_TMP)]:
            final = name[len(_TMP):]
            if final in obsm:
                del obsm[final]
            obsm.move(name, final)
        stub = _Stub(len(last))
        last.write_adata(stub, self.key)
        rec = stub.uns.get("cellatlas", {})
        rec["moved_columns"] = {**self._previous("moved_columns", {}), **renamed}
        for name, value in stub.uns.items():
            if name in uns:
                del uns[name]
            write_uns(uns, name, value)
        if self.tmp is not None:
            self.f.close()
            os.replace(self.tmp, self.output)
        else:
            self.f.flush()
        return renamed

    def _previous(self, name: str, default):
        """An entry of the input's ``uns["cellatlas"]`` (what an earlier run recorded)."""
        rec = self.f.get("uns/cellatlas")
        if rec is None or name not in rec:
            return default
        from anndata.io import read_elem  # imports anndata (0.3-0.5 s): only when there is something to read

        return read_elem(rec[name])

    def _move_aside(self, obs, uns) -> dict[str, str]:
        """The input's own obs columns named like the new ones, renamed ``<name>_uploaded`` (the rule of
        :mod:`cellatlas.adata_out`, applied to the file); columns an earlier cellatlas run wrote are left to replace."""
        from cellatlas.adata_out import move_aside, warn_moved

        ours = {str(c) for c in np.asarray(self._previous("obs_columns", [])).tolist()}
        existing = _Stub(0)
        existing.obs = pd.DataFrame(columns=[str(k) for k in obs.keys() if not k.startswith(_TMP) and k != obs.attrs.get("_index")])
        renamed = move_aside(existing, self.columns, ours=ours)
        for old, new in renamed.items():
            obs.move(old, new)
        warn_moved(renamed, stacklevel=4)
        return renamed

    def abort(self) -> None:
        """Drop what was written: the temporary file, or the temporary columns of an in-place run."""
        if self.tmp is not None:
            try:
                self.f.close()
            finally:
                self.tmp.unlink(missing_ok=True)
            return
        for group in ("obs", "obsm"):
            for name in [k for k in self.f[group].keys() if k.startswith(_TMP)]:
                del self.f[group][name]


class _Columns(dict):
    """A stub's ``obs``: the columns as :meth:`AnnotationResult.write_adata` puts them (categoricals
    and arrays), without a DataFrame to insert each one into for every block."""

    def __init__(self, n: int):
        super().__init__()
        self.index = pd.RangeIndex(n)

    @property
    def columns(self) -> list[str]:
        return list(self)


class _Stub:
    """The part of an AnnData that :meth:`AnnotationResult.write_adata` writes into (one block's cells)."""

    def __init__(self, n: int):
        self.n_obs, self.obs, self.obsm, self.uns = n, _Columns(n), {}, {}


def write_uns(group, name: str, value: Any) -> None:
    """Write a nested dict of strings, numbers and lists in anndata's encoding (as ``write_elem`` would).

    Lists mixing types, or holding dicts, are stored as one JSON string.
    """
    import h5py

    if isinstance(value, dict):
        g = _dict_group(group, name)
        for k, v in value.items():
            write_uns(g, str(k), v)
        return
    if isinstance(value, str):
        group.create_dataset(name, data=value, dtype=h5py.string_dtype())
        _attrs(group[name], "string")
        return
    if isinstance(value, (bool, int, float, np.generic)):
        group.create_dataset(name, data=value)
        _attrs(group[name], "numeric-scalar")
        return
    arr = np.asarray(value if len(value) else [], dtype=object if value and all(isinstance(v, str) for v in value) else None)
    if arr.dtype == object and all(isinstance(v, str) for v in arr.ravel()):
        group.create_dataset(name, data=arr, dtype=h5py.string_dtype())
        _attrs(group[name], "string-array")
    elif arr.dtype.kind in "biuf":
        group.create_dataset(name, data=arr)
        _attrs(group[name], "array")
    else:
        import json

        write_uns(group, name, json.dumps(value, default=str))


def _attrs(obj, encoding: str, version: str = "0.2.0") -> None:
    obj.attrs["encoding-type"], obj.attrs["encoding-version"] = encoding, version


def _dict_group(f, name: str):
    g = f.create_group(name)
    _attrs(g, "dict", "0.1.0")
    return g


def _frame_group(f, name: str):
    g = f.create_group(name)
    _attrs(g, "dataframe")
    g.attrs["_index"] = "_index"
    g.attrs["column-order"] = np.zeros(0)  # h5py stores no empty string array; anndata reads this as no columns
    return g
