import numpy as np
import pytest

from cellatlas import calls, fusion
from cellatlas.fusion import Evidence, Hierarchy


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


def test_ood_z_is_a_robust_z():
    z = fusion.ood_z(np.array([0.1, 0.2, 0.9]), median=0.1, mad=0.02)
    assert z[0] == pytest.approx(0.0) and np.all(np.diff(z) > 0)
    assert z[1] == pytest.approx(0.1 / (1.4826 * 0.02), rel=1e-4)


def _evidence(z, knn, seen, n_foil=0, distance=None, knn_top=None):
    z = np.asarray(z, dtype=np.float32)
    knn = np.asarray(knn, dtype=np.float32)
    n = len(z)
    return Evidence(
        raw_centred=z / 10, z=z, knn=knn, distance=np.zeros(n, np.float32) if distance is None else np.asarray(distance, np.float32),
        log_expressed=np.full(n, 8.0, np.float32), seen=np.asarray(seen, bool), coverage=np.ones(z.shape[1], np.float32),
        knn_top=np.full(n, -1) if knn_top is None else np.asarray(knn_top), n_foil=n_foil,
    )


def test_design_gives_unseen_labels_their_own_terms():
    ev = _evidence([[3.0, 1.0, 6.0]], [[1.0, 0.0, 0.0]], [True, True, False])
    X = fusion.design(ev)
    f = {k: i for i, k in enumerate(fusion.FEATURES)}
    assert X.shape == (1, 4, len(fusion.FEATURES))
    assert X[0, 2, f["marker_z_unseen"]] == 6.0 and X[0, 0, f["marker_z_unseen"]] == 0.0
    assert X[0, 0, f["reference_seen"]] == 1.0 and X[0, 2, f["reference_seen"]] == 0.0
    assert X[0, 0, f["knn_log_vote"]] == pytest.approx(np.log(1.0 + fusion.EPS), rel=1e-4)
    assert X[0, 2, f["knn_log_vote"]] == 0.0  # an unseen label has no vote to read
    assert X[0, 3, f["novel"]] == 1.0 and X[0, 3, f["novel_x_best_marker_z"]] == 6.0


def _fit_on_synthetic(rng, n=600):
    """Seen labels 0-1 and an unseen label 2; truth drawn so that markers decide when they are strong."""
    evs, truths = [], []
    for _ in range(3):
        truth = rng.integers(0, 3, n)
        z = rng.normal(0, 1, (n, 3)).astype(np.float32)
        z[np.arange(n), truth] += 5.0
        knn = np.zeros((n, 3), np.float32)
        own = truth < 2  # neighbours vote right for seen types, for label 0 when the type is unseen
        knn[np.arange(n), np.where(own, truth, 0)] = 1.0
        evs.append(_evidence(z, knn, [True, True, False]))
        t = np.zeros((n, 4), bool)
        t[np.arange(n), truth] = True
        truths.append(t)
    X = np.concatenate([fusion.design(e) for e in evs])
    return fusion.fit(X, np.concatenate(truths))


def test_fit_learns_that_strong_markers_beat_neighbours_of_a_reference_without_the_type():
    model = _fit_on_synthetic(np.random.default_rng(0))
    # a neuron-like cell: its neighbours in a blood-only reference are all "label 0", its markers say label 2
    neuron = _evidence([[0.2, -0.3, 6.0]], [[1.0, 0.0, 0.0]], [True, True, False])
    blood = _evidence([[5.5, 0.1, 0.3]], [[1.0, 0.0, 0.0]], [True, True, False])
    p_neuron, p_blood = model.probabilities(neuron)[0], model.probabilities(blood)[0]
    assert p_neuron.argmax() == 2 and p_neuron[2] > 0.8
    assert p_blood.argmax() == 0 and p_blood[0] > 0.8
    assert model.summary["fitted"] and model.summary["converged"]


def test_padded_options_change_nothing():
    """Cases from atlases with fewer candidates are padded to one width; padding must not count."""
    rng = np.random.default_rng(3)
    n = 200
    ev = _evidence(rng.normal(size=(n, 3)), rng.dirichlet(np.ones(3), size=n), [True, True, False])
    X = fusion.design(ev)
    truth = np.zeros((n, 4), bool)
    truth[np.arange(n), rng.integers(0, 4, n)] = True
    plain = fusion.fit(X, truth)
    pad = np.concatenate([X, rng.normal(size=(n, 3, X.shape[2])).astype(X.dtype)], axis=1)
    avail = np.zeros((n, 7), bool)
    avail[:, :4] = True
    padded = fusion.fit(pad, np.concatenate([truth, np.ones((n, 3), bool)], axis=1), available=avail)
    assert np.allclose(padded.coef, plain.coef, atol=1e-5)


def test_model_round_trips_through_a_dict():
    model = _fit_on_synthetic(np.random.default_rng(1))
    again = fusion.FusionModel.from_dict(model.to_dict())
    assert np.allclose(again.coef, model.coef)
    assert np.allclose(fusion.FusionModel.from_dict(None).coef, fusion.FusionModel.default().coef)


def test_hierarchy_masses_and_depth():
    parents = {"naive": "CD4", "memory": "CD4", "CD4": "T", "T": "Lymph", "B": "Lymph"}
    h = Hierarchy.build(["naive", "memory", "B"], parents)
    assert h.nodes[:3] == ["naive", "memory", "B"]
    pos = {n: i for i, n in enumerate(h.nodes)}
    m = h.mass(np.array([[0.35, 0.35, 0.30]]))
    assert m[0, pos["CD4"]] == pytest.approx(0.7) and m[0, pos["Lymph"]] == pytest.approx(1.0)
    assert h.depth[pos["naive"]] == 3 and h.depth[pos["Lymph"]] == 0


def test_calls_stop_where_the_next_step_is_more_likely_wrong():
    parents = {"naive": "CD4", "memory": "CD4", "CD4": "T", "T": "Lymph", "B": "Lymph"}
    h = Hierarchy.build(["naive", "memory", "B"], parents)
    pos = {n: i for i, n in enumerate(h.nodes)}
    ev = _evidence(np.zeros((3, 3)), np.zeros((3, 3)), [True, True, True])
    prob = np.array([[0.45, 0.45, 0.1, 0.0], [0.95, 0.03, 0.02, 0.0], [0.2, 0.2, 0.1, 0.5]])
    call, conf, parent, p_conf, novel = calls.decide(ev, prob, h, calls.NodeCalibration.default())
    names = [h.nodes[c] for c in call]
    # the unfitted calibration reads each node's mass: CD4 (0.9) yes, naive (0.45) no
    assert names[0] == "CD4" and conf[0] == pytest.approx(0.9, abs=1e-3) and h.nodes[parent[0]] == "T"
    assert names[1] == "naive" and conf[1] == pytest.approx(0.95, abs=1e-3)
    assert p_conf[1] >= conf[1]
    # half the mass says "none of these": flagged novel, and its confidence is capped below 0.5
    assert novel.tolist() == [False, False, True] and conf[2] <= 0.5


def test_a_candidate_with_finer_candidates_below_is_called_when_its_own_probability_leads():
    parents = {"stellate": "fibroblast", "fibroblast": "stromal", "endo": ""}
    h = Hierarchy.build(["fibroblast", "stellate", "endo"], parents)
    assert h.inner_candidates.tolist() == [0]
    ev = _evidence(np.zeros((3, 3)), np.zeros((3, 3)), [True, True, True])
    prob = np.array([[0.6, 0.3, 0.1, 0.0], [0.2, 0.7, 0.1, 0.0], [0.3, 0.35, 0.35, 0.0]])
    mass = h.mass(prob[:, :3])
    assert mass[0, 0] == pytest.approx(0.9) and h.own(mass, np.zeros(3, int))[0] == pytest.approx(0.6)
    br = calls.path(mass, h)
    assert [h.nodes[j] for j in br[0] if j >= 0] == ["stromal", "fibroblast"]  # its own 0.6 beats the child's 0.3
    assert [h.nodes[j] for j in br[2] if j >= 0] == ["stromal", "fibroblast", "stellate"]  # 0.35 beats 0.3
    call, conf, *_ = calls.decide(ev, prob, h, calls.NodeCalibration.default())
    names = [h.nodes[c] for c in call]
    # the unfitted calibration reads each node's mass: a fibroblast at 0.9 (its own 0.6 and the
    # stellate cell's 0.3), a stellate cell at 0.7; at 0.35 the stellate step is more likely
    # wrong than right, so the call stays at "fibroblast" (0.65 with it)
    assert names == ["fibroblast", "stellate", "fibroblast"]
    assert conf.tolist() == pytest.approx([0.9, 0.7, 0.65], abs=1e-3)


def test_path_probabilities_never_increase_down_the_branch():
    parents = {"a": "A", "b": "A"}
    h = Hierarchy.build(["a", "b"], parents)
    ev = _evidence(np.zeros((2, 2)), np.zeros((2, 2)), [True, True])
    prob = np.array([[0.6, 0.4, 0.0], [0.3, 0.3, 0.4]])
    cal = calls.NodeCalibration(np.r_[2.0, np.zeros(len(calls.NODE_FEATURES) - 2), 3.0], 0.0, {})  # leaves get a bonus
    br, p = calls.path_probabilities(ev, prob, h, cal)
    assert np.all(np.diff(p, axis=1) <= 1e-12)


def test_node_calibration_fits_rightness():
    rng = np.random.default_rng(2)
    F = rng.normal(size=(3000, len(calls.NODE_FEATURES)))
    y = rng.random(3000) < 1 / (1 + np.exp(-(2 * F[:, 0] - 0.5)))
    cal = calls.fit_calibration(F, y, np.ones(3000))
    assert fusion.expected_calibration_error(cal.predict(F), y) < 0.05
    assert fusion.expected_calibration_error(np.ones(3000), y) > 0.2  # an overconfident score is not calibrated
    again = calls.NodeCalibration.from_dict(cal.to_dict())
    assert np.allclose(again.predict(F), cal.predict(F))


def test_no_neighbours_means_no_neighbour_label_term():
    """Markers only (no label seen by neighbours): the novel option's neighbour-label term is 0,
    whatever order the candidates come in."""
    z = [[5.0, -3.0]]
    a = fusion.design(_evidence(z, [[0.0, 0.0]], [False, False]))
    b = fusion.design(_evidence([[-3.0, 5.0]], [[0.0, 0.0]], [False, False]))
    j = fusion.FEATURES.index("novel_x_neighbour_label_z")
    assert a[0, -1, j] == 0.0 and b[0, -1, j] == 0.0
    seen = fusion.design(_evidence(z, [[0.2, 0.8]], [True, True]))
    assert seen[0, -1, j] == -3.0  # the label the neighbours voted for
