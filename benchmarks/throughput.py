"""In-process throughput of the default path (issue #2: >= 20,000 cells/s on 2 cores).

    python benchmarks/throughput.py [--sizes 20000,100000] [--repeats 3] [--out benchmarks/results]

PBMC-like data: PBMC3k cells (real UMI count profiles, ../shared/data) drawn with
replacement (seeded) and binomially thinned to 90% of their counts, so no two rows
are identical. Each size runs in a fresh worker process so its peak RSS is its own:

* cold: ``load_atlas("human-core")`` and the first ``annotate`` (runtime setup +
  scoring), reported as setup seconds and total seconds;
* warm: ``cellatlas.annotate(X, genes)`` again ``--repeats`` times on the built-in
  atlas (runtime cached): median seconds, cells/s, and per-cell microseconds;
* stages: one more warm run, in one thread (``CELLATLAS_THREADS=1``), with timers
  wrapped around the engine's functions (exclusive time: validation and value detection,
  gene-list check, column selection, QC facts, embed, kNN search, kNN vote, marker
  evidence, fusion model, calls + confidence, per-cell details, other), nothing in
  ``src/`` edited;
* peak RSS of the worker (``ru_maxrss``) and its RSS before the matrix was made.

Writes ``throughput.json`` and ``throughput.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLATLAS_SHARED_DATA") or REPO.parent / "shared" / "data")
PBMC3K = SHARED / "datasets" / "human_pbmc3k_10xv1_seurat_labels.h5ad"
TARGET = 20_000
THIN = 0.9
SEED = 0


def pbmc_like(n_cells: int, seed: int = SEED):
    """``n_cells`` PBMC3k cells drawn with replacement, binomially thinned: (CSR counts, genes)."""
    import anndata as ad

    a = ad.read_h5ad(PBMC3K)
    rng = np.random.default_rng(seed)
    X = a.X.tocsr()[rng.integers(0, a.n_obs, n_cells)]
    X.data = rng.binomial(np.rint(X.data).astype(np.int64), THIN).astype(np.float32)
    X.eliminate_zeros()
    return X, [str(g) for g in a.var_names]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------- stage timers
class StageTimer:
    """Exclusive wall time per stage of wrapped functions (nested calls are not double counted)."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self._stack: list[list[float]] = []

    def wrap(self, fn, stage: str):
        def timed(*args, **kwargs):
            self._stack.append([0.0])
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                child = self._stack.pop()[0]
                self.totals[stage] = self.totals.get(stage, 0.0) + dt - child
                if self._stack:
                    self._stack[-1][0] += dt

        return timed


def _targets(rt) -> list[tuple[object, str, str]]:
    """(owner, attribute, stage) of every engine function timed; a name that no longer exists fails loudly."""
    import cellatlas.calls as calls
    import cellatlas.fusion as fusion
    import cellatlas.io as cio
    import cellatlas.query as query
    import cellatlas.runtime as runtime
    from cellatlas.neighbours import DepthMatchedIndex
    from cellatlas.result import AnnotationResult
    from cellatlas.sparse import ColumnPlan

    ann = sys.modules["cellatlas.annotate"]  # the attribute ``cellatlas.annotate`` is the function

    t = [(ann, "prepare_query", "prepare_query (other)"), (cio, "validate_matrix", "validate + values"),
         (cio, "detect_values", "validate + values"), (cio, "to_counts_like", "validate + values"),
         (query, "run_gene_check", "gene-list check"), (ann, "get_runtime", "runtime lookup"),
         (ColumnPlan, "apply", "column selection"), (query, "cell_qc", "QC facts"), (ann, "unassigned_reasons", "QC facts"),
         (type(rt.encoder), "embed", "embed"), (type(rt.index), "search", "kNN search"),
         (DepthMatchedIndex, "search", "kNN search"), (DepthMatchedIndex, "level", "depth levels (first use)"),
         (fusion, "knn_vote", "kNN vote"), (fusion, "ood_z", "kNN vote"),
         (runtime, "rank_scores", "marker evidence"), (runtime, "score_markers", "marker evidence"),
         (runtime, "marker_null_z", "marker evidence"),
         (fusion, "design", "fusion model"), (fusion, "softmax", "fusion model"),
         (fusion.FusionModel, "marker_probabilities", "fusion model"), (calls, "decide", "calls + confidence"),
         (type(rt), "alternates", "per-cell details"), (type(rt), "expressed_markers", "per-cell details"),
         (type(rt), "layout", "per-cell details"), (AnnotationResult, "concat", "per-cell details")]
    missing = [f"{getattr(o, '__name__', o)}.{a}" for o, a, _ in t if not hasattr(o, a)]
    if missing:
        raise SystemExit(f"throughput.py times engine functions that no longer exist: {', '.join(missing)}; update _targets")
    return t


@contextmanager
def timed_stages(rt, timer: StageTimer):
    saved = []
    for owner, attr, stage in _targets(rt):
        orig = owner.__dict__[attr] if isinstance(owner, type) and attr in owner.__dict__ else getattr(owner, attr)
        saved.append((owner, attr, orig))
        setattr(owner, attr, timer.wrap(getattr(owner, attr), stage))
    try:
        yield
    finally:
        for owner, attr, orig in reversed(saved):
            setattr(owner, attr, orig)


# ---------------------------------------------------------------------- worker
def worker(n_cells: int, repeats: int) -> dict:
    """Everything measured for one size, in this (fresh) process."""
    import warnings

    warnings.filterwarnings("ignore")
    import cellatlas
    from cellatlas.annotate import get_runtime
    from cellatlas.atlas import load_atlas
    from cellatlas.config import get_settings

    rss0 = _rss_mb()
    X, genes = pbmc_like(n_cells)
    depth = np.asarray(X.sum(axis=1)).ravel()
    t0 = time.perf_counter()
    atlas = load_atlas("human-core")
    t_load = time.perf_counter() - t0
    res = cellatlas.annotate(X, genes, atlas=atlas)
    cold = time.perf_counter() - t0
    setup = t_load + float(res.provenance.get("setup_seconds", 0.0))
    times = []
    for _ in range(repeats):
        t1 = time.perf_counter()
        res = cellatlas.annotate(X, genes, atlas=atlas)
        times.append(time.perf_counter() - t1)
    warm = float(np.median(times))
    threads = get_settings().resolved_threads
    rt = get_runtime(atlas, "default", _query_genes(X, genes))
    # Stage timers keep one call stack: time the stages in one thread.
    os.environ["CELLATLAS_THREADS"] = "1"
    get_settings.cache_clear()
    timer = StageTimer()
    with timed_stages(rt, timer):
        t2 = time.perf_counter()
        cellatlas.annotate(X, genes, atlas=atlas)
        staged = time.perf_counter() - t2
    stages = {k: round(v, 4) for k, v in sorted(timer.totals.items(), key=lambda kv: -kv[1])}
    stages["other"] = round(staged - sum(timer.totals.values()), 4)
    return {
        "n_cells": n_cells,
        "median_counts_per_cell": float(np.median(depth)),
        "median_genes_per_cell": float(np.median(np.diff(X.indptr))),
        "chunk_size": get_settings().chunk_size,
        "threads": threads,
        "atlas_load_s": round(t_load, 3),
        "cold_total_s": round(cold, 3),
        "cold_setup_s": round(setup, 3),
        "warm_s": [round(t, 3) for t in times],
        "warm_median_s": round(warm, 3),
        "warm_setup_s": float(res.provenance.get("setup_seconds", 0.0)),
        "cells_per_s": round(n_cells / warm),
        "us_per_cell": round(1e6 * warm / n_cells, 2),
        "stages_s": stages,
        "stages_run_s": round(staged, 3),
        "rss_before_data_mb": round(rss0, 1),
        "peak_rss_mb": round(_rss_mb(), 1),
        "labels": {k: int(v) for k, v in zip(*np.unique(res.label, return_counts=True))},
    }


def _query_genes(X, genes) -> list[str]:
    from cellatlas.query import prepare_query

    return prepare_query(X[:1], genes).genes


# ---------------------------------------------------------------------- report
def markdown(out: dict) -> str:
    rows = out["runs"]
    lines = ["# cellatlas in-process throughput (default model, human-core atlas)", "",
             f"{out['machine']['cpus']} CPUs, Python {out['machine']['python']}, load average before/after "
             f"{out['load_before']} / {out['load_after']}; PBMC3k cells resampled and thinned to {THIN:.0%}; "
             f"warm runs on {rows[0].get('threads', 1)} engine thread(s).", "",
             "| cells | counts/cell | cold total s | setup s | warm s (median) | cells/s | µs/cell | peak RSS MB | "
             f">= {TARGET:,} cells/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n_cells']:,} | {r['median_counts_per_cell']:.0f} | {r['cold_total_s']:.2f} | {r['cold_setup_s']:.2f} | "
                     f"{r['warm_median_s']:.2f} | {r['cells_per_s']:,} | {r['us_per_cell']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{'PASS' if r['cells_per_s'] >= TARGET else '**FAIL**'} |")
    stages = sorted({s for r in rows for s in r["stages_s"]}, key=lambda s: -max(r["stages_s"].get(s, 0) for r in rows))
    lines += ["", "Stage times of one more warm run in one thread (exclusive seconds, share of that run):", "",
              "| stage | " + " | ".join(f"{r['n_cells']:,} cells" for r in rows) + " |",
              "|---|" + "---|" * len(rows)]
    for s in stages:
        cells = [f"{r['stages_s'].get(s, 0):.3f} ({r['stages_s'].get(s, 0) / r['stages_run_s']:.0%})" for r in rows]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20000,100000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats)))
        return {}
    if not PBMC3K.exists():
        sys.exit(f"PBMC3k not found at {PBMC3K} (set CELLATLAS_SHARED_DATA)")
    out = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
           "load_before": [round(x, 2) for x in os.getloadavg()], "thin": THIN, "seed": SEED, "runs": []}
    for n in [int(s) for s in args.sizes.split(",")]:
        print(f"[{time.strftime('%H:%M:%S')}] {n:,} cells ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", str(n), "--repeats", str(args.repeats)],
                              capture_output=True, text=True, check=True)
        out["runs"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out["load_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    md = markdown(out)
    (args.out / "throughput.json").write_text(json.dumps(out, indent=1))
    (args.out / "throughput.md").write_text(md)
    print(md)
    return out


if __name__ == "__main__":
    main()
