"""Rebuild the built-in ``human-core`` atlas (see DATA.md).

Reference cells from every usable labelled source in ../shared/data (blood, pancreas,
head-and-neck tumour microenvironment, mouse lung and pancreas through orthologs) plus
averaged profiles drawn as pseudo-cells (Baron and Segerstolpe pancreas, Novershtern
haematopoiesis, mouse bulk tissues), every curated marker-defined label, and a fusion model
fitted on held-out datasets (scripts/builtin_sources.py lists them and their label maps).

    python scripts/build_builtin_atlas.py [--shared ../shared/data] [--out src/cellatlas/data/atlases]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from builtin_sources import PBMC3K_TO_CORE, builtin_sources  # noqa: E402,F401  (PBMC3K_TO_CORE: used by tests)

DESCRIPTION = (
    "Human core atlas: reference cells of blood, pancreas, tumour microenvironment and lung immune cells "
    "(human, and mouse through orthologs), pseudo-cells from averaged profiles, and curated marker-defined labels "
    "for major immune, stromal, epithelial, endothelial, neural and parenchymal types."
)


N_HVG = 3000
"""Panel genes chosen per source and combined: more than a one-tissue atlas needs, so that queries
measuring only a few thousand genes (pre-filtered data) still share a useful part of it."""


def build(shared: Path, name: str = "human-core", version: str = "2026.12", exclude_groups=(), layout: str = "umap", log=print):
    """The built-in atlas from ``shared`` (the benchmark rebuilds it without the groups it scores)."""
    from cellatlas.atlas_build import build_from_sources

    return build_from_sources(
        builtin_sources(shared, exclude_groups), name=name, version=version, description=DESCRIPTION,
        marker_labels="all", n_hvg=N_HVG, layout=layout, log=log,
        provenance={"recipe": "scripts/build_builtin_atlas.py", "excluded_groups": sorted(exclude_groups)},
    )


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=here.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=here / "src" / "cellatlas" / "data" / "atlases")
    ap.add_argument("--name", default="human-core")
    ap.add_argument("--version", default="2026.12")
    args = ap.parse_args()
    t0 = time.perf_counter()
    atlas = build(args.shared, args.name, args.version)
    path = atlas.save(args.out / args.name)
    fus = atlas.meta["models"]["default"].get("fusion", {}).get("summary", {})
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f} s; fusion {fus.get('by_variant')}")


if __name__ == "__main__":
    main()
