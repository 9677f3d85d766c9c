"""QC flags, dot-plot statistics and relabel rules, on small hand-made matrices."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from cellatlas.errors import InputError
from cellatlas.tl import defining_markers, expression_for_genes
from cellatlas.web.analysis import dotplot_stats, qc_flags
from cellatlas.web.views import apply_relabel, confidence_histogram, current_labels

X = sp.csr_matrix(np.array([[10, 0, 5, 5], [1, 1, 0, 0], [0, 0, 0, 0], [2, 2, 8, 0]], dtype=np.float32))
GENES = ["CD3E", "MS4A1", "MT-CO1", "mt-Nd1"]


def test_qc_flags_mark_cells_and_never_drop_them():
    qc = qc_flags(X, GENES, min_counts=3, max_mito_fraction=0.5)
    assert qc.total_counts.tolist() == [20, 2, 0, 12]
    assert np.allclose(qc.mito_fraction, [0.5, 0.0, 0.0, 8 / 12])
    assert qc.qc_pass.tolist() == [True, False, False, False]
    assert qc.reasons.tolist() == ["", "low_counts", "low_counts", "high_mito"]
    assert qc.summary["n_mito_genes"] == 2 and qc.summary["n_flagged"] == 3 and len(qc.qc_pass) == 4


def test_qc_without_filters_or_mito_genes_says_so():
    assert qc_flags(X, GENES).qc_pass.all()
    qc = qc_flags(X[:, :2], GENES[:2], max_mito_fraction=0.1)
    assert qc.qc_pass.all() and np.isnan(qc.mito_fraction).all()
    assert "not applied" in qc.summary["notes"][0]
    # mapped symbols decide when given (an Ensembl-id column that maps to MT-CO1)
    qc = qc_flags(X, ["a", "b", "ENSG00000198804", "d"], ["A", "B", "MT-CO1", None], max_mito_fraction=0.3)
    assert qc.summary["n_mito_genes"] == 1 and qc.qc_pass.tolist() == [True, True, True, False]


def test_expression_is_log_cp10k_over_all_genes():
    e = expression_for_genes(X, [0, 2]).toarray()
    assert np.allclose(e[0], np.log1p([10 / 20 * 1e4, 5 / 20 * 1e4]))
    assert np.allclose(e[2], 0)  # an empty cell stays zero, no division by zero
    assert np.allclose(expression_for_genes(X, [0], values="lognorm").toarray().ravel(), [10, 1, 0, 2])


def test_dotplot_stats_per_group():
    expr = sp.csr_matrix(np.array([[1, 0], [3, 2], [0, 0], [5, 1]], dtype=np.float32))
    frac, mean = dotplot_stats(expr, ["a", "a", "b", "c"], ["a", "b", "z"])
    assert frac.tolist() == [[1.0, 0.5], [0.0, 0.0], [0.0, 0.0]]
    assert mean.tolist() == [[2.0, 1.0], [0.0, 0.0], [0.0, 0.0]]


def test_marker_genes_are_unique_and_present():
    sets = {"T": {"positive": ["CD3E", "CD3D", "IL7R", "CCR7"]}, "NK": {"positive": ["CD3E", "NKG7", "GNLY"]}}
    pairs = defining_markers(["T", "NK", "missing"], sets, {"CD3E", "IL7R", "CCR7", "NKG7", "GNLY"}, per_label=2)
    assert pairs == [("T", "CD3E"), ("T", "IL7R"), ("NK", "NKG7"), ("NK", "GNLY")]


def test_defining_markers_put_curated_first_then_derived_and_skip_inherited():
    # positives as atlases store them: own curated, inherited from the parent (no source), derived
    sets = {"Platelet": {"positive": ["LAPTM5", "PF4", "PPBP", "CLU"],
                         "sources": {"PPBP": "reference", "PF4": "curated", "CLU": "curated+reference"}}}
    pairs = defining_markers(["Platelet"], sets, {"LAPTM5", "PF4", "PPBP", "CLU"}, per_label=4)
    assert pairs == [("Platelet", "PF4"), ("Platelet", "CLU"), ("Platelet", "PPBP")]


def test_confidence_histogram_bins_match_bands():
    h = confidence_histogram(np.array([0.0, 0.39, 0.4, 0.69, 0.7, 1.0]))
    counts = np.asarray(h["counts"])
    edges = np.asarray(h["edges"])
    assert counts.sum() == 6
    assert counts[edges[:-1] >= 0.7].sum() == 2 and counts[(edges[:-1] >= 0.4) & (edges[:-1] < 0.7)].sum() == 2


class _Res:
    label = np.array(["T", "T", "B", "NK"], dtype=object)

    def __len__(self):
        return 4


def test_apply_relabel_rules():
    run = {"result": _Res()}
    new, n = apply_relabel(run, {}, label="Treg", cells=[0])
    assert new == {0: "Treg"} and n == 1
    new, n = apply_relabel(run, new, label="Lymphocyte", group="T")  # current label T: only cell 1
    assert new == {0: "Treg", 1: "Lymphocyte"} and n == 1
    new, _ = apply_relabel(run, new, label="T", cells=[1])  # back to the engine's call = no relabel
    assert new == {0: "Treg"}
    new, _ = apply_relabel(run, new, label=None, group="Treg")  # revert
    assert new == {} and current_labels(run, new).tolist() == ["T", "T", "B", "NK"]
    for kw in ({"cells": [4]}, {"cells": []}, {"group": "X"}, {"cells": [0], "group": "T"}, {}):
        with pytest.raises(InputError):
            apply_relabel(run, {}, label="x", **kw)
