"""Fit the fusion model on held-out cells that look like what users send.

The model (:class:`cellatlas.fusion.FusionModel`) has a few coefficients shared by every
label. They are fitted at build time, never on a query, on cells the atlas being fitted did
not contain:

* **other datasets**: with several reference groups (datasets, or studies sharing cells),
  each group is held out in turn and scored against an atlas built from the others, so
  cross-dataset, cross-technology and cross-species shifts are in the training data, as are
  labels only the held-out group has (they become marker-defined labels of that atlas);
  with one group, folds of its cells (by donor or batch where known);
* **the same study**: a third of each real-cell source's cells scored against all the other
  reference cells, its own included (a tissue the atlas holds, read with the reference's own
  protocol);
* **labels held out**: in every fold a share of the remaining reference labels loses its
  reference cells (the label stays a marker-defined candidate when the atlas has curated
  markers for it, else it becomes a type the atlas cannot call);
* **held-out datasets** (``kind="heldout"``): scored against the whole reference;
* **shallow cells**: every held-out cell again, binomially thinned to 1/4 and 1/16 of its depth;
* **pre-filtered gene lists**: every held-out cell again with only its dataset's 1,000 or 2,500
  most detected genes (as in datasets shared as highly variable or expressed genes only), at
  half its depth;
* **targeted panels**: every held-out cell read by its markers alone (what a query measuring too
  few of the atlas's panel genes for neighbours gets);
* **corrupted input**: a sample of held-out cells with their gene names shuffled, whose truth
  is "none of the atlas's labels".
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from cellatlas import calls, fusion
from cellatlas.atlas import Atlas
from cellatlas.errors import CellAtlasError
from cellatlas.markers import load_labels, parent_chain
from cellatlas.neighbours import thin
from cellatlas.sources import NOVEL, Prepared, source_table, stack

GROUP_KEYS = ("donor", "batch", "sample", "sample_id")
DROP_FRACTION = 0.1
"""Share of a fold's reference labels whose reference cells are held out with the fold."""
MAX_CELLS = 600
"""Held-out cells read per source and fold (a seeded sample, at most ``MAX_CELLS // 4`` per label)."""
THINNING = (0.25, 1.0 / 16)
PANEL_SIZES = (1000, 2500)
"""Pre-filtered gene lists: held-out cells again with only this many of their most detected genes."""
SHUFFLED_CELLS = 100
VARIANT_WEIGHT = {"as sent": 1.0, "thinned": 0.5, "fewer genes": 0.5, "markers only": 0.25, "shuffled genes": 0.5}
PROFILE_WEIGHT = 0.25
"""Pseudo-cells drawn from averaged profiles are easier than real cells: they count less."""


@dataclass
class Cases:
    """Held-out cases of one (fold, source, variant)."""

    evidence: fusion.Evidence
    truth: np.ndarray
    weight: float
    source: str
    variant: str
    hierarchy: fusion.Hierarchy

    @property
    def design(self) -> np.ndarray:
        return fusion.design(self.evidence)


def truth_options(truth: Sequence[str], candidates: list[str], foils: list[str], parents: dict[str, str]) -> np.ndarray:
    """``[n, n_cand + n_foil + 1]`` bool: the options that are right for each truth label.

    A truth that is a candidate is right for that candidate alone (a "Fibroblast" is not
    thereby a pancreatic stellate cell); other truths are right for every candidate at or
    below them (a coarse truth such as "T cell" accepts every kind of T cell); else for the
    deepest candidate above it (a finer truth than the atlas resolves); else for a foil at or
    below it; else "novel". ``None`` truths get no right option (the case is left out).
    """
    lineage = {c: [c, *parent_chain(c, parents)] for c in candidates + foils}
    position = {c: j for j, c in enumerate(candidates)}
    n_c, n_f = len(candidates), len(foils)
    cache: dict[str, np.ndarray] = {}
    out = np.zeros((len(truth), n_c + n_f + 1), dtype=bool)
    for i, t in enumerate(truth):
        if t is None:
            continue
        if t not in cache:
            row = np.zeros(n_c + n_f + 1, dtype=bool)
            if t != NOVEL:
                below = [position[t]] if t in position else [j for j, c in enumerate(candidates) if t in lineage[c]]
                if below:
                    row[below] = True
                else:
                    up = [c for c in parent_chain(t, parents) if c in candidates]
                    if up:
                        row[candidates.index(up[0])] = True
                    else:
                        f = [n_c + j for j, c in enumerate(foils) if t in lineage[c]]
                        row[f] = True
            if not row.any():
                row[-1] = True
            cache[t] = row
        out[i] = cache[t]
    return out


def _sample(labels: np.ndarray, rng: np.random.Generator, cap: int = MAX_CELLS) -> np.ndarray:
    """Seeded sample of at most ``cap`` rows, at most ``cap // 4`` per label."""
    rows = []
    per = max(1, cap // 4)
    for lab in np.unique(labels.astype(str)):
        r = np.flatnonzero(labels.astype(str) == lab)
        rows.append(rng.choice(r, min(per, len(r)), replace=False))
    rows = np.sort(np.concatenate(rows)) if rows else np.zeros(0, int)
    return np.sort(rng.choice(rows, cap, replace=False)) if len(rows) > cap else rows


def _score(atlas: Atlas, part: Prepared, rows: np.ndarray, model: str, encoder, rng, parents) -> list[Cases]:
    """Cases of one held-out part against one atlas, as sent and in every variant (module docstring)."""
    from cellatlas.runtime import AtlasRuntime

    weight = PROFILE_WEIGHT if part.kind == "profiles" else 1.0
    counts, labels = part.counts[rows], part.labels[rows]
    genes = np.asarray(part.genes, dtype=object)
    detected = np.asarray((part.counts > 0).mean(axis=0)).ravel()
    variants = [("as sent", genes, counts, rows)]
    variants += [("thinned", genes, thin(counts, f, seed=int(rng.integers(1 << 30))), rows) for f in THINNING]
    for n in PANEL_SIZES:
        if n < len(genes) // 2:
            keep = np.sort(np.argsort(-detected, kind="stable")[:n])
            variants.append(("fewer genes", genes[keep], thin(counts[:, keep], 0.5, seed=int(rng.integers(1 << 30))), rows))
    take = np.sort(rng.choice(len(rows), min(SHUFFLED_CELLS, len(rows)), replace=False))
    variants.append(("shuffled genes", genes[rng.permutation(len(genes))], counts[take], None))
    out, runtimes = [], {}
    for variant, g, X, truth_rows in variants:
        key = tuple(g)
        if key not in runtimes:
            try:
                runtimes[key] = AtlasRuntime(atlas, model, list(g), encoder=encoder)
            except CellAtlasError:
                runtimes[key] = None  # no runtime for these genes: no case
        rt = runtimes[key]
        if rt is None:
            continue
        ev = rt.evidence(X)[0]
        if truth_rows is None:  # gene names no longer belong to the columns: no label is right
            truth = np.zeros((X.shape[0], ev.n_cand + ev.n_foil + 1), dtype=bool)
            truth[:, -1] = True
        else:
            truth = truth_options(list(labels), rt.candidates, rt.foils, parents)
        out.append(Cases(ev, truth, weight * VARIANT_WEIGHT[variant], part.name, variant, rt.hierarchy))
        if variant == "as sent":  # the same cells read by their markers alone (a query with too few panel genes)
            blind = fusion.Evidence(ev.raw_centred, ev.z, np.zeros_like(ev.knn), np.zeros_like(ev.distance), ev.log_expressed,
                                    np.zeros_like(ev.seen), ev.coverage, np.full(len(ev.knn_top), -1), ev.n_foil)
            out.append(Cases(blind, truth, weight * VARIANT_WEIGHT["markers only"], part.name, "markers only", rt.hierarchy))
    return out


def _folds_within(part: Prepared, n_folds: int, seed: int) -> list[np.ndarray]:
    """Test rows of each fold of one reference part: grouped by donor/batch when there are 3+, else stratified."""
    from sklearn.model_selection import GroupKFold, StratifiedKFold

    labels = part.labels.astype(str)
    for key in GROUP_KEYS:
        if key in part.obs.columns and part.obs[key].nunique() >= 3:
            groups = part.obs[key].astype(str).to_numpy()
            k = min(n_folds, part.obs[key].nunique())
            return [test for _, test in GroupKFold(n_splits=k).split(labels, labels, groups)]
    counts = np.unique(labels, return_counts=True)[1]
    k = int(max(2, min(n_folds, counts.min())))
    return [test for _, test in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(labels, labels)]


def _own_study_folds(ref: list[Prepared], seed: int) -> list[tuple[list[np.ndarray], list[tuple[Prepared, np.ndarray]]]]:
    """One fold per real-cell reference source: a third of its cells (by donor or batch where there are
    3+, else stratified) held out against every other reference cell, its own other cells included.

    Leaving whole groups out only shows the model queries from a study the reference lacks; a user
    whose tissue the atlas holds sends cells like these, whose nearest reference cells are of their
    own kind and protocol.
    """
    folds = []
    for i, p in enumerate(ref):
        if p.kind != "cells" or len(np.unique(p.labels)) < 2:
            continue
        test = _folds_within(p, 3, seed)[0]
        train = [np.setdiff1d(np.arange(len(q.labels)), test) if j == i else np.arange(len(q.labels)) for j, q in enumerate(ref)]
        folds.append((train, [(replace(p, name=f"{p.name} (own study)"), test)]))
    return folds


def fit_fusion(
    prepared: list[Prepared],
    assemble_kw: dict,
    atlas: Atlas,
    *,
    embedding: np.ndarray | None = None,
    n_folds: int = 5,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> tuple[fusion.FusionModel, calls.NodeCalibration]:
    """Fit the fusion model of ``atlas`` and its node calibration on held-out cases of its sources (see the module docstring).

    ``assemble_kw`` are the arguments :func:`cellatlas.atlas_build.assemble` built ``atlas``
    with; ``embedding`` the reference's foundation-model embedding (rows as the stacked
    reference), if any.
    """
    from cellatlas.atlas_build import assemble, measured_by_all

    log = log or (lambda m: None)
    rng = np.random.default_rng(seed)
    model, encoder = assemble_kw.get("model", "default"), assemble_kw.get("encoder")
    table = load_labels()
    parents = {lab: (p if isinstance(p, str) else "") for lab, p in table["parent"].items()}
    parents.update({r["label"]: r["parent"] for r in atlas.meta["labels"]})
    ref = [p for p in prepared if p.kind != "heldout"]
    offsets = np.cumsum([0] + [len(p.labels) for p in ref])
    groups = list(dict.fromkeys(p.group for p in ref))
    # Each fold: which rows of each reference part train, and which (part, rows) are held out.
    folds: list[tuple[list[np.ndarray], list[tuple[Prepared, np.ndarray]]]] = []
    if len(groups) >= 2:
        for g in groups:
            train = [np.arange(len(p.labels)) if p.group != g else np.zeros(0, int) for p in ref]
            folds.append((train, [(p, np.arange(len(p.labels))) for p in prepared if p.group == g]))
        folds += _own_study_folds(ref, seed)
    else:
        for test in _folds_within(ref[0], n_folds, seed):
            train = [np.setdiff1d(np.arange(len(ref[0].labels)), test)]
            folds.append((train, [(ref[0], test)]))
    cases: list[Cases] = []
    for k, (train, tests) in enumerate(folds):
        labels = sorted({lab for p, r in zip(ref, train) for lab in p.labels[r].tolist()})
        n_drop = max(1, int(round(DROP_FRACTION * len(labels)))) if len(labels) >= 3 else 0
        drop = set(rng.choice(labels, n_drop, replace=False).tolist()) if n_drop else set()
        train = [r[~np.isin(p.labels[r], list(drop))] for p, r in zip(ref, train)]
        parts = [Prepared(p.name, p.group, p.kind, p.counts[r], p.genes, p.labels[r]) for p, r in zip(ref, train) if len(r)]
        if len({lab for p in parts for lab in p.labels.tolist()}) < 2:
            continue
        counts, genes, labs, part = stack(parts)
        kw = dict(assemble_kw)
        emb = None if embedding is None else embedding[np.concatenate([offsets[i] + r for i, r in enumerate(train)])]
        sub = assemble(counts, genes, labs, sources=source_table(parts, part), measured=measured_by_all(parts), embedding=emb, **kw)
        for p, rows in tests:
            rows = rows[_sample(p.labels[rows], rng)]
            cases += _score(sub, p, rows, model, encoder, rng, parents)
        log(f"  fold {k + 1}/{len(folds)}: held out {', '.join(sorted({p.name for p, _ in tests}))}"
            f"{'; labels without reference cells: ' + ', '.join(sorted(drop)) if drop else ''}")
    for p in prepared:
        if p.kind == "heldout" and p.group not in groups:
            cases += _score(atlas, p, _sample(p.labels, rng), model, encoder, rng, parents)
    if not cases:
        return fusion.FusionModel.default(), calls.NodeCalibration.default()
    fitted, calibration, probs = fit_cases(cases)
    fitted.summary.update(_summary(calibration, cases, probs))
    log(f"  fusion model fitted on {sum(len(c.truth) for c in cases)} held-out cases: {fitted.summary['by_variant']}")
    return fitted, calibration


def fit_cases(cases: list[Cases]) -> tuple[fusion.FusionModel, "calls.NodeCalibration", list[np.ndarray]]:
    """The fusion model and the node calibration fitted on ``cases`` (each case set's weight
    shared by its cases), and each set's probabilities under the fitted model."""
    X, T, A = _padded(cases)
    w = np.concatenate([np.full(len(c.truth), c.weight / max(len(c.truth), 1)) for c in cases])
    fitted = fusion.fit(X, T, w, available=A)
    probs = [fitted.probabilities(c.evidence) for c in cases]
    rows = [calls.training_rows(c.evidence, p, c.truth, c.hierarchy) for c, p in zip(cases, probs)]
    cw = np.concatenate([np.full(len(y), c.weight / max(len(c.truth), 1)) for c, (_, y) in zip(cases, rows)])
    calibration = calls.fit_calibration(np.vstack([F for F, _ in rows]), np.concatenate([y for _, y in rows]), cw)
    return fitted, calibration, probs


def call_cases(c: Cases, prob: np.ndarray, calibration: "calls.NodeCalibration") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Call, confidence and rightness (the truth is the call or below it) of one case set's cells."""
    call, cf, *_ = calls.decide(c.evidence, prob, c.hierarchy, calibration)
    return call, cf, calls.right_nodes(c.truth, c.hierarchy)[np.arange(len(call)), call]


def _padded(cases: list[Cases]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Designs, truths and availability of all cases at one option width (folds whose atlases
    have fewer candidates are padded with unavailable options)."""
    width = max(c.truth.shape[1] for c in cases)
    n = sum(len(c.truth) for c in cases)
    X = np.zeros((n, width, len(fusion.FEATURES)), dtype=np.float32)
    T = np.zeros((n, width), dtype=bool)
    A = np.zeros((n, width), dtype=bool)
    i = 0
    for c in cases:
        m, o = c.truth.shape
        X[i : i + m, :o], T[i : i + m, :o], A[i : i + m, :o] = c.design, c.truth, True
        i += m
    return X, T, A


def _summary(calibration: "calls.NodeCalibration", cases: list[Cases], probs: list[np.ndarray]) -> dict:
    """Held-out accuracy, mean confidence and ECE of the calls (in sample for the few fitted coefficients), per variant and source."""
    per = []  # (right, confidence) of each case's calls
    for c, prob in zip(cases, probs):
        _, cf, right = call_cases(c, prob, calibration)
        per.append((right, cf))

    def stats(which: list[int]) -> dict:
        r, cf = np.concatenate([per[i][0] for i in which]), np.concatenate([per[i][1] for i in which])
        return {"n": int(len(r)), "accuracy": round(float(r.mean()), 4), "mean_confidence": round(float(cf.mean()), 4),
                "ece": round(fusion.expected_calibration_error(cf, r), 4)}

    by_variant = {v: stats([i for i, c in enumerate(cases) if c.variant == v]) for v in dict.fromkeys(c.variant for c in cases)}
    sent = {s: [i for i, c in enumerate(cases) if c.source == s and c.variant == "as sent"] for s in dict.fromkeys(c.source for c in cases)}
    by_source = {s: stats(which) for s, which in sent.items() if which}
    return {"by_variant": by_variant, "by_source": by_source, "features": list(fusion.FEATURES)}
