"""One fitted model that turns the evidence about a cell into probabilities over labels.

The evidence (computed in :mod:`cellatlas.runtime`):

* marker fit of every candidate label, from the curated and reference-derived marker sets,
  on three scales: the raw rank score, the same centred on the reference's cells of other
  labels, and a z-score against the cell's own expression (random genes as the null), so
  that labels with and without reference cells are on one scale that does not depend on
  how many genes were measured;
* the distance-weighted vote of the cell's nearest reference neighbours, per hierarchy node,
  read for each label as the vote for the label or any label above it (a reference cell
  labelled "T cell" supports every kind of T cell; markers choose among them), except that
  a reference label that can itself be called votes for itself alone;
* how far the cell lies from the reference (robust z of its neighbour distance).

:class:`FusionModel` is a conditional logit over the options "each candidate label", "each
curated type the atlas cannot call" (foils) and "none of these" (novel). Its few
coefficients are shared by all labels, so it transfers to label sets it was not fitted
on; they are fitted at build time on held-out cells (other datasets, labels held out,
thinned and corrupted cells: :mod:`cellatlas.training`). A node's mass (its candidates'
summed probability) is what :mod:`cellatlas.calls` calibrates into the call's and its
parent's confidence; the novel option's probability caps both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

K_NEIGHBOURS = 15
NOVEL_THRESHOLD = 0.5
"""A cell is flagged novel when "none of the atlas's labels" is at least as likely as not; its
call's confidence is then at most 0.5 by construction."""
EPS = 1e-3
"""Floor of a neighbour-vote share before its logarithm (a vote of 0 out of 15 neighbours is not certainty)."""

FEATURES = (
    "marker_centred", "marker_z", "marker_z_unseen", "marker_log_coverage", "knn_log_vote", "reference_seen",
    "unseen_log_count", "foil", "foil_log_count", "novel", "novel_x_best_marker_z", "novel_x_distance",
    "novel_x_neighbour_label_z", "novel_x_marker_z_margin",
)
"""Columns of the design matrix, one coefficient each (see :func:`design`)."""
_COLUMN = {k: j for j, k in enumerate(FEATURES)}


@dataclass
class Evidence:
    """What the model reads about a chunk of ``n`` cells.

    Attributes
    ----------
    raw_centred, z
        Marker fit ``[n, n_cand + n_foil]``: raw rank score minus the reference's mean over
        cells of other labels, and the z-score against the cell's own null.
    knn
        ``[n, n_cand]`` neighbour-vote share of the label or any label above it.
    distance
        ``[n]`` robust z of the mean neighbour distance.
    log_expressed
        ``[n]`` log2(1 + number of the genes read that the cell expresses): how much evidence it can carry.
    seen
        ``[n_cand]`` whether reference cells carry the label or a label above it.
    coverage
        ``[n_cand + n_foil]`` share of each label's positive markers among the genes read.
    knn_top
        ``[n]`` hierarchy node of the label the neighbours voted for most (``-1``: none).
    n_foil
        Number of foil columns at the end of ``raw_centred``, ``z`` and ``coverage``.
    """

    raw_centred: np.ndarray
    z: np.ndarray
    knn: np.ndarray
    distance: np.ndarray
    log_expressed: np.ndarray
    seen: np.ndarray
    coverage: np.ndarray
    knn_top: np.ndarray
    n_foil: int = 0

    @property
    def n_cand(self) -> int:
        return self.knn.shape[1]

    def take(self, rows: np.ndarray | slice) -> "Evidence":
        """The evidence of ``rows`` (a slice gives views, an index array copies)."""
        return Evidence(self.raw_centred[rows], self.z[rows], self.knn[rows], self.distance[rows],
                        self.log_expressed[rows], self.seen, self.coverage, self.knn_top[rows], self.n_foil)


def design(ev: Evidence) -> np.ndarray:
    """Design tensor ``[n, n_cand + n_foil + 1, len(FEATURES)]`` (last option: novel).

    Labels the reference does not see (and foils) have their own intercept, their own slope on
    the marker z and a term in the log of how many of them there are, so that many unlikely
    labels do not take mass from a likely one merely by being many. A view of
    :func:`design_by_feature` (the same values, stored feature by feature).
    """
    return design_by_feature(ev).transpose(1, 2, 0)


def design_by_feature(ev: Evidence) -> np.ndarray:
    """:func:`design` stored feature-major, ``[len(FEATURES), n, n_cand + n_foil + 1]``: every feature
    is written and read as one contiguous block (a third of the time of the option-major layout)."""
    n, c, f = ev.knn.shape[0], ev.n_cand, ev.n_foil
    X = np.zeros((len(FEATURES), n, c + f + 1), dtype=np.float32)
    i = _COLUMN
    seen = ev.seen.astype(np.float32)
    unseen = np.r_[1.0 - seen, np.zeros(f, dtype=np.float32)]
    X[i["marker_centred"], :, : c + f] = ev.raw_centred
    X[i["marker_z"], :, : c + f] = ev.z
    X[i["marker_z_unseen"], :, : c + f] = ev.z * np.r_[1.0 - seen, np.ones(f, dtype=np.float32)][None, :]
    X[i["marker_log_coverage"], :, : c + f] = np.log(np.maximum(ev.coverage, 0.05))[None, :]
    X[i["knn_log_vote"], :, :c] = np.log(ev.knn + EPS) * seen[None, :]
    X[i["reference_seen"], :, :c] = seen
    X[i["unseen_log_count"], :, : c + f] = unseen * np.log(max(float(unseen.sum()), 1.0))
    X[i["foil"], :, c : c + f] = 1.0
    X[i["foil_log_count"], :, c : c + f] = np.log(max(f, 1))
    X[i["novel"], :, -1] = 1.0
    if c:
        rows = np.arange(n)
        X[i["novel_x_best_marker_z"], :, -1] = ev.z[:, :c].max(axis=1)
        X[i["novel_x_distance"], :, -1] = ev.distance
        voted = np.where(ev.seen[None, :], ev.knn, -1.0)
        top = voted.argmax(axis=1)  # no neighbours (markers only): no neighbours' label, the term is 0
        X[i["novel_x_neighbour_label_z"], :, -1] = np.where(voted[rows, top] > 0, ev.z[rows, top], 0.0)
        top2 = np.partition(ev.z[:, :c], -2, axis=1)[:, -2:] if c > 1 else np.hstack([ev.z[:, :c], ev.z[:, :c]])
        X[i["novel_x_marker_z_margin"], :, -1] = top2.max(axis=1) - top2.min(axis=1)
    return X


def stored_coef(coef, names: Sequence[str]) -> np.ndarray:
    """Coefficients as stored in an atlas: by name (a name an older file lacks reads 0) or in ``names`` order."""
    if isinstance(coef, dict):
        coef = [float(coef.get(k, 0.0)) for k in names]
    return np.asarray(coef, dtype=np.float64)


def softmax(u: np.ndarray) -> np.ndarray:
    u = u - u.max(axis=1, keepdims=True)
    e = np.exp(u)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class FusionModel:
    """Conditional logit over candidates, foils and "novel" (coefficients per :data:`FEATURES`)."""

    coef: np.ndarray
    summary: dict = field(default_factory=dict)

    @classmethod
    def default(cls) -> "FusionModel":
        """Unfitted fallback: markers and neighbours weighted equally, novel unlikely (tests, atlases without held-out data)."""
        c = dict(zip(FEATURES, np.zeros(len(FEATURES))))
        c.update(marker_z=1.0, knn_log_vote=1.0, reference_seen=2.0, unseen_log_count=-1.0, foil=-2.0,
                 foil_log_count=-1.0, novel=-4.0)
        return cls(np.array([c[k] for k in FEATURES], dtype=np.float64), {"fitted": False})

    @classmethod
    def from_dict(cls, d: dict | None) -> "FusionModel":
        if not d or "coef" not in d:
            return cls.default()
        return cls(stored_coef(d["coef"], FEATURES), dict(d.get("summary", {})))

    def to_dict(self) -> dict:
        return {"coef": {k: float(v) for k, v in zip(FEATURES, self.coef)}, "summary": self.summary}

    def probabilities(self, ev: Evidence) -> np.ndarray:
        """``[n, n_cand + n_foil + 1]`` probabilities (last column: novel)."""
        return softmax(np.tensordot(self.coef.astype(np.float32), design_by_feature(ev), axes=1))

    def marker_probabilities(self, ev: Evidence) -> np.ndarray:
        """``[n, n_cand]`` what the marker terms alone say (softmax over candidates)."""
        c = ev.n_cand
        u = self.coef[0] * ev.raw_centred[:, :c] + self.coef[1] * ev.z[:, :c]
        return softmax(u)


def fit(X: np.ndarray, truth: np.ndarray, weight: np.ndarray | None = None, l2: float = 1e-2,
        available: np.ndarray | None = None) -> FusionModel:
    """Maximum-likelihood coefficients of the conditional logit.

    Parameters
    ----------
    X
        Design tensor ``[N, O, p]`` of held-out cases (:func:`design`).
    truth
        ``[N, O]`` bool: the options that are right for each case (all candidates under a
        coarse truth label; "novel" or the matching foil for a type the atlas cannot call).
        The likelihood of a case is the probability of its right options together.
    weight
        Case weights (default 1).
    l2
        Ridge penalty per unit of total weight.
    available
        ``[N, O]`` bool: options that exist for the case (default all). Cases from atlases
        with different numbers of candidates are padded to one width; padding is unavailable.
    """
    from scipy.optimize import minimize

    X = np.asarray(X, dtype=np.float64)
    T = np.asarray(truth, dtype=bool)
    A = np.ones(T.shape, dtype=bool) if available is None else np.asarray(available, dtype=bool)
    keep = (T & A).any(axis=1)
    X, T, A = X[keep], T[keep] & A[keep], A[keep]
    w = np.ones(len(X)) if weight is None else np.asarray(weight, dtype=np.float64)[keep]
    w = w / w.sum()
    start = np.zeros(X.shape[2])
    d = FusionModel.default().coef
    start[: min(len(d), len(start))] = d[: len(start)]

    def nll(beta):
        P = softmax(np.where(A, X @ beta, -np.inf))
        PT = np.where(T, P, 0.0)
        s = np.maximum(PT.sum(axis=1), 1e-300)
        Q = PT / s[:, None]
        loss = -(w * np.log(s)).sum() + 0.5 * l2 * beta @ beta
        grad = np.einsum("no,nop->p", (P - Q) * w[:, None], X) + l2 * beta
        return loss, grad

    res = minimize(nll, start, jac=True, method="L-BFGS-B")
    model = FusionModel(res.x)
    model.summary = {"fitted": True, "n_cases": int(len(X)), "loss": float(res.fun), "converged": bool(res.success)}
    return model


@dataclass
class Hierarchy:
    """Candidates and their ancestors as matrices for vectorised roll-up.

    ``above[a, b]`` is True when node ``b`` is node ``a`` or one of its ancestors; ``member``
    is its rows for the candidates (``member[c, j]``: node ``j`` is candidate ``c`` or above it)
    and ``depth`` the number of ancestors of each node. Nodes ``0..n_cand-1`` are the
    candidates themselves; a candidate may sit above others (a type with finer types below
    it), and then its node's mass is its own probability plus theirs.
    """

    nodes: list[str]
    n_cand: int
    parent: np.ndarray  # node -> parent node index or -1
    above: np.ndarray  # [n_nodes, n_nodes] bool

    @classmethod
    def build(cls, candidates: list[str], parents: dict[str, str], extra: list[str] = ()) -> "Hierarchy":
        """Candidates first, then every ancestor (and ``extra`` nodes, e.g. reference labels that are not candidates)."""
        nodes = list(candidates)
        pos = {n: i for i, n in enumerate(nodes)}
        for e in extra:
            if e not in pos:
                pos[e] = len(nodes)
                nodes.append(e)
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
        # Candidates with candidates below them: where the cell's own probability of such a
        # candidate is at least every child's mass, the branch ends there (calls.path).
        has_child = np.zeros(len(self.nodes), dtype=bool)
        has_child[self.parent[self.parent >= 0]] = True
        self.inner_candidates = np.nonzero(has_child[: self.n_cand])[0]

    def own(self, mass: np.ndarray, nodes: np.ndarray) -> np.ndarray:
        """``[n]`` the probability of candidate ``nodes[i]`` itself (its mass minus its children's)."""
        rows = np.arange(len(nodes))
        kids = (self.parent[None, :] == nodes[:, None])  # [n, n_nodes]
        return mass[rows, nodes] - np.where(kids, mass, 0.0).sum(axis=1)

    def mass(self, p: np.ndarray) -> np.ndarray:
        """Probability mass of every node ``[n, n_nodes]`` from candidate probabilities."""
        if p.dtype != np.float32:
            p = p.astype(np.float32)
        return p @ self._member_f


def knn_vote(sim: np.ndarray, idx: np.ndarray, ref_codes: np.ndarray, n_codes: int, bandwidth: float) -> np.ndarray:
    """Distance-weighted vote of the neighbours -> shares over reference label codes ``[n, n_codes]``.

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
    flat = (np.arange(n)[:, None] * n_codes + codes).ravel()
    p = np.bincount(flat, weights=w.ravel(), minlength=n * n_codes).reshape(n, n_codes)
    p /= np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
    return p


def ood_z(mean_dist: np.ndarray, median: float, mad: float) -> np.ndarray:
    """Robust z of the mean neighbour distance against the reference's own distribution."""
    return ((mean_dist - median) / max(1.4826 * mad, 1e-4)).astype(np.float32)


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
