"""Label harmonisation and scoring for the accuracy benchmark.

Every dataset's author labels are mapped onto the curated vocabulary of
``src/cellatlas/data/labels_human_core.tsv`` (which carries Cell Ontology ids
and parents) by a small explicit table below. A label with no counterpart in
the vocabulary maps to ``None`` and is reported as "not harmonised"; a label
missing from a table is an error (nothing is dropped silently).

Scoring compares a prediction with the truth at three levels:

* **shared level**: both are mapped to the finest label both the reference and
  the query resolve (:func:`shared_labels`); e.g. Kang's "CD4 T cell" versus
  PBMC3k's naive/memory CD4 T cells compare at "CD4 T cell". A call coarser than
  the shared label (e.g. "T cell" for a CD4 T cell) is wrong at this level.
* **fine level**: the call mapped to the query's own label set must equal the
  query's own (vocabulary) label.
* **hierarchical**: the call is the truth, an ancestor of it (a correct but
  coarser call) or a descendant of it (finer than the truth can judge).

Calibration (ECE, Brier) is judged at the shared level like macro-F1: a call finer
than its shared label is scored with the engine's confidence in that label (its
``parent_confidence``), since a right "CD4 T cell" says nothing about whether the
confidence in "Naive CD4 T cell" was right (:func:`shared_level_confidence`).
"""

from __future__ import annotations

import gzip
import sys
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from cellatlas.fusion import expected_calibration_error

OTHER = "(other)"
"""Placeholder for a call that maps onto no shared label."""

# The same renamings the built-in atlas is built with (one table, two users).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from builtin_sources import CELL_LINES, CHETAH_HNSCC, EMBRYO, KANG, MOUSE_LUNG, PANCREAS  # noqa: E402
from builtin_sources import PBMC3K_TO_CORE as PBMC3K  # noqa: E402

TABLES: dict[str, dict[str, str | None]] = {
    "pbmc3k": PBMC3K,
    "kang": KANG,
    "pancreas": PANCREAS,
    "chetah_hnscc": CHETAH_HNSCC,
    "mouse_lung": MOUSE_LUNG,
    "cell_lines": CELL_LINES,
    "embryo": EMBRYO,
}


# ---------------------------------------------------------------------- vocabulary
@lru_cache(maxsize=1)
def vocabulary() -> pd.DataFrame:
    """The curated label table (label -> ontology_id, parent, lineage, ...)."""
    from cellatlas.markers import load_labels

    return load_labels()


def vocab_parents(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Label -> parent label ("" for roots) from the vocabulary, overlaid with ``extra``."""
    t = vocabulary()
    out = {lab: (p if isinstance(p, str) else "") for lab, p in t["parent"].items()}
    out.update({k: v or "" for k, v in (extra or {}).items()})
    return out


def lineage(label: str, parents: Mapping[str, str]) -> list[str]:
    """``label`` followed by its ancestors, nearest first."""
    out, seen = [label], {label}
    p = parents.get(label, "")
    while p and p not in seen:
        out.append(p)
        seen.add(p)
        p = parents.get(p, "")
    return out


def harmonise(raw: Iterable[str], table: Mapping[str, str | None]) -> np.ndarray:
    """Map author labels onto the vocabulary (``None`` where a label has no counterpart).

    Raises
    ------
    KeyError
        A label the table does not list (add it to the table, mapped or ``None``).
    """
    raw = [str(x) for x in raw]
    missing = sorted({x for x in raw if x not in table})
    if missing:
        raise KeyError(f"labels missing from the harmonisation table: {missing}")
    vocab = set(vocabulary().index)
    bad = sorted({v for v in table.values() if v is not None and v not in vocab})
    if bad:
        raise KeyError(f"table maps onto labels outside the vocabulary: {bad}")
    return np.array([table[x] for x in raw], dtype=object)


# ---------------------------------------------------------------------- levels
def shared_labels(query_labels: Iterable[str], ref_labels: Iterable[str], parents: Mapping[str, str]) -> dict[str, str | None]:
    """For each query label, the finest label both datasets resolve (``None`` if the reference lacks it).

    A query label is its own shared label when the reference has it or something finer
    (e.g. query "CD4 T cell", reference naive + memory CD4 T cells); otherwise the deepest
    reference label that is an ancestor of it (query "Naive CD4 T cell", reference
    "CD4 T cell"); otherwise ``None`` (the reference has no counterpart, e.g. CD8 T cells
    against a reference without any T-cell label but CD4).
    """
    refs = set(ref_labels)
    below = {a for r in refs for a in lineage(r, parents)}  # labels at or above some reference label
    out: dict[str, str | None] = {}
    for q in set(query_labels):
        if q in below:
            out[q] = q
            continue
        up = [a for a in lineage(q, parents)[1:] if a in refs]
        out[q] = up[0] if up else None
    return out


def to_level(pred: Sequence[str], level_set: Iterable[str], parents: Mapping[str, str]) -> np.ndarray:
    """Map each call to the deepest label of ``level_set`` on its lineage (``OTHER`` if none)."""
    levels = set(level_set)
    cache: dict[str, str] = {}
    out = []
    for p in pred:
        if p not in cache:
            hit = [a for a in lineage(str(p), parents) if a in levels]
            cache[p] = hit[0] if hit else OTHER
        out.append(cache[p])
    return np.array(out, dtype=object)


def hierarchical_correct(pred: Sequence[str], truth: Sequence[str], parents: Mapping[str, str]) -> np.ndarray:
    """Call is the truth, one of its ancestors, or one of its descendants."""
    return np.array(
        [t in lineage(str(p), parents) or str(p) in lineage(t, parents) for p, t in zip(pred, truth)], dtype=bool
    )


def judged_claims(pred: Sequence[str], conf: np.ndarray, parent_conf: np.ndarray, truth: Sequence[str],
                  parents: Mapping[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The claim the truth can judge for each call: its confidence, whether it is right, whether it
    is judged, and whether the call was finer than the truth.

    A call at, above or beside the truth is judged as made (right when the truth is the call or
    below it). A call finer than the truth ("Naive CD4 T cell" where the truth says "CD4 T
    cell") makes a claim the truth cannot check; the claim one level up, "CD4 T cell" with the
    call's ``parent_confidence``, is judged instead (right), and where even the parent is finer
    than the truth the cell is left out (not judged).
    """
    pred = [str(p) for p in pred]
    truth = [str(t) for t in truth]
    conf, pc = np.asarray(conf, float).copy(), np.asarray(parent_conf, float)
    ok = hierarchical_correct(pred, truth, parents)
    judged, finer = np.ones(len(pred), dtype=bool), np.zeros(len(pred), dtype=bool)
    for i, (p, t) in enumerate(zip(pred, truth)):
        if p != t and t in lineage(p, parents):
            finer[i] = True
            if parents.get(p) == t and np.isfinite(pc[i]):
                conf[i] = pc[i]
            else:
                judged[i] = False
    return conf, ok, judged, finer


def shared_level_confidence(
    pred: Sequence[str], conf: np.ndarray, parent_conf: np.ndarray | None, level_set: Iterable[str], parents: Mapping[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """The predictor's confidence in its call's label at the shared level (what macro-F1 scores).

    Where the call is finer than that label (e.g. "Naive CD4 T cell" scored as "CD4 T cell"),
    the engine's ``parent_confidence`` is used: its calibrated probability for the label one
    level up. If the shared label lies further up, that is a lower bound. Without a parent
    confidence (baselines) the call's own confidence is kept.

    Returns the confidences and which cells were scored at the parent.
    """
    c = np.asarray(conf, float).copy()
    if parent_conf is None:
        return c, np.zeros(len(c), dtype=bool)
    pred = np.asarray([str(p) for p in pred], dtype=object)
    at = to_level(pred, level_set, parents)
    up = (at != pred) & (at != OTHER)
    pc = np.asarray(parent_conf, float)
    up &= np.isfinite(pc)
    c[up] = pc[up]
    return c, up


# ---------------------------------------------------------------------- metrics
def ece(conf: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error of the top-label confidence (equal-width bins; NaN for no cells)."""
    return expected_calibration_error(conf, correct, n_bins) if len(conf) else float("nan")


def brier(conf: np.ndarray, correct: np.ndarray) -> float:
    """Brier score of the top-label confidence against 0/1 correctness."""
    conf, correct = np.asarray(conf, float), np.asarray(correct, float)
    return float(np.mean((conf - correct) ** 2)) if len(conf) else float("nan")


def reliability_bins(conf: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> list[dict]:
    """Per-bin mean confidence, accuracy and count (for the reliability plot)."""
    conf, correct = np.asarray(conf, float), np.asarray(correct, float)
    b = np.clip((conf * n_bins).astype(int), 0, n_bins - 1)
    return [
        {"lo": k / n_bins, "hi": (k + 1) / n_bins, "n": int((b == k).sum()),
         "conf": float(conf[b == k].mean()) if (b == k).any() else None,
         "acc": float(correct[b == k].mean()) if (b == k).any() else None}
        for k in range(n_bins)
    ]


def score(
    truth: Sequence[str | None],
    pred: Sequence[str],
    ref_labels: Iterable[str],
    parents: Mapping[str, str],
    *,
    conf: np.ndarray | None = None,
    level: Sequence[str] | None = None,
    band: Sequence[str] | None = None,
    novel: Sequence[bool] | None = None,
    parent_conf: np.ndarray | None = None,
) -> dict:
    """All metrics of one prediction set against harmonised truth.

    Parameters
    ----------
    truth
        Vocabulary label per cell (``None`` = not harmonised; those cells only enter
        the call counts).
    pred
        Call per cell (vocabulary labels, possibly coarse).
    ref_labels
        Labels the predictor could call (reference labels / atlas candidates).
    conf, level, band, novel, parent_conf
        Optional engine outputs (confidence, fine/coarse, band, novel flag, confidence of the
        call's parent label).

    ``ece``/``brier``/``reliability`` judge the confidence in the label at the shared level
    (see :func:`shared_level_confidence`), the level at which macro-F1 scores the call;
    ``ece_call``/``brier_call`` judge the call's own confidence against the same
    correctness, which a truth coarser than the call cannot judge (a right "CD4 T cell" says
    nothing about "Naive CD4 T cell" at 0.88).
    """
    from sklearn.metrics import f1_score

    truth = np.array(truth, dtype=object)
    pred = np.array([str(p) for p in pred], dtype=object)
    has = np.array([t is not None for t in truth])
    qlabels = sorted({t for t in truth[has]})
    smap = shared_labels(qlabels, ref_labels, parents)
    shared_truth = np.array([smap.get(t) if t is not None else None for t in truth], dtype=object)
    sh = np.array([s is not None for s in shared_truth])
    S = sorted({s for s in shared_truth[sh]})
    out: dict = {
        "n_cells": int(len(pred)),
        "n_harmonised": int(has.sum()),
        "n_shared": int(sh.sum()),
        "shared_labels": S,
        "shared_map": {q: smap[q] for q in qlabels},
        "unshared_labels": sorted(q for q in qlabels if smap[q] is None),
    }
    if sh.any():
        y_true, y_pred = shared_truth[sh], to_level(pred[sh], S, parents)
        ok = y_pred == y_true
        out["macro_f1"] = float(f1_score(y_true, y_pred, labels=S, average="macro", zero_division=0))
        per = f1_score(y_true, y_pred, labels=S, average=None, zero_division=0)
        out["f1_per_label"] = {s: round(float(v), 4) for s, v in zip(S, per)}
        out["accuracy_shared"] = float(ok.mean())
        hier = hierarchical_correct(pred[sh], y_true, parents)
        out["accuracy_hierarchical"] = float(hier.mean())
        if conf is not None:
            c_call = np.asarray(conf, float)[sh]
            pc = None if parent_conf is None else np.asarray(parent_conf, float)[sh]
            c, at_parent = shared_level_confidence(pred[sh], c_call, pc, S, parents)
            out.update({
                "ece": ece(c, hier), "brier": brier(c, hier),
                "ece_call": ece(c_call, hier), "brier_call": brier(c_call, hier),
                "n_scored_at_parent": int(at_parent.sum()),
                "ece_strict": ece(c, ok), "brier_strict": brier(c, ok),
                "mean_confidence": float(c.mean()),
                "reliability": reliability_bins(c, hier),
            })
    if has.any():
        fine = to_level(pred[has], qlabels, parents) == truth[has]
        out["accuracy_fine"] = float(fine.mean())
    if level is not None:
        out["coarse_fraction"] = float(np.mean(np.asarray(level) == "coarse"))
    if band is not None:
        b = np.asarray(band)
        out["bands"] = {k: float(np.mean(b == k)) for k in ("confident", "review", "low")}
    if novel is not None:
        nv = np.asarray(novel, bool)
        out["novel_fraction"] = float(nv.mean())
        if band is not None:
            out["flagged_fraction"] = float(np.mean(nv | (np.asarray(band) == "low")))
    calls = pd.crosstab(pd.Series(truth, dtype=object).fillna("(not harmonised)").to_numpy(), pred)
    out["confusion"] = {str(t): {str(p): int(v) for p, v in row.items() if v} for t, row in calls.iterrows()}
    return out


# ---------------------------------------------------------------------- ontology
def ontology_check(path: Path) -> dict:
    """Check that each vocabulary parent is a Cell Ontology ancestor of its child.

    Returns the number of parent links checked and the ones the ontology does not
    support (``CL`` id pairs), so the hierarchy used for scoring can be audited.
    """
    if not path.exists():
        return {"checked": 0, "unsupported": [], "note": f"{path} not found"}
    with gzip.open(path, "rt") as fh:
        cl = pd.read_csv(fh, sep="\t", usecols=["id", "parents"], dtype=str).fillna("")
    up = {r.id: [p for p in r.parents.strip('"').split("|") if p] for r in cl.itertuples()}

    def ancestors(cid: str) -> set[str]:
        seen, todo = set(), list(up.get(cid, []))
        while todo:
            c = todo.pop()
            if c not in seen:
                seen.add(c)
                todo += up.get(c, [])
        return seen

    t = vocabulary()
    checked, bad = 0, []
    for lab, row in t.iterrows():
        par = row["parent"]
        if not isinstance(par, str) or not par:
            continue
        child_id, par_id = str(row["ontology_id"]), str(t.loc[par, "ontology_id"])
        checked += 1
        if par_id not in ancestors(child_id):
            bad.append({"label": lab, "id": child_id, "parent": par, "parent_id": par_id})
    return {"checked": checked, "unsupported": bad}
