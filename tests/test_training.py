"""The fusion model fitted on held-out sources, end to end on synthetic cells with curated markers."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import cellatlas
from cellatlas.markers import load_curated_markers
from cellatlas.sources import Source

TYPES = {"T cell": "T", "B cell": "B", "CD14 monocyte": "M", "Neuron": "N", "Pancreatic beta cell": "P"}


def _cells(types, n_per, genes, markers, rng, depth=1500, fold=40.0):
    """Counts where each type expresses its curated positive markers ``fold`` times above background."""
    gi = {g: i for i, g in enumerate(genes)}
    rows, labels = [], []
    for t in types:
        base = np.full(len(genes), 1.0)
        for g in markers[t]:
            if g in gi:
                base[gi[g]] = fold
        p = base / base.sum()
        for _ in range(n_per):
            rows.append(rng.multinomial(int(depth * rng.uniform(0.6, 1.4)), rng.dirichlet(p * 300)))
            labels.append(t)
    a = ad.AnnData(sp.csr_matrix(np.asarray(rows, dtype=np.float32)))
    a.var_names = genes
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    a.obs["cell_type"] = labels
    return a


@pytest.fixture(scope="module")
def world():
    curated = load_curated_markers()
    markers = {t: curated[t]["positive"] for t in TYPES}
    rng = np.random.default_rng(0)
    from cellatlas.gene_tables import human_tables

    marker_genes = {g for m in markers.values() for g in m}
    pool = sorted(g for g in human_tables()["symbols"] if g.isalnum() and g not in marker_genes)
    genes = sorted(marker_genes | set(rng.choice(pool, 600, replace=False).tolist()))  # real symbols as background
    blood = ["T cell", "B cell", "CD14 monocyte"]
    sources = [
        Source("blood_a", _cells(blood, 60, genes, markers, rng)),
        Source("blood_b", _cells(blood, 60, genes, markers, rng, depth=1000)),
        Source("pancreas", _cells(["Pancreatic beta cell", "T cell"], 60, genes, markers, rng)),
        Source("held_out_blood", _cells(blood, 40, genes, markers, rng, depth=800), kind="heldout"),
    ]
    from cellatlas.atlas_build import build_from_sources

    atlas = build_from_sources(sources, name="synthetic", marker_labels="all", n_hvg=200, n_pcs=10, fit_folds=3, layout="pca")
    return atlas, genes, markers, rng


def test_groups_are_held_out_in_turn_and_the_fit_is_recorded(world):
    atlas, *_ = world
    fus = atlas.meta["models"]["default"]["fusion"]
    assert fus["summary"]["fitted"] and fus["calibration"]["summary"]["fitted"]
    assert {"blood_a", "blood_b", "pancreas", "held_out_blood"} <= set(fus["summary"]["by_source"])
    # each real-cell source is also held out against a reference holding its own other cells
    assert {"blood_a (own study)", "blood_b (own study)", "pancreas (own study)"} <= set(fus["summary"]["by_source"])
    assert set(atlas.reference_labels) == {"T cell", "B cell", "CD14 monocyte", "Pancreatic beta cell"}
    assert "Neuron" in atlas.meta["candidates"] and "Neuron" not in atlas.reference_labels


def test_a_neuron_next_to_a_blood_reference_is_called_a_neuron(world):
    atlas, genes, markers, rng = world
    q = _cells(["Neuron"], 40, genes, markers, rng)
    res = cellatlas.annotate(q, atlas=atlas, skip_gene_check=True)
    assert (res.marker_label == "Neuron").mean() > 0.9
    assert (res.label == "Neuron").mean() > 0.8  # the neighbours (all blood or beta) do not carry it off
    assert (res.knn_label != "Neuron").all()


def test_both_signals_agreeing_give_a_confident_fine_call(world):
    atlas, genes, markers, rng = world
    q = _cells(["B cell", "Pancreatic beta cell"], 40, genes, markers, rng)
    res = cellatlas.annotate(q, atlas=atlas, skip_gene_check=True)
    truth = q.obs["cell_type"].to_numpy()
    assert (res.label == truth).mean() > 0.9
    assert (res.level == "fine").mean() > 0.9 and np.median(res.confidence) > 0.8


def test_confidence_falls_as_cells_are_thinned(world):
    from cellatlas.neighbours import thin

    atlas, genes, markers, rng = world
    q = _cells(["T cell", "B cell", "CD14 monocyte"], 40, genes, markers, rng, fold=6.0)
    means = []
    for f in (1.0, 0.1, 0.02):
        b = q.copy()
        b.X = thin(sp.csr_matrix(b.X), f, seed=1) if f < 1 else b.X
        res = cellatlas.annotate(b, atlas=atlas, skip_gene_check=True)
        called = res.label != "Unassigned"
        means.append(float(res.confidence[called].mean()) if called.any() else 0.0)
    assert means[0] > means[1] > means[2]
