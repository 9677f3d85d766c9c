"""Reference-neighbour search: thinning, downsampling and depth-matched levels."""

import numpy as np
import pytest
import scipy.sparse as sp

from cellatlas import fusion
from cellatlas.encoders.default import DefaultEncoder
from cellatlas.neighbours import KNN_DEPTH_LEVELS, KNN_DEPTH_STEP, DepthMatchedIndex, downsample, neighbour_stats, thin


def _cells(n_per_type: int, depth: int, seed: int, n_genes: int = 300, n_types: int = 3):
    """Cells of ``n_types`` types sharing a background profile, each with 20 genes raised 4x."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(99).dirichlet(np.full(n_genes, 0.5))
    rows, labels = [], []
    for t in range(n_types):
        p = base.copy()
        p[20 * t : 20 * (t + 1)] *= 4.0
        p /= p.sum()
        d = rng.poisson(depth, n_per_type)
        rows.append(np.stack([rng.multinomial(k, p) for k in d]))
        labels += [t] * n_per_type
    return sp.csr_matrix(np.vstack(rows).astype(np.float32)), np.array(labels)


def test_thin_accepts_one_fraction_per_row():
    x = sp.csr_matrix(np.full((3, 50), 20.0, dtype=np.float32))
    out = thin(x, np.array([1.0, 0.5, 0.0]), seed=1)
    depth = np.asarray(out.sum(axis=1)).ravel()
    assert depth[0] == 1000.0
    assert 400 < depth[1] < 600
    assert depth[2] == 0.0
    np.testing.assert_array_equal(out.toarray(), thin(x, np.array([1.0, 0.5, 0.0]), seed=1).toarray())


def test_downsample_lowers_deep_cells_to_the_target_and_keeps_shallow_ones():
    x, _ = _cells(20, 2000, seed=0)
    shallow = thin(x[:5], 0.1, seed=2)
    both = sp.vstack([x, shallow]).tocsr()
    out = downsample(both, 500.0, seed=3)
    depth = np.asarray(out.sum(axis=1)).ravel()
    assert np.all(np.abs(depth[:60] - 500) < 100)
    # Cells already below the target are returned unchanged, not thinned further.
    np.testing.assert_array_equal(out[60:].toarray(), shallow.toarray())


def test_levels_follow_log_depth_in_steps_and_are_clipped():
    ref, _ = _cells(10, 1000, seed=0)
    idx = DepthMatchedIndex(lambda x: np.zeros((x.shape[0], 2), np.float32), ref, None, {})
    med = idx.median_depth
    steps = int(round(1 / KNN_DEPTH_STEP))
    depth = np.array([med * 4, med, med / 2, med / 4, med / 1e6])
    np.testing.assert_array_equal(idx.levels(depth), [0, 0, steps, 2 * steps, KNN_DEPTH_LEVELS - 1])


def test_shallow_cells_are_placed_among_their_type_at_their_depth():
    ref, ref_labels = _cells(150, 3000, seed=0)
    genes = [f"G{i}" for i in range(ref.shape[1])]
    enc = DefaultEncoder.fit(ref, genes, genes, n_pcs=10)
    emb = np.ascontiguousarray(enc.embed(ref, genes), dtype=np.float32)
    import faiss

    base = faiss.IndexFlatIP(emb.shape[1])
    base.add(emb)
    stats = neighbour_stats(emb)
    index = DepthMatchedIndex(lambda x: enc.embed(x, genes), ref, base, stats)

    query, truth = _cells(60, 150, seed=5)  # 20x shallower than the reference
    q = enc.embed(query, genes)
    depth = np.asarray(query.sum(axis=1)).ravel()
    sim, idx, z = index.search(q, depth, 15)
    assert set(np.unique(index.levels(depth))) != {0}  # a deeper level was used
    full_sim, full_idx = base.search(np.ascontiguousarray(q), 15)
    full_z = fusion.ood_z((1.0 - full_sim).mean(axis=1), stats["median"], stats["mad"])

    def vote_accuracy(s, i):
        p = fusion.knn_vote(s, i, ref_labels, 3, stats["bandwidth"])
        return float((p.argmax(axis=1) == truth).mean())

    # At full depth the shallow cells all land next to one type (about a third right); at their
    # own depth their neighbours are of their own type, and shallow cells of known types are not
    # called far from the atlas merely for being shallow.
    assert vote_accuracy(sim, idx) >= 0.85
    assert vote_accuracy(sim, idx) > vote_accuracy(full_sim, full_idx) + 0.3
    assert np.median(z) < np.median(full_z)
    assert np.median(z) < 3.0  # not "far" in robust-z terms


def test_level_indices_are_built_once_and_deterministic():
    ref, _ = _cells(30, 2000, seed=0)
    genes = [f"G{i}" for i in range(ref.shape[1])]
    enc = DefaultEncoder.fit(ref, genes, genes, n_pcs=5)
    calls = []

    def embed(x):
        calls.append(x.shape[0])
        return enc.embed(x, genes)

    a = DepthMatchedIndex(embed, ref, None, {})
    b = DepthMatchedIndex(lambda x: enc.embed(x, genes), ref, None, {})
    q = np.ascontiguousarray(enc.embed(thin(ref, 0.25, seed=9), genes))
    depth = np.full(q.shape[0], a.median_depth / 4)
    r1, r2 = a.search(q, depth, 5), a.search(q, depth, 5)
    assert len(calls) == 1
    for x, y, w in zip(r1, r2, b.search(q, depth, 5)):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, w)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_levels_of_empty_cells_are_the_shallowest(bad):
    ref, _ = _cells(10, 1000, seed=0)
    idx = DepthMatchedIndex(lambda x: x, ref, None, {})
    assert idx.levels(np.array([bad]))[0] == KNN_DEPTH_LEVELS - 1


def test_neighbour_stats_of_a_sample_match_the_full_reference():
    ref, _ = _cells(400, 2000, seed=0)
    genes = [f"G{i}" for i in range(ref.shape[1])]
    emb = DefaultEncoder.fit(ref, genes, genes, n_pcs=10).embed(ref, genes)
    full = neighbour_stats(emb)
    sampled = neighbour_stats(emb, max_cells=300)
    assert sampled != full
    assert abs(sampled["median"] - full["median"]) < 0.1 * full["median"]
    assert abs(sampled["mad"] - full["mad"]) < 0.3 * full["mad"]


def test_neighbours_an_ivf_index_did_not_find_are_replaced_by_the_nearest_found():
    from cellatlas.neighbours import fill_missing

    sim = np.array([[0.9, 0.8, -3.4e38], [-3.4e38, -3.4e38, -3.4e38]], dtype=np.float32)
    idx = np.array([[4, 7, -1], [-1, -1, -1]])
    s, i = fill_missing(sim, idx)
    assert i.tolist() == [[4, 7, 4], [0, 0, 0]]
    assert np.allclose(s, [[0.9, 0.8, 0.9], [-1.0, -1.0, -1.0]])
    z = fusion.ood_z((1.0 - s).mean(axis=1), 0.2, 0.05)
    assert np.isfinite(z).all() and z[1] > z[0]  # nothing found reads as far, not as overflow
