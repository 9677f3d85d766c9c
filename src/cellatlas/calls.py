"""From label probabilities to a call and a confidence that means what it says.

The fusion model (:mod:`cellatlas.fusion`) ranks labels. The call walks down the label
hierarchy along the most probable branch (root, its most probable child, ...) and stops
where the next step is more likely wrong than right. "Likely right" is the probability that
the cell is that node or below it (or that its truth is coarser and includes it), from a
logistic model of the node's evidence — its probability under the fusion model, whether the
neighbours' and the markers' best labels fall under it, the strongest vote and marker fit
beneath it, the distance to the reference, how many genes the cell expresses, the
probability that the cell is of no atlas type, the node's depth. It is fitted at build time
on the same held-out cells as the fusion model (:mod:`cellatlas.training`), so it answers
the question a confidence answers: of the calls made with confidence ~0.8, are ~80% right?

A node is never more likely than its parent: the probabilities along the path are made
non-increasing. The call's confidence is capped by the probability that the cell is of some
atlas type, so a cell flagged novel is never confident.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellatlas.fusion import EPS, Evidence, Hierarchy, NOVEL_THRESHOLD, stored_coef

NODE_FEATURES = (
    "logit_mass", "neighbours_agree", "markers_agree", "log_best_vote", "best_marker_z", "distance",
    "log_expressed", "log_novel", "depth", "leaf",
)
THRESHOLD = 0.5
"""The call steps down to a node while the node is more likely right than wrong."""


def path(mass: np.ndarray, h: Hierarchy) -> np.ndarray:
    """``[n, depth]`` nodes of the most probable branch from a root down to a candidate (``-1`` padded).

    At a candidate with candidates below it the branch ends when the candidate's own
    probability is at least every child's mass.
    """
    n, n_nodes = mass.shape
    children = np.zeros((n_nodes + 1, n_nodes), dtype=bool)
    children[h.parent + 1, np.arange(n_nodes)] = True  # children[j + 1]: children of node j; [0]: roots
    inner = np.zeros(n_nodes + 1, dtype=bool)
    inner[h.inner_candidates + 1] = True
    current = np.full(n, -1)
    out = []
    for _ in range(int(h.depth.max()) + 1):
        masked = np.where(children[current + 1], mass, -1.0)
        child = masked.argmax(axis=1)
        has = masked[np.arange(n), child] > -1.0
        at_inner = np.nonzero(inner[current + 1] & has)[0]
        if len(at_inner):
            has[at_inner] &= masked[at_inner, child[at_inner]] > h.own(mass[at_inner], current[at_inner])
        if not has.any():
            break
        current = np.where(has, child, current)
        out.append(np.where(has, child, -1))
    return np.stack(out, axis=1) if out else np.full((n, 1), -1)


def node_features(ev: Evidence, prob: np.ndarray, mass: np.ndarray, nodes: np.ndarray, h: Hierarchy) -> np.ndarray:
    """Features of one node per cell (``nodes[i]``, a valid node index), see :data:`NODE_FEATURES`."""
    c = ev.n_cand
    rows = np.arange(len(nodes))
    m = np.clip(mass[rows, nodes].astype(np.float64), 1e-4, 1 - 1e-4)
    under = h.member[:, nodes].T  # [n, n_cand]: candidate under the node
    knn_node = ev.knn_top
    agree_knn = (knn_node >= 0) & (h.above[np.maximum(knn_node, 0), nodes] | h.above[nodes, np.maximum(knn_node, 0)])
    marker_top = ev.z[:, :c].argmax(axis=1)
    return np.column_stack([
        np.log(m / (1 - m)),
        agree_knn,
        under[rows, marker_top],
        np.log(np.where(under, ev.knn, 0.0).max(axis=1) + EPS),
        np.where(under, ev.z[:, :c], -10.0).max(axis=1),
        ev.distance,
        ev.log_expressed,
        np.log(np.clip(prob[:, -1], 1e-4, 1.0)),
        h.depth[nodes],
        nodes < c,
    ]).astype(np.float64)


@dataclass
class NodeCalibration:
    """Logistic model: probability that a node on the call's path is right (:data:`NODE_FEATURES`)."""

    coef: np.ndarray
    intercept: float
    summary: dict

    @classmethod
    def default(cls) -> "NodeCalibration":
        """Unfitted: the node's probability under the fusion model as it is."""
        coef = np.zeros(len(NODE_FEATURES))
        coef[0] = 1.0
        return cls(coef, 0.0, {"fitted": False})

    @classmethod
    def from_dict(cls, d: dict | None) -> "NodeCalibration":
        if not d or "coef" not in d:
            return cls.default()
        return cls(stored_coef(d["coef"], NODE_FEATURES), float(d.get("intercept", 0.0)), dict(d.get("summary", {})))

    def to_dict(self) -> dict:
        return {"coef": {k: float(v) for k, v in zip(NODE_FEATURES, self.coef)}, "intercept": self.intercept,
                "summary": self.summary}

    def predict(self, F: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(F @ self.coef + self.intercept)))


def path_probabilities(ev: Evidence, prob: np.ndarray, h: Hierarchy, cal: NodeCalibration) -> tuple[np.ndarray, np.ndarray]:
    """The branch (:func:`path`) and each node's calibrated probability, non-increasing down the branch."""
    mass = h.mass(prob[:, : h.n_cand])
    br = path(mass, h)
    p = np.zeros(br.shape)
    for d in range(br.shape[1]):
        ok = br[:, d] >= 0
        if ok.any():  # a depth every cell's branch reaches (always the first) is read as views, not copies
            rows = slice(None) if ok.all() else np.nonzero(ok)[0]
            p[rows, d] = cal.predict(node_features(ev.take(rows), prob[rows], mass[rows], br[rows, d], h))
    p = np.minimum.accumulate(np.where(br >= 0, p, 1.0), axis=1)
    return br, np.where(br >= 0, p, 0.0)


def decide(ev: Evidence, prob: np.ndarray, h: Hierarchy, cal: NodeCalibration):
    """Call, confidence, parent node and parent confidence, and the novel flag, per cell.

    The call is the deepest node of the branch whose probability is at least :data:`THRESHOLD`;
    where even the top of the branch falls short, the branch's candidate is called with its
    (low) probability.
    """
    br, p = path_probabilities(ev, prob, h, cal)
    n = len(br)
    rows = np.arange(n)
    last = (br >= 0).sum(axis=1) - 1
    passing = (p >= THRESHOLD) & (br >= 0)
    depth = np.where(passing.any(axis=1), passing.sum(axis=1) - 1, last)  # p is non-increasing: passing is a prefix
    call = br[rows, depth]
    conf = p[rows, depth]
    parent = h.parent[call]
    has_parent = depth > 0
    p_conf = np.where(has_parent, p[rows, np.maximum(depth - 1, 0)], np.nan)
    novel_p = prob[:, h.n_cand:].sum(axis=1)
    cap = 1.0 - novel_p
    conf = np.minimum(conf, cap)
    p_conf = np.where(has_parent, np.maximum(np.minimum(p_conf, cap), conf), np.nan)
    return call, conf.astype(np.float32), parent, p_conf.astype(np.float32), novel_p >= NOVEL_THRESHOLD


def right_nodes(truth: np.ndarray, h: Hierarchy) -> np.ndarray:
    """``[n, n_nodes]``: whether each node is right for each case (some right option of the case
    is a candidate under it: the truth is the node, below it, or a coarser label that includes it)."""
    return truth[:, : h.n_cand].astype(np.float32) @ h.member.astype(np.float32) > 0


def training_rows(ev: Evidence, prob: np.ndarray, truth: np.ndarray, h: Hierarchy) -> tuple[np.ndarray, np.ndarray]:
    """Node features and rightness for every node on the branch of held-out cases (to fit the calibration).

    A node is right when some right option of the case is a candidate under it (the truth is the
    node, below it, or a coarser label that includes it).
    """
    mass = h.mass(prob[:, : h.n_cand])
    br = path(mass, h)
    right_under = right_nodes(truth, h)
    F, y = [], []
    for d in range(br.shape[1]):
        ok = np.nonzero(br[:, d] >= 0)[0]
        if len(ok):
            F.append(node_features(ev.take(ok), prob[ok], mass[ok], br[ok, d], h))
            y.append(right_under[ok, br[ok, d]])
    return np.vstack(F), np.concatenate(y)


def fit_calibration(F: np.ndarray, y: np.ndarray, weight: np.ndarray) -> NodeCalibration:
    """Logistic regression of node rightness on the node features (weights as the fusion model's cases)."""
    from sklearn.linear_model import LogisticRegression

    w = np.asarray(weight, dtype=np.float64)
    lr = LogisticRegression(C=1.0, max_iter=2000).fit(F, y, sample_weight=w / w.mean())
    return NodeCalibration(lr.coef_[0].astype(np.float64), float(lr.intercept_[0]), {"fitted": True, "n_nodes": int(len(y))})
