"""Inputs of benchmarks/scale.py: PBMC-like .h5ad files of any size, written without holding them in memory.

Cells are PBMC 3k cells of ../shared/data resampled with replacement, each binomially
thinned to a fraction drawn uniformly from [0.6, 1.0] of its counts (so no two cells are
copies, and library sizes and sparsity stay those of real 10x PBMCs, slightly shallower).
Files are written block by block with h5py in anndata's on-disk format (CSR ``X``
uncompressed, as ``AnnData.write_h5ad`` writes by default; float32 counts, int32
indices). Sizes above what the disk holds are built from a smaller file by HDF5 virtual
datasets (``virtual_repeat``): the larger file's ``X/data`` and ``X/indices`` are the
smaller file's arrays repeated, every row is read from disk like any other, cell ids are
unique.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLATLAS_SHARED_DATA") or REPO.parent / "shared" / "data")
PBMC3K = SHARED / "datasets" / "human_pbmc3k_10xv1_seurat_labels.h5ad"
BLOCK = 50_000


def _source():
    import anndata as ad

    a = ad.read_h5ad(PBMC3K)
    return a.X.tocsr().astype(np.float32), [str(g) for g in a.var_names]


def _attrs(obj, enc: str, ver: str = "0.2.0") -> None:
    obj.attrs["encoding-type"], obj.attrs["encoding-version"] = enc, ver


def _skeleton(f, n: int, genes: list[str]):
    import h5py

    f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
    for name in ("obs", "var"):
        g = f.create_group(name)
        _attrs(g, "dataframe")
        g.attrs["_index"], g.attrs["column-order"] = "_index", np.zeros(0)
    f["var"].create_dataset("_index", data=np.asarray(genes, dtype=object), dtype=h5py.string_dtype())
    _attrs(f["var/_index"], "string-array")
    ids = f["obs"].create_dataset("_index", shape=(n,), dtype=h5py.string_dtype(), chunks=(min(n, 1 << 16),))
    _attrs(ids, "string-array")
    for name in ("uns", "obsm", "layers", "varm", "obsp", "varp"):
        _attrs(f.create_group(name), "dict", "0.1.0")
    X = f.create_group("X")
    _attrs(X, "csr_matrix", "0.1.0")
    X.attrs["shape"] = np.array([n, len(genes)], dtype=np.int64)
    return X, ids


def cell_ids(start: int, stop: int) -> np.ndarray:
    return np.char.add("cell", np.char.zfill(np.arange(start, stop).astype(str), 9)).astype(object)


def write_h5ad(path: Path, n: int, seed: int = 0) -> Path:
    """An ``n``-cell PBMC-like .h5ad at ``path``, written in blocks of 50,000 cells."""
    import h5py

    src, genes = _source()
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        X, ids = _skeleton(f, n, genes)
        data = X.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 20,))
        ind = X.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indptr = X.create_dataset("indptr", shape=(n + 1,), dtype=np.int64)
        pos = 0
        indptr[0] = 0
        for a in range(0, n, BLOCK):
            b = min(a + BLOCK, n)
            rows = src[rng.integers(0, src.shape[0], b - a)]
            keep = rng.uniform(0.6, 1.0, b - a).astype(np.float64)
            rows.data = rng.binomial(rows.data.astype(np.int64), np.repeat(keep, np.diff(rows.indptr))).astype(np.float32)
            rows.eliminate_zeros()
            m = rows.nnz
            data.resize((pos + m,))
            ind.resize((pos + m,))
            data[pos:] = rows.data
            ind[pos:] = rows.indices.astype(np.int32)
            indptr[a + 1:b + 1] = rows.indptr[1:] + pos
            ids[a:b] = cell_ids(a, b)
            pos += m
    return path


def virtual_repeat(base: Path, path: Path, times: int) -> Path:
    """An .h5ad of ``times`` x the cells of ``base`` whose X arrays are HDF5 virtual datasets over ``base``'s."""
    import h5py

    with h5py.File(base, "r") as fb:
        n0, nnz = fb["X/indptr"].shape[0] - 1, fb["X/data"].shape[0]
        genes = [g.decode() if isinstance(g, bytes) else g for g in fb["var/_index"][:]]
        ip0 = fb["X/indptr"][:]
    n = n0 * times
    with h5py.File(path, "w") as f:
        X, ids = _skeleton(f, n, genes)
        for name, dtype in (("data", np.float32), ("indices", np.int32)):
            layout = h5py.VirtualLayout(shape=(nnz * times,), dtype=dtype)
            vsrc = h5py.VirtualSource(str(Path(base).resolve()), f"X/{name}", shape=(nnz,))
            for t in range(times):
                layout[t * nnz:(t + 1) * nnz] = vsrc
            X.create_virtual_dataset(name, layout)
        indptr = X.create_dataset("indptr", shape=(n + 1,), dtype=np.int64)
        indptr[0] = 0
        for t in range(times):
            indptr[t * n0 + 1:(t + 1) * n0 + 1] = ip0[1:] + t * nnz
        for a in range(0, n, 1 << 20):
            b = min(a + (1 << 20), n)
            ids[a:b] = cell_ids(a, b)
    return path


def dataset(tmp: Path, n: int, *, base: Path | None = None) -> Path:
    """The ``n``-cell input under ``tmp`` (reused when present); virtual over ``base`` when given."""
    path = tmp / f"pbmc_like_{n}.h5ad"
    if not path.exists():
        part = path.with_suffix(".partial")
        if base is not None:
            n0 = _n_cells(base)
            virtual_repeat(base, part, n // n0)
        else:
            write_h5ad(part, n)
        part.rename(path)
    return path


def _n_cells(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["X/indptr"].shape[0] - 1)
