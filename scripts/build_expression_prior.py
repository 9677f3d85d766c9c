#!/usr/bin/env python
"""Derive the per-gene expression prior of the gene-list check (``cellatlas.io_genecheck``).

Run once by a developer (re-runnable; the output is deterministic)::

    python scripts/build_expression_prior.py                  # reads ../shared/data
    python scripts/build_expression_prior.py --shared-data /path/to/shared/data

Writes ``src/cellatlas/data/genes/expression_prior.tsv.gz`` (``symbol``, ``log_mean``,
``detection``, ``n_sources``) and ``expression_prior.json`` (sources, sha256, rules).

For every source (single-cell datasets and averaged reference profiles of blood,
pancreas, lung tumour, head-and-neck tumour, lung cancer cell lines and mouse tissues;
10x, inDrop, CEL-seq2, Drop-seq, Smart-seq2 and bulk RNA-seq; human and mouse, mouse
genes through their human orthologs) the gene's log10 mean relative expression per
10,000 counts is computed exactly as the check computes it on a query
(:func:`cellatlas.io_genecheck.column_log_means`). Sources differ by a constant in that
scale (their gene sets and depths differ), so each is shifted to agree with the
consensus on the genes both measure above the floor (median difference, three rounds),
and the prior is the median over sources. ``detection`` is the median share of cells
detecting the gene over the single-cell sources (NaN for genes fewer than three of them measure).

Data the check is tested on but the prior never sees: Kang 2018 PBMC (both files),
Xin and Wang pancreas, the CellBench 10x subset, Yan's embryo cells and scanpy's
``pbmc68k_reduced``; the sources themselves are tested leave-one-source-out
(``tests/test_genecheck.py``).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "src" / "cellatlas" / "data" / "genes"
RULE = (
    "Per source: log10 mean relative expression per 10,000 counts over all cells (io_genecheck.column_log_means; "
    "log2 sources linearised first; columns mapping to one symbol keep the highest value; mouse genes through "
    "their human orthologs). Each source shifted onto the consensus by the median difference over genes both "
    "measure above the floor (three rounds); log_mean = median over sources; detection = median share of cells "
    "detecting the gene over the single-cell sources (at least 3 of them, else nan)."
)
FLOOR = -1.5
"""log10 CP10k below which a gene counts as not measurably expressed when aligning sources."""
MIN_DETECTION_SOURCES = 3
"""``detection`` is given only for genes measured by at least this many single-cell sources."""

# name: (path under shared/data, values, what it is)
SOURCES: dict[str, tuple[str, str, str]] = {
    "pbmc3k": ("datasets/human_pbmc3k_10xv1_seurat_labels.h5ad", "counts", "human PBMC, 10x v1"),
    "cellbench_celseq2_dropseq": ("datasets/human_celllines_cellbench_tian2019_celseq2_dropseq.h5ad", "counts",
                                  "human lung adenocarcinoma cell lines, CEL-seq2 + Drop-seq"),
    "baron_human_cider": ("datasets/pancreas_baron2016_human_mouse_cider_subset.h5ad", "counts",
                          "human and mouse pancreas (genes both share, upper-cased symbols), inDrop"),
    "puram_hnscc": ("datasets/human_hnscc_tme_puram2017_chetah_ref_subset.h5ad", "log2",
                    "human head-and-neck tumour microenvironment, Smart-seq2 (log2(TPM/10+1))"),
    "baron_mouse": ("datasets/mouse_pancreas_baron2016_mouse1_indrop.h5ad", "counts", "mouse pancreas, inDrop"),
    "zilionis_mouse_lung": ("datasets/mouse_lung_zilionis2019_cluey_subset.h5ad", "counts", "mouse lung tumour immune cells, inDrop"),
    "baron_human_means": ("references/ref_human_pancreas_baron2016_inDrop_celltype_means.h5ad", "profiles",
                          "human pancreas, inDrop, 14 cell-type means"),
    "segerstolpe_means": ("references/ref_human_pancreas_segerstolpe2016_smartseq2_cluster_means.h5ad", "profiles",
                          "human pancreas, Smart-seq2, 12 cluster means"),
    "mouse_bulk": ("references/ref_mouse_bulk_rnaseq_singleR_mouse_rnaseq.h5ad", "log2_profiles",
                   "mouse bulk RNA-seq of 28 cell types (SingleR mouse.rnaseq, log2)"),
}


def source_profile(adata, values: str) -> pd.DataFrame:
    """Per approved human symbol: ``log_mean`` (as the check computes it) and ``detection``.

    ``values``: ``counts``, ``log2`` (log2(x+1) per cell), ``profiles`` (averaged
    profiles, no detection) or ``log2_profiles``. Columns mapping to one symbol keep the
    highest value.
    """
    from cellatlas.genes import map_genes
    from cellatlas.io_genecheck import column_log_means

    X = sp.csr_matrix(adata.X, dtype=np.float64)
    if values.startswith("log2"):
        X.data = np.exp2(X.data) - 1.0
    log_mean, _ = column_log_means(X)
    single_cells = "profiles" not in values
    detection = np.asarray((X > 0).mean(axis=0)).ravel() if single_cells else np.full(X.shape[1], np.nan)
    symbols = map_genes([str(g) for g in adata.var_names]).symbols
    df = pd.DataFrame({"symbol": symbols, "log_mean": log_mean, "detection": detection}).dropna(subset=["symbol"])
    return df.groupby("symbol").max()


def combine(profiles: dict[str, pd.DataFrame], rounds: int = 3) -> pd.DataFrame:
    """Median over sources after shifting each onto the consensus (see the module docstring)."""
    names = sorted(profiles)
    table = pd.concat([profiles[n]["log_mean"].rename(n) for n in names], axis=1).sort_index()
    values = table.to_numpy(dtype=float)
    consensus = values[:, 0]
    for _ in range(rounds):
        offsets = []
        for j in range(len(names)):
            ok = (values[:, j] > FLOOR) & (consensus > FLOOR)  # NaN compares False: genes both measure
            offsets.append(float(np.median(values[ok, j] - consensus[ok])))
        aligned = values - np.asarray(offsets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows cannot occur: every gene has a source
            consensus = np.nanmedian(aligned, axis=1)
    det = pd.concat([profiles[n]["detection"].rename(n) for n in names], axis=1).reindex(table.index)
    detection = det.median(axis=1).where(det.notna().sum(axis=1) >= MIN_DETECTION_SOURCES)
    out = pd.DataFrame({"log_mean": consensus, "detection": detection, "n_sources": table.notna().sum(axis=1)}, index=table.index)
    out.index.name = "symbol"
    return out


def build(shared: Path, exclude: tuple[str, ...] = ()) -> pd.DataFrame:
    """The prior from every source in :data:`SOURCES` except ``exclude``."""
    import anndata as ad

    profiles = {}
    for name, (rel, values, _) in SOURCES.items():
        if name not in exclude:
            profiles[name] = source_profile(ad.read_h5ad(shared / rel), values)
    return combine(profiles)


def as_lookup(table: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """The prior in the form :func:`cellatlas.io_genecheck.check_gene_list` takes."""
    return {s: (float(m), float(d)) for s, m, d in zip(table.index, table["log_mean"], table["detection"])}


def write(table: pd.DataFrame, shared: Path, out_dir: Path = OUT_DIR) -> None:
    body = io.StringIO()
    table.to_csv(body, sep="\t", float_format="%.3f", na_rep="nan")
    raw = body.getvalue().encode()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as fh:
        fh.write(raw)
    (out_dir / "expression_prior.tsv.gz").write_bytes(buf.getvalue())
    manifest = {
        "rows": int(len(table)),
        "rule": RULE,
        "floor_log10_cp10k": FLOOR,
        "sources": {
            name: {"path": rel, "values": values, "what": what,
                   "sha256": hashlib.sha256((shared / rel).read_bytes()).hexdigest()}
            for name, (rel, values, what) in SOURCES.items()
        },
    }
    (out_dir / "expression_prior.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args(argv)
    table = build(args.shared_data)
    write(table, args.shared_data)
    n_ubiq = int((table["detection"] >= 0.9).sum())
    print(f"wrote {len(table)} genes ({n_ubiq} ubiquitous, detection >= 0.9) to {OUT_DIR / 'expression_prior.tsv.gz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
