"""Do two versions of the engine give the same calls? Snapshot every per-cell output on real data, then compare.

    python benchmarks/calls_identity.py snapshot OUT.npz [--datasets a,b] [--max-cells N]
    python benchmarks/calls_identity.py compare BEFORE.npz AFTER.npz

``snapshot`` annotates the datasets of ../shared/data/datasets (all of them by default, at
most ``--max-cells`` evenly spread cells each) with the built-in atlas, in-process, and
stores every per-cell column of :meth:`AnnotationResult.to_dataframe` plus the embedding and
layout. Run it at two commits (e.g. ``git worktree add /tmp/before <commit>`` and that tree's
own interpreter path, or ``PYTHONPATH=/tmp/before/src``), then ``compare``: it prints, per
dataset, the share of cells whose label, parent, novel flag, reason, alternates and markers
are identical, and the largest difference of each numeric column (confidences, evidence,
embedding, layout). Speed changes must leave labels identical and numbers equal up to float32
rounding; this is how that was checked (docs/DESIGN.md, "Hot path").
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLATLAS_SHARED_DATA") or REPO.parent / "shared" / "data")
TEXT = ("cell_type", "cell_type_parent", "cell_type_level", "alternate_1", "alternate_2", "alternate_3", "markers",
        "knn_label", "marker_label", "agreement", "novel", "reason")


def snapshot(out: Path, datasets: list[str] | None, max_cells: int) -> None:
    import anndata as ad

    import cellatlas

    warnings.filterwarnings("ignore")
    arrays: dict[str, np.ndarray] = {}
    paths = sorted((SHARED / "datasets").glob("*.h5ad"))
    for p in paths:
        name = p.name.removesuffix(".h5ad")
        if datasets and name not in datasets:
            continue
        a = ad.read_h5ad(p)
        if a.n_obs > max_cells:
            a = a[np.linspace(0, a.n_obs - 1, max_cells).round().astype(int)].copy()
        try:
            res = cellatlas.annotate(a)
        except cellatlas.CellAtlasError as e:
            print(f"{name}: {e.one_line()}")
            continue
        df = res.to_dataframe()
        for col in df.columns:
            v = df[col].to_numpy()
            arrays[f"{name}/{col}"] = v.astype(str) if v.dtype == object or col in TEXT else v.astype(np.float64)
        arrays[f"{name}/embedding"] = np.asarray(res.embedding, dtype=np.float32)
        arrays[f"{name}/layout"] = np.asarray(res.layout, dtype=np.float32)
        print(f"{name}: {a.n_obs} cells, {len(set(res.label))} labels")
    np.savez_compressed(out, **arrays)


def compare(before: Path, after: Path) -> bool:
    a, b = np.load(before), np.load(after)
    names = sorted({k.split("/")[0] for k in a.files})
    ok = True
    for name in names:
        cols = sorted(k.split("/", 1)[1] for k in a.files if k.startswith(name + "/"))
        same, worst = [], []
        for col in cols:
            x, y = a[f"{name}/{col}"], b.get(f"{name}/{col}") if f"{name}/{col}" in b.files else None
            if y is None or x.shape != y.shape:
                same.append(f"{col}: MISSING/SHAPE")
                ok = False
                continue
            if x.dtype.kind in "US":
                eq = (x == y).mean()
                if eq < 1:
                    ok = ok and col not in ("cell_type", "novel", "reason")
                    same.append(f"{col} {eq:.4%}")
            else:
                both = np.isnan(x) & np.isnan(y)
                d = np.where(both, 0.0, np.abs(x.astype(np.float64) - y.astype(np.float64)))
                m = float(np.nanmax(d)) if d.size else 0.0
                if m > 0:
                    worst.append(f"{col} {m:.2g}")
        print(f"{name}: {len(a[f'{name}/cell_type'])} cells; not identical: {', '.join(same) or 'none'}; "
              f"largest numeric differences: {', '.join(worst) or 'none'}")
    print("labels, novel flags and reasons identical" if ok else "LABELS DIFFER")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("snapshot")
    s.add_argument("out", type=Path)
    s.add_argument("--datasets", default="")
    s.add_argument("--max-cells", type=int, default=20_000)
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = ap.parse_args()
    if args.cmd == "snapshot":
        snapshot(args.out, [d for d in args.datasets.split(",") if d] or None, args.max_cells)
    else:
        sys.exit(0 if compare(args.before, args.after) else 1)


if __name__ == "__main__":
    main()
