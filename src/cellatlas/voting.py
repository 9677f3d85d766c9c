"""Optional smoothing of calls by majority vote within over-clusters of the query.

CellTypist-style: over-cluster the query's own embedding (faiss k-means, about one
cluster per 40 cells), and within each cluster relabel the minority cells whose call
differs from a clear majority (> 50%). Changed cells keep their original call as the
first alternate and are marked in ``provenance``; their ``confidence`` stays that of the
cell's own evidence, and their parent is the new label's (with no parent confidence).
"""

from __future__ import annotations

import faiss
import numpy as np

from cellatlas.result import AnnotationResult

CELLS_PER_CLUSTER = 40


def majority_vote(res: AnnotationResult, *, seed: int = 0) -> np.ndarray:
    """Smooth ``res`` in place; returns the boolean mask of cells whose label changed."""
    emb = np.ascontiguousarray(res.embedding, dtype=np.float32)
    n = emb.shape[0]
    k = max(1, n // CELLS_PER_CLUSTER)
    changed = np.zeros(n, dtype=bool)
    if k < 2:
        return changed
    km = faiss.Kmeans(emb.shape[1], k, niter=20, seed=seed, verbose=False)
    km.train(emb)
    _, assign = km.index.search(emb, 1)
    assign = assign.ravel()
    labels = np.asarray(res.label, dtype=object)
    ontology = dict(zip(labels, res.ontology_id))
    parent = dict(zip(labels, res.parent_label))
    for c in np.unique(assign):
        members = np.nonzero(assign == c)[0]
        vals, counts = np.unique(labels[members], return_counts=True)
        top = counts.argmax()
        if counts[top] / len(members) <= 0.5:
            continue
        for i in members[labels[members] != vals[top]]:
            res.alternates[i] = [(str(labels[i]), float(res.confidence[i]))] + res.alternates[i][:2]
            res.label[i] = vals[top]
            res.ontology_id[i] = ontology.get(vals[top], "")
            res.parent_label[i] = parent.get(vals[top], "")
            res.parent_confidence[i] = np.nan
            changed[i] = True
    return changed
