#!/usr/bin/env python
"""Draw the README's plots from real data with ``cellatlas.pl`` (written to ``docs/figures/``).

    python scripts/make_figures.py                       # ../shared/data for Kang 2018
    python scripts/make_figures.py --shared-data /path/to/shared/data

Two datasets the built-in atlas was not built from (it is built from PBMC3k):

- scanpy's bundled ``pbmc68k_reduced`` (700 cells, 765 genes, log-normalised ``.raw``),
  with the user's own UMAP (``obsm["X_umap"]``) and louvain clusters;
- Kang et al. 2018 PBMCs (``human_pbmc_kang2018_muscat_subset.h5ad``: 8,684 cells, raw
  counts, the authors' labels in ``obs["cell_type"]``), which has no UMAP: one is computed
  with scanpy on the cellatlas embedding.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "figures")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore", FutureWarning)

    import anndata as ad
    import scanpy as sc

    import cellatlas

    t = time.perf_counter()
    pbmc = sc.datasets.pbmc68k_reduced()
    cellatlas.annotate_adata(pbmc)
    cellatlas.pl.embedding(pbmc, save=args.out / "embedding_pbmc68k.png")
    cellatlas.pl.cluster_summary(pbmc, "louvain", save=args.out / "clusters_pbmc68k.png")
    cellatlas.pl.projection(pbmc, save=args.out / "projection_pbmc68k.png")

    kang = ad.read_h5ad(args.shared_data / "datasets" / "human_pbmc_kang2018_muscat_subset.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the authors' cell_type is moved to cell_type_uploaded
        cellatlas.annotate_adata(kang)
    cellatlas.pl.compare(kang, "cell_type_uploaded", save=args.out / "compare_kang.png")
    cellatlas.pl.embedding(kang, color=["label", "cell_type_uploaded", "confidence"], save=args.out / "embedding_kang.png")
    cellatlas.pl.markers(kang, save=args.out / "markers_kang.png")
    for p in sorted(args.out.glob("*.png")):
        print(f"{p.relative_to(REPO)}  {p.stat().st_size / 1e3:.0f} kB")
    print(f"{time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
