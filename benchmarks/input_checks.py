"""Honest input (issue #12, parts 1 and 2): the gene-list check and the Unassigned rule, measured.

    python benchmarks/input_checks.py [--sections genes,loo,timing,unassigned] [--out benchmarks/results]

* **genes**: every human and mouse dataset in ``../shared/data/datasets`` plus scanpy's
  bundled ``pbmc68k_reduced`` (``.raw``: 765 genes, log-normalised), each sent through
  ``prepare_query`` (the path of every door) as given, with its gene list rolled by
  +1, -1, +2, +5 and +50 columns (``np.roll(genes, k)``), reversed, shuffled (seed 0),
  and replaced by another dataset's genes (a seeded random subset, in that dataset's
  order, of the next file holding at least as many genes). Verdict per case; detection
  = error or warning on a corrupted list, false alarm = anything but ``ok`` on a list as given.
* **loo**: the same cases for the nine sources of the packaged prior, each checked against
  a prior rebuilt without it (``scripts/build_expression_prior.py``), so a source is never
  judged by a prior that memorised it.
* **timing**: ``check_gene_list`` alone on PBMC3k and on 200,000 cells (Kang rows tiled),
  median of 5.
* **unassigned**: Kang PBMC (8,684 cells) with 20 all-zero cells, 200 cells thinned to 1, 5
  and 9 counts, and 200 cells thinned to 10, 20 and 50 counts appended; share Unassigned
  and mean confidence per group (built-in atlas).

Writes ``input_checks.json`` and ``input_checks.md`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("CELLATLAS_SHARED_DATA") or REPO.parent / "shared" / "data")
VARIANTS = ("given", "shift+1", "shift-1", "shift+2", "shift+5", "shift+50", "reversed", "shuffled", "other")


def datasets() -> list[tuple[str, object]]:
    """(name, AnnData) for every dataset file plus pbmc68k_reduced's ``.raw``."""
    import anndata as ad
    import scanpy as sc

    out = [(p.stem, ad.read_h5ad(p)) for p in sorted((SHARED / "datasets").glob("*.h5ad"))]
    p68 = sc.datasets.pbmc68k_reduced()
    out.append(("scanpy_pbmc68k_reduced", ad.AnnData(p68.raw.X, obs=p68.obs[[]], var=p68.raw.var[[]])))
    return out


def corrupt(genes: list[str], variant: str, others: list[list[str]], seed: int = 0) -> list[str]:
    """The gene list of ``variant`` (see the module docstring); ``others``: other datasets' lists, in order."""
    g = np.asarray(genes, dtype=object)
    if variant == "given":
        return list(g)
    if variant.startswith("shift"):
        return list(np.roll(g, int(variant[5:])))
    if variant == "reversed":
        return list(g[::-1])
    if variant == "shuffled":
        return list(g[np.random.default_rng(seed).permutation(len(g))])
    if variant == "other":
        donor = next(o for o in others if len(o) >= len(g))
        keep = np.sort(np.random.default_rng(seed).choice(len(donor), len(g), replace=False))
        return [donor[i] for i in keep]
    raise ValueError(variant)


def _other_lists(items, i: int) -> list[list[str]]:
    names = [list(map(str, a.var_names)) for _, a in items]
    order = names[i + 1:] + names[:i]
    # fall back on a reference's full list when no dataset is long enough (the largest dataset)
    ref = SHARED / "references" / "ref_human_pancreas_segerstolpe2016_smartseq2_cluster_means.h5ad"
    if ref.exists():
        import anndata as ad

        order.append(list(map(str, ad.read_h5ad(ref, backed="r").var_names)))
    return order


def _verdict(fn) -> dict:
    from cellatlas.errors import GeneListMismatchError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            check = fn()
        except GeneListMismatchError as e:
            return {**e.details["gene_check"], "raised": True}
    return {**(check if isinstance(check, dict) else check.report()), "raised": False}


def run_genes(items, prior=None, names=None) -> list[dict]:
    from cellatlas.io_genecheck import check_gene_list
    from cellatlas.query import prepare_query

    rows = []
    for i, (name, a) in enumerate(items):
        if names is not None and name not in names:
            continue
        others = _other_lists(items, i)
        base = prepare_query(a, skip_gene_check=True) if prior is not None else None
        for variant in VARIANTS:
            genes = corrupt(list(map(str, a.var_names)), variant, others)
            if prior is None:
                rep = _verdict(lambda: prepare_query(a.X, genes, use_raw=False).report["gene_check"])
            else:
                from cellatlas.genes import map_genes

                rep = _verdict(lambda: check_gene_list(base.raw, map_genes(genes).symbols, prior=prior))
            rows.append({"dataset": name, "variant": variant, **rep})
    return rows


def _cell(r: dict) -> str:
    v = r["verdict"]
    if v == "error":
        what = f"shift {r['shift']:+d}" if r["cause"] == "shifted" else {"mismatched": "mismatch"}.get(r["cause"], r["cause"])
        return f"**E** {what}"
    return {"warning": "*W*", "ok": "ok"}.get(v, v)


def table(rows: list[dict]) -> tuple[str, dict]:
    by = {}
    for r in rows:
        by.setdefault(r["dataset"], {})[r["variant"]] = r
    lines = ["| dataset | rho as given | " + " | ".join(VARIANTS) + " |", "|---" * (len(VARIANTS) + 2) + "|"]
    for name, vs in by.items():
        rho = vs["given"]["rho"]
        lines.append(f"| {name} | {rho if rho is not None else '-'} | " + " | ".join(_cell(vs[v]) for v in VARIANTS) + " |")
    corrupted = [r for r in rows if r["variant"] != "given"]
    given = [r for r in rows if r["variant"] == "given"]
    stats = {
        "corrupted_cases": len(corrupted),
        "detected": sum(r["verdict"] in ("error", "warning") for r in corrupted),
        "errors": sum(r["verdict"] == "error" for r in corrupted),
        "shifts_named_right": sum(r["verdict"] == "error" and r["cause"] == "shifted" and f"shift{r['shift']:+d}" == r["variant"]
                                  for r in corrupted if r["variant"].startswith("shift")),
        "shift_cases": sum(r["variant"].startswith("shift") for r in corrupted),
        "given_cases": len(given),
        "false_alarms": sum(r["verdict"] != "ok" for r in given),
        "min_rho_given": min(r["rho"] for r in given if r["rho"] is not None),
        "max_rho_corrupted": max(r["rho"] for r in corrupted if r["rho"] is not None),
    }
    return "\n".join(lines), stats


def run_loo(items) -> tuple[list[dict], dict]:
    import anndata as ad

    from scripts.build_expression_prior import SOURCES, as_lookup, combine, source_profile

    profiles = {k: source_profile(ad.read_h5ad(SHARED / rel), values) for k, (rel, values, _) in SOURCES.items()}
    stem_of = {k: Path(rel).stem for k, (rel, _, _) in SOURCES.items()}
    rows = []
    for k in SOURCES:
        if not rel_is_dataset(SOURCES[k][0]):
            continue
        prior = as_lookup(combine({n: p for n, p in profiles.items() if n != k}))
        rows += run_genes(items, prior=prior, names={stem_of[k]})
    return rows, {k: stem_of[k] for k in SOURCES}


def rel_is_dataset(rel: str) -> bool:
    return rel.startswith("datasets/")


def run_timing(items) -> dict:
    from cellatlas.genes import map_genes
    from cellatlas.io_genecheck import check_gene_list

    out = {}
    named = dict(items)
    for label, name, reps in (("pbmc3k (2,638 cells)", "human_pbmc3k_10xv1_seurat_labels", 1),
                              ("kang tiled (200,000 cells)", "human_pbmc_kang2018_muscat_subset", None)):
        a = named[name]
        X = sp.csr_matrix(a.X, dtype=np.float32)
        if reps is None:
            X = sp.vstack([X] * int(np.ceil(200_000 / X.shape[0])), format="csr")[:200_000]
        symbols = map_genes(list(map(str, a.var_names))).symbols
        times = []
        for _ in range(5):
            t = time.perf_counter()
            check_gene_list(X, symbols)
            times.append(time.perf_counter() - t)
        out[label] = round(float(np.median(times)) * 1000, 1)
    return out


def thin_to(X: sp.csr_matrix, target: int, rng) -> sp.csr_matrix:
    """Each row reduced to exactly ``target`` counts drawn without replacement (rows with fewer keep theirs)."""
    X = sp.csr_matrix(X, dtype=np.float32)
    rows = []
    for i in range(X.shape[0]):
        lo, hi = X.indptr[i], X.indptr[i + 1]
        idx, cnt = X.indices[lo:hi], np.rint(X.data[lo:hi]).astype(np.int64)
        pool = np.repeat(idx, cnt)
        pick = rng.choice(pool, min(target, len(pool)), replace=False)
        rows.append(np.bincount(pick, minlength=X.shape[1]))
    return sp.csr_matrix(np.vstack(rows).astype(np.float32))


def run_unassigned(items) -> list[dict]:
    import cellatlas

    a = dict(items)["human_pbmc_kang2018_muscat_subset"]
    X = sp.csr_matrix(a.X, dtype=np.float32)
    rng = np.random.default_rng(0)
    pick = rng.choice(X.shape[0], 200, replace=False)
    groups = [("as sent", X), ("all-zero", sp.csr_matrix((20, X.shape[1]), dtype=np.float32))]
    for target in (1, 5, 9, 10, 20, 50):
        groups.append((f"{target} counts", thin_to(X[pick], target, rng)))
    res = cellatlas.annotate(sp.vstack([g for _, g in groups], format="csr"), list(map(str, a.var_names)))
    out, start = [], 0
    for name, g in groups:
        sl = slice(start, start + g.shape[0])
        start += g.shape[0]
        lab = np.asarray(res.label[sl], dtype=object)
        out.append({"group": name, "cells": int(g.shape[0]), "unassigned": round(float((lab == "Unassigned").mean()), 4),
                    "mean_confidence": round(float(np.mean(res.confidence[sl])), 3),
                    "confident_band": round(float((res.band[sl] == "confident").mean()), 3),
                    "reasons": sorted(set(map(str, res.reason[sl])) - {""})})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default="genes,loo,timing,unassigned")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    items = datasets()
    result, md = {}, ["# Input checks (issue #12 parts 1-2)", "", "`python benchmarks/input_checks.py`", ""]
    if "genes" in sections:
        rows = run_genes(items)
        tab, stats = table(rows)
        result["genes"] = {"rows": rows, "stats": stats}
        md += ["## Gene-list check, packaged prior", "", tab, "", f"`{json.dumps(stats)}`", ""]
    if "loo" in sections:
        rows, _ = run_loo(items)
        tab, stats = table(rows)
        result["loo"] = {"rows": rows, "stats": stats}
        md += ["## Gene-list check, leave-one-source-out prior", "", tab, "", f"`{json.dumps(stats)}`", ""]
    if "timing" in sections:
        result["timing_ms"] = run_timing(items)
        md += ["## check_gene_list time (ms, median of 5)", "", *[f"- {k}: {v} ms" for k, v in result["timing_ms"].items()], ""]
    if "unassigned" in sections:
        result["unassigned"] = run_unassigned(items)
        md += ["## Unassigned rule (Kang PBMC + appended cells, built-in atlas)", "",
               "| group | cells | Unassigned | mean confidence | confident band | reasons |", "|---|---|---|---|---|---|"]
        md += [f"| {r['group']} | {r['cells']} | {r['unassigned']:.1%} | {r['mean_confidence']} | {r['confident_band']:.1%} | "
               f"{'; '.join(r['reasons'])} |" for r in result["unassigned"]]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "input_checks.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (args.out / "input_checks.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
