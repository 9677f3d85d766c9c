"""The faiss index of a reference embedding, chosen by the reference's size.

Up to :data:`EXACT_MAX_CELLS` reference cells the index is exact (``IndexFlatIP``: every
query compared with every reference cell, the index the engine always used). Beyond, an
exact search costs too much per query (0.1 ms a query at 50,000 cells, growing with the
reference) and an inverted-file index (IVF: reference cells grouped around ``nlist``
centroids, a query compared only with the cells of its ``nprobe`` nearest groups) takes its
place. Its vectors are float32 (``IVF-Flat``: exact distances within the probed groups), or,
from :data:`PQ_MIN_CELLS` cells where float32 vectors stop fitting, as compact as the recall
target allows: product-quantized codes (``PQ``, ``d / 2`` bytes a cell), 8 bits per dimension
(``SQ8``), float32 last; the first codec whose recall reaches the target is kept. Measured on
200,000 resampled PBMC cells (``benchmarks/large_reference.py``, one thread): IVF-Flat reached
recall@15 0.992 at ``nprobe`` 32 in 113 us a query against 385 us for the exact search; SQ8
stopped at 0.93 and 16-bit floats needed 400 us a query (the scalar-quantizer kernels of the
faiss-cpu wheel are slow); HNSW (32 links) reached 0.94 at 225 us.

``nprobe`` is not guessed: :func:`make` raises it until the recall@15 against the exact
search, on :data:`RECALL_QUERIES` query cells, reaches :data:`RECALL_TARGET` (0.99), and
returns that recall with the index, so an atlas build reports it (``meta["models"][model]
["index"]``, shown by ``cellatlas atlas info``). The query cells are reference cells thinned
to half their depth and embedded (the caller passes them): query cells are shallower than
reference cells, and a reference cell searching for itself would make the recall look better.
"""

from __future__ import annotations

import time
from typing import Any

import faiss
import numpy as np

EXACT_MAX_CELLS = 50_000
"""Largest reference searched exactly (flat index)."""
PQ_MIN_CELLS = 2_000_000
"""From this many cells (400 MB of float32 vectors a depth level at 50 dimensions), compressed codes are
tried first (PQ, then SQ8, then float32 if they miss the recall target)."""
RECALL_TARGET = 0.99
RECALL_K = 15
RECALL_QUERIES = 1000
TRAIN_PER_LIST = 40
"""Training cells per IVF list (k-means on a seeded sample of ``TRAIN_PER_LIST * nlist`` cells)."""


def choose(n_cells: int, dim: int) -> dict[str, Any]:
    """Index kind for a reference of ``n_cells`` cells: ``{"kind": "flat"}`` or an IVF spec to tune."""
    if n_cells <= EXACT_MAX_CELLS:
        return {"kind": "flat"}
    nlist = int(np.clip(2 ** round(np.log2(4 * np.sqrt(n_cells))), 64, 65536))
    codecs = ["Flat"]
    if n_cells >= PQ_MIN_CELLS:
        m = max(m for m in range(1, dim // 2 + 1) if dim % m == 0)
        codecs = [f"PQ{m}", "SQ8", "Flat"]
    return {"kind": "ivf", "nlist": nlist, "codecs": codecs}


def _ivf(emb: np.ndarray, nlist: int, codec: str, seed: int):
    d = emb.shape[1]
    quantizer = faiss.IndexFlatIP(d)
    if codec in ("SQ8", "SQfp16"):
        qt = faiss.ScalarQuantizer.QT_8bit if codec == "SQ8" else faiss.ScalarQuantizer.QT_fp16
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, qt, faiss.METRIC_INNER_PRODUCT)
    elif codec == "Flat":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    elif codec.startswith("PQ"):
        index = faiss.IndexIVFPQ(quantizer, d, nlist, int(codec[2:]), 8, faiss.METRIC_INNER_PRODUCT)
    else:  # pragma: no cover - choose() names only these
        raise ValueError(f"unknown codec {codec}")
    index.own_fields = True
    quantizer.this.disown()
    index.cp.seed, index.cp.niter = seed, 10
    n_train = min(len(emb), TRAIN_PER_LIST * nlist)
    rows = np.sort(np.random.default_rng(seed).choice(len(emb), n_train, replace=False)) if n_train < len(emb) else slice(None)
    index.train(np.ascontiguousarray(emb[rows], dtype=np.float32))
    for a in range(0, len(emb), 1 << 16):  # added in blocks: no second full copy of the embedding
        index.add(np.ascontiguousarray(emb[a:a + (1 << 16)], dtype=np.float32))
    return index


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact ``k`` neighbours that were found (recall@k)."""
    k = exact.shape[1]
    hits = (found[:, :, None] == exact[:, None, :]).any(axis=1).sum(axis=1)
    return float(hits.mean() / k)


def make(emb: np.ndarray, queries: np.ndarray | None = None, *, spec: dict[str, Any] | None = None, seed: int = 0,
         target: float = RECALL_TARGET) -> tuple[Any, dict[str, Any]]:
    """The faiss index of ``emb`` (rows L2-normalised; inner product = cosine) and what was measured.

    Parameters
    ----------
    emb
        Reference embedding ``[n, d]``.
    queries
        Query embeddings for the recall measurement (default: :data:`RECALL_QUERIES` reference
        rows, which find themselves: an optimistic recall, noted in the result).
    spec
        From :func:`choose` (default: chosen by ``len(emb)``).

    Returns
    -------
    index, info
        ``info``: ``kind``, ``n_cells``; for IVF also ``nlist``, ``nprobe``, ``codec``,
        ``recall_at_15`` (on ``n_queries`` queries), the codecs ``tried``, ``bytes`` and ``build_seconds``.
    """
    t0 = time.perf_counter()
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    spec = spec or choose(n, d)
    if spec["kind"] == "flat":
        index = faiss.IndexFlatIP(d)
        index.add(emb)
        return index, {"kind": "flat", "n_cells": int(n), "recall_at_15": 1.0}
    rng = np.random.default_rng(seed)
    self_queries = queries is None
    if self_queries:
        queries = emb[np.sort(rng.choice(n, min(n, RECALL_QUERIES), replace=False))]
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(RECALL_K, n)
    _, exact = faiss.knn(queries, emb, k, metric=faiss.METRIC_INNER_PRODUCT)
    tried = []
    for codec in spec["codecs"]:
        index = _ivf(emb, spec["nlist"], codec, seed)
        nprobe, last = 1, -1.0
        while True:
            index.nprobe = nprobe
            r = recall(index.search(queries, k)[1], exact)
            # Stop at the target, at an exhaustive scan, or where probing more lists stopped paying:
            # the codec's own rounding then caps the recall, and a finer codec is tried.
            if r >= target or nprobe >= spec["nlist"] or (codec != "Flat" and nprobe >= 16 and r - last < 0.002):
                break
            nprobe, last = min(2 * nprobe, spec["nlist"]), r
        tried.append({"codec": codec, "nprobe": int(nprobe), "recall_at_15": round(r, 4)})
        if r >= target:
            break
    codec, nprobe, r = tried[-1]["codec"], tried[-1]["nprobe"], tried[-1]["recall_at_15"]
    info = {"kind": "ivf", "n_cells": int(n), "nlist": int(spec["nlist"]), "nprobe": int(nprobe), "codec": codec,
            "recall_at_15": round(r, 4), "recall_target": target, "n_queries": int(len(queries)),
            "queries": "reference cells (self-queries)" if self_queries else "reference cells thinned to half depth",
            "tried": tried, "bytes": int(faiss.serialize_index(index).nbytes),
            "build_seconds": round(time.perf_counter() - t0, 2)}
    return index, info


def serialize(index) -> np.ndarray:
    """The index as a uint8 array (stored in an atlas file or a runtime store)."""
    return faiss.serialize_index(index)


def deserialize(arr: np.ndarray, info: dict[str, Any] | None = None):
    """An index from :func:`serialize`, with its tuned ``nprobe`` (from ``info``) set again."""
    index = faiss.deserialize_index(np.asarray(arr, dtype=np.uint8))
    if info and info.get("kind") == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(info["nprobe"])
    return index
