"""Rebuild the built-in ``human-core`` atlas (see DATA.md).

Reference cells: PBMC3k (10x v1, Seurat tutorial labels) from ../shared/data, labels
renamed onto the curated vocabulary; plus every curated marker-defined label
(immune, stromal, epithelial, endothelial, neural, parenchymal).

    python scripts/build_builtin_atlas.py [--shared ../shared/data] [--out src/cellatlas/data/atlases]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


from cellatlas.atlas_build import build_atlas

PBMC3K_TO_CORE = {
    "Naive CD4 T": "Naive CD4 T cell",
    "Memory CD4 T": "Memory CD4 T cell",
    "CD8 T": "CD8 T cell",
    "NK": "NK cell",
    "B": "B cell",
    "CD14+ Mono": "CD14 monocyte",
    "FCGR3A+ Mono": "CD16 monocyte",
    "DC": "Dendritic cell",
    "Platelet": "Platelet",
}


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=here.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=here / "src" / "cellatlas" / "data" / "atlases")
    ap.add_argument("--name", default="human-core")
    ap.add_argument("--version", default="2026.11")
    args = ap.parse_args()
    t0 = time.perf_counter()
    ref = args.shared / "datasets" / "human_pbmc3k_10xv1_seurat_labels.h5ad"
    atlas = build_atlas(
        ref,
        "cell_type",
        name=args.name,
        version=args.version,
        description="Human core atlas: PBMC reference cells (PBMC3k, 10x v1) plus curated marker-defined labels for "
        "major immune, stromal, epithelial, endothelial, neural and parenchymal types.",
        label_map=PBMC3K_TO_CORE,
        marker_labels="all",
        log=print,
    )
    path = atlas.save(args.out / args.name)
    cal = atlas.meta["models"]["default"]["calibration"]["summary"]
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f} s; calibration {cal}")


if __name__ == "__main__":
    main()
