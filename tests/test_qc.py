"""Per-cell QC facts and the Unassigned rule: cells with too little information are not called.

Uses the built-in atlas's reference cells (shipped with the package), so it runs without
``../shared/data``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import cellatlas
from cellatlas.atlas import load_atlas
from cellatlas.io_qc import MIN_COUNTS, MIN_GENES, UNASSIGNED, cell_qc, doublet_scores, mito_mask, unassigned_reasons
from cellatlas.result import AnnotationResult


def test_cell_qc_facts():
    X = sp.csr_matrix(np.array([[1, 3, 0, 4], [0, 0, 0, 0], [2, 0, 2, 0]], dtype=np.float32))
    mito = mito_mask(["MT-CO1", "ACTB", "B2M", "mt-Nd1"])
    assert mito.tolist() == [True, False, False, True]
    qc = cell_qc(X, mito)
    np.testing.assert_allclose(qc.total_counts, [8, 0, 4])
    assert qc.n_genes.tolist() == [3, 0, 2]
    np.testing.assert_allclose(qc.pct_mito, [62.5, 0.0, 50.0])
    assert np.isnan(cell_qc(X, np.zeros(4, bool)).pct_mito).all()  # no MT- genes: unknown, not 0


def test_unassigned_reasons_first_rule_wins_and_count_rule_only_for_counts():
    X = sp.csr_matrix(np.array([[0, 0, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [2, 2, 2, 2, 2, 2], [9, 9, 1, 1, 1, 1]], dtype=np.float32))
    qc = cell_qc(X, np.zeros(6, bool))
    atlas = np.array([0, 5, 12, 0])
    r = unassigned_reasons(qc, atlas)
    assert r[0] == "no counts (all-zero cell)"
    assert r[1] == f"fewer than {MIN_COUNTS} counts"
    assert r[2] == ""  # 12 counts in 6 genes, some read by the atlas
    assert r[3] == "no counts in the genes the atlas reads"
    lognorm = unassigned_reasons(qc, atlas, values="lognorm")  # totals are not counts there
    assert lognorm[1] == f"fewer than {MIN_GENES} genes detected" and lognorm[0] == "no counts (all-zero cell)"


def _thin_to(X, target, rng):
    rows = []
    for i in range(X.shape[0]):
        lo, hi = X.indptr[i], X.indptr[i + 1]
        pool = np.repeat(X.indices[lo:hi], np.rint(X.data[lo:hi]).astype(int))
        rows.append(np.bincount(rng.choice(pool, target, replace=False), minlength=X.shape[1]))
    return sp.csr_matrix(np.vstack(rows).astype(np.float32))


@pytest.fixture(scope="module")
def shallow():
    """120 reference cells, then 10 all-zero cells and 30 cells each thinned to 1, 5 and 9 counts, interleaved."""
    at = load_atlas("human-core")
    X = sp.csr_matrix(at.reference_counts(), dtype=np.float32)
    rng = np.random.default_rng(0)
    base = X[np.linspace(0, X.shape[0] - 1, 120).astype(int)]
    parts = [base[:60], sp.csr_matrix((10, X.shape[1]), dtype=np.float32)]
    for t in (1, 5, 9):
        parts.append(_thin_to(base[60:90], t, rng))
    parts.append(base[60:])
    M = sp.vstack(parts, format="csr")
    empty = np.zeros(M.shape[0], bool)
    empty[60:160] = True
    return M, list(at.ref_genes), empty


def test_all_zero_and_under_10_count_cells_are_unassigned_in_place(shallow):
    X, genes, empty = shallow
    ids = [f"c{i}" for i in range(X.shape[0])]
    res = cellatlas.annotate(X, genes, cell_ids=ids)
    lab = np.asarray(res.label, dtype=object)
    assert list(res.cell_ids) == ids  # kept in input order
    assert (lab[empty] == UNASSIGNED).all()
    assert (res.confidence[empty] == 0).all() and (res.band[empty] == "low").all()
    assert all(res.reason[empty] != "") and all(m == [] for m in np.asarray(res.markers, dtype=object)[empty])
    assert set(res.reason[60:70]) == {"no counts (all-zero cell)"}
    assert set(res.reason[70:160]) == {f"fewer than {MIN_COUNTS} counts"}
    assert (lab[~empty] != UNASSIGNED).all() and (res.reason[~empty] == "").all()
    np.testing.assert_allclose(res.total_counts, np.asarray(X.sum(axis=1)).ravel())
    assert (res.n_genes[60:70] == 0).all() and (res.n_genes[~empty] > 50).all()
    assert np.isnan(res.pct_mito).all()  # the atlas's genes hold no MT- gene: unknown, not 0
    assert res.provenance["unassigned"]["n_cells"] == 100
    assert res.provenance["unassigned"]["reasons"] == {"no counts (all-zero cell)": 10, f"fewer than {MIN_COUNTS} counts": 90}
    summary = res.summary()
    assert summary.loc[UNASSIGNED, "cells"] == 100 and summary.loc[UNASSIGNED, "mean_confidence"] == 0


def test_cluster_vote_does_not_call_unassigned_cells(shallow):
    X, genes, empty = shallow
    res = cellatlas.annotate(X, genes, cluster_vote=True)
    assert (np.asarray(res.label, dtype=object)[empty] == UNASSIGNED).all()


def test_qc_and_reason_survive_every_view(shallow, tmp_path):
    import anndata as ad

    X, genes, empty = shallow
    res = cellatlas.annotate(X[50:80], genes)
    df = res.to_dataframe()
    assert {"reason", "total_counts", "n_genes", "pct_mito", "doublet_score"} <= set(df.columns)
    assert (df["cell_type"][df["reason"] != ""] == UNASSIGNED).all()
    calls = res.to_calls()
    assert calls[15]["label"] == UNASSIGNED and calls[15]["reason"] and calls[15]["qc"]["n_genes"] == 0
    assert calls[0]["reason"] == "" and calls[0]["qc"]["total_counts"] > 0 and calls[0]["qc"]["doublet_score"] is None
    back = AnnotationResult.from_calls(calls)
    assert list(back.reason) == list(res.reason) and back.n_genes.tolist() == res.n_genes.tolist()
    np.testing.assert_allclose(back.total_counts, res.total_counts, rtol=1e-4)
    both = AnnotationResult.concat([res, res])
    assert list(both.reason) == 2 * list(res.reason)
    a = ad.AnnData(X[50:80])
    res.write_adata(a)
    assert (a.obs["cell_type_reason"] != "").sum() == (res.reason != "").sum()
    assert a.obs["cell_type_n_genes"].tolist() == res.n_genes.tolist()
    a.write_h5ad(tmp_path / "x.h5ad")  # the new obs columns are storable


def test_old_wire_calls_without_qc_still_load():
    calls = [{"label": "T cell", "confidence": 0.9, "alternates": [], "markers": []}]
    back = AnnotationResult.from_calls(calls)
    assert back.reason.tolist() == [""] and back.n_genes.tolist() == [-1] and np.isnan(back.total_counts[0])
    assert back.to_calls()[0]["qc"]["n_genes"] is None


def test_doublet_scores_are_optional(shallow):
    X, genes, _ = shallow
    off = cellatlas.annotate(X[:120], genes)
    assert np.isnan(off.doublet_score).all() and off.provenance["doublets"]["computed"] is False
    scores, note = doublet_scores(sp.vstack([X[:60], X[160:]], format="csr"))
    assert np.isfinite(scores).all() and (scores >= 0).all() and note is None
    few, note = doublet_scores(X[:20])
    assert np.isnan(few).all() and "fewer than" in note


def test_cell_qc_sums_duplicate_entries_without_touching_the_input():
    data, indices, indptr = np.array([1.0, 2.0, 3.0, 4.0], np.float32), np.array([2, 0, 2, 1]), np.array([0, 3, 3, 4])
    X = sp.csr_matrix((data.copy(), indices.copy(), indptr.copy()), shape=(3, 3))  # row 0: column 2 twice
    qc = cell_qc(X, np.zeros(3, bool))
    assert qc.n_genes.tolist() == [2, 0, 1] and qc.total_counts.tolist() == [6, 0, 4]
    np.testing.assert_array_equal(X.data, data)
    np.testing.assert_array_equal(X.indices, indices)


@pytest.mark.parametrize("layout", ["sorted", "shuffled", "duplicates", "sorted duplicates", "stored zeros"])
def test_cell_qc_equals_the_dense_count_whatever_the_row_layout(layout):
    """The fast path (no copy, no sort unless a row names a gene twice) agrees with a dense reference."""
    rng = np.random.default_rng(3)
    D = (rng.random((40, 30)) < 0.3) * rng.integers(1, 9, (40, 30)).astype(np.float32)
    D[5] = 0
    X = sp.csr_matrix(D)
    if layout in ("shuffled", "duplicates"):
        for r in range(X.shape[0]):  # permute each row's entries
            a, b = X.indptr[r], X.indptr[r + 1]
            p = a + rng.permutation(b - a)
            X.indices[a:b], X.data[a:b] = X.indices[p], X.data[p]
        X.has_sorted_indices = False
    if "duplicates" in layout:  # split every third entry into two halves naming the same column
        coo = X.tocoo()
        pick = np.arange(coo.nnz) % 3 == 0
        half = coo.data[pick] / 2
        rows = np.r_[coo.row, coo.row[pick]]
        cols = np.r_[coo.col, coo.col[pick]]
        vals = np.r_[np.where(pick, coo.data / 2, coo.data), half]
        order = np.argsort(rows, kind="stable") if layout == "duplicates" else np.lexsort((cols, rows))
        X = sp.csr_matrix((vals[order], cols[order], np.r_[0, np.cumsum(np.bincount(rows, minlength=40))]), shape=(40, 30))
    if layout == "stored zeros":
        X.data[::4] = 0
        D = X.toarray()
    mito = np.zeros(30, bool)
    mito[[1, 7]] = True
    qc = cell_qc(X, mito)
    np.testing.assert_allclose(qc.total_counts, D.sum(axis=1), rtol=1e-6)
    assert qc.n_genes.tolist() == (D > 0).sum(axis=1).tolist()
    mt = D[:, mito].sum(axis=1)
    np.testing.assert_allclose(qc.pct_mito, np.where(D.sum(axis=1) > 0, 100 * mt / np.maximum(D.sum(axis=1), 1), 0), rtol=1e-5)
