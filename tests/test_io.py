"""Tests for cellatlas.io: validation, value detection, AnnData matrix choice and file readers."""

from __future__ import annotations

import csv
import gzip
import os
import time
import warnings
import zipfile
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from cellatlas import io, io_values
from cellatlas.config import get_settings
from cellatlas.errors import InputError

SHARED = Path(
    os.environ.get("CELLATLAS_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)


# --------------------------------------------------------------------------- fixtures
def _counts(n_cells: int = 60, n_genes: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    depth = rng.uniform(0.5, 3.0, size=(n_cells, 1))
    mu = rng.gamma(0.6, 2.0, size=(1, n_genes)) * depth
    X = rng.poisson(mu).astype(np.float32)
    X[:, 0] += 1  # every cell expressed
    return X


def _genes(n: int) -> list[str]:
    return [f"GENE{i}" for i in range(n)]


def _lognorm(C: np.ndarray, base: float = np.e) -> np.ndarray:
    norm = C / C.sum(1, keepdims=True) * 1e4
    return (np.log1p(norm) / np.log(base)).astype(np.float32)


def _same_csr(a: sp.csr_matrix, b: sp.csr_matrix) -> bool:
    return (a.shape == b.shape and np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
            and np.array_equal(a.data, b.data))


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setenv("CELLATLAS_CHUNK_SIZE", "7")
    get_settings.cache_clear()
    yield 7
    get_settings.cache_clear()


def _err(excinfo) -> InputError:
    e = excinfo.value
    assert isinstance(e, InputError) and e.fix, "every InputError carries a fix"
    return e


# --------------------------------------------------------------------------- chunks
def test_iter_chunks_cover_range_and_use_settings(small_chunks):
    sl = list(io.iter_chunks(20))
    assert [(s.start, s.stop) for s in sl] == [(0, 7), (7, 14), (14, 20)]
    assert [(s.start, s.stop) for s in io.iter_chunks(5, size=2)] == [(0, 2), (2, 4), (4, 5)]
    assert list(io.iter_chunks(0)) == []
    with pytest.raises(ValueError):
        list(io.iter_chunks(5, size=0))


# --------------------------------------------------------------------------- validate_matrix
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_all_input_types_give_same_csr():
    C = _counts()
    C[C == 0] = 0
    g = _genes(C.shape[1])
    ref = io.validate_matrix(sp.csr_matrix(C), g)
    assert ref.dtype == np.float32 and ref.has_sorted_indices
    variants = [C, C.astype(np.int64), np.asmatrix(C), C.tolist(), sp.csc_matrix(C), sp.coo_matrix(C),
                sp.csr_matrix(C.astype(np.float64)), sp.csr_array(C)]
    for v in variants:
        assert _same_csr(io.validate_matrix(v, g), ref), type(v)


def test_duplicate_entries_summed_zeros_dropped_input_untouched():
    row, col, val = np.array([0, 0, 1, 1]), np.array([2, 2, 0, 1]), np.array([1.0, 2.0, 0.0, 5.0])
    coo = sp.coo_matrix((val, (row, col)), shape=(2, 3))
    out = io.validate_matrix(coo, ["A", "B", "C"])
    assert out.toarray().tolist() == [[0, 0, 3], [0, 5, 0]] and out.nnz == 2
    unsorted = sp.csr_matrix((np.array([1.0, 2.0], np.float32), np.array([2, 0]), np.array([0, 2])), shape=(1, 3))
    before = unsorted.indices.copy()
    fixed = io.validate_matrix(unsorted, ["A", "B", "C"])
    assert fixed.indices.tolist() == [0, 2] and np.array_equal(unsorted.indices, before)
    canonical = io.validate_matrix(fixed, ["A", "B", "C"])
    assert canonical is fixed  # nothing to change: no copy


def test_dense_is_processed_in_chunks(small_chunks):
    C = _counts(30, 10)
    g = _genes(10)
    out = io.validate_matrix(C, g)
    assert _same_csr(out, sp.csr_matrix(C))
    C[25, 3] = np.nan
    ids = [f"c{i}" for i in range(30)]
    with pytest.raises(InputError) as ei:
        io.validate_matrix(C, g, ids)
    e = _err(ei)
    assert e.field == "matrix" and "'c25'" in e.message and "'GENE3'" in e.message and "NaN" in e.message


def test_row_sliceable_array_like(tmp_path, small_chunks):
    C = _counts(20, 8)
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f["X"] = C
    with h5py.File(tmp_path / "m.h5", "r") as f:
        out = io.validate_matrix(f["X"], _genes(8))
        assert io.detect_values(f["X"]) == "counts"
    assert _same_csr(out, sp.csr_matrix(C))


@pytest.mark.parametrize(
    "X, genes, field, words",
    [
        (np.ones(3), ["A", "B", "C"], "matrix", ["2-D", "reshape(1, -1)"]),
        (np.ones((2, 2, 2)), ["A", "B"], "matrix", ["2-D"]),
        (np.array([["a", "b"]]), ["A", "B"], "matrix", ["non-numeric"]),
        (np.ones((2, 2), dtype=bool), ["A", "B"], "matrix", ["non-numeric"]),
        (np.zeros((0, 3)), ["A", "B", "C"], "matrix", ["empty", "0 cells x 3 genes"]),
        (np.zeros((2, 0)), [], "matrix", ["empty"]),
        (np.ones((3, 5)), ["A", "B", "C"], "matrix", ["transposed", "3 rows", "5 columns"]),
        (np.ones((2, 5)), ["A", "B", "C"], "genes", ["5 gene columns", "3 names"]),
        (np.ones((2, 3)), ["A", "", "C"], "genes", ["empty"]),
        (np.ones((2, 3)), ["A", None, "C"], "genes", ["genes[1]=None"]),
        (np.ones((2, 3)), "ABC", "genes", ["list of gene names"]),
        (np.ones((2, 3)), None, "genes", ["list of gene names"]),
        (np.array([[1.0, np.inf, 0]]), ["A", "B", "C"], "matrix", ["infinite", "'B'"]),
        (np.array([[1.0, -0.5, 0]]), ["A", "B", "C"], "matrix", ["negative", "scaled", "-0.5"]),
        (sp.csr_matrix((2, 3)), ["A", "B", "C"], "matrix", ["no non-zero"]),
        ([[1, 2], [3]], ["A", "B"], "matrix", ["2-D"]),
    ],
)
def test_validate_matrix_errors(X, genes, field, words):
    with pytest.raises(InputError) as ei:
        io.validate_matrix(X, genes)
    e = _err(ei)
    assert e.field == field, e.message
    for w in words:
        assert w in f"{e.message} | {e.fix}", (w, e.message)


def test_duplicate_genes_listed_with_fix():
    genes = ["A", "A", "B", "B", "B", "C1", "C1", "D1", "D1", "E1", "E1", "F1", "F1", "Z"]
    with pytest.raises(InputError) as ei:
        io.validate_matrix(np.ones((2, len(genes))), genes)
    e = _err(ei)
    assert e.field == "genes" and "6 gene names occur more than once" in e.message
    assert "'B' (x3)" in e.message and "'F1'" not in e.message  # at most 5 shown
    assert "var_names_make_unique" in e.fix and e.details["duplicates"][:2] == ["A", "B"]


def test_negative_fix_points_to_raw_counts():
    with pytest.raises(InputError) as ei:
        io.validate_matrix(sp.csr_matrix(np.array([[1.0, -2.0]])), ["A", "B"], ["cellX"])
    e = _err(ei)
    assert "use_raw=True" in e.fix and "layer='counts'" in e.fix and "'cellX'" in e.message


def test_cell_ids_checked():
    with pytest.raises(InputError) as ei:
        io.validate_matrix(np.ones((2, 2)), ["A", "B"], ["c1"])
    assert _err(ei).field == "cell_ids"
    with pytest.warns(UserWarning, match="more than once"):
        io.validate_matrix(np.ones((2, 2)), ["A", "B"], ["c1", "c1"])


# --------------------------------------------------------------------------- validate_csr_arrays
def test_csr_arrays_roundtrip_from_lists_and_arrays():
    M = sp.csr_matrix(_counts(25, 12))
    a = io.validate_csr_arrays(M.indptr.tolist(), M.indices.tolist(), M.data.tolist(), list(M.shape))
    b = io.validate_csr_arrays(M.indptr, M.indices, M.data, M.shape)
    c = io.validate_csr_arrays(M.indptr.astype(float), M.indices.astype(float), M.data, M.shape)
    for out in (a, b, c):
        assert out.dtype == np.float32 and _same_csr(out, M.astype(np.float32))


@pytest.mark.parametrize(
    "indptr, indices, data, shape, field, words",
    [
        ([0, 1], [0], [1.0], [1, 2, 3], "matrix.shape", ["two integers"]),
        ([0, 1], [0], [1.0], [0, 2], "matrix.shape", ["at least"]),
        ([0, 1], [0], [1.0], ["a", 2], "matrix.shape", ["two integers"]),
        ([0, 1], [0], [1.0], [True, 2], "matrix.shape", ["two integers"]),
        ([0, 1], [0], [1.0], 5, "matrix.shape", ["two integers"]),
        ([0, 1], [0], [1.0], [2, 2], "matrix.indptr", ["length 2", "n_cells + 1 = 3"]),
        ([1, 1], [0], [1.0], [1, 2], "matrix.indptr", ["start at 0"]),
        ([0, 2], [0], [1.0], [1, 2], "matrix.indptr", ["end at len(data) = 1"]),
        ([0, 2, 1, 3], [0, 1, 0], [1.0, 1, 1], [3, 2], "matrix.indptr", ["non-decreasing", "indptr[2] < indptr[1]"]),
        ([], [], [], [1, 2], "matrix.indptr", ["empty"]),
        ([0, 1], [0, 1], [1.0], [1, 2], "matrix.indices", ["length 2", "data has length 1"]),
        ([0, 2], [0, 2], [1.0, 1.0], [1, 2], "matrix.indices", ["[0, 2)", "indices[1] = 2"]),
        ([0, 1], [-1], [1.0], [1, 2], "matrix.indices", ["indices[0] = -1"]),
        ([0, 1], [0.5], [1.0], [1, 2], "matrix.indices", ["whole numbers"]),
        ([0, 1], [0], ["x"], [1, 2], "matrix.data", ["only numbers"]),
        ([0, 1], [0], [None], [1, 2], "matrix.data", ["only numbers"]),
        ([0, 1], [0], [[1.0]], [1, 2], "matrix.data", ["1-D"]),
        ([0, "1"], [0], [1.0], [1, 2], "matrix.indptr", ["only numbers"]),
    ],
)
def test_csr_array_errors(indptr, indices, data, shape, field, words):
    with pytest.raises(InputError) as ei:
        io.validate_csr_arrays(indptr, indices, data, shape)
    e = _err(ei)
    assert e.field == field, e.message
    assert "csr_matrix" in e.fix and ".indptr" in e.fix
    for w in words:
        assert w in e.message, (w, e.message)


def test_csr_arrays_fast_for_millions_of_nnz():
    n_rows, per_row, n_cols = 100_000, 30, 20_000
    rng = np.random.default_rng(1)
    indptr = np.arange(n_rows + 1, dtype=np.int64) * per_row
    indices = rng.integers(0, n_cols, size=n_rows * per_row)
    data = rng.integers(1, 20, size=n_rows * per_row).astype(np.float32)
    t = time.perf_counter()
    out = io.validate_csr_arrays(indptr, indices, data, (n_rows, n_cols))
    assert time.perf_counter() - t < 5.0 and out.nnz == 3_000_000


# --------------------------------------------------------------------------- detect / convert
def test_detect_values_kinds():
    C = _counts(300, 80)
    ln = _lognorm(C)
    assert io.detect_values(C) == "counts"
    assert io.detect_values(sp.csc_matrix(C)) == "counts"
    assert io.detect_values(ln) == "lognorm" and io.detect_values(sp.csr_matrix(ln)) == "lognorm"
    assert io.detect_values(_lognorm(C, base=2)) == "lognorm"
    z = (ln - ln.mean(0)) / (ln.std(0) + 1e-6)
    assert io.detect_values(z) == "scaled"
    lengths = np.random.default_rng(2).uniform(500, 5000, size=80)
    tpm = C / lengths
    tpm = tpm / tpm.sum(1, keepdims=True) * 1e6
    assert io.detect_values(tpm) == "nonint"
    per10 = C / C.sum(1, keepdims=True) * 10  # normalised, not logged, small values
    assert per10.max() <= 30 and io.detect_values(per10) == "nonint"
    assert io.detect_values(sp.csr_matrix((5, 4))) == "counts"


def test_detect_values_samples_rows():
    C = sp.csr_matrix(_counts(10_000, 20))
    C = C.tolil()
    assert 100 not in io_values.sample_index(10_000)
    C[100, 0] = 0.5  # a row that the sample (40 runs of 50 of the 10000 rows) skips
    assert io.detect_values(C.tocsr()) == "counts"
    C[0, 0] = -1.0  # the first row is always sampled
    assert io.detect_values(C.tocsr()) == "scaled"


def test_log_base_and_to_counts_like():
    C = _counts(200, 60)
    norm = C / C.sum(1, keepdims=True) * 1e4
    for base in (np.e, 2.0, 10.0):
        X = io.validate_matrix(_lognorm(C, base), _genes(60))
        assert io.detect_log_base(X) == pytest.approx(base)
        back = io.to_counts_like(X, "lognorm")
        assert np.allclose(back.toarray(), norm, rtol=1e-3, atol=1e-3)
        assert X.data.max() < 30  # input untouched
    X = io.validate_matrix(_lognorm(C, 2.0), _genes(60))
    forced = io.to_counts_like(X, "lognorm", base=np.e)
    assert np.allclose(forced.data, np.expm1(X.data), rtol=1e-5)
    Y = io.validate_matrix(C, _genes(60))
    assert io.to_counts_like(Y, "counts") is Y and io.to_counts_like(Y, "nonint") is Y


def test_to_counts_like_refuses_scaled_and_unknown():
    with pytest.raises(InputError) as ei:
        io.to_counts_like(sp.csr_matrix(np.ones((1, 1))), "scaled")
    e = _err(ei)
    assert e.field == "matrix" and "scaled" in e.message and "adata.raw" in e.fix
    with pytest.raises(InputError) as ei:
        io.to_counts_like(sp.csr_matrix(np.ones((1, 1))), "zscore")
    assert _err(ei).field == "values"


def test_prepare_counts():
    C = _counts(50, 30)
    out, kind = io.prepare_counts(_lognorm(C), _genes(30))
    assert kind == "lognorm" and np.allclose(out.sum(1), 1e4, rtol=1e-3)
    out, kind = io.prepare_counts(C, _genes(30))
    assert kind == "counts" and np.array_equal(out.toarray(), C)


# --------------------------------------------------------------------------- AnnData
@pytest.fixture(scope="module")
def pbmc68k():
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()


def test_pbmc68k_reduced_picks_raw(pbmc68k):
    X, genes, cells, source = io.counts_from_adata(pbmc68k)
    assert source == "raw.X" and X.shape == (700, 765) and len(genes) == 765
    assert genes == list(pbmc68k.raw.var_names) and cells == list(pbmc68k.obs_names)
    assert io.detect_values(X) == "lognorm" and io.detect_log_base(X) == pytest.approx(np.e)
    assert io.detect_values(pbmc68k.X) == "scaled"
    assert io.choose_matrix(pbmc68k, use_raw=False)[2] == "X"


def _adata(X, layers=None, raw=None):
    a = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"c{i}" for i in range(X.shape[0])]),
                   var=pd.DataFrame(index=_genes(X.shape[1])))
    for k, v in (layers or {}).items():
        a.layers[k] = v
    if raw is not None:
        a.raw = raw
    return a


def test_choose_matrix_rules():
    C = sp.csr_matrix(_counts(40, 20))
    ln = sp.csr_matrix(_lognorm(C.toarray()))
    z = np.asarray(ln.toarray() - ln.toarray().mean(0))
    assert io.choose_matrix(_adata(C))[2] == "X"
    a = _adata(ln, layers={"counts": C})
    X, genes, src = io.choose_matrix(a)
    assert src == "layers['counts']" and X is a.layers["counts"]
    a = _adata(ln, layers={"raw_counts": C})
    assert io.choose_matrix(a)[2] == "layers['raw_counts']"
    assert io.choose_matrix(_adata(ln))[2] == "X"  # lognorm with no alternative: handled downstream
    raw_src = _adata(C)
    a = _adata(ln, raw=raw_src)
    assert io.choose_matrix(a)[2] == "raw.X"  # raw holds counts
    a = _adata(z, raw=_adata(ln))
    assert io.choose_matrix(a)[2] == "raw.X"  # X scaled: raw even if lognorm
    assert io.choose_matrix(a, layer=None, use_raw=False)[2] == "X"
    a = _adata(C, layers={"counts": C})
    assert io.choose_matrix(a, layer="counts")[2] == "layers['counts']"


def test_raw_with_more_genes_keeps_its_own_names():
    full = _adata(sp.csr_matrix(_counts(30, 25)))
    sub = full[:, :10].copy()
    sub.X = sp.csr_matrix(_lognorm(sub.X.toarray()))
    sub.X.data -= 0.5
    sub.raw = full
    X, genes, cells, src = io.counts_from_adata(sub)
    assert src == "raw.X" and X.shape == (30, 25) and genes == _genes(25)


@pytest.mark.parametrize(
    "kwargs, field, words",
    [
        ({"layer": "nope"}, "layer", ["no layer 'nope'", "['counts']"]),
        ({"use_raw": True}, "use_raw", ["adata.raw is not set"]),
        ({"layer": "counts", "use_raw": True}, "layer", ["both"]),
    ],
)
def test_choose_matrix_errors(kwargs, field, words):
    C = sp.csr_matrix(_counts(10, 5))
    with pytest.raises(InputError) as ei:
        io.choose_matrix(_adata(C, layers={"counts": C}), **kwargs)
    e = _err(ei)
    assert e.field == field
    for w in words:
        assert w in e.message


def test_scaled_without_alternative_and_not_anndata(pbmc68k):
    z = np.array([[1.0, -1.0], [-1.0, 1.0]])
    with pytest.raises(InputError) as ei:
        io.choose_matrix(_adata(z))
    assert "scaled" in _err(ei).message
    with pytest.raises(InputError) as ei:
        io.counts_from_adata(pbmc68k, use_raw=False)
    assert "negative" in _err(ei).message
    with pytest.raises(InputError) as ei:
        io.counts_from_adata(np.ones((2, 2)))
    assert _err(ei).field == "adata"


# --------------------------------------------------------------------------- readers
GENE_IDS = [f"ENSG{i:011d}" for i in range(6)]
SYMBOLS = ["CD3E", "MS4A1", "LYZ", "ACTB", "GAPDH", "CD3E"]  # duplicated symbol, as in real 10x files
TYPES = ["Gene Expression"] * 5 + ["Gene Expression"]
BARCODES = [f"AAACCTGAGAAG{a}{b}CT-1" for a in "ACG" for b in "ACGT"][:10]


def _ten_x_counts() -> np.ndarray:
    return _counts(len(BARCODES), len(SYMBOLS), seed=5)  # cells x genes


def _write_tsv(path: Path, rows: list[list[str]]) -> None:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", newline="") as fh:
        csv.writer(fh, delimiter="\t", lineterminator="\n").writerows(rows)


def _write_10x_dir(folder: Path, C: np.ndarray, *, legacy=False, gz=True, prefix="", extra_feature=False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    z = ".gz" if gz else ""
    ids, syms, types = list(GENE_IDS), list(SYMBOLS), list(TYPES)
    M = C
    if extra_feature:
        ids, syms, types = ids + ["CD4_TotalSeqB"], syms + ["CD4"], types + ["Antibody Capture"]
        M = np.hstack([C, np.full((C.shape[0], 1), 7.0, np.float32)])
    mtx = folder / f"{prefix}matrix.mtx{z}"
    with (gzip.open(mtx, "wb") if gz else open(mtx, "wb")) as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(M.T.astype(np.int64)))
    if legacy:
        _write_tsv(folder / f"{prefix}genes.tsv{z}", [[i, s] for i, s in zip(ids, syms)])
    else:
        _write_tsv(folder / f"{prefix}features.tsv{z}", [[i, s, t] for i, s, t in zip(ids, syms, types)])
    _write_tsv(folder / f"{prefix}barcodes.tsv{z}", [[b] for b in BARCODES])


def _check_10x(adata, C) -> None:
    assert adata.var_names.tolist() == ["CD3E", "MS4A1", "LYZ", "ACTB", "GAPDH", "CD3E-1"]
    assert adata.var["gene_ids"].tolist() == GENE_IDS
    assert adata.obs_names.tolist() == BARCODES
    assert np.array_equal(np.asarray(adata.X.toarray()), C)
    info = adata.uns["cellatlas_io"]
    assert list(info["renamed_genes_from"]) == ["CD3E"] and list(info["renamed_genes_to"]) == ["CD3E-1"]


def test_read_10x_mtx_variants(tmp_path):
    C = _ten_x_counts()
    for name, kw in {"v3gz": {}, "legacy": {"legacy": True, "gz": False}, "v3plain": {"gz": False},
                     "prefixed": {"prefix": "GSM1_"}}.items():
        _write_10x_dir(tmp_path / name, C, **kw)
        with pytest.warns(UserWarning, match="duplicated gene names renamed"):
            a = io.read(tmp_path / name)
        _check_10x(a, C)
        assert a.uns["cellatlas_io"]["format"] == "10x_mtx"


def test_read_10x_mtx_drops_antibody_features_with_a_note(tmp_path):
    C = _ten_x_counts()
    _write_10x_dir(tmp_path / "d", C, extra_feature=True)
    with pytest.warns(UserWarning) as rec:
        a = io.read(tmp_path / "d")
    messages = " ".join(str(w.message) for w in rec)
    assert "dropped 1 'Antibody Capture'" in messages and "'CD3E' -> 'CD3E-1'" in messages
    _check_10x(a, C)
    assert any("Antibody Capture" in n for n in a.uns["cellatlas_io"]["notes"])


def test_read_zip_nested_and_errors(tmp_path):
    C = _ten_x_counts()
    _write_10x_dir(tmp_path / "src" / "sample" / "filtered_feature_bc_matrix", C)
    zpath = tmp_path / "upload.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in (tmp_path / "src").rglob("*"):
            if p.is_file():
                zf.write(p, p.relative_to(tmp_path / "src"))
        zf.writestr("__MACOSX/sample/._matrix.mtx.gz", b"junk")
    with pytest.warns(UserWarning):
        a = io.read(zpath)
    _check_10x(a, C)
    assert a.uns["cellatlas_io"]["format"] == "zip/10x_mtx" and a.uns["cellatlas_io"]["source"] == "upload.zip"
    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as zf:
        for sub in ("a", "b"):
            for p in (tmp_path / "src").rglob("*"):
                if p.is_file():
                    zf.write(p, f"{sub}/{p.relative_to(tmp_path / 'src')}")
    with pytest.raises(InputError) as ei:
        io.read(two)
    assert "2 matrices" in _err(ei).message
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(InputError) as ei:
        io.read(bad)
    assert _err(ei).field == "file"


def _write_10x_h5(path: Path, C: np.ndarray) -> None:
    ids = GENE_IDS + ["CD4_TotalSeqB"]
    names = SYMBOLS + ["CD4"]
    types = TYPES + ["Antibody Capture"]
    # 10x stores the genes x cells matrix column-compressed: the same arrays as cells x genes CSR
    M = sp.csr_matrix(np.hstack([C, np.full((C.shape[0], 1), 3.0)]).astype(np.int32))
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = M.data, M.indices.astype(np.int64), M.indptr.astype(np.int64)
        m["shape"] = np.array([M.shape[1], M.shape[0]], dtype=np.int32)
        m["barcodes"] = np.array(BARCODES, dtype="S")
        feats = m.create_group("features")
        feats["id"], feats["name"] = np.array(ids, dtype="S"), np.array(names, dtype="S")
        feats["feature_type"] = np.array(types, dtype="S")
        feats["genome"] = np.array(["GRCh38"] * len(ids), dtype="S")
        feats["_all_tag_keys"] = np.array([b"genome"])


def test_read_10x_h5_v3(tmp_path):
    C = _ten_x_counts()
    _write_10x_h5(tmp_path / "filtered_feature_bc_matrix.h5", C)
    with pytest.warns(UserWarning) as rec:
        a = io.read(tmp_path / "filtered_feature_bc_matrix.h5")
    assert sum("Antibody Capture" in str(w.message) or "CD3E-1" in str(w.message) for w in rec) == 2
    _check_10x(a, C)
    assert a.uns["cellatlas_io"]["format"] == "10x_h5" and a.X.dtype == np.float32
    assert a.var["genome"].tolist() == ["GRCh38"] * 6


def test_read_h5ad_and_content_sniffing(tmp_path):
    C = sp.csr_matrix(_counts(12, 7))
    a = _adata(C)
    a.write_h5ad(tmp_path / "x.h5ad")
    b = io.read(tmp_path / "x.h5ad")
    assert _same_csr(sp.csr_matrix(b.X), C) and b.uns["cellatlas_io"]["format"] == "h5ad"
    os.replace(tmp_path / "x.h5ad", tmp_path / "upload.bin")
    assert io.read(tmp_path / "upload.bin").uns["cellatlas_io"]["format"] == "h5ad"  # HDF5 magic bytes
    os.replace(tmp_path / "upload.bin", tmp_path / "x.h5")
    assert io.read(tmp_path / "x.h5").uns["cellatlas_io"]["format"] == "h5ad"
    b.write_h5ad(tmp_path / "again.h5ad")  # the io record is writable
    assert ad.read_h5ad(tmp_path / "again.h5ad").uns["cellatlas_io"]["format"] == "h5ad"


def _frame() -> tuple[pd.DataFrame, np.ndarray]:
    C = _ten_x_counts()[:, :5]
    return pd.DataFrame(C, index=BARCODES, columns=SYMBOLS[:5]), C


def test_read_csv_both_orientations_same_result(tmp_path):
    df, C = _frame()
    df.to_csv(tmp_path / "cells.csv")
    df.T.to_csv(tmp_path / "genes.tsv.gz", sep="\t")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = io.read(tmp_path / "cells.csv")
    with pytest.warns(UserWarning, match="transposed"):
        b = io.read(tmp_path / "genes.tsv.gz")
    for x in (a, b):
        assert x.var_names.tolist() == SYMBOLS[:5] and x.obs_names.tolist() == BARCODES
        assert np.array_equal(np.asarray(x.X.toarray()), C)
    assert not a.uns["cellatlas_io"]["transposed"] and b.uns["cellatlas_io"]["transposed"]


def test_read_table_orientation_without_barcodes(tmp_path, small_chunks):
    genes = ["ACTB", "GAPDH", "CD3E", "MS4A1", "LYZ", "NKG7"]
    C = _counts(20, len(genes), seed=9)  # 20 rows > chunk size 7: chunked body reading
    df = pd.DataFrame(C, index=[f"cell{i}" for i in range(20)], columns=genes)
    df.T.to_csv(tmp_path / "g.csv")
    with pytest.warns(UserWarning, match="transposed"):
        a = io.read(tmp_path / "g.csv")
    assert a.var_names.tolist() == genes and np.array_equal(np.asarray(a.X.toarray()), C)
    df.to_csv(tmp_path / "c.txt", sep="\t")
    b = io.read(tmp_path / "c.txt")
    assert b.var_names.tolist() == genes and not b.uns["cellatlas_io"]["transposed"]


def test_read_table_header_without_corner_field(tmp_path):
    df, C = _frame()
    lines = [",".join(SYMBOLS[:5])] + [",".join([bc] + [str(int(v)) for v in row]) for bc, row in zip(BARCODES, C)]
    (tmp_path / "r.csv").write_text("\n".join(lines) + "\n")
    a = io.read(tmp_path / "r.csv")
    assert a.var_names.tolist() == SYMBOLS[:5] and np.array_equal(np.asarray(a.X.toarray()), C)


@pytest.mark.parametrize(
    "text, words",
    [
        ("", ["empty"]),
        (",A,B\n", ["no data rows"]),
        (",A,B\nc1,1,x\n", ["non-numeric value 'x'", "data row 1", "value column 2"]),
        (",A,B\nc1,1\n", ["header has 3 fields", "first data row has 2"]),
        (",A,B\nc1,1,2\nc2,1,2,3,4\n", ["could not read"]),
    ],
)
def test_read_table_errors(tmp_path, text, words):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(InputError) as ei:
        io.read(tmp_path / "t.csv")
    e = _err(ei)
    assert e.field == "file"
    for w in words:
        assert w in e.message, (w, e.message)


def test_read_format_errors_and_override(tmp_path):
    (tmp_path / "x.loom").write_bytes(b"\x00\x01 something")
    with pytest.raises(InputError) as ei:
        io.read(tmp_path / "x.loom")
    e = _err(ei)
    assert "unsupported" in e.message and ".h5ad" in e.fix and "10x" in e.fix and ".csv" in e.fix
    with pytest.raises(InputError) as ei:
        io.read(tmp_path / "missing.h5ad")
    assert "no such file" in _err(ei).message
    (tmp_path / "matrix.mtx").write_text("%%MatrixMarket matrix coordinate integer general\n1 1 0\n")
    with pytest.raises(InputError) as ei:
        io.read(tmp_path / "matrix.mtx")
    assert "features.tsv" in _err(ei).fix
    df, C = _frame()
    df.to_csv(tmp_path / "upload")
    assert np.array_equal(np.asarray(io.read(tmp_path / "upload", fmt="csv").X.toarray()), C)
    with pytest.raises(InputError) as ei:
        io.read(tmp_path / "upload", fmt="xlsx")
    assert _err(ei).field == "format"
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError) as ei:
        io.read(tmp_path / "empty_dir")
    assert "no matrix.mtx" in _err(ei).message


def test_read_then_counts_end_to_end(tmp_path):
    C = _ten_x_counts()
    _write_10x_dir(tmp_path / "d", C)
    with pytest.warns(UserWarning):
        a = io.read(tmp_path / "d")
    X, genes, cells, src = io.counts_from_adata(a)
    assert src == "X" and genes[-1] == "CD3E-1" and cells == BARCODES and io.detect_values(X) == "counts"


# --------------------------------------------------------------------------- shared data (optional)
@pytest.mark.shared
def test_shared_datasets_value_kinds():
    d = SHARED / "datasets"
    if not d.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    pbmc = ad.read_h5ad(d / "human_pbmc3k_10xv1_seurat_labels.h5ad")
    X, genes, _, src = io.counts_from_adata(pbmc)
    assert src == "X" and io.detect_values(X) == "counts" and X.shape == (2638, 13714)
    lay = pbmc.layers["seurat_lognorm"]
    assert io.detect_values(lay) == "lognorm" and io.detect_log_base(lay) == pytest.approx(np.e)
    back = io.to_counts_like(io.validate_matrix(lay[:50], genes), "lognorm").toarray()
    ratio = back[X[:50].toarray() > 0] / X[:50].toarray()[X[:50].toarray() > 0]
    assert ratio.min() > 0  # expm1 of LogNormalize is counts x (1e4 / depth)
    puram = ad.read_h5ad(d / "human_hnscc_tme_puram2017_chetah_ref_subset.h5ad")
    assert io.detect_values(puram.X) == "lognorm" and io.detect_log_base(puram.X) == 2.0
    yan = ad.read_h5ad(d / "human_preimplantation_embryo_yan2013_scmap_rpkm.h5ad")
    assert io.detect_values(yan.X) == "nonint"
