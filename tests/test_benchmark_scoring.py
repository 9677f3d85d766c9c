"""The accuracy benchmark's scoring (benchmarks/harmonise.py): what its ECE means."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harmonise as hm  # noqa: E402

PARENTS = {"Naive CD4 T cell": "CD4 T cell", "Memory CD4 T cell": "CD4 T cell", "CD4 T cell": "T cell",
           "CD8 T cell": "T cell", "T cell": "Lymphocyte", "NK cell": "Lymphocyte", "B cell": "Lymphocyte"}


def test_calls_finer_than_the_shared_label_are_scored_with_the_parent_confidence():
    pred = ["Naive CD4 T cell", "Memory CD4 T cell", "NK cell", "T cell", "Naive CD4 T cell"]
    conf = np.array([0.6, 0.55, 0.9, 0.8, 0.7])
    parent = np.array([0.98, 0.97, 0.99, 0.95, np.nan])
    c, up = hm.shared_level_confidence(pred, conf, parent, {"CD4 T cell", "NK cell", "CD8 T cell"}, PARENTS)
    # finer -> parent; at the shared level -> own; coarser than it -> own; no parent confidence -> own
    np.testing.assert_allclose(c, [0.98, 0.97, 0.9, 0.8, 0.7])
    assert list(up) == [True, True, False, False, False]
    c, up = hm.shared_level_confidence(pred, conf, None, {"CD4 T cell"}, PARENTS)
    np.testing.assert_allclose(c, conf)
    assert not up.any()


def test_score_reports_both_eces():
    # Kang-like truth ("CD4 T cell") and a PBMC3k-like atlas that calls naive/memory CD4 T cells.
    truth = ["CD4 T cell"] * 8 + ["NK cell"] * 2
    pred = ["Naive CD4 T cell"] * 6 + ["Memory CD4 T cell"] * 2 + ["NK cell", "Naive CD4 T cell"]
    conf = np.array([0.6] * 8 + [0.95, 0.6])
    parent = np.array([0.99] * 8 + [0.99, 0.99])
    refs = ["Naive CD4 T cell", "Memory CD4 T cell", "NK cell"]
    r = hm.score(truth, pred, refs, PARENTS, conf=conf, parent_conf=parent)
    assert r["n_scored_at_parent"] == 9  # the wrong "Naive CD4 T cell" is scored as "CD4 T cell" too
    correct = np.array([True] * 9 + [False])
    assert r["ece_call"] == pytest.approx(hm.ece(conf, correct))
    assert r["ece"] == pytest.approx(hm.ece(np.array([0.99] * 8 + [0.95, 0.99]), correct))
    assert r["ece"] < r["ece_call"]


def test_a_claim_the_truth_cannot_check_is_judged_one_level_up_or_not_at_all():
    truth = ["CD4 T cell", "CD4 T cell", "T cell", "CD4 T cell", "NK cell", "T cell"]
    pred = ["Naive CD4 T cell", "T cell", "Naive CD4 T cell", "CD4 T cell", "Naive CD4 T cell", "Lymphocyte"]
    conf = np.array([0.6, 0.9, 0.7, 0.8, 0.75, 0.95])
    parent = np.array([0.97, 0.99, 0.95, 0.9, 0.93, np.nan])
    c, ok, judged, finer = hm.judged_claims(pred, conf, parent, truth, PARENTS)
    # finer by one level -> the parent's claim (right); finer by two -> not judged;
    # coarser than the truth -> its own claim, right; beside the truth -> its own claim, wrong
    np.testing.assert_allclose(c, [0.97, 0.9, 0.7, 0.8, 0.75, 0.95])
    assert list(ok) == [True, True, True, True, False, True]
    assert list(judged) == [True, True, False, True, True, True]
    assert list(finer) == [True, False, True, False, False, False]
