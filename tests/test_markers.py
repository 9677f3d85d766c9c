"""Marker knowledge and rank-based marker scoring (cellatlas.markers)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import rankdata

from cellatlas import markers as M
from cellatlas.config import get_settings
from cellatlas.errors import InputError

LINEAGES = {"immune", "stromal", "epithelial", "endothelial", "neural", "parenchymal"}


def _shared() -> Path:
    env = os.environ.get("CELLATLAS_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


SHARED = _shared()
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED}")


def _random_counts(n_cells: int, n_genes: int, high: int, density: float, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    X = sp.random(n_cells, n_genes, density=density, random_state=seed, data_rvs=lambda k: rng.integers(1, high + 1, k))
    return sp.csr_matrix(X, dtype=np.float32)


def _brute_force(X: sp.csr_matrix) -> list[np.ndarray]:
    """Per row: rankdata (ties averaged) / n_expressed == 1 - (n_greater + n_equal_others / 2) / n."""
    return [rankdata(X.data[X.indptr[i] : X.indptr[i + 1]]) / max(X.indptr[i + 1] - X.indptr[i], 1) for i in range(X.shape[0])]


# ----------------------------------------------------------------------------- rank scores
def test_rank_scores_match_brute_force_with_ties():
    X = _random_counts(60, 400, high=32, density=0.3, seed=1)
    X = sp.vstack([X, sp.csr_matrix((1, 400), dtype=np.float32)]).tocsr()  # a cell with nothing expressed
    R = M.rank_scores(X)
    assert R.shape == X.shape and R.dtype == np.float32
    np.testing.assert_array_equal(R.indptr, X.indptr)
    np.testing.assert_array_equal(R.indices, X.indices)
    for i, expected in enumerate(_brute_force(X)):
        np.testing.assert_allclose(R.data[R.indptr[i] : R.indptr[i + 1]], expected, atol=1e-6)


def test_rank_scores_stored_zeros_are_not_expressed():
    X = sp.csr_matrix(np.array([[0, 3, 1, 0, 5], [2, 2, 0, 0, 0]], dtype=np.float32))
    Y = X.copy()
    Y.data = np.concatenate([Y.data, [0.0]]).astype(np.float32)  # append a stored zero to row 1
    Y.indices = np.concatenate([Y.indices, [4]]).astype(Y.indices.dtype)
    Y.indptr = np.array([0, 3, 6])
    R = M.rank_scores(Y)
    assert R.nnz == Y.nnz and R.data[-1] == 0.0
    np.testing.assert_allclose(R.data[3:5], [0.75, 0.75])  # two tied genes among two expressed
    np.testing.assert_allclose(M.rank_scores(X).data[:3], [2 / 3, 1 / 3, 1.0])


def test_rank_scores_invariant_to_scaling():
    X = _random_counts(40, 300, high=16, density=0.25, seed=2)
    R = M.rank_scores(X)
    X2 = X.copy()
    X2.data *= 2  # integer counts up to 32: still one bin per value
    np.testing.assert_allclose(M.rank_scores(X2).data, R.data, atol=1e-7)
    # log-normalised-like floats: scaling by a power of two is exact, any factor keeps the order
    F = X.copy()
    F.data = np.log1p(F.data * 1e4 / np.repeat(np.asarray(X.sum(axis=1)).ravel(), np.diff(X.indptr))).astype(np.float32)
    RF = M.rank_scores(F)
    F2 = F.copy()
    F2.data *= 2
    np.testing.assert_allclose(M.rank_scores(F2).data, RF.data, atol=1e-7)
    F3 = F.copy()
    F3.data *= 3.7
    R3 = M.rank_scores(F3)
    for i in range(F.shape[0]):
        sl = slice(F.indptr[i], F.indptr[i + 1])
        order = np.argsort(F.data[sl], kind="stable")
        assert np.all(np.diff(R3.data[sl][order]) >= -1e-7), "rank scores must be monotone in the value"
        assert np.corrcoef(R3.data[sl], RF.data[sl])[0, 1] > 0.95  # only bin boundaries move


def test_rank_scores_chunking_and_inputs(monkeypatch):
    X = _random_counts(50, 120, high=40, density=0.3, seed=3)
    full = M.rank_scores(X)
    monkeypatch.setenv("CELLATLAS_CHUNK_SIZE", "7")
    get_settings.cache_clear()
    try:
        np.testing.assert_array_equal(M.rank_scores(X).data, full.data)
    finally:
        monkeypatch.delenv("CELLATLAS_CHUNK_SIZE")
        get_settings.cache_clear()
    np.testing.assert_allclose(M.rank_scores(X.toarray()).data, full.data)
    bad = X.copy()
    bad.data[0] = -1.0
    with pytest.raises(InputError, match="negative"):
        M.rank_scores(bad)
    bad.data[0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        M.rank_scores(bad)


# ----------------------------------------------------------------------------- compile / score
def _cells(genes: list[str], expressed: list[dict[str, float]], n_background: int = 300, seed: int = 0) -> sp.csr_matrix:
    """Cells over ``genes``: a low-count background on the first ``n_background`` genes plus chosen genes."""
    rng = np.random.default_rng(seed)
    X = np.zeros((len(expressed), len(genes)), dtype=np.float32)
    X[:, :n_background] = rng.integers(0, 3, (len(expressed), n_background))
    col = {g: i for i, g in enumerate(genes)}
    for r, values in enumerate(expressed):
        for g, v in values.items():
            X[r, col[g]] = v
    return sp.csr_matrix(X)


def _panel(extra: list[str]) -> list[str]:
    curated = M.load_curated_markers()
    marker_genes = sorted({g for s in curated.values() for side in s.values() for g in side})
    return [f"BG{i}" for i in range(300)] + marker_genes + [g for g in extra if g not in marker_genes]


def test_t_cell_profile_scores_t_above_b():
    genes = _panel([])
    X = _cells(genes, [{"CD3E": 12, "CD3D": 15, "IL7R": 9, "CD2": 6, "LCK": 5}, {"MS4A1": 12, "CD79A": 15, "CD79B": 8}])
    curated = M.load_curated_markers()
    c = M.compile_markers({k: curated[k] for k in ("T cell", "B cell")}, genes)
    s = M.score_markers(X, c)
    assert s[0, 0] > s[0, 1] + 0.2 and s[1, 1] > s[1, 0] + 0.2
    assert np.all(s <= 1) and np.all(s >= -1)


def test_negative_markers_keep_nk_cells_off_cd16_monocytes():
    genes = _panel([])
    nk_like = {"FCGR3A": 20, "NKG7": 30, "GNLY": 25, "LST1": 6, "IFITM2": 8, "PRF1": 5, "KLRD1": 4}
    X = _cells(genes, [nk_like])
    curated = M.load_curated_markers()
    sets = {k: curated[k] for k in ("CD16 monocyte", "NK cell")}
    no_neg = {k: {"positive": v["positive"], "negative": []} for k, v in sets.items()}
    with_neg = M.score_markers(X, M.compile_markers(sets, genes))[0]
    without = M.score_markers(X, M.compile_markers(no_neg, genes))[0]
    assert {"NKG7", "GNLY"} <= set(curated["CD16 monocyte"]["negative"])
    assert with_neg[0] < without[0] - 0.1, "NKG7/GNLY must penalise the CD16 monocyte label"
    assert with_neg[1] > with_neg[0]


def test_compile_markers_weights_and_coverage():
    genes = ["A", "B", None, "C", "A", "X"]
    c = M.compile_markers({"L1": {"positive": ["A", "B", "Z"], "negative": ["X", "Q"]}, "L2": ["C"], "L3": {"positive": []}}, genes)
    assert c.labels == ["L1", "L2", "L3"] and c.n_genes == 6
    np.testing.assert_array_equal(c.n_pos_present, [2, 1, 0])
    np.testing.assert_array_equal(c.n_pos_total, [3, 1, 0])
    np.testing.assert_allclose(c.coverage, [2 / 3, 1.0, 0.0])
    assert c.missing["L1"] == ["Z"]
    np.testing.assert_array_equal(c.marker_idx[0], [0, 1])  # first column of a duplicated symbol
    np.testing.assert_array_equal(c.negative_idx[0], [5])
    W = c.W.toarray()
    np.testing.assert_allclose(W[:, 0], [1 / 3, 1 / 3, 0, 0, 0, -M.NEG_WEIGHT / 3])
    np.testing.assert_allclose(W[:, 1], [0, 0, 0, 1, 0, 0])
    assert not W[:, 2].any()
    X = sp.csr_matrix(np.array([[5, 5, 0, 0, 9, 5]], dtype=np.float32))
    s = M.score_markers(X, c)
    r = M.rank_scores(X).toarray()[0]
    np.testing.assert_allclose(s[0], [(r[0] + r[1] - M.NEG_WEIGHT * r[5]) / 3, 0.0, 0.0], atol=1e-6)
    with pytest.raises(InputError, match="both positive and negative"):
        M.compile_markers({"L": {"positive": ["A"], "negative": ["A"]}}, genes)
    with pytest.raises(InputError, match="not a list or a dict"):
        M.compile_markers({"L": "A"}, genes)


def test_score_markers_ranked_path_and_shape_check():
    genes = _panel([])
    X = _random_counts(30, len(genes), high=20, density=0.2, seed=4)
    c = M.compile_markers(M.load_curated_markers(), genes)
    s = M.score_markers(X, c)
    assert s.shape == (30, c.n_labels) and s.dtype == np.float32
    np.testing.assert_allclose(M.score_markers(M.rank_scores(X), c, ranked=True), s, atol=1e-6)
    with pytest.raises(InputError, match="gene columns"):
        M.score_markers(X[:, :-1], c)


# ----------------------------------------------------------------------------- derived markers
def _synthetic_reference(seed: int = 5):
    rng = np.random.default_rng(seed)
    n_per, n_bg = 60, 200
    genes = [f"G{i}" for i in range(n_bg)] + [f"{k}{i}" for k in "ABC" for i in range(6)] + ["MT-CO1", "RPL3", "HK1"]
    col = {g: i for i, g in enumerate(genes)}
    X = rng.poisson(0.3, (3 * n_per, len(genes))).astype(np.float32)
    labels = np.repeat(["alpha", "beta", "gamma"], n_per)
    for j, lab in enumerate(["A", "B", "C"]):
        rows = slice(j * n_per, (j + 1) * n_per)
        for i in range(6):  # marker i: in a fraction 1 - 0.1 i of its label's cells, nowhere else
            X[:, col[f"{lab}{i}"]] = 0
            X[rows, col[f"{lab}{i}"]] = (rng.poisson(6, n_per) + 1) * (np.arange(n_per) < n_per * (1 - 0.1 * i))
    X[:n_per, col["MT-CO1"]] = 50  # mitochondrial, high in one label only
    X[:, col["RPL3"]] = np.where(labels == "beta", 40, 0)
    X[:, col["HK1"]] = 5  # expressed everywhere
    return sp.csr_matrix(X), genes, labels


def test_derive_markers_recovers_planted_markers():
    X, genes, labels = _synthetic_reference()
    d = M.derive_markers(X, genes, labels, n_pos=6, n_neg=4)
    assert list(d) == ["alpha", "beta", "gamma"]
    for lab, prefix in zip(d, "ABC"):
        assert set(d[lab]["positive"]) == {f"{prefix}{i}" for i in range(6)}
        assert d[lab]["positive"][:2] == [f"{prefix}0", f"{prefix}1"]
        assert len(d[lab]["negative"]) == 4 and all(g[0] in "ABC".replace(prefix, "") for g in d[lab]["negative"])
    firsts = {g[0] for g in d["alpha"]["negative"]}
    assert firsts == {"B", "C"}, "negatives are taken in turn from each other label"
    flat = {g for s in d.values() for side in s.values() for g in side}
    assert not flat & {"MT-CO1", "RPL3", "HK1"}


def test_derive_markers_rejects_bad_labels():
    X, genes, labels = _synthetic_reference()
    with pytest.raises(InputError, match="labels for"):
        M.derive_markers(X, genes, labels[:-1])
    bad = labels.astype(object)
    bad[3] = None
    with pytest.raises(InputError, match="no label"):
        M.derive_markers(X, genes, bad)
    with pytest.raises(InputError, match="only one"):
        M.derive_markers(X, genes, np.repeat("x", X.shape[0]))
    with pytest.raises(InputError, match="gene names"):
        M.derive_markers(X, genes[:-1], labels)


def test_merge_markers_union_sources_and_conflicts():
    curated = {"B cell": {"positive": ["MS4A1", "CD79A"], "negative": ["CD3E"]}, "Platelet": {"positive": ["PPBP"], "negative": []}}
    derived = {
        "B": {"positive": ["CD79A", "TCL1A", "CD3E"], "negative": ["LYZ", "MS4A1"]},
        "Mono": {"positive": ["LYZ"], "negative": ["MS4A1"]},
    }
    m = M.merge_markers(curated, derived, label_map={"B": "B cell"})
    assert list(m) == ["B cell", "Platelet", "Mono"]
    assert m["B cell"]["positive"] == ["MS4A1", "CD79A", "TCL1A"]
    assert m["B cell"]["negative"] == ["CD3E", "LYZ"]
    assert m["B cell"]["sources"] == {
        "MS4A1": "curated", "CD79A": "curated+reference", "TCL1A": "reference", "CD3E": "curated", "LYZ": "reference",
    }
    assert m["Platelet"]["sources"] == {"PPBP": "curated"}
    assert m["Mono"] == {"positive": ["LYZ"], "negative": ["MS4A1"], "sources": {"LYZ": "reference", "MS4A1": "reference"}}
    assert curated["B cell"]["positive"] == ["MS4A1", "CD79A"], "inputs are not modified"


# ----------------------------------------------------------------------------- curated tables
def test_label_table_and_marker_table_are_consistent():
    labels = M.load_labels()
    curated = M.load_curated_markers()
    assert labels.index.is_unique and set(labels.columns) >= {"ontology_id", "parent", "lineage", "tissue", "description"}
    assert set(labels["lineage"]) <= LINEAGES and set(labels["lineage"]) == LINEAGES
    assert set(labels["parent"]) - {""} <= set(labels.index)
    assert set(labels["kind"]) == {"group", "type"}
    groups = set(labels.index[labels["kind"] == "group"])
    assert groups <= set(labels["parent"])  # a group is made up of its children: it has some
    assert set(labels["parent"]) - {""} - groups == {"Fibroblast"}  # the one type with a type below it
    assert set(curated) == set(labels.index)
    for lab, s in curated.items():
        assert len(s["positive"]) >= 3, lab
        assert not set(s["positive"]) & set(s["negative"]), lab
        parent = labels.at[lab, "parent"]
        if parent:  # a child's negative marker must not be a positive marker it inherits from its parent
            assert not set(s["negative"]) & set(curated[parent]["positive"]), lab
    assert all(g == g.upper() and " " not in g for s in curated.values() for side in s.values() for g in side)
    top_non_immune = labels.index[(labels["lineage"] != "immune") & (labels["parent"] == "")]
    assert all("PTPRC" in curated[lab]["negative"] for lab in top_non_immune)  # inherited by their descendants


def test_ancestors_walks_the_hierarchy():
    labels = M.load_labels()
    assert M.ancestors("Naive CD4 T cell", labels) == ["CD4 T cell", "T cell", "Lymphocyte", "Leukocyte"]
    assert M.ancestors("Pancreatic beta cell", labels) == ["Pancreatic endocrine cell"]
    assert M.ancestors("Hepatocyte", labels) == []
    with pytest.raises(InputError, match="Unknown label"):
        M.ancestors("Unicorn cell", labels)
    loop = pd.DataFrame({"parent": ["b", "a"]}, index=["a", "b"])
    with pytest.raises(InputError, match="cycle"):
        M.ancestors("a", loop)


# ----------------------------------------------------------------------------- shared data
def _hgnc() -> tuple[set[str], dict[str, str]]:
    t = pd.read_csv(SHARED / "gene_ids" / "HGNChelper_0.8.15_hgnc_alias_to_approved.tsv.gz", sep="\t", dtype=str)
    return set(t["Approved.Symbol"]), t.drop_duplicates("Symbol").set_index("Symbol")["Approved.Symbol"].to_dict()


def _dataset(name: str):
    import anndata as ad

    a = ad.read_h5ad(SHARED / "datasets" / name)
    approved, alias = _hgnc()
    genes = [g if g in approved else alias.get(g, g) for g in a.var_names]
    return sp.csr_matrix(a.X, dtype=np.float32), genes, a.obs["cell_type"].astype(str).to_numpy()


def _leaves() -> list[str]:
    labels = M.load_labels()
    return [lab for lab in labels.index if lab not in set(labels["parent"])]


def _call(X, genes, label_names):
    curated = M.load_curated_markers()
    c = M.compile_markers({k: curated[k] for k in label_names}, genes)
    return np.asarray(c.labels, dtype=object)[M.score_markers(X, c).argmax(axis=1)]


@needs_shared
@pytest.mark.shared
def test_ontology_ids_and_gene_symbols_are_valid():
    with gzip.open(SHARED / "ontology" / "cell_ontology_CL_from_cellmarkeraccordion.tsv.gz", "rt") as fh:
        onto = pd.read_csv(fh, sep="\t", dtype=str).set_index("id")
    labels = M.load_labels()
    for lab, cl in labels["ontology_id"].items():
        assert cl in onto.index and onto.at[cl, "obsolete"] == "FALSE", (lab, cl)
    approved, _ = _hgnc()
    genes = {g for s in M.load_curated_markers().values() for side in s.values() for g in side}
    assert sorted(genes - approved) == []


@needs_shared
@pytest.mark.shared
def test_pbmc3k_major_types_by_markers_alone():
    X, genes, authors = _dataset("human_pbmc3k_10xv1_seurat_labels.h5ad")
    to_core = {"Naive CD4 T": "T cell", "Memory CD4 T": "T cell", "CD8 T": "T cell", "CD14+ Mono": "CD14 monocyte",
               "B": "B cell", "NK": "NK cell", "Platelet": "Platelet"}
    truth = np.array([to_core.get(x) for x in authors], dtype=object)
    keep = truth != None  # noqa: E711  (DC and FCGR3A+ monocytes have no label in this set)
    pred = _call(X[keep], genes, ["B cell", "CD14 monocyte", "NK cell", "T cell", "Platelet"])
    acc = float(np.mean(pred == truth[keep]))
    assert acc >= 0.85, acc
    for lab in ("B cell", "CD14 monocyte", "NK cell", "Platelet"):
        assert np.mean(pred[truth[keep] == lab] == lab) >= 0.85, lab


@needs_shared
@pytest.mark.shared
def test_xin_islet_endocrine_types_by_markers_alone():
    X, genes, authors = _dataset("human_pancreas_xin2016_scclassify_subset.h5ad")
    to_core = {"alpha": "Pancreatic alpha cell", "beta": "Pancreatic beta cell", "delta": "Pancreatic delta cell",
               "gamma": "Pancreatic PP cell"}
    truth = np.array([to_core[x] for x in authors], dtype=object)
    labels = M.load_labels()
    endocrine = list(labels.index[labels["parent"] == "Pancreatic endocrine cell"])
    assert len(endocrine) == 5
    pred = _call(X, genes, endocrine)
    assert np.mean(pred == truth) >= 0.85
    for lab in to_core.values():
        assert np.mean(pred[truth == lab] == lab) >= 0.8, lab


@needs_shared
@pytest.mark.shared
def test_marker_profiles_stay_in_their_lineage():
    labels = M.load_labels()
    lineage = labels["lineage"].to_dict()
    leaves = _leaves()
    X, genes, authors = _dataset("human_pbmc3k_10xv1_seurat_labels.h5ad")
    mono = X[authors == "CD14+ Mono"]
    pred = _call(mono, genes, leaves)
    assert np.mean([lineage[p] == "immune" for p in pred]) >= 0.99
    pseudo = sp.csr_matrix(np.asarray(mono.sum(axis=0)))
    assert lineage[_call(pseudo, genes, leaves)[0]] == "immune"
    X, genes, authors = _dataset("human_pancreas_xin2016_scclassify_subset.h5ad")
    beta = X[authors == "beta"]
    pred = _call(beta, genes, leaves)
    assert np.mean([lineage[p] == "parenchymal" for p in pred]) >= 0.99
    assert _call(sp.csr_matrix(np.asarray(beta.sum(axis=0))), genes, leaves)[0] == "Pancreatic beta cell"
    # a neuron: its curated markers on a background of ~2,000 lowly expressed genes of a full transcriptome
    approved, _ = _hgnc()
    universe = sorted(approved)[:: max(1, len(approved) // 3000)]
    neuron = M.load_curated_markers()["Neuron"]["positive"]
    genes = sorted(set(universe) | {g for s in M.load_curated_markers().values() for side in s.values() for g in side})
    rng = np.random.default_rng(7)
    cells = np.zeros((20, len(genes)), dtype=np.float32)
    bg = rng.random((20, len(genes))) < 0.3
    cells[bg] = rng.integers(1, 4, int(bg.sum()))
    curated_genes = [genes.index(g) for s in M.load_curated_markers().values() for g in s["positive"]]
    cells[:, curated_genes] = np.where(rng.random((20, len(curated_genes))) < 0.1, 1, 0)  # stray reads of other types
    for g in neuron:
        cells[:, genes.index(g)] = rng.integers(4, 30, 20) * (rng.random(20) < 0.8)
    pred = _call(sp.csr_matrix(cells), genes, leaves)
    assert all(lineage[p] == "neural" for p in pred), list(pred)
