"""Pure functions that turn the two signals into calls.

Signal 1: a distance-weighted vote among the cell's nearest reference neighbours.
Signal 2: a rank-based marker-signature score per candidate label.
They are fused by a geometric mean (the prototype's finding: as good as or better
than veto/re-rank rules), a call is made top-down in the label hierarchy (a coarser
label when only that level is supported), and the call's confidence is a logistic
calibration fitted on held-out reference cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

K_NEIGHBOURS = 15
MARKER_TEMPERATURE = 0.5
"""Softmax temperature of standardised marker scores (1 = the gap between a label's own cells and others)."""
CALL_THRESHOLD = 0.4
"""A node is called when its fused probability mass reaches this."""
OOD_Z = 3.0
"""Robust z of the neighbour distance above which a cell is out of the atlas's range."""
EPS = 1e-4
CALIBRATION_FEATURES = ("logit_mass", "logit_knn_mass", "logit_marker_mass", "agreement", "ood", "coarse")


def knn_vote(sim: np.ndarray, idx: np.ndarray, ref_codes: np.ndarray, n_ref_labels: int, bandwidth: float) -> np.ndarray:
    """Distance-weighted vote of the neighbours -> probabilities over reference labels.

    Parameters
    ----------
    sim, idx
        Cosine similarities and reference indices of the ``k`` neighbours ``[n, k]``.
    ref_codes
        Label code of each reference cell.
    bandwidth
        Kernel width in cosine distance (the reference's median neighbour distance).
    """
    d = 1.0 - sim
    w = np.exp(-(d - d[:, :1]) / max(bandwidth, 1e-3))
    codes = ref_codes[idx]
    n = sim.shape[0]
    flat = (np.arange(n)[:, None] * n_ref_labels + codes).ravel()
    p = np.bincount(flat, weights=w.ravel(), minlength=n * n_ref_labels).reshape(n, n_ref_labels)
    p /= p.sum(axis=1, keepdims=True)
    return p


def ood_score(mean_dist: np.ndarray, median: float, mad: float) -> tuple[np.ndarray, np.ndarray]:
    """Robust z of the mean neighbour distance and an out-of-distribution weight in [0, 1].

    The weight is 0 up to ``OOD_Z - 1``, rises linearly and reaches 1 at ``OOD_Z + 1``.
    """
    z = (mean_dist - median) / max(1.4826 * mad, 1e-4)
    return z.astype(np.float32), ood_weight(z)


def ood_weight(z: np.ndarray) -> np.ndarray:
    """Out-of-distribution weight in [0, 1] of a robust distance z (see :func:`ood_score`)."""
    return np.clip((np.asarray(z, dtype=np.float64) - (OOD_Z - 1.0)) / 2.0, 0.0, 1.0)


MARKER_OOD_MARGIN = 0.75
"""Standardised marker-score lead (in label gaps) of a marker-defined label over every reference label
at which the kNN mass starts moving to marker-defined labels; all of it has moved one gap later.

Chosen on the built-in atlas section of benchmarks/accuracy.py (macro-F1 at 1.5 / 1.0 / 0.75 / 0.5):
HNSCC 0.317 / 0.385 / 0.414 / 0.466, mouse Baron 0.326 / 0.410 / 0.432 / 0.468, CIDER Baron
0.413 / 0.484 / 0.499 / 0.493, CEL-seq2 lines 0.966 / 0.984 / 0.985 / 0.988, Kang 0.971 throughout,
Kang SCE 0.657 / 0.657 / 0.655 / 0.642. Non-blood cells (HNSCC endothelial cells) sit near
sparse blood cells such as platelets in an embedding built on blood genes, at a typical
distance, so only their markers can move them; 0.75 keeps blood data where it was."""


def marker_ood(std_scores: np.ndarray, marker_only: np.ndarray) -> np.ndarray:
    """Out-of-reference weight from markers alone, in [0, 1].

    Rises when a label the reference has no cells for fits the cell much better (by more
    than ``MARKER_OOD_MARGIN`` label gaps) than every reference label. The lead is relative,
    so it holds for shallow droplet data and deep full-length data alike.
    """
    if not marker_only.any() or marker_only.all():
        return np.zeros(std_scores.shape[0])
    lead = std_scores[:, marker_only].max(axis=1) - std_scores[:, ~marker_only].max(axis=1)
    return np.clip(lead - MARKER_OOD_MARGIN, 0.0, 1.0)


FOIL_MIN_COVERAGE = 0.5
"""A foil (curated type the atlas cannot call) is used only when most of its own positive markers are measured:
a signature read on a minority of its genes rests on one or two genes that other cells express too."""
FOIL_MAX_REFERENCE_RATE = 0.25
"""A foil that fits better than every candidate in more than this share of some reference label's own cells
describes that label (one named outside the curated vocabulary, e.g. "NK" for "NK cell": 88% there) and is not
used. A minority inside a label (NK-like cells in PBMC3k's "CD8 T": 10%) keeps it."""


def foil_standardisation(ref_raw: np.ndarray, cand_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and scale of foil scores, on the candidates' standardised scale.

    A foil has no reference cells, so its centre is the mean raw score over all reference
    cells (0 = a typical reference cell) and its scale the median candidate gap between
    own and other cells (1 = as far above the reference as a typical label's own cells).
    """
    n_foil = ref_raw.shape[1]
    centre = ref_raw.mean(axis=0) if len(ref_raw) else np.zeros(n_foil)
    scale = np.full(n_foil, float(np.median(cand_scale)) if len(cand_scale) else 0.3)
    return centre.astype(np.float32), np.maximum(scale, 0.02).astype(np.float32)


def usable_foils(coverage: np.ndarray, ref_std: np.ndarray, ref_foil: np.ndarray, ref_codes: np.ndarray) -> np.ndarray:
    """Which foils may flag cells: measured well enough and not already describing a reference label.

    Parameters
    ----------
    coverage
        Share of each foil's own positive markers (not those inherited from its parent) present
        in the scored genes.
    ref_std, ref_foil
        Standardised candidate and foil scores of the reference cells ``[n_ref, ...]``.
    ref_codes
        Reference label of each reference cell.
    """
    keep = np.asarray(coverage) >= FOIL_MIN_COVERAGE
    if ref_foil.shape[1] == 0 or len(ref_foil) == 0:
        return keep
    beats = ref_foil > ref_std.max(axis=1, keepdims=True)
    for c in np.unique(ref_codes):
        keep &= beats[ref_codes == c].mean(axis=0) <= FOIL_MAX_REFERENCE_RATE
    return keep


def foil_lead(std_scores: np.ndarray, foil_scores: np.ndarray) -> np.ndarray:
    """How much better the best foil fits than the best candidate (standardised units; -inf without foils).

    A positive lead means a curated type the atlas cannot call describes the cell better
    than every label it can: the cell is flagged novel (its label is still reported).
    """
    if foil_scores.shape[1] == 0:
        return np.full(std_scores.shape[0], -np.inf)
    return foil_scores.max(axis=1) - std_scores.max(axis=1)


def marker_probs(scores: np.ndarray, temperature: float = MARKER_TEMPERATURE) -> np.ndarray:
    """Softmax of marker scores over candidate labels."""
    s = scores / temperature
    s = s - s.max(axis=1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=1, keepdims=True)


def spread_knn(p_ref: np.ndarray, ref_to_cand: np.ndarray, o: np.ndarray, p_marker: np.ndarray, marker_only: np.ndarray) -> np.ndarray:
    """kNN probabilities over all candidates.

    The reference labels keep ``(1 - o)`` of the mass; the rest goes to the labels the
    reference has no cells for, in proportion to their marker probability, so a cell far
    from every reference cell can still be called a type that only markers describe.
    """
    n, c = p_ref.shape[0], p_marker.shape[1]
    p = np.zeros((n, c))
    p[:, ref_to_cand] = p_ref * (1.0 - o)[:, None]
    if marker_only.any():
        pm = p_marker[:, marker_only]
        pm = pm / np.maximum(pm.sum(axis=1, keepdims=True), 1e-12)
        p[:, marker_only] += pm * o[:, None]
    else:
        p[:, ref_to_cand] += p_ref * o[:, None]
    return p


MARKER_WEIGHT = 0.5
"""Weight of the marker signal in the geometric mean (0.35 measured no better on the cross-dataset splits)."""


def fuse(p_knn: np.ndarray, p_marker: np.ndarray, marker_weight: float | None = None) -> np.ndarray:
    """Weighted geometric mean of the two signals, renormalised."""
    w = MARKER_WEIGHT if marker_weight is None else marker_weight
    f = (p_knn + EPS) ** (1.0 - w) * (p_marker + EPS) ** w
    return f / f.sum(axis=1, keepdims=True)


@dataclass
class Hierarchy:
    """Candidates (leaves) and their ancestors as matrices for vectorised roll-up.

    ``above[a, b]`` is True when node ``b`` is node ``a`` or one of its ancestors; ``member``
    is its rows for the candidates (``member[c, j]``: node ``j`` is candidate ``c`` or above it)
    and ``depth`` the number of ancestors of each node. Nodes ``0..n_cand-1`` are the
    candidates themselves.
    """

    nodes: list[str]
    n_cand: int
    parent: np.ndarray  # node -> parent node index or -1
    above: np.ndarray  # [n_nodes, n_nodes] bool

    @classmethod
    def build(cls, candidates: list[str], parents: dict[str, str]) -> "Hierarchy":
        nodes = list(candidates)
        pos = {n: i for i, n in enumerate(nodes)}
        i = 0
        while i < len(nodes):
            par = parents.get(nodes[i]) or ""
            if par and par not in pos:
                pos[par] = len(nodes)
                nodes.append(par)
            i += 1
        parent = np.array([pos.get(parents.get(n) or "", -1) for n in nodes])
        above = np.zeros((len(nodes), len(nodes)), dtype=bool)
        for a in range(len(nodes)):
            b = a
            while b >= 0:
                above[a, b] = True
                b = parent[b]
        return cls(nodes, len(candidates), parent, above)

    def __post_init__(self) -> None:
        self.member = self.above[: self.n_cand]  # [n_cand, n_nodes]
        self.depth = self.above.sum(axis=1) - 1
        self._member_f = self.member.astype(np.float32)

    def mass(self, p: np.ndarray) -> np.ndarray:
        """Probability mass of every node ``[n, n_nodes]`` from candidate probabilities."""
        if p.dtype != np.float32:
            p = p.astype(np.float32)
        return p @ self._member_f


def roll_up_to_shared(call: np.ndarray, other_above: np.ndarray, h: Hierarchy) -> np.ndarray:
    """The deepest node that is both the call (or above it) and above another type, per cell.

    Parameters
    ----------
    call
        Called node per cell.
    other_above
        ``[n, n_nodes]`` bool: which hierarchy nodes lie above the other type of each cell (e.g. a
        curated type the atlas cannot call, which fits the cell better than every candidate).

    Returns the node per cell, or ``-1`` where the two share no node (the call is then kept).
    """
    shared = h.above[call] & other_above
    depth = np.where(shared, h.depth[None, :], -1)
    best = depth.argmax(axis=1)
    return np.where(depth.max(axis=1) >= 0, best, -1)


def hierarchical_call(
    fused: np.ndarray, h: Hierarchy, threshold: float = CALL_THRESHOLD, mass: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-down call: from the roots, step to the child with the most mass while it reaches ``threshold``.

    Returns the called node index per cell and whether it is coarser than the best
    candidate. If no top-level node reaches the threshold, the best candidate is called
    (with the low confidence its mass implies). ``mass`` is ``h.mass(fused)`` when already computed.
    """
    mass = h.mass(fused) if mass is None else mass
    n, n_nodes = mass.shape
    # children[j + 1] masks the children of node j; children[0] the roots.
    children = np.zeros((n_nodes + 1, n_nodes), dtype=bool)
    children[h.parent + 1, np.arange(n_nodes)] = True
    current = np.full(n, -1)
    rows = np.arange(n)
    for _ in range(int(h.depth.max()) + 1):
        masked = np.where(children[current + 1], mass, -1.0)
        child = masked.argmax(axis=1)
        step = masked[rows, child] >= threshold
        if not step.any():
            break
        current = np.where(step, child, current)
    best = fused.argmax(axis=1)
    call = np.where(current >= 0, current, best)
    return call, call != best


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def calibration_features(
    fused: np.ndarray, p_knn: np.ndarray, p_marker: np.ndarray, call: np.ndarray, coarse: np.ndarray, h: Hierarchy, o: np.ndarray,
    masses: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Features of one node per cell (the call, or e.g. its parent) for the confidence model.

    See ``CALIBRATION_FEATURES``. ``masses`` are ``h.mass`` of ``fused``, ``p_knn`` and
    ``p_marker`` when already computed (scoring two nodes per cell reads them twice).
    """
    if masses is None:
        masses = (h.mass(fused), h.mass(p_knn), h.mass(p_marker))
    rows = np.arange(len(call))
    mf, mk, mm = (m[rows, call].astype(np.float64) for m in masses)
    kl, ml = p_knn.argmax(axis=1), p_marker.argmax(axis=1)
    agree = h.member[kl, call] & h.member[ml, call]
    return np.column_stack([_logit(mf), _logit(mk), _logit(mm), agree, o, coarse]).astype(np.float64)


def apply_calibration(features: np.ndarray, coef: np.ndarray, intercept: float) -> np.ndarray:
    """Logistic calibration -> confidence in [0, 1]."""
    z = features @ np.asarray(coef, dtype=np.float64) + float(intercept)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def fit_calibration(features: np.ndarray, correct: np.ndarray) -> dict:
    """Fit the logistic confidence model on held-out reference calls; returns its parameters and ECE.

    Targets are smoothed as in Platt (1999): a right call counts as ``(N+ + 1) / (N+ + 2)``
    right and a wrong one as ``1 / (N- + 2)``, so a held-out set with few or no errors
    (e.g. pseudo-cells drawn from averaged profiles, which are all called right) gives
    a confidence near its smoothed accuracy instead of an undefined fit.
    """
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(correct, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    target = np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    X = np.vstack([features, features])
    labels = np.r_[np.ones(len(y), dtype=int), np.zeros(len(y), dtype=int)]
    lr = LogisticRegression(C=1.0, max_iter=1000).fit(X, labels, sample_weight=np.r_[target, 1.0 - target])
    p = lr.predict_proba(features)[:, 1]
    return {
        "coef": lr.coef_[0].tolist(),
        "intercept": float(lr.intercept_[0]),
        "n": int(len(y)),
        "summary": {"n": int(len(y)), "accuracy": float(y.mean()), "ece": expected_calibration_error(p, y)},
    }


def expected_calibration_error(conf: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    """ECE with equal-width bins."""
    conf, correct = np.asarray(conf, dtype=float), np.asarray(correct, dtype=float)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(conf[m].mean() - correct[m].mean())
    return float(ece)
