"""Baseline annotators trained on the same reference as the engine's atlas.

Each baseline gets the raw counts of the reference and the query on the genes
both share (after the engine's own identifier mapping, so every method sees the
same genes), normalised to log1p counts per 10,000 over those shared genes, and
returns a call per query cell, a top-label confidence where the method has one,
and its fit and predict times.

* ``logreg``: scikit-learn logistic regression on the reference's 2,000 HVGs.
* ``celltypist``: ``celltypist.train`` (all shared genes, offline) + ``annotate``
  without majority voting.
* ``singler``: ``singler.train_single`` (classic markers on the reference aggregated
  per label) + ``classify_single`` (fine-tuning on).
* ``knn_pca``: 50 PCs of the reference HVGs (scanpy), query projected on them,
  15-nearest-neighbour majority vote (no markers).
* ``ingest``: ``scanpy.tl.ingest`` onto the reference PCA, kNN label transfer.
* ``decoupler_ulm_panglaodb``: no reference; decoupler's univariate linear model of every cell's
  log1p CP10k on every human PanglaoDB marker set (all organs), argmax per cell.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp

N_HVG = 2000
N_PCS = 50
K = 15
SEED = 0


@dataclass
class BaselineResult:
    """Calls of one baseline on one query."""

    name: str
    pred: np.ndarray | None = None
    conf: np.ndarray | None = None
    fit_s: float = 0.0
    predict_s: float = 0.0
    error: str = ""
    info: dict = field(default_factory=dict)
    rows: np.ndarray | None = None
    """Query rows the calls are for (``None`` = all rows)."""

    @property
    def cells_per_s(self) -> float | None:
        if self.pred is None or self.predict_s <= 0:
            return None
        return len(self.pred) / self.predict_s


def lognorm(counts: sp.spmatrix) -> sp.csr_matrix:
    """log1p of counts per 10,000 (cells with no counts stay zero)."""
    x = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    size = np.asarray(x.sum(axis=1)).ravel()
    size[size == 0] = 1.0
    x.data *= np.repeat((1e4 / size).astype(np.float32), np.diff(x.indptr))
    np.log1p(x.data, out=x.data)
    return x


def shared_genes(ref_genes: list[str], query_genes: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Genes present in both (reference order) and their column indices in each."""
    qi = {g: i for i, g in enumerate(query_genes)}
    genes = [g for g in ref_genes if g in qi]
    ri = {g: i for i, g in enumerate(ref_genes)}
    return genes, np.array([ri[g] for g in genes]), np.array([qi[g] for g in genes])


def _adata(x: sp.csr_matrix, genes: list[str]):
    import anndata as ad

    a = ad.AnnData(x)
    a.var_names = list(genes)
    a.obs_names = [f"c{i}" for i in range(x.shape[0])]
    return a


def _hvg_index(xr_log: sp.csr_matrix, genes: list[str], n: int = N_HVG) -> np.ndarray:
    import scanpy as sc

    if len(genes) <= n:
        return np.arange(len(genes))
    a = _adata(xr_log, genes)
    sc.pp.highly_variable_genes(a, n_top_genes=n, flavor="seurat")
    return np.nonzero(a.var["highly_variable"].to_numpy())[0]


def run_logreg(xr, yr, xq, genes) -> BaselineResult:
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    hv = _hvg_index(xr, genes)
    clf = LogisticRegression(max_iter=1000, C=1.0)
    clf.fit(xr[:, hv], yr)
    t1 = time.perf_counter()
    proba = clf.predict_proba(xq[:, hv])
    pred = clf.classes_[proba.argmax(axis=1)]
    return BaselineResult("logreg", pred, proba.max(axis=1), t1 - t0, time.perf_counter() - t1, info={"n_genes": int(len(hv))})


def run_celltypist(xr, yr, xq, genes) -> BaselineResult:
    import celltypist

    t0 = time.perf_counter()
    with warnings.catch_warnings(), _celltypist_compat():
        warnings.simplefilter("ignore")
        model = celltypist.train(_adata(xr, genes), labels=list(yr), check_expression=False, n_jobs=2, max_iter=1000)
        t1 = time.perf_counter()
        res = celltypist.annotate(_adata(xq, genes), model=model, majority_voting=False)
    pred = res.predicted_labels["predicted_labels"].astype(str).to_numpy()
    conf = res.probability_matrix.max(axis=1).to_numpy()
    info = {"n_genes": len(genes), "note": "LogisticRegression without multi_class='ovr' (removed in scikit-learn 1.8)"}
    return BaselineResult("celltypist", pred, conf, t1 - t0, time.perf_counter() - t1, info=info)


@contextmanager
def _celltypist_compat():
    """celltypist 1.7 passes ``multi_class='ovr'``, which scikit-learn >= 1.8 rejects: drop it."""
    import sys

    import celltypist  # noqa: F401  (loads the module; ``celltypist.train`` is the function)
    from sklearn.linear_model import LogisticRegression

    ct_train = sys.modules["celltypist.train"]

    original = ct_train.LogisticRegression
    ct_train.LogisticRegression = lambda multi_class=None, **kw: LogisticRegression(**kw)
    try:
        yield
    finally:
        ct_train.LogisticRegression = original


@contextmanager
def _ingest_compat():
    """scanpy 1.11's ingest rebuilds a pynndescent forest with ``n_search_trees=None`` (pynndescent 0.7): skip that hack."""
    from pynndescent import NNDescent
    from scanpy.tools import _ingest

    def init(self, distances):
        first_col = np.arange(distances.shape[0])[:, None]
        init_indices = np.hstack((first_col, np.stack(distances.tolil().rows)))
        self._nnd_idx = NNDescent(
            data=self._rep, metric=self._metric, metric_kwds=self._metric_kwds, n_neighbors=self._n_neighbors,
            init_graph=init_indices, random_state=self._neigh_random_state,
        )

    original = _ingest.Ingest._init_pynndescent
    _ingest.Ingest._init_pynndescent = init
    try:
        yield
    finally:
        _ingest.Ingest._init_pynndescent = original


def run_singler(xr, yr, xq, genes, max_cells: int = 0) -> BaselineResult:
    """SingleR (classic markers on a reference aggregated per label, fine-tuning on).

    ``aggregate=True`` (pseudo-bulk profiles per label, as SingleR advises for single-cell
    references) both suits the classic marker test and makes fine-tuning fast. On at most
    ``max_cells`` seeded query cells when > 0.
    """
    import singler

    rows = None
    if max_cells and xq.shape[0] > max_cells:
        rows = np.sort(np.random.default_rng(SEED).choice(xq.shape[0], max_cells, replace=False))
        xq = xq[rows]
    t0 = time.perf_counter()
    # dense reference: singler 0.5's aggregation hands a sparse block to k-means for labels with few cells
    ref = np.asarray(xr.T.toarray(), dtype=np.float64)
    built = singler.train_single(ref, list(yr), list(genes), test_features=list(genes), aggregate=True, num_threads=2)
    t1 = time.perf_counter()
    res = singler.classify_single(_genes_by_cells(xq), built, num_threads=2)
    pred = np.asarray(res.column("best"), dtype=object)
    out = BaselineResult("singler", pred, None, t1 - t0, time.perf_counter() - t1, info={"n_genes": len(genes)}, rows=rows)
    if rows is not None:
        out.info["note"] = f"evaluated on {len(rows)} seeded query cells (fine-tuning is slow)"
    return out


def _genes_by_cells(x: sp.csr_matrix) -> sp.csc_matrix:
    m = sp.csc_matrix(x.T)
    m.sort_indices()
    return m


def _pca_fit(xr, genes):
    import scanpy as sc

    hv = _hvg_index(xr, genes)
    a = _adata(xr[:, hv], [genes[i] for i in hv])
    n = int(min(N_PCS, a.n_vars - 1, a.n_obs - 1))
    sc.pp.pca(a, n_comps=n, random_state=SEED)
    return a, hv


def run_knn_pca(xr, yr, xq, genes) -> BaselineResult:
    from sklearn.neighbors import KNeighborsClassifier

    t0 = time.perf_counter()
    a, hv = _pca_fit(xr, genes)
    mean = np.asarray(xr[:, hv].mean(axis=0)).ravel()
    loadings = a.varm["PCs"]
    knn = KNeighborsClassifier(n_neighbors=K).fit(a.obsm["X_pca"], yr)
    t1 = time.perf_counter()
    zq = np.asarray(xq[:, hv] @ loadings) - mean @ loadings
    proba = knn.predict_proba(zq)
    pred = knn.classes_[proba.argmax(axis=1)]
    return BaselineResult("knn_pca", pred, proba.max(axis=1), t1 - t0, time.perf_counter() - t1, info={"n_genes": int(len(hv))})


def run_ingest(xr, yr, xq, genes) -> BaselineResult:
    import scanpy as sc

    t0 = time.perf_counter()
    a, hv = _pca_fit(xr, genes)
    a.obs["label"] = list(yr)
    # exact kNN: the default pynndescent path (> 4096 cells) hands scanpy 1.11 a csr_array it cannot read
    sc.pp.neighbors(a, n_neighbors=K, random_state=SEED, transformer="sklearn")
    t1 = time.perf_counter()
    q = _adata(xq[:, hv], [genes[i] for i in hv])
    with warnings.catch_warnings(), _ingest_compat():
        warnings.simplefilter("ignore")
        sc.tl.ingest(q, a, obs="label", embedding_method="pca")
    pred = q.obs["label"].astype(str).to_numpy()
    return BaselineResult("ingest", pred, None, t1 - t0, time.perf_counter() - t1, info={"n_genes": int(len(hv))})


BASELINES: dict[str, Callable[..., BaselineResult]] = {
    "logreg": run_logreg,
    "celltypist": run_celltypist,
    "singler": run_singler,
    "knn_pca": run_knn_pca,
    "ingest": run_ingest,
}


def _warm_up() -> None:
    """Compile numba code of ingest/pynndescent once, so timings are steady state."""
    rng = np.random.default_rng(SEED)
    x = lognorm(sp.csr_matrix(rng.poisson(1.0, (120, 60)).astype(np.float32)))
    run_ingest(x, np.array(["a", "b"] * 60), x[:10], [f"g{i}" for i in range(60)])


def run_all(
    ref_counts, ref_genes, ref_labels, query_counts, query_genes, names=None, singler_max_cells: int = 0, log=print
) -> list[BaselineResult]:
    """Every baseline on the genes shared by reference and query (failures are recorded, not raised).

    Parameters
    ----------
    ref_counts, query_counts
        Raw counts, cells x genes (CSR).
    ref_genes, query_genes
        Column symbols (already mapped the same way for both).
    ref_labels
        Reference label per cell (vocabulary labels).
    """
    genes, ri, qi = shared_genes(list(ref_genes), list(query_genes))
    xr = lognorm(sp.csr_matrix(ref_counts)[:, ri])
    xq = lognorm(sp.csr_matrix(query_counts)[:, qi])
    yr = np.asarray(ref_labels, dtype=object).astype(str)
    out = []
    for name in names or BASELINES:
        try:
            if name == "ingest":
                _warm_up()
            kw = {"max_cells": singler_max_cells} if name == "singler" else {}
            res = BASELINES[name](xr, yr, xq, genes, **kw)
        except Exception as exc:  # a failing baseline is a result, not a crash
            res = BaselineResult(name, error=f"{type(exc).__name__}: {exc}"[:300])
        res.info["n_shared_genes"] = len(genes)
        log(f"  baseline {name}: {'error ' + res.error if res.error else f'{res.predict_s:.2f} s'}")
        out.append(res)
    return out


PANGLAO = "markers/original/panglaodb_hs_from_CAdir.tsv.gz"


def panglao_net(shared) -> "pd.DataFrame":
    """Every human PanglaoDB row (all organs) as a decoupler network (source = cell type, target = gene)."""
    import pandas as pd

    df = pd.read_csv(Path(shared) / PANGLAO, sep="\t")
    df = df[df["species"].astype(str).str.contains("Hs")]
    return df[["cell_type", "gene"]].drop_duplicates().rename(columns={"cell_type": "source", "gene": "target"})


def run_marker_enrichment(query_counts, query_genes, net, to_vocab: dict) -> BaselineResult:
    """decoupler ``mt.ulm`` (tmin=5) on log1p CP10k with the PanglaoDB network, argmax per cell.

    PanglaoDB cell types are renamed onto the vocabulary by ``to_vocab`` (unmapped types: ``None``).
    """
    import decoupler as dc

    t0 = time.perf_counter()
    a = _adata(lognorm(sp.csr_matrix(query_counts)), list(query_genes))
    dc.mt.ulm(data=a, net=net, tmin=5, verbose=False)
    sc = a.obsm["score_ulm"]
    best = sc.columns.to_numpy()[np.nanargmax(np.nan_to_num(sc.to_numpy(), nan=-np.inf), axis=1)]
    pred = np.array([to_vocab.get(b) for b in best], dtype=object)
    return BaselineResult("decoupler_ulm_panglaodb", pred, None, 0.0, time.perf_counter() - t0,
                          info={"n_cell_types": int(sc.shape[1])})
