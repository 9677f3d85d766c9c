import numpy as np
import pytest

from cellatlas import fusion
from cellatlas.fusion import Hierarchy


def test_knn_vote_weights_nearer_neighbours_more():
    sim = np.array([[0.99, 0.5, 0.5]])
    idx = np.array([[0, 1, 2]])
    codes = np.array([0, 1, 1])
    p = fusion.knn_vote(sim, idx, codes, 2, bandwidth=0.05)
    assert p.shape == (1, 2)
    assert np.isclose(p.sum(), 1.0)
    assert p[0, 0] > p[0, 1]  # one close neighbour beats two far ones
    p_wide = fusion.knn_vote(sim, idx, codes, 2, bandwidth=10.0)
    assert p_wide[0, 1] > p_wide[0, 0]  # with a very wide kernel it is a plain majority


def test_ood_score_monotone():
    z, o = fusion.ood_score(np.array([0.1, 0.2, 0.9]), median=0.1, mad=0.02)
    assert z[0] == pytest.approx(0.0)
    assert o[0] < 0.1 < 0.9 < o[2]
    assert np.all(np.diff(o) > 0)


def test_spread_knn_moves_mass_to_marker_only_labels_when_far():
    p_ref = np.array([[1.0, 0.0], [1.0, 0.0]])
    ref_to_cand = np.array([0, 1])
    marker_only = np.array([False, False, True, True])
    p_marker = np.array([[0.1, 0.1, 0.7, 0.1]] * 2)
    o = np.array([0.0, 1.0])
    p = fusion.spread_knn(p_ref, ref_to_cand, o, p_marker, marker_only)
    assert np.allclose(p.sum(axis=1), 1.0)
    assert p[0, 0] == 1.0 and p[0, 2:].sum() == 0
    assert p[1, 0] == 0.0 and p[1, 2] == pytest.approx(0.875)


def test_hierarchy_rolls_up_when_only_parent_is_supported():
    # candidates: naive CD4, memory CD4, B; parents: CD4 T -> T -> Lymphocyte; B -> Lymphocyte
    parents = {"naive": "CD4", "memory": "CD4", "CD4": "T", "T": "Lymph", "B": "Lymph"}
    h = Hierarchy.build(["naive", "memory", "B"], parents)
    assert h.nodes[:3] == ["naive", "memory", "B"]
    fused = np.array([[0.35, 0.35, 0.30], [0.9, 0.05, 0.05], [0.3, 0.3, 0.4]])
    call, coarse = fusion.hierarchical_call(fused, h)
    names = [h.nodes[c] for c in call]
    assert names == ["CD4", "naive", "CD4"]
    assert list(coarse) == [True, False, True]


def test_roll_up_to_shared_finds_the_deepest_common_label():
    # NK and CD4 are candidates; CD8 (a foil) sits under T; Lymph is the root of both.
    parents = {"NK": "Lymph", "CD4": "T", "T": "Lymph", "B": "Lymph"}
    h = Hierarchy.build(["NK", "CD4", "B"], parents)
    pos = {n: i for i, n in enumerate(h.nodes)}
    assert h.above[pos["CD4"], pos["Lymph"]] and not h.above[pos["Lymph"], pos["CD4"]]
    above_cd8 = np.zeros(len(h.nodes), dtype=bool)
    above_cd8[[pos["T"], pos["Lymph"]]] = True
    nothing = np.zeros(len(h.nodes), dtype=bool)
    call = np.array([pos["NK"], pos["CD4"], pos["NK"]])
    up = fusion.roll_up_to_shared(call, np.stack([above_cd8, above_cd8, nothing]), h)
    # NK and CD8 share only "Lymph"; CD4 and CD8 share "T"; with nothing shared the call stays (-1).
    assert [h.nodes[u] if u >= 0 else None for u in up] == ["Lymph", "T", None]


def test_calibration_fit_and_ece():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, len(fusion.CALIBRATION_FEATURES)))
    p = 1 / (1 + np.exp(-(2 * x[:, 0] - 0.5)))
    y = rng.random(2000) < p
    cal = fusion.fit_calibration(x, y)
    conf = fusion.apply_calibration(x, np.array(cal["coef"]), cal["intercept"])
    assert fusion.expected_calibration_error(conf, y) < 0.05
    # an overconfident score is badly calibrated
    assert fusion.expected_calibration_error(np.ones(2000), y) > 0.2


def test_calibration_without_held_out_errors_gives_the_smoothed_accuracy():
    x = np.random.default_rng(1).normal(size=(300, len(fusion.CALIBRATION_FEATURES)))
    cal = fusion.fit_calibration(x, np.ones(300, dtype=bool))
    conf = fusion.apply_calibration(x, np.array(cal["coef"]), cal["intercept"])
    # nothing distinguishes right from wrong calls: every call gets (300 + 1) / (300 + 2)
    assert np.allclose(conf, 301 / 302, atol=2e-3) and cal["summary"]["accuracy"] == 1.0


def test_fuse_is_geometric_mean():
    a = np.array([[0.8, 0.2]])
    b = np.array([[0.2, 0.8]])
    f = fusion.fuse(a, b)
    assert np.allclose(f, [[0.5, 0.5]], atol=1e-3)


def test_marker_ood_needs_a_clear_lead():
    marker_only = np.array([False, False, True])
    s = np.array([
        [0.0, 0.05, 3.0],  # a marker-only label fits far better than any reference label
        [1.0, 0.0, 1.2],   # a reference label fits about as well: stay
        [0.0, 0.0, 0.2],   # nothing fits anywhere: no evidence to move
    ])
    o = fusion.marker_ood(s, marker_only)
    assert o[0] > 0.8 and o[1] == 0 and o[2] == 0


def test_foil_lead_flags_a_better_fitting_absent_type():
    s = np.array([[1.0, 0.1], [0.1, 0.2], [0.9, 0.0]])
    f = np.array([[0.3, 0.0], [0.8, 0.1], [0.2, 0.95]])
    lead = fusion.foil_lead(s, f)
    assert lead[0] < 0 and lead[1] > 0 and lead[2] > 0
    assert np.all(np.isneginf(fusion.foil_lead(s, np.zeros((3, 0)))))


def test_usable_foils_drop_unmeasured_and_reference_owned_types():
    codes = np.array([0] * 10 + [1] * 10)
    ref_std = np.full((20, 2), 0.0)
    ref_std[:10, 0] = ref_std[10:, 1] = 1.0
    ref_foil = np.zeros((20, 3))
    ref_foil[10:19, 1] = 2.0  # foil 1 beats every candidate on 90% of label 1: it *is* label 1
    ref_foil[0, 2] = 2.0      # foil 2 beats on one cell of label 0 (10%): a minority, kept
    keep = fusion.usable_foils(np.array([0.2, 1.0, 0.8]), ref_std, ref_foil, codes)
    assert keep.tolist() == [False, False, True]  # foil 0 has too few of its markers measured


def test_foil_standardisation_uses_reference_mean_and_median_gap():
    centre, scale = fusion.foil_standardisation(np.array([[0.1, 0.0], [0.3, 0.2]]), np.array([0.2, 0.4, 0.6]))
    assert np.allclose(centre, [0.2, 0.1]) and np.allclose(scale, [0.4, 0.4])
