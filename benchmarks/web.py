"""Workspace latency: upload a 10,000-cell dataset and time until the results JSON is ready.

Everything goes through the HTTP routes the page uses, on loopback, against a real
``uvicorn`` server in its own process (``cellatlas.service.app:create_app``, local
mode): POST the file (upload + reading + dataset facts), POST run, poll the status,
GET the results JSON (points, label table, histogram, dot plot). As in a browser, the
page's config request comes first (it starts warming the engine) and the upload follows
``--settle`` seconds later; the first run is reported as ``cold``, the others as ``warm``.
After the results, the map of the user's cells (a UMAP computed in the background when the
upload has none) is polled until it is drawn: ``user_map_after_results_s``.

The dataset is real: PBMC3k counts from ``../shared/data`` (13,714 genes) resampled to
10,000 cells with new cell ids; without the shared data, the built-in atlas's reference
cells are resampled instead (fewer genes, said in the output).

    python benchmarks/web.py [--cells 10000] [--repeats 3] [--out benchmarks/results/web.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

HERE = Path(__file__).resolve().parent
PBMC3K = HERE.parents[1] / "shared" / "data" / "datasets" / "human_pbmc3k_10xv1_seurat_labels.h5ad"
TARGET_S = 5.0


def make_dataset(n_cells: int, path: Path) -> str:
    """Write an ``n_cells`` .h5ad of real counts to ``path``; returns a description of it."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    shared = Path(os.environ.get("CELLATLAS_SHARED_DATA", PBMC3K.parents[1])) / "datasets" / PBMC3K.name
    rng = np.random.default_rng(0)
    if shared.exists():
        src = ad.read_h5ad(shared)
        X, genes, what = sp.csr_matrix(src.X), list(src.var_names), f"PBMC3k counts ({src.n_obs} cells x {src.n_vars} genes)"
    else:
        from cellatlas.atlas import load_atlas

        at = load_atlas("human-core")
        X, genes, what = at.reference_counts(), at.ref_genes, "human-core reference cells (panel + marker genes only)"
    rows = rng.choice(X.shape[0], size=n_cells, replace=n_cells > X.shape[0])
    obs = pd.DataFrame(index=[f"cell{i:06d}" for i in range(n_cells)])
    ad.AnnData(X=sp.csr_matrix(X[rows]), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return f"{n_cells:,} cells resampled from {what}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    """``uvicorn --factory cellatlas.service.app:create_app`` on a free loopback port, local mode."""
    port = _free_port()
    env = dict(os.environ, CELLATLAS_HOME=str(home), CELLATLAS_REQUIRE_API_KEY="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "cellatlas.service.app:create_app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/workspace/api/config", timeout=2).ok:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


def one_run(url: str, path: Path) -> dict:
    """Upload -> run -> results through HTTP; seconds per stage."""
    api = f"{url}/workspace/api"
    t0 = time.perf_counter()
    with open(path, "rb") as fh:
        up = requests.post(f"{api}/sessions", params={"filename": path.name}, data=fh, timeout=300)
    up.raise_for_status()
    t_up = time.perf_counter()
    sid = up.json()["session"]
    requests.post(f"{api}/sessions/{sid}/run", json={"min_counts": 500, "max_mito_fraction": 0.1}, timeout=60).raise_for_status()
    while True:
        st = requests.get(f"{api}/sessions/{sid}/status", timeout=60).json()
        if st["state"] in ("done", "error"):
            break
        time.sleep(0.02)
    if st["state"] == "error":
        raise RuntimeError(st["error"])
    t_run = time.perf_counter()
    res = requests.get(f"{api}/sessions/{sid}/results", timeout=60)
    res.raise_for_status()
    body = res.json()
    t_res = time.perf_counter()
    um = body["user_map"]
    while um["state"] == "computing":  # the map of the user's cells follows in the background
        time.sleep(0.1)
        um = requests.get(f"{api}/sessions/{sid}/user-map", timeout=60).json()
    t_map = time.perf_counter()
    requests.delete(f"{api}/sessions/{sid}", timeout=60)
    return {
        "total_s": t_res - t0,
        "upload_and_facts_s": t_up - t0,
        "run_s": t_run - t_up,
        "results_json_s": t_res - t_run,
        "results_json_mb": len(res.content) / 1e6,
        "user_map_after_results_s": t_map - t_res,
        "user_map": um["state"],
        "engine": body["summary"]["timings"],
        "n_cells": body["n_cells"],
        "n_labels": len(body["labels"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds between opening the page and uploading")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "web.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / f"bench_{args.cells}.h5ad"
        what = make_dataset(args.cells, data)
        proc, url = start_server(Path(tmp) / "home")
        time.sleep(args.settle)  # the page is open (its config request warms the engine) before a file is chosen
        try:
            runs = [one_run(url, data) for _ in range(args.repeats)]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        size_mb = data.stat().st_size / 1e6
    print(f"dataset: {what}; file {size_mb:.1f} MB; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    print(f"{'run':<6}{'total s':>9}{'upload+facts':>14}{'annotate':>10}{'results':>9}{'JSON MB':>9}{'+ your-cells map s':>20}")
    for i, r in enumerate(runs):
        tag = "cold" if i == 0 else f"warm{i}"
        print(f"{tag:<6}{r['total_s']:>9.2f}{r['upload_and_facts_s']:>14.2f}{r['run_s']:>10.2f}{r['results_json_s']:>9.2f}"
              f"{r['results_json_mb']:>9.2f}{r['user_map_after_results_s']:>20.2f}")
    warm = [r["total_s"] for r in runs[1:]] or [runs[0]["total_s"]]
    verdict = "PASS" if np.median(warm) < TARGET_S else "FAIL"
    print(f"median warm total {np.median(warm):.2f} s (target < {TARGET_S:.0f} s): {verdict}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "web workspace: upload -> results JSON over HTTP (loopback, uvicorn, local mode)",
        "dataset": what, "file_mb": round(size_mb, 2), "cells": args.cells,
        "machine": {"cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2), "python": platform.python_version()},
        "settle_s": args.settle, "runs": runs, "median_warm_total_s": round(float(np.median(warm)), 3), "target_s": TARGET_S, "verdict": verdict,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
