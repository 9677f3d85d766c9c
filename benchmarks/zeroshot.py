"""Zero-shot section of the accuracy benchmark: the built-in atlas on every labelled dataset.

A dataset that feeds the built-in atlas (as reference cells, or as held-out data for its fusion
model) is scored only against the atlas rebuilt without its group (leave one dataset out:
``scripts/builtin_sources.py`` lists the groups; datasets sharing cells or a study are one group).
In the same run, on the same coarse vocabulary (``coarse.py``):

* cellatlas, and its own ``marker_label`` and ``knn_label`` columns alone;
* decoupler ``ulm`` with every human PanglaoDB marker set (no reference);
* logistic regression and CellTypist trained on the rebuilt atlas's own reference cells
  (the same sources, stacked; pseudo-cells included), and SingleR with ``--zeroshot-singler``.

Calibration is judged at the label the call makes: a call is right when the truth is that
label or below it (a call coarser than the truth is right, only less specific). A call finer
than the truth ("Naive CD4 T cell" where the truth says "CD4 T cell") makes a claim the truth
cannot check: the claim one level up, with the call's parent confidence, is judged instead
(``harmonise.judged_claims``). ``ece_counting_finer_calls_right`` keeps the earlier, lenient
reading (every finer call right at its own confidence).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

import baselines
import coarse as co
import harmonise as hm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from build_builtin_atlas import build as build_builtin  # noqa: E402
from builtin_sources import builtin_sources  # noqa: E402

GROUP_OF = {
    "pbmc3k": "pbmc3k", "kang": "kang", "kang_sce": "kang", "xin": "xin", "wang": "wang", "mouse_baron": "baron",
    "cider_baron": "baron", "mouse_lung": "mouse_lung", "chetah_hnscc": "hnscc", "cellbench_10x": "cellbench",
    "cellbench_celseq_dropseq": "cellbench", "yan_embryo": "yan",
}
"""Dataset key (``accuracy.DATASETS``) -> its group in the built-in atlas's sources."""
COVERAGE = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
THINNING = (1.0, 0.5, 0.25, 0.125, 1 / 16, 1 / 32, 1 / 64)


def risk_coverage(conf: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """Accuracy of the most confident ``x`` of the calls, for each ``x`` in :data:`COVERAGE`."""
    order = np.argsort(-np.asarray(conf, float), kind="stable")
    ok = np.asarray(correct, float)[order]
    return {f"{x:.2f}": float(ok[: max(1, int(round(x * len(ok))))].mean()) for x in COVERAGE} if len(ok) else {}


def engine_metrics(res, truth: np.ndarray, atlas) -> dict:
    """Coarse-vocabulary scores of the call and of its two evidence columns, and calibration at the call."""
    vp = hm.vocab_parents()
    ap = hm.vocab_parents({r["label"]: r["parent"] for r in atlas.meta["labels"]})
    row = {"coarse": co.score_coarse(truth, res.label, vp),
           "marker_label": co.score_coarse(truth, res.marker_label, vp),
           "knn_label": co.score_coarse(truth, res.knn_label, vp)}
    has = np.array([t is not None for t in truth], dtype=bool)
    called = np.asarray(res.label, dtype=object) != "Unassigned"
    band = np.asarray(res.band, dtype=object)
    novel = np.asarray(res.novel, dtype=bool)
    row.update({
        "n_cells": int(len(truth)), "n_harmonised": int(has.sum()),
        "novel_fraction": float(novel.mean()), "unassigned": int((~called).sum()),
        "bands": {b: float(np.mean(band == b)) for b in ("confident", "review", "low")},
        "novel_in_confident": int((novel & (band == "confident")).sum()),
    })
    keep = has & called
    if keep.any():
        call_conf = np.asarray(res.confidence, float)[keep]
        conf, ok, judged, finer = hm.judged_claims(res.label[keep], call_conf, np.asarray(res.parent_confidence, float)[keep],
                                            truth[keep], ap)
        conf_band = band[keep] == "confident"
        fine = np.asarray(res.level, dtype=object)[keep] == "fine"
        c, k = conf[judged], ok[judged]
        row.update({
            "accuracy_at_call": float(k.mean()), "ece": hm.ece(c, k), "brier": hm.brier(c, k),
            "mean_confidence": float(c.mean()), "reliability": hm.reliability_bins(c, k),
            "judged_share": float(judged.mean()),
            "finer_than_truth_share": float(finer.mean()),
            "ece_counting_finer_calls_right": hm.ece(call_conf, ok),
            "confident_share": float(conf_band.mean()),
            "confident_accuracy": float(ok[conf_band].mean()) if conf_band.any() else None,
            "coarse_call_share": float(1.0 - fine.mean()),
            "fine_call_accuracy": float(ok[fine].mean()) if fine.any() else None,
            "risk_coverage": risk_coverage(c, k),
            "_pool": (c, k),
        })
    return row


class Lodo:
    """Atlases and baseline references of the built-in recipe without one group each (built once per group)."""

    def __init__(self, shared: Path, log=print):
        self.shared, self.log = shared, log
        self._atlas: dict[str, object] = {}

    def atlas(self, group: str):
        if group not in self._atlas:
            t0 = time.perf_counter()
            self._atlas[group] = build_builtin(self.shared, name=f"human-core minus {group}", exclude_groups=[group], layout="pca",
                                               log=lambda m: None)
            self.log(f"built human-core without {group} in {time.perf_counter() - t0:.0f} s")
        return self._atlas[group]

    def reference(self, group: str):
        """The rebuilt atlas's reference cells over all their genes: counts, genes, vocabulary labels."""
        from cellatlas.sources import prepare_sources, stack

        prepared, _, _ = prepare_sources(builtin_sources(self.shared, [group]))
        counts, genes, labels, _ = stack([p for p in prepared if p.kind != "heldout"])
        return counts, genes, labels


def section_zeroshot(args, load, lodo: Lodo, log=print) -> list[dict]:
    """One row per (dataset, method); see the module docstring."""
    import cellatlas
    from cellatlas.errors import CellAtlasError
    from cellatlas.query import prepare_query

    net = baselines.panglao_net(args.shared)
    vp = hm.vocab_parents()
    rows = []
    for key, group in GROUP_OF.items():
        a = load(key)
        truth = a.obs["truth"].to_numpy()
        atlas = lodo.atlas(group)
        log(f"zero-shot {key} (atlas without {group})")
        t0 = time.perf_counter()
        try:
            res = cellatlas.annotate(a, atlas=atlas)
            row = {"dataset": key, "method": "cellatlas", "left_out": group, "seconds": round(time.perf_counter() - t0, 2),
                   **engine_metrics(res, truth, atlas)}
        except CellAtlasError as exc:  # a clear refusal is a result
            row = {"dataset": key, "method": "cellatlas", "left_out": group, "refused": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
        q = prepare_query(a, skip_gene_check=True)
        b = baselines.run_marker_enrichment(q.counts, q.genes, net, co.PANGLAO_TO_VOCAB)
        rows.append({"dataset": key, "method": b.name, "coarse": co.score_coarse(truth, b.pred, vp)})
        if args.no_baselines:
            continue
        ref_counts, ref_genes, ref_labels = lodo.reference(group)
        names = ["logreg", "celltypist"] + (["singler"] if args.zeroshot_singler else [])
        for b in baselines.run_all(ref_counts, ref_genes, ref_labels, q.counts, q.genes, names=names,
                                   singler_max_cells=args.singler_max_cells, log=log):
            r = {"dataset": key, "method": b.name}
            if b.error:
                r["error"] = b.error
            else:
                sel = slice(None) if b.rows is None else b.rows
                r["coarse"] = co.score_coarse(truth[sel], b.pred, vp)
            rows.append(r)
    return rows


def thinning(args, load, lodo: Lodo, log=print) -> list[dict]:
    """Kang's cells binomially thinned cell by cell: confidence must fall with the evidence (atlas without Kang)."""
    import cellatlas
    from cellatlas.neighbours import thin

    a = load("kang")
    atlas = lodo.atlas(GROUP_OF["kang"])
    truth = a.obs["truth"].to_numpy()
    ap = hm.vocab_parents({r["label"]: r["parent"] for r in atlas.meta["labels"]})
    out = []
    for f in THINNING:
        b = a.copy()
        if f < 1:
            b.X = thin(b.X.tocsr(), f, seed=0)
        res = cellatlas.annotate(b, atlas=atlas)
        conf, ok, judged, _ = hm.judged_claims(res.label, res.confidence, res.parent_confidence, truth, ap)
        called = (res.label != "Unassigned") & judged
        depth = np.asarray(b.X.sum(axis=1)).ravel()
        out.append({"fraction": f, "median_counts": float(np.median(depth)), "mean_confidence": float(res.confidence.mean()),
                    "accuracy_at_call": float(ok[called].mean()) if called.any() else None,
                    "confident_share": float(np.mean(res.band == "confident")), "unassigned": float(np.mean(res.label == "Unassigned")),
                    "ece": hm.ece(conf[called], ok[called]) if called.any() else None})
        log(f"  thinned to {f:.3f}: median {out[-1]['median_counts']:.0f} counts, confidence {out[-1]['mean_confidence']:.3f}, "
            f"accuracy {out[-1]['accuracy_at_call']}")
    return out
