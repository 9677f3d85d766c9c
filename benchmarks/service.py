"""Benchmark of the HTTP service on loopback (one command, one run).

    python benchmarks/service.py [--cells 10000] [--repeats 5] [--large 200000] [--out results.json]

Starts ``cellatlas serve`` (1 worker, SQLite ledger in a temporary home) on
127.0.0.1, builds a PBMC-like query by resampling the PBMC 3k cells of
../shared/data (raw counts, ~850 genes detected per cell, 13,714 genes), then
reports for one request of ``--cells`` cells:

* binary body (``Client.annotate``: npz + zstd, end to end including client
  encoding and response decoding): p50 / p90 latency and cells/s;
* JSON body (the articles' payload, built with ``.tolist()`` beforehand): ``json`` posts
  it pre-serialised (the server's JSON path), ``json_seed`` exactly as the articles do
  (``requests.post(json=payload)``, stdlib serialisation included): p50 / p90, cells/s, the
  server's steps (Server-Timing) and the client's own ``json.dumps`` time;

the in-process engine alone (``cellatlas.annotate``, the floor under both), and
``Client.annotate_large`` on ``--large`` cells in a fresh client process
(wall time, cells/s, the client's peak RSS and its peak above the matrix it holds).
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

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLATLAS_SHARED_DATA") or REPO.parent / "shared" / "data")
PBMC3K = SHARED / "datasets" / "human_pbmc3k_10xv1_seurat_labels.h5ad"
SECRET = "service-benchmark-secret"
"""API-key hashing secret shared by the server and this script's ledger (the keys it creates)."""


def pbmc_like(n_cells: int, seed: int = 0):
    """``n_cells`` PBMC 3k cells resampled with replacement: (CSR counts, genes)."""
    import anndata as ad

    a = ad.read_h5ad(PBMC3K)
    X = a.X.tocsr()
    idx = np.random.default_rng(seed).integers(0, X.shape[0], n_cells)
    return X[idx], [str(g) for g in a.var_names]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, port: int) -> subprocess.Popen:
    """``cellatlas serve`` in a subprocess; returns once /healthz answers."""
    import httpx

    env = dict(os.environ, CELLATLAS_HOME=str(home), CELLATLAS_REQUIRE_API_KEY="true", CELLATLAS_API_KEY_SECRET=SECRET)
    env.pop("CELLATLAS_DATABASE_URL", None)
    code = "import typer; from cellatlas.service.commands import serve; typer.run(serve)"
    proc = subprocess.Popen([sys.executable, "-c", code, "--port", str(port), "--log-level", "warning"], env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def machine_speed() -> float:
    """Seconds for a pure-Python loop of 10^7 additions (about 0.15-0.3 s on an idle modern core):
    a yardstick for how loaded the machine was during the run."""
    t0 = time.perf_counter()
    sum(range(10**7))
    return round(time.perf_counter() - t0, 3)


def _stats(times: list[float], n_cells: int) -> dict:
    t = np.asarray(times)
    return {
        "p50_s": round(float(np.percentile(t, 50)), 3),
        "p90_s": round(float(np.percentile(t, 90)), 3),
        "mean_s": round(float(t.mean()), 3),
        "cells_per_s": round(n_cells / float(np.percentile(t, 50))),
        "runs": len(times),
    }


def _server_steps(header: str) -> dict[str, float]:
    """Seconds per step from a ``Server-Timing`` header (``read;dur=12.3, parse;dur=...``)."""
    return {k: float(v) / 1000 for k, v in (p.split(";dur=") for p in header.split(", "))}


def _median_steps(steps: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(float(np.median([s[k] for s in steps])), 3) for k in steps[0]}


def bench_request(url: str, key: str, X, genes, repeats: int) -> dict:
    """p50 latency and throughput of one request, binary (client) and JSON (seed code)."""
    import orjson
    import requests

    from cellatlas.client import Client

    import cellatlas

    cellatlas.annotate(X[:500], genes)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        cellatlas.annotate(X, genes)
        times.append(time.perf_counter() - t0)
    out = {"engine_in_process": _stats(times, X.shape[0])}  # the floor: no HTTP, no serialisation
    with Client(url, key, progress=False) as c:
        c.annotate(X[:500], genes)  # warm: atlas load, runtime cache, connection
        times, calls, steps = [], None, []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = c.annotate(X, genes)
            times.append(time.perf_counter() - t0)
            calls = calls if calls is not None else list(res.label)
            steps.append(_server_steps(c.last_server_timing))
        out["binary"] = _stats(times, X.shape[0])
        # Median seconds per server step (Server-Timing); the rest is the client (encode, decode) and the wire.
        server = _median_steps(steps)
        server["client_and_wire"] = round(out["binary"]["p50_s"] - sum(server.values()), 3)
        out["binary"]["server_steps_s"] = server
    payload = {
        "genes": list(genes),
        "matrix": {"indptr": X.indptr.tolist(), "indices": X.indices.tolist(), "data": X.data.tolist(), "shape": list(X.shape)},
        "model": "default",
        "reference_atlas": "human-core-2026",
    }
    headers = {"Authorization": f"Bearer {key}"}
    body = orjson.dumps(payload)
    for mode in ("json", "json_seed"):
        times, steps = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            if mode == "json":  # the JSON body path of the server: body already serialised
                r = requests.post(f"{url}/v1/singlecell/annotate", data=body, headers={**headers, "Content-Type": "application/json"}, timeout=300)
            else:  # exactly the articles' call: requests serialises the payload with the stdlib json module
                r = requests.post(f"{url}/v1/singlecell/annotate", json=payload, headers=headers, timeout=300)
            r.raise_for_status()
            labels = [c["label"] for c in r.json()["calls"]]
            times.append(time.perf_counter() - t0)
            steps.append(_server_steps(r.headers["Server-Timing"]))
        assert labels == calls, "JSON and binary paths disagree"
        out[mode] = {**_stats(times, X.shape[0]), "server_steps_s": _median_steps(steps)}
    out["json"]["body_mb"] = round(len(body) / 1e6, 1)
    encode = []
    for _ in range(repeats):  # the seed client's own share: requests runs json.dumps(payload) before sending
        t0 = time.perf_counter()
        json.dumps(payload, allow_nan=False).encode("utf-8")
        encode.append(time.perf_counter() - t0)
    out["json_seed"]["client_encode_s"] = round(float(np.median(encode)), 3)
    return out


_LARGE = r"""
import json, resource, sys, time
sys.path.insert(0, {bench_dir!r})
from service import pbmc_like
from cellatlas.client import DEFAULT_CHUNK, Client

def rss_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024

X, genes = pbmc_like({n}, seed=1)
base = rss_mb("VmRSS:")
with Client({url!r}, {key!r}, progress=False) as c:
    t0 = time.perf_counter()
    res = c.annotate_large(X, genes)
    dt = time.perf_counter() - t0
assert len(res) == {n} and list(res.cell_ids[:3]) == ["0", "1", "2"]
peak = rss_mb("VmHWM:")
print(json.dumps({{"cells": {n}, "seconds": round(dt, 2), "cells_per_s": round({n} / dt),
    "requests": -(-{n} // min(DEFAULT_CHUNK, c.limits()["max_cells_per_request"])),
    "matrix_mb": round((X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) / 1e6),
    "rss_before_mb": round(base), "peak_rss_mb": round(peak), "peak_above_matrix_mb": round(peak - base)}}))
"""


def bench_large(url: str, key: str, n: int) -> dict:
    """annotate_large on ``n`` cells in a fresh process, with its memory high-water mark."""
    code = _LARGE.format(bench_dir=str(Path(__file__).parent), n=n, url=url, key=key)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--large", type=int, default=200_000, help="cells for annotate_large (0 = skip)")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    if not PBMC3K.exists():
        sys.exit(f"PBMC 3k not found at {PBMC3K} (set CELLATLAS_SHARED_DATA)")

    from cellatlas.service.ledger import Ledger

    with tempfile.TemporaryDirectory() as home:
        port = _free_port()
        proc = start_server(Path(home), port)
        try:
            led = Ledger(f"sqlite:///{Path(home) / 'cellatlas.db'}", secret=SECRET)
            key, _ = led.create_key("benchmark", credits=10**9)
            url = f"http://127.0.0.1:{port}"
            X, genes = pbmc_like(args.cells)
            speed = machine_speed()
            results = {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                            "python_loop_1e7_s": speed},
                "query": {"cells": args.cells, "genes": len(genes), "nnz_per_cell": round(X.nnz / X.shape[0])},
                **bench_request(url, key, X, genes, args.repeats),
            }
            if args.large:
                results["annotate_large"] = bench_large(url, key, args.large)
            results["machine"]["python_loop_1e7_s_after"] = machine_speed()
        finally:
            proc.terminate()
            proc.wait(30)
    print(json.dumps(results, indent=2))
    b, j, js = results["binary"], results["json"], results["json_seed"]
    print(f"\n{args.cells:,} cells: engine alone p50 {results['engine_in_process']['p50_s']} s; binary p50 {b['p50_s']} s ({b['cells_per_s']:,} cells/s); JSON p50 {j['p50_s']} s "
          f"({j['cells_per_s']:,} cells/s); JSON as the articles send it p50 {js['p50_s']} s")
    print("binary request, median seconds per step: " + ", ".join(f"{k} {v}" for k, v in b["server_steps_s"].items()))
    print(f"JSON as the articles send it: the client's own json.dumps {js['client_encode_s']} s; server steps "
          + ", ".join(f"{k} {v}" for k, v in js["server_steps_s"].items()))
    if args.large:
        L = results["annotate_large"]
        print(f"annotate_large {L['cells']:,} cells: {L['seconds']} s ({L['cells_per_s']:,} cells/s), client peak RSS {L['peak_rss_mb']} MB "
              f"({L['peak_above_matrix_mb']} MB above the {L['matrix_mb']} MB matrix)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
