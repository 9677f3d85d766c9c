"""Streaming and Dask annotation: the same calls from memory, backed .h5ad, zarr, 10x .h5 and a Dask cluster."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellatlas
from cellatlas.errors import InputError
from cellatlas.stream import annotate_file

CHUNK = 64  # blocks of 64 * threads cells: several blocks per file, so block edges are exercised


@pytest.fixture(scope="module")
def cells(pbmc3k):
    """500 PBMC 3k cells with raw counts only (no layers), in memory."""
    sub = pbmc3k[np.random.default_rng(3).choice(pbmc3k.n_obs, 500, replace=False)].copy()
    sub.layers = {}
    sub.X = sp.csr_matrix(sub.X)
    return sub


@pytest.fixture(scope="module")
def files(cells, tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    cells.write_h5ad(d / "cells.h5ad")
    cells.write_zarr(d / "cells.zarr")
    return d


@pytest.fixture(scope="module")
def reference(cells):
    return cellatlas.annotate(cells)


def _same_calls(res, ref) -> None:
    labels = np.asarray(res.label if hasattr(res, "label") else res.calls["cell_type"].astype(str))
    conf = np.asarray(res.confidence if hasattr(res, "confidence") else res.calls["cell_type_confidence"])
    if hasattr(res, "cell_ids"):
        assert list(res.cell_ids) == list(ref.cell_ids)
    assert list(labels) == list(ref.label)
    np.testing.assert_allclose(conf, ref.confidence, atol=1e-5)


def _x_digest(path) -> str:
    with h5py.File(path, "r") as f:
        return hashlib.sha256(b"".join(f["X"][k][:].tobytes() for k in ("data", "indices", "indptr"))).hexdigest()


def test_backed_h5ad_zarr_and_file_give_the_in_memory_calls(cells, files, reference):
    import anndata as ad

    backed = ad.read_h5ad(files / "cells.h5ad", backed="r")
    res = cellatlas.annotate(backed, chunk_size=CHUNK)
    _same_calls(res, reference)
    assert res.gene_report["n_genes_used"] == reference.gene_report["n_genes_used"]
    np.testing.assert_allclose(res.embedding, reference.embedding, atol=1e-5)
    for path in (files / "cells.h5ad", files / "cells.zarr", f"file://{files / 'cells.zarr'}"):  # a URL: as on object storage
        fa = annotate_file(path, chunk_size=CHUNK)
        _same_calls(fa, reference)
        assert fa.provenance["n_cells"] == 500 and fa.gene_report["values"] == "counts"


def test_dask_cluster_gives_the_in_memory_calls(cells, files, reference):
    da = pytest.importorskip("dask.array")
    distributed = pytest.importorskip("distributed")

    lazy = cells.copy()
    lazy.X = da.from_array(cells.X, chunks=(150, -1))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        res = cellatlas.annotate(lazy, chunk_size=CHUNK)  # the active client's cluster
        _same_calls(res, reference)
        fa = annotate_file(files / "cells.zarr", scheduler=client, chunk_size=CHUNK)
        _same_calls(fa, reference)
        # each worker built its runtime once and kept it for its next blocks
        built = client.run(lambda: sum(1 for k in __import__("cellatlas.cluster").cluster._WORKER if k[0] == "annotator"))
        assert set(built.values()) == {1}
        # nanny-started workers run with MALLOC_TRIM_THRESHOLD_ set (distributed's default); a worker that
        # has it put back glibc's large-block reuse once, one without it was left alone
        tuned = client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"), __import__("cellatlas.cluster").cluster._WORKER.get("malloc")))
        assert all((done is True) == bool(env) for env, done in tuned.values()), tuned
        # the machine's cores are shared among both workers' task threads, not given to each
        from cellatlas.cluster import task_threads

        assert task_threads(client) == {a: max(1, os.cpu_count() // 2) for a in client.scheduler_info()["workers"]}


def test_cli_output_links_x_and_leaves_the_input_untouched(files, reference, tmp_path):
    import anndata as ad
    from typer.testing import CliRunner

    from cellatlas.cli import app

    src = tmp_path / "in.h5ad"
    src.write_bytes((files / "cells.h5ad").read_bytes())
    before, size = _x_digest(src), src.stat().st_size
    out, calls = tmp_path / "sub" / "out.h5ad", tmp_path / "calls.parquet"
    out.parent.mkdir()
    r = CliRunner().invoke(app, ["annotate", str(src), "-o", str(out), "--parquet", str(calls), "--chunk-size", str(CHUNK)])
    assert r.exit_code == 0, r.output
    assert _x_digest(src) == before and src.stat().st_size == size
    with h5py.File(out, "r") as f:
        assert isinstance(f.get("X", getlink=True), h5py.ExternalLink)  # not a copy
    assert out.stat().st_size < size / 2
    cwd = os.getcwd()
    os.chdir(tmp_path.parent)  # the link resolves from the output's folder, not the working directory
    try:
        a = ad.read_h5ad(out)
    finally:
        os.chdir(cwd)
    orig = ad.read_h5ad(src)
    assert (a.X != orig.X).nnz == 0 and list(a.obs_names) == list(orig.obs_names)
    assert list(a.obs["cell_type"].astype(str)) == list(reference.label)
    np.testing.assert_allclose(a.obsm["X_cellatlas"], reference.embedding, atol=1e-5)
    assert a.uns["cellatlas"]["provenance"]["n_cells"] == 500
    # the authors' own cell_type is kept aside, as annotate_adata does in memory
    assert list(a.obs["cell_type_uploaded"].astype(str)) == list(orig.obs["cell_type"].astype(str))
    assert dict(a.uns["cellatlas"]["moved_columns"]) == {"cell_type": "cell_type_uploaded"}
    assert "kept the file's obs['cell_type'] as obs['cell_type_uploaded']" in r.output
    df = pd.read_parquet(calls)
    expected = reference.to_dataframe()
    assert list(df.index) == list(expected.index) and list(df.columns) == list(expected.columns)
    assert (df["cell_type"] == expected["cell_type"]).all()


def test_copy_x_is_self_contained_and_in_place_keeps_x(files, reference, tmp_path):
    import anndata as ad

    src = tmp_path / "in.h5ad"
    src.write_bytes((files / "cells.h5ad").read_bytes())
    before = _x_digest(src)
    out = tmp_path / "copy.h5ad"
    annotate_file(src, output=out, copy_x=True, chunk_size=CHUNK, key_added="ca")
    moved = tmp_path / "moved.h5ad"
    src.rename(moved)  # a copy needs no input beside it
    a = ad.read_h5ad(out)
    assert a.n_obs == 500 and list(a.obs["ca"].astype(str)) == list(reference.label)
    annotate_file(moved, in_place=True, chunk_size=CHUNK, key_added="ca")
    n_cols = len(ad.read_h5ad(moved).obs.columns)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rerun replaces its own columns: nothing moved aside, no warning
        res = annotate_file(moved, in_place=True, chunk_size=CHUNK, key_added="ca")
    assert res.moved_columns == {}
    assert _x_digest(moved) == before
    b = ad.read_h5ad(moved)
    assert list(b.obs["ca"].astype(str)) == list(reference.label) and "X_cellatlas" in b.obsm
    assert len(b.obs.columns) == n_cols and not any(k.startswith("__cellatlas") or "_uploaded" in k for k in b.obs.columns)
    with pytest.raises(InputError, match="both given"):
        annotate_file(moved, in_place=True, output=tmp_path / "x.h5ad")


def test_non_h5ad_input_writes_its_counts_and_csv(files, reference, tmp_path):
    import anndata as ad

    out, csv = tmp_path / "z.h5ad", tmp_path / "calls.csv.gz"
    annotate_file(files / "cells.zarr", output=out, calls=csv, chunk_size=CHUNK)
    a, orig = ad.read_h5ad(out), ad.read_zarr(files / "cells.zarr")
    assert (a.X != orig.X).nnz == 0 and list(a.var_names) == list(orig.var_names)
    df = pd.read_csv(csv, index_col=0)
    assert list(df.index.astype(str)) == list(reference.cell_ids) and list(df["cell_type"]) == list(reference.label)


def test_10x_h5_is_read_in_blocks_like_the_reader(cells, tmp_path):
    from cellatlas import io as cio

    X = sp.csr_matrix(cells.X, dtype=np.float32)
    n, g = X.shape
    adt = sp.random(n, 2, density=0.5, format="csr", random_state=0, dtype=np.float32) * 10
    full = sp.hstack([X, adt.ceil()], format="csr")  # two antibody features, read and dropped like the reader does
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = full.data.astype(np.int32), full.indices, full.indptr
        m["shape"] = np.array([g + 2, n])
        m["barcodes"] = np.array([c.encode() for c in cells.obs_names])
        feats = m.create_group("features")
        feats["name"] = np.array([s.encode() for s in list(cells.var_names) + ["CD3_TotalSeqB", "CD19_TotalSeqB"]])
        feats["id"] = np.array([f"G{i}".encode() for i in range(g + 2)])
        feats["feature_type"] = np.array([b"Gene Expression"] * g + [b"Antibody Capture"] * 2)
    with pytest.warns(UserWarning):
        ref = cellatlas.annotate(cio.read(path))
    fa = annotate_file(path, chunk_size=CHUNK)
    _same_calls(fa, ref)


def test_bad_value_names_its_row_in_the_whole_file(cells, tmp_path):
    bad = cells.copy()
    X = bad.X.tolil()
    X[321, 5] = np.nan
    bad.X = X.tocsr()
    bad.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(InputError) as e:
        annotate_file(tmp_path / "bad.h5ad", calls=tmp_path / "c.csv", chunk_size=CHUNK)
    assert e.value.details["row"] == 321 and bad.obs_names[321] in e.value.message
    assert not (tmp_path / "c.csv").exists() and not list(tmp_path.glob(".c.csv*"))  # nothing half-written left


def test_import_loads_no_heavy_dependency():
    code = ("import sys, cellatlas, cellatlas.cli; "
            "print(sorted(m for m in ('faiss', 'scanpy', 'fastapi', 'sqlalchemy', 'anndata', 'dask', 'torch', 'httpx', 'scipy.signal', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_writer_failing_mid_run_stops_the_run_and_leaves_no_partial_file(files, tmp_path, monkeypatch):
    """An output that cannot be written stops the run with its error and removes every half-written file."""
    from cellatlas import stream_write

    real, seen = stream_write.CallsWriter.write, []

    def fail_on_third(self, part):
        seen.append(len(part))
        if len(seen) == 3:
            raise OSError("disk full")
        real(self, part)

    monkeypatch.setattr(stream_write.CallsWriter, "write", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        annotate_file(files / "cells.h5ad", calls=tmp_path / "c.csv", output=tmp_path / "o.h5ad", chunk_size=CHUNK)
    assert len(seen) == 3  # the parts after the failing one were not written
    assert not list(tmp_path.iterdir())  # neither output nor a temporary file is left


def test_value_detection_sample_is_read_in_a_few_runs_of_rows():
    from cellatlas.io_values import sample_index
    from cellatlas.stream_sources import CsrRows

    class Counting(np.ndarray):  # an on-disk array stand-in that counts its reads
        reads = 0

        def __getitem__(self, key):
            if isinstance(key, slice):
                Counting.reads += 1
            return np.asarray(super().__getitem__(key))

    n = 200_000
    X = sp.random(n, 300, density=0.01, format="csr", random_state=0, dtype=np.float32)
    idx = sample_index(n)
    assert len(idx) == 2000 and np.all(np.diff(idx) > 0) and idx[0] == 0 and idx[-1] == n - 1
    rows = CsrRows(X.data.view(Counting), X.indices.view(Counting), X.indptr, X.shape)
    got = rows[idx]
    assert (got != X[idx]).nnz == 0
    assert Counting.reads <= 2 * 40  # 40 runs of consecutive rows, one read per run and array (not 2,000)
    assert list(sample_index(1500)) == list(range(1500))


def test_worker_malloc_is_left_alone_without_the_nanny_variable(monkeypatch):
    from cellatlas import cluster

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.setattr(cluster, "_WORKER", {})
    assert cluster._worker_malloc() is False and "malloc" not in cluster._WORKER
