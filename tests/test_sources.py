"""Multi-source atlas builds: sources, pseudo-cells, the held-out fit of the fusion model."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellatlas.errors import InputError
from cellatlas.sources import NOVEL, Source, dispersion_of, prepare, prepare_sources, pseudo_counts, stack
from cellatlas.training import truth_options


def _adata(X, genes, labels, **obs):
    a = ad.AnnData(sp.csr_matrix(np.asarray(X, dtype=np.float32)))
    a.var_names = list(genes)
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    a.obs["cell_type"] = list(labels)
    for k, v in obs.items():
        a.obs[k] = list(v)
    return a


def test_pseudo_counts_hit_the_depth_and_overdispersion_spreads_them():
    rel = sp.csr_matrix(np.tile(np.r_[np.full(50, 10.0), np.full(150, 1.0)], (400, 1)))
    depths = np.full(400, 2000)
    flat = pseudo_counts(rel, depths, seed=0)
    assert np.allclose(np.asarray(flat.sum(axis=1)).ravel(), 2000)  # multinomial: exactly the depth
    noisy = pseudo_counts(rel, depths, seed=0, dispersion=1.0)
    assert abs(np.asarray(noisy.sum(axis=1)).ravel().mean() - 2000) < 100
    # a gene's counts vary across pseudo-cells far more than Poisson with overdispersion 1
    g0_flat, g0_noisy = flat[:, 0].toarray().ravel(), noisy[:, 0].toarray().ravel()
    assert g0_noisy.var() > 3 * g0_flat.var()


def test_dispersion_is_read_off_real_cells_only():
    rng = np.random.default_rng(0)
    mu = rng.uniform(1, 20, 300)
    X = rng.poisson(mu * rng.gamma(1 / 0.5, 0.5, (200, 300)))  # overdispersion 0.5
    cells = prepare(Source("c", _adata(X, [f"G{i}" for i in range(300)], ["T"] * 200)))
    assert dispersion_of([cells]) == pytest.approx(0.5, abs=0.15)
    assert dispersion_of([]) == 0.0


def test_label_maps_must_cover_every_label_and_none_leaves_a_label_out():
    genes = ["CD3E", "CD3D", "MS4A1", "CD79A", "LYZ"] + [f"G{i}" for i in range(20)]
    X = np.random.default_rng(1).poisson(2.0, (12, len(genes)))
    a = _adata(X, genes, ["t"] * 6 + ["junk"] * 6)
    with pytest.raises(InputError):
        prepare(Source("s", a, label_map={"t": "T cell"}))
    p = prepare(Source("s", a, label_map={"t": "T cell", "junk": None}))
    assert p.counts.shape[0] == 6 and set(p.labels) == {"T cell"}


def test_stack_unions_genes_and_profiles_fill_only_gaps_of_their_species():
    rng = np.random.default_rng(2)
    cells = _adata(rng.poisson(3.0, (20, 4)), ["CD3E", "MS4A1", "LYZ", "ACTB"], ["T cell"] * 10 + ["B cell"] * 10)
    prof = _adata(rng.uniform(1, 50, (2, 4)), ["CD3E", "LYZ", "ACTB", "GAPDH"], ["T cell", "Macrophage"])
    prepared, dropped, disp = prepare_sources([Source("cells", cells), Source("prof", prof, kind="profiles", n_pseudo=6)])
    prof_part = next(p for p in prepared if p.name == "prof")
    assert set(prof_part.labels) == {"Macrophage"}  # real T cells exist: the T-cell profile is dropped
    counts, genes, labels, part = stack(prepared)
    assert genes == sorted({"CD3E", "MS4A1", "LYZ", "ACTB", "GAPDH"}) and counts.shape == (26, 5)
    assert (labels[part == 1] == "Macrophage").all()
    gi = genes.index("GAPDH")
    assert counts[part == 0][:, gi].nnz == 0  # not measured by the cell source: zero there


def test_cells_without_a_label_are_left_out_not_labelled_nan():
    rng = np.random.default_rng(4)
    a = _adata(rng.poisson(3.0, (12, 4)), ["CD3E", "MS4A1", "LYZ", "ACTB"], ["T cell"] * 5 + ["B cell"] * 5 + [None, np.nan])
    part = prepare(Source("x", a))
    assert sorted(set(part.labels)) == ["B cell", "T cell"] and len(part.labels) == 10
    mapped = prepare(Source("y", a, label_map={"T cell": "T cell", "B cell": "B cell"}))  # no need to map "nan"
    assert len(mapped.labels) == 10


def test_truth_options_accept_every_candidate_under_a_coarse_truth():
    parents = {"Naive CD4 T cell": "CD4 T cell", "Memory CD4 T cell": "CD4 T cell", "CD4 T cell": "T cell",
               "CD8 T cell": "T cell", "T cell": "Lymphocyte", "B cell": "Lymphocyte", "NK cell": "Lymphocyte"}
    cands = ["Naive CD4 T cell", "Memory CD4 T cell", "CD8 T cell", "B cell"]
    T = truth_options(["T cell", "CD4 T cell", "B cell", "NK cell", NOVEL, None], cands, ["NK cell"], parents)
    assert T.shape == (6, 6)
    assert T[0].tolist() == [True, True, True, False, False, False]
    assert T[1].tolist() == [True, True, False, False, False, False]
    assert T[2].tolist() == [False, False, False, True, False, False]
    assert T[3].tolist() == [False, False, False, False, True, False]  # a type the atlas cannot call: its foil
    assert T[4].tolist() == [False] * 5 + [True]  # none of the atlas's types
    assert not T[5].any()  # unknown truth: left out


def test_a_truth_that_is_a_candidate_is_right_for_it_alone():
    parents = {"Pancreatic stellate cell": "Fibroblast", "Fibroblast": "Stromal cell"}
    T = truth_options(["Fibroblast", "Pancreatic stellate cell", "Stromal cell"],
                      ["Fibroblast", "Pancreatic stellate cell"], [], parents)
    assert T[0].tolist() == [True, False, False]  # a fibroblast is not thereby a stellate cell
    assert T[1].tolist() == [False, True, False]
    assert T[2].tolist() == [True, True, False]


def test_a_finer_truth_is_right_for_the_coarser_candidate():
    parents = {"Naive CD4 T cell": "CD4 T cell", "CD4 T cell": "T cell"}
    T = truth_options(["Naive CD4 T cell"], ["CD4 T cell", "B cell"], [], parents)
    assert T[0].tolist() == [True, False, False]


def test_built_in_recipe_moves_cd8_cells_out_of_cd4_clusters_by_their_markers():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from builtin_sources import CD8_MIN_COUNTS, split_cd8

    genes = ["CD8A", "CD8B", "CD4", "ACTB"]
    X = np.array([[1, 1, 0, 9],   # CD4 cluster, CD8A + CD8B = 2, no CD4 -> CD8 T
                  [2, 0, 1, 9],   # CD4 counts too -> stays
                  [1, 0, 0, 9],   # too few CD8 counts -> stays
                  [3, 1, 0, 9],   # memory CD4 cluster -> CD8 T
                  [2, 2, 0, 9]])  # a B cell expressing CD8: not a CD4 cluster -> stays
    a = ad.AnnData(sp.csr_matrix(X.astype(np.float32)), var=pd.DataFrame(index=genes))
    a.obs["cell_type"] = ["Naive CD4 T", "Naive CD4 T", "Naive CD4 T", "Memory CD4 T", "B"]
    out = split_cd8(a)
    assert CD8_MIN_COUNTS == 2
    assert list(out.obs["cell_type"]) == ["CD8 T", "Naive CD4 T", "Naive CD4 T", "CD8 T", "B"]
    assert out.uns["cd8_split"]["relabelled"] == 2
