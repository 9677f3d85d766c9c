"""Column plans: selection and merging of CSR columns must equal the dense arithmetic."""

import numpy as np
import pytest
import scipy.sparse as sp

from cellatlas.sparse import ColumnPlan, canonicalize, row_block


def _random_csr(rng, n=40, m=12, density=0.4, shuffle=False, dup=False):
    X = sp.random(n, m, density=density, format="csr", random_state=rng, dtype=np.float32)
    X.data = np.ceil(X.data * 5).astype(np.float32)
    if shuffle or dup:
        coo = X.tocoo()
        r, c, v = coo.row, coo.col, coo.data
        if dup:  # split every entry into two stored duplicates
            r, c, v = np.r_[r, r], np.r_[c, c], np.r_[v / 2, v / 2]
        order = rng.permutation(len(r))
        r, c, v = r[order], c[order], v[order]
        srt = np.argsort(r, kind="stable")
        indptr = np.searchsorted(r[srt], np.arange(n + 1))
        X = sp.csr_matrix((v[srt], c[srt], indptr), shape=(n, m))
    return X


def _dense_apply(D, colmap, n_out):
    out = np.zeros((D.shape[0], n_out), dtype=np.float64)
    for j, t in enumerate(colmap):
        if t >= 0:
            out[:, t] += D[:, j]
    return out


@pytest.mark.parametrize("shuffle,dup", [(False, False), (True, False), (True, True)])
def test_plan_merges_drops_and_reorders_like_dense(shuffle, dup):
    rng = np.random.default_rng(0)
    X = _random_csr(rng, shuffle=shuffle, dup=dup)
    D = X.toarray()
    before = (X.data.copy(), X.indices.copy(), X.indptr.copy())
    # 12 columns -> 7: drop two, merge 3 columns into target 1, targets out of source order, one empty target
    colmap = np.array([1, 0, -1, 1, 2, 3, 1, -1, 4, 5, 3, 2])
    Y = ColumnPlan.from_colmap(colmap, 7).apply(X)
    assert Y.shape == (40, 7)
    assert Y.has_canonical_format and Y.data.all()
    np.testing.assert_allclose(Y.toarray(), _dense_apply(D, colmap, 7), rtol=1e-6)
    assert not Y[:, 6].nnz  # a target without a source is an all-zero column, never invented
    for a, b in zip(before, (X.data, X.indices, X.indptr)):
        np.testing.assert_array_equal(a, b)  # the input is never modified


def test_select_equals_fancy_indexing_and_identity_returns_input():
    rng = np.random.default_rng(1)
    X = _random_csr(rng)
    cols = np.array([7, 2, 9, 0])
    np.testing.assert_array_equal(ColumnPlan.select(12, cols).apply(X).toarray(), X[:, cols].toarray())
    assert ColumnPlan.select(12, np.arange(12)).apply(X) is X  # canonical identity: no copy
    Xs = _random_csr(rng, shuffle=True)
    Ys = ColumnPlan.select(12, np.arange(12)).apply(Xs)
    assert Ys is not Xs and Ys.has_canonical_format and not Xs.has_sorted_indices
    np.testing.assert_array_equal(Ys.toarray(), Xs.toarray())


def test_plan_rejects_bad_maps_and_shapes():
    with pytest.raises(ValueError, match="colmap"):
        ColumnPlan.from_colmap(np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="columns"):
        ColumnPlan.select(5, [0, 1]).apply(sp.csr_matrix((2, 4), dtype=np.float32))


def test_row_block_shares_data_and_canonicalize_removes_zeros():
    rng = np.random.default_rng(2)
    X = _random_csr(rng)
    B = row_block(X, 5, 17)
    np.testing.assert_array_equal(B.toarray(), X[5:17].toarray())
    assert np.shares_memory(B.data, X.data)
    Z = X.copy()
    Z.data[::3] = 0
    C = canonicalize(Z)
    assert C is not Z and C.data.all() and (Z.data == 0).any()
    np.testing.assert_array_equal(C.toarray(), Z.toarray())
