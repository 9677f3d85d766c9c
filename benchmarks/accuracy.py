"""Accuracy benchmark (one command, one run).

    python benchmarks/accuracy.py [--sections cross,zeroshot,thinning,novel] [--no-baselines]
                                  [--singler-max-cells N] [--zeroshot-singler] [--out benchmarks/results]

Sections (see benchmarks/README.md for what each number means):

* ``cross``: cross-dataset splits, engine vs baselines trained on the same reference:
  PBMC3k -> Kang, Kang -> PBMC3k, Xin -> Wang, Wang -> Xin, and the human Baron
  pancreas profiles (as pseudo-cells) -> mouse Baron pancreas through orthologs.
* ``zeroshot``: the built-in atlas on every labelled dataset in ../shared/data, each against
  the atlas rebuilt without the dataset's group (``zeroshot.py``), with its marker-only and
  neighbour-only columns, a marker-enrichment baseline and classifiers trained on the same
  reference, at one coarse vocabulary (``coarse.py``).
* ``thinning``: Kang's cells thinned to 1/2 ... 1/64 of their counts: confidence must fall.
* ``novel``: atlases with one label removed; share of that label's cells flagged.

Writes ``accuracy.json``, ``accuracy.md``, ``reliability.png`` and
``reliability_overall.png`` to the output folder. Atlases are built in memory with
``fit_folds=3`` and ``layout="pca"`` to keep the run short.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402
import harmonise as hm  # noqa: E402
import report  # noqa: E402
import zeroshot  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLATLAS_SHARED_DATA") or REPO.parent / "shared" / "data")
SEED = 0
BUILD = {"fit_folds": 3, "layout": "pca", "seed": SEED}

DATASETS = {
    "pbmc3k": ("human_pbmc3k_10xv1_seurat_labels.h5ad", "pbmc3k"),
    "kang": ("human_pbmc_kang2018_muscat_subset.h5ad", "kang"),
    "kang_sce": ("human_pbmc_kang2018_muscat_example_sce.h5ad", "kang"),
    "xin": ("human_pancreas_xin2016_scclassify_subset.h5ad", "pancreas"),
    "wang": ("human_pancreas_wang2016_scclassify_subset.h5ad", "pancreas"),
    "mouse_baron": ("mouse_pancreas_baron2016_mouse1_indrop.h5ad", "pancreas"),
    "cider_baron": ("pancreas_baron2016_human_mouse_cider_subset.h5ad", "pancreas"),
    "mouse_lung": ("mouse_lung_zilionis2019_cluey_subset.h5ad", "mouse_lung"),
    "chetah_hnscc": ("human_hnscc_tme_puram2017_chetah_ref_subset.h5ad", "chetah_hnscc"),
    "cellbench_10x": ("human_celllines_cellbench_tian2019_10x_cepo_subset.h5ad", "cell_lines"),
    "cellbench_celseq_dropseq": ("human_celllines_cellbench_tian2019_celseq2_dropseq.h5ad", "cell_lines"),
    "yan_embryo": ("human_preimplantation_embryo_yan2013_scmap_rpkm.h5ad", "embryo"),
}
BARON_PROFILES = "references/ref_human_pancreas_baron2016_inDrop_celltype_means.h5ad"
PSEUDO_CELLS_PER_PROFILE = 50


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------- data
@lru_cache(maxsize=None)
def load(key: str):
    """A labelled dataset with ``obs['truth']`` = its harmonised vocabulary label (or None)."""
    import anndata as ad

    fname, table = DATASETS[key]
    a = ad.read_h5ad(SHARED / "datasets" / fname)
    a.obs["truth"] = hm.harmonise(a.obs["cell_type"].astype(str), hm.TABLES[table])
    return a


def table_of(key: str) -> dict:
    return {k: v for k, v in hm.TABLES[DATASETS[key][1]].items() if v is not None}


@lru_cache(maxsize=None)
def baron_pseudo_cells():
    """Human Baron per-type mean profiles -> 50 multinomial pseudo-cells each at PBMC3k depths (seeded)."""
    import anndata as ad
    import scipy.sparse as sp

    prof = ad.read_h5ad(SHARED / BARON_PROFILES)
    depths = load("pbmc3k").X.sum(axis=1).A1
    rng = np.random.default_rng(SEED)
    rows, labels = [], []
    for i, lab in enumerate(prof.obs["cell_type"].astype(str)):
        p = np.asarray(prof.X[i].todense() if sp.issparse(prof.X) else prof.X[i], dtype=np.float64).ravel()
        p = np.clip(p, 0, None) / p.clip(0, None).sum()
        n = rng.choice(depths, PSEUDO_CELLS_PER_PROFILE).astype(np.int64)
        rows.append(sp.csr_matrix(np.stack([rng.multinomial(d, p) for d in n]).astype(np.float32)))
        labels += [lab] * PSEUDO_CELLS_PER_PROFILE
    a = ad.AnnData(sp.vstack(rows).tocsr())
    a.var_names = list(prof.var_names)
    a.obs_names = [f"pseudo{i}" for i in range(a.n_obs)]
    a.obs["cell_type"] = labels
    a.obs["truth"] = hm.harmonise(labels, hm.PANCREAS)
    a.uns["reference_kind"] = "profiles"
    return a


# ---------------------------------------------------------------------- engine
def build(adata, table: dict, name: str, marker_labels="reference"):
    """An atlas from ``adata`` (pseudo-cells made from profiles say so in ``uns['reference_kind']``)."""
    from cellatlas.atlas_build import build_atlas

    t0 = time.perf_counter()
    kind = str(adata.uns.get("reference_kind", "cells"))
    atlas = build_atlas(adata, "cell_type", name=name, label_map=table, marker_labels=marker_labels, reference_kind=kind, **BUILD)
    log(f"built atlas {name}: {atlas.meta['provenance']['n_reference_cells']} cells, "
        f"{len(atlas.meta['candidates'])} candidates in {time.perf_counter() - t0:.1f} s")
    return atlas


def atlas_parents(atlas) -> dict[str, str]:
    return hm.vocab_parents({r["label"]: r["parent"] for r in atlas.meta["labels"]})


def run_engine(query, atlas, name: str, truth=None) -> dict:
    """Annotate ``query`` with ``atlas`` and score against ``query.obs['truth']``."""
    import cellatlas
    from cellatlas.errors import CellAtlasError

    truth = query.obs["truth"].to_numpy() if truth is None else truth
    t0 = time.perf_counter()
    try:
        res = cellatlas.annotate(query, atlas=atlas)
    except CellAtlasError as exc:  # a clear refusal is a result
        log(f"  engine refused {name}: {exc}")
        return {"method": "cellatlas", "refused": f"{type(exc).__name__}: {exc}", "n_cells": int(query.n_obs)}
    except Exception as exc:  # an engine crash is reported, not fatal to the benchmark
        log(f"  ENGINE ERROR on {name}: {type(exc).__name__}: {exc}")
        return {"method": "cellatlas", "error": f"engine crashed: {type(exc).__name__}: {exc}", "n_cells": int(query.n_obs)}
    secs = time.perf_counter() - t0
    setup = float(res.provenance.get("setup_seconds", 0.0))
    row = hm.score(truth, res.label, atlas.meta["candidates"], atlas_parents(atlas), conf=res.confidence,
                   level=res.level, band=res.band, novel=res.novel, parent_conf=res.parent_confidence)
    row.update({
        "method": "cellatlas", "seconds": round(secs, 3), "setup_seconds": round(setup, 3),
        "cells_per_s": round(query.n_obs / max(secs - setup, 1e-9)),
        "gene_report": {k: res.gene_report.get(k) for k in ("species", "values", "n_genes_used", "panel_coverage", "panel_adapted")},
    })
    row["_pool"] = _pool(res.label, res.confidence, res.parent_confidence, truth, row["shared_map"], atlas_parents(atlas))
    log(f"  cellatlas on {name}: macro-F1 {row.get('macro_f1', float('nan')):.3f}, ECE {row.get('ece', float('nan')):.3f}")
    return row


def _pool(pred, conf, parent_conf, truth, smap: dict, parents: dict):
    """(confidence at the shared level, hierarchically correct) of the cells with a shared truth, for pooled calibration."""
    s = np.array([smap.get(t) if t is not None else None for t in truth], dtype=object)
    keep = np.array([x is not None for x in s], dtype=bool)
    if not keep.any():
        return None
    pred = np.asarray(pred)[keep]
    c, _ = hm.shared_level_confidence(pred, np.asarray(conf, float)[keep], np.asarray(parent_conf, float)[keep], set(s[keep]), parents)
    return c, hm.hierarchical_correct(pred, s[keep], parents)


# ---------------------------------------------------------------------- sections
def cross_splits():
    """(name, reference AnnData, reference table, query key) for every cross-dataset split."""
    return [
        ("PBMC3k -> Kang", load("pbmc3k"), table_of("pbmc3k"), "kang"),
        ("Kang -> PBMC3k", load("kang"), table_of("kang"), "pbmc3k"),
        ("Xin -> Wang", load("xin"), table_of("xin"), "wang"),
        ("Wang -> Xin", load("wang"), table_of("wang"), "xin"),
        ("human Baron profiles -> mouse Baron", baron_pseudo_cells(), table_of("mouse_baron"), "mouse_baron"),
    ]


def pancreas_marker_labels() -> list[str]:
    voc = hm.vocabulary()
    return [lab for lab, tissue in voc["tissue"].items() if "pancreas" in str(tissue)]


def section_cross(args) -> list[dict]:
    from cellatlas.query import prepare_query

    rows = []
    for name, ref, table, qkey in cross_splits():
        log(f"split {name}")
        query = load(qkey)
        ml = pancreas_marker_labels() if "Baron" in name else "reference"
        atlas = build(ref, table, name, marker_labels=ml)
        r = run_engine(query, atlas, name)
        rows.append({"split": name, **r})
        if args.no_baselines:
            continue
        rq, qq = prepare_query(ref), prepare_query(query)
        keep = np.isin(ref.obs["truth"].to_numpy(), atlas.reference_labels)
        ref_truth = ref.obs["truth"].to_numpy()[keep]
        for b in baselines.run_all(rq.counts[keep], rq.genes, ref_truth, qq.counts, qq.genes,
                                   singler_max_cells=args.singler_max_cells, log=log):
            row = {"split": name, "method": b.name, "fit_seconds": round(b.fit_s, 3), **b.info}
            if b.error:
                row["error"] = b.error
            else:
                sel = slice(None) if b.rows is None else b.rows
                row.update(hm.score(query.obs["truth"].to_numpy()[sel], b.pred, set(ref_truth), atlas_parents(atlas), conf=b.conf))
                row.update({"seconds": round(b.predict_s, 3), "cells_per_s": round(b.cells_per_s or 0)})
            rows.append(row)
    return rows


NOVEL = [
    ("PBMC3k minus B", "pbmc3k", "B", "kang"),
    ("PBMC3k minus NK", "pbmc3k", "NK", "kang"),
    ("Xin minus delta", "xin", "delta", "wang"),
    ("Xin minus delta", "xin", "delta", "xin"),
]


def section_novel(args) -> list[dict]:
    import cellatlas
    from cellatlas.errors import CellAtlasError

    rows, cache = [], {}
    for name, rkey, drop, qkey in NOVEL:
        ref = load(rkey)
        dropped = hm.TABLES[DATASETS[rkey][1]][drop]
        variants = [("reference", "reference")] + ([("all", "all")] if args.novel_markers and rkey == "pbmc3k" else [])
        for tag, ml in variants:
            akey = (rkey, drop, tag)
            if akey not in cache:
                keep = ref.obs["cell_type"].astype(str).to_numpy() != drop
                cache[akey] = build(ref[keep].copy(), table_of(rkey), f"{name} ({tag})", marker_labels=ml)
            atlas = cache[akey]
            query = load(qkey)
            if qkey == rkey:  # same study: only the held-out type's cells (never in the atlas)
                query = query[query.obs["truth"].to_numpy() == dropped].copy()
            log(f"novel {name} ({tag} labels) -> {qkey}")
            try:
                res = cellatlas.annotate(query, atlas=atlas)
            except CellAtlasError as exc:
                rows.append({"test": name, "query": qkey, "marker_labels": tag, "refused": str(exc)})
                continue
            except Exception as exc:  # reported, not fatal
                log(f"  ENGINE ERROR: {type(exc).__name__}: {exc}")
                rows.append({"test": name, "query": qkey, "marker_labels": tag,
                             "refused": f"engine crashed: {type(exc).__name__}: {exc}"})
                continue
            truth = query.obs["truth"].to_numpy()
            is_new = truth == dropped
            flagged = res.novel | (res.band == "low")
            known = ~is_new & np.isin(truth, atlas.reference_labels)
            labels, counts = np.unique(res.label[is_new], return_counts=True)
            order = np.argsort(-counts)
            rows.append({
                "test": name, "query": qkey, "dropped": dropped, "marker_labels": tag,
                "dropped_is_candidate": dropped in atlas.meta["candidates"],
                "n_cells": int(is_new.sum()),
                "flagged": float(flagged[is_new].mean()),
                "novel": float(res.novel[is_new].mean()),
                "low": float((res.band[is_new] == "low").mean()),
                "called_dropped_label": float((res.label[is_new] == dropped).mean()),
                "flagged_or_right": float((flagged | (res.label == dropped))[is_new].mean()),
                "calls": {str(labels[i]): int(counts[i]) for i in order[:5]},
                "false_flag_known": float(flagged[known].mean()) if known.any() else None,
                "n_known": int(known.sum()),
            })
            log(f"  flagged {rows[-1]['flagged']:.1%} of {rows[-1]['n_cells']} {dropped} cells")
    return rows


# ---------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="cross,zeroshot,thinning,novel")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--singler-max-cells", type=int, default=0, help="SingleR on at most this many query cells (0 = all)")
    ap.add_argument("--zeroshot-singler", action="store_true", help="also run SingleR in the zero-shot section (slow)")
    ap.add_argument("--no-novel-markers", dest="novel_markers", action="store_false",
                    help="skip the novel-type variant where the dropped label stays a marker-defined candidate")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if not SHARED.exists():
        sys.exit(f"shared data not found at {SHARED} (set CELLATLAS_SHARED_DATA)")
    t0 = time.perf_counter()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    out = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
           "settings": {"build": BUILD, "singler_max_cells": args.singler_max_cells, "seed": SEED},
           "ontology_check": hm.ontology_check(SHARED / "ontology" / "cell_ontology_CL_from_cellmarkeraccordion.tsv.gz")}
    args.shared = SHARED
    lodo = zeroshot.Lodo(SHARED, log)
    runners = {"cross": section_cross, "novel": section_novel,
               "zeroshot": lambda a: zeroshot.section_zeroshot(a, load, lodo, log),
               "thinning": lambda a: zeroshot.thinning(a, load, lodo, log)}
    for s in sections:
        out[s] = runners[s](args)
    out["criteria"] = report.criteria(out)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    report.reliability_plots(out, args.out)
    md = report.markdown(out)
    (args.out / "accuracy.md").write_text(md)
    (args.out / "accuracy.json").write_text(json.dumps(report.jsonable(out), indent=1))
    print(md)
    return out


if __name__ == "__main__":
    main()
