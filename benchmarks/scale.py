"""Scale benchmark: cells/s and peak memory from 10k to 10M cells, CellTypist beside, Dask, the physical floor.

    python benchmarks/scale.py [--sizes 10000,100000,1000000,10000000] [--tmp /tmp/cellatlas-scale]
                               [--celltypist-sizes 10000,100000] [--dask-cells 100000,1000000]
                               [--floor-cells 100000] [--out benchmarks/results/scale]

One command, one run, every measurement in a fresh process (``os.wait4`` gives each
process's own peak RSS):

* inputs: PBMC-like ``.h5ad`` files resampled from PBMC 3k (``scale_data.py``), written
  under ``--tmp`` block by block; the 10M file reuses the 1M file's arrays through HDF5
  virtual datasets (every row is still read from disk) so it needs ~0.2 GB, not 68 GB;
* ``cellatlas (in-process)``: ``annotate_file(path)`` (file -> labels), timed from the
  call (the package imported before), and ``cellatlas CLI``: ``cellatlas annotate
  in.h5ad -o out.h5ad``, the whole process (interpreter start, imports, writing);
* CellTypist 1.7 trained on the built-in atlas's reference (PBMC 3k, the same labels,
  feature-selected model), ``celltypist.annotate`` on the log1p-normalised file (read and
  normalisation included), at ``--celltypist-sizes`` (it holds the matrix in memory);
* Dask: ``annotate_file(path, scheduler=client)`` on a 2-worker LocalCluster (1 thread
  each; started, and ``cellatlas.stream`` imported on its workers, before the clock, as the
  in-process run imports it before its clock) against the in-process call, same file, calls compared,
  at each of ``--dask-cells`` (the workers' one-off setup weighs less as the input grows);
* the physical floor at ``--floor-cells`` (0: skipped): read the CSR from disk, one sparse projection onto the
  atlas's principal axes, one faiss k=15 search of the reference.

Results go to ``--out``.json / .md; the machine's load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scale_data  # noqa: E402

GB = 1024**3

# Every child prints its own peak RSS (VmHWM of the program after exec; the rusage of a forked
# child would also count the pages it shared with this process at fork time) and its CPU seconds
# (all its threads; on a loaded machine cells per CPU-second moves less than cells per second).
_PEAK = r"""
import atexit, json as _json, resource as _res
def _peak():
    u = _res.getrusage(_res.RUSAGE_SELF)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print(_json.dumps({"peak_rss_gb": round(int(line.split()[1]) / 2**20, 2),
                               "cpu_s": round(u.ru_utime + u.ru_stime, 2)}), flush=True)
atexit.register(_peak)
"""
_CLI = _PEAK + r"""
import sys
from cellatlas.cli import app
sys.argv = ["cellatlas", *sys.argv[1:]]
app()
"""

_INPROC = r"""
import json, sys, time
import cellatlas
from cellatlas.stream import annotate_file
t0, c0 = time.perf_counter(), time.process_time()
res = annotate_file(sys.argv[1], calls=sys.argv[2] if len(sys.argv) > 2 else None)
labels = res.calls["cell_type"]
print(json.dumps({"seconds": time.perf_counter() - t0, "call_cpu_s": time.process_time() - c0, "cells": len(labels),
                  "engine_setup_s": res.provenance["setup_seconds"]}))
"""

_DASK = r"""
import json, sys, time
import cellatlas
from cellatlas.stream import annotate_file
from distributed import Client, LocalCluster
if __name__ == "__main__":
    t = time.perf_counter()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        start = time.perf_counter() - t
        client.run(lambda: __import__("cellatlas.stream"))  # the workers import what the in-process run imports before its clock
        t0 = time.perf_counter()
        res = annotate_file(sys.argv[1], calls=sys.argv[2], scheduler=client)
        dt = time.perf_counter() - t0
        hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])  # noqa: E731
        workers = client.run(hwm)
    print(json.dumps({"seconds": dt, "cells": len(res), "cluster_start_s": start,
                      "worker_peak_rss_gb": round(max(workers.values()) / 2**20, 2)}))
"""

_CELLTYPIST = r"""
import json, sys, time
import celltypist, scanpy as sc
t0, c0 = time.perf_counter(), time.process_time()
a = sc.read_h5ad(sys.argv[1])
sc.pp.normalize_total(a, target_sum=1e4)
sc.pp.log1p(a)
pred = celltypist.annotate(a, model=sys.argv[2], majority_voting=False)
labels = pred.predicted_labels["predicted_labels"]
print(json.dumps({"seconds": time.perf_counter() - t0, "call_cpu_s": time.process_time() - c0, "cells": len(labels)}))
"""

_TRAIN = r"""
import sys, warnings, anndata as ad, scanpy as sc, celltypist
sys.path.insert(0, sys.argv[3])
import scale_data
from baselines import _celltypist_compat  # celltypist 1.7 vs scikit-learn >= 1.8
a = ad.read_h5ad(scale_data.PBMC3K)
sc.pp.normalize_total(a, target_sum=1e4)
sc.pp.log1p(a)
with warnings.catch_warnings(), _celltypist_compat():
    warnings.simplefilter("ignore")
    model = celltypist.train(a, labels="cell_type", feature_selection=True, n_jobs=2, check_expression=False, max_iter=1000)
model.write(sys.argv[1])
print(sys.argv[1])
"""

_FLOOR = r"""
import json, os, sys, time
import h5py, numpy as np, scipy.sparse as sp, faiss
from cellatlas.atlas import load_atlas
at = load_atlas("human-core")
state = at.encoder_state("default")
W = np.ascontiguousarray((np.asarray(state["components"], np.float32)).T)  # [panel, d]
ref = np.ascontiguousarray(at.embedding("default"), dtype=np.float32)
index = faiss.IndexFlatIP(ref.shape[1]); index.add(ref)
t0 = time.perf_counter()
with h5py.File(sys.argv[1], "r") as f:
    X = sp.csr_matrix((f["X/data"][:], f["X/indices"][:], f["X/indptr"][:]), shape=tuple(f["X"].attrs["shape"]))
    genes = [g.decode() for g in f["var/_index"][:]]
t1 = time.perf_counter()
pos = {g: i for i, g in enumerate(genes)}
keep = [i for i, g in enumerate(at.panel) if g in pos]
cols = np.array([pos[at.panel[i]] for i in keep])
emb = np.ascontiguousarray(X[:, cols] @ W[keep], dtype=np.float32)
t2 = time.perf_counter()
# faiss's own threading (one OpenMP thread per core) and one thread: the faster counts.
search = {}
for threads in sorted({os.cpu_count() or 1, 1}, reverse=True):
    faiss.omp_set_num_threads(threads)
    t = time.perf_counter()
    index.search(emb, 15)
    search[threads] = time.perf_counter() - t
t3 = t2 + min(search.values())
print(json.dumps({"read_s": t1 - t0, "projection_s": t2 - t1, "search_s": t3 - t2, "search_by_threads": search,
                  "seconds": t3 - t0, "cells": X.shape[0]}))
"""


def run(argv: list[str], env: dict | None = None, timeout: float = 3600) -> dict:
    """Run a fresh process; its wall time, exit status, and the JSON lines it printed (its result, its peak RSS)."""
    load_1min = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    deadline = t0 + timeout
    while True:
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, _ = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    rec = {"wall_s": round(wall, 2), "ok": os.waitstatus_to_exitcode(status) == 0, "load_before": load_1min}
    for line in out.strip().splitlines():
        if line.startswith("{"):
            rec.update(json.loads(line))
    if not rec["ok"]:
        rec["error"] = (err.strip().splitlines() or ["killed"])[-1][:300]
    return rec


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000,10000000")
    ap.add_argument("--celltypist-sizes", default="10000,100000")
    ap.add_argument("--dask-cells", default="100000,1000000", help="sizes for the Dask comparison ('' to skip)")
    ap.add_argument("--floor-cells", type=int, default=100_000, help="size for the physical floor (0 to skip)")
    ap.add_argument("--floor-pairs", type=int, default=2, help="floor + in-process runs back to back, this many times")
    ap.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()) / "cellatlas-scale")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scale")
    ap.add_argument("--keep", action="store_true", help="keep the generated inputs (default: delete at the end)")
    args = ap.parse_args()
    if not scale_data.PBMC3K.exists():
        sys.exit(f"PBMC 3k not found at {scale_data.PBMC3K} (set CELLATLAS_SHARED_DATA)")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    ct_sizes = {int(s) for s in args.celltypist_sizes.split(",") if s}
    dask_sizes = [int(s) for s in args.dask_cells.split(",") if s]
    args.tmp.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    home = args.tmp / "home"  # one CELLATLAS_HOME for every run: gene mappings stored by the first
    env = dict(os.environ, CELLATLAS_HOME=str(home))
    res: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                             "load_before": load()}, "runs": {}, "notes": []}

    def note(msg: str) -> None:
        print(msg, flush=True)
        res["notes"].append(msg)

    paths: dict[int, Path] = {}
    base = None
    for n in sorted((set(sizes) | set(dask_sizes) | {args.floor_cells}) - {0}):
        free = shutil.disk_usage(args.tmp).free
        virtual = n >= 10_000_000 and base is not None
        need = (0.5 if virtual else 7.0 * n / 1e6 + 2) * GB
        if free < need:
            note(f"{n:,} cells: not generated, {free / GB:.0f} GB free under {args.tmp} and {need / GB:.0f} GB needed")
            continue
        t = time.perf_counter()
        paths[n] = scale_data.dataset(args.tmp, n, base=base if virtual else None)
        note(f"input {n:,} cells: {paths[n]} ({paths[n].stat().st_size / GB:.2f} GB{', virtual over the 1M file' if virtual else ''}; "
             f"{time.perf_counter() - t:.0f} s)")
        if n == 1_000_000:
            base = paths[n]
    # Gene mapping is stored per gene list in CELLATLAS_HOME: a first run fills it (as a user's first run would).
    fresh = not (home / "cache" / "genes").exists()
    warm = run([py, "-c", _INPROC, str(paths[min(paths)])], env=env)
    note(f"warm-up run{' on a fresh CELLATLAS_HOME (fills the gene-mapping store)' if fresh else ''}: "
         f"{warm.get('seconds', float('nan')):.2f} s at {min(paths):,} cells; the runs below find the gene mapping stored")
    model = args.tmp / "celltypist_pbmc3k.pkl"
    if ct_sizes and not model.exists():
        t = time.perf_counter()
        r = run([py, "-c", _TRAIN, str(model), "", str(HERE)], env=env)
        note(f"CellTypist trained on PBMC 3k (feature selection): {time.perf_counter() - t:.0f} s{'' if r['ok'] else ' FAILED: ' + r.get('error', '')}")

    for n in sizes:
        if n not in paths:
            continue
        p = paths[n]
        row = res["runs"].setdefault(str(n), {})
        row["inprocess"] = run([py, "-c", _PEAK + _INPROC, str(p)], env=env)
        out = args.tmp / f"out_{n}.h5ad"
        row["cli"] = run([py, "-c", _CLI, "annotate", str(p), "-o", str(out)], env=env)
        row["cli"]["output_gb"] = round(out.stat().st_size / GB, 3) if out.exists() else None
        out.unlink(missing_ok=True)
        if n in ct_sizes and model.exists():
            row["celltypist"] = run([py, "-c", _PEAK + _CELLTYPIST, str(p), str(model)], env=env)
        print(n, json.dumps(row), flush=True)
    for n in dask_sizes:
        if n not in paths:
            continue
        a, b = args.tmp / "calls_inproc.parquet", args.tmp / "calls_dask.parquet"
        inproc = run([py, "-c", _PEAK + _INPROC, str(paths[n]), str(a)], env=env)
        dask = run([py, "-c", _PEAK + _DASK, str(paths[n]), str(b)], env=env)
        import pandas as pd

        same = bool(a.exists() and b.exists() and (pd.read_parquet(a)["cell_type"].to_numpy() == pd.read_parquet(b)["cell_type"].to_numpy()).all())
        res.setdefault("dask", []).append({"cells": n, "inprocess": inproc, "dask_2_workers": dask, "identical_calls": same})
        print("dask", json.dumps(res["dask"][-1]), flush=True)
    if args.floor_cells in paths:
        # Floor and in-process call back to back, twice: the same load for both halves of each ratio.
        res["floor_pairs"] = []
        for _ in range(args.floor_pairs):
            floor = run([py, "-c", _PEAK + _FLOOR, str(paths[args.floor_cells])], env=env)
            ip = run([py, "-c", _PEAK + _INPROC, str(paths[args.floor_cells])], env=env)
            res["floor_pairs"].append({"cells": args.floor_cells, "floor": floor, "inprocess": ip})
            print("floor", json.dumps(floor), "inprocess", json.dumps(ip), flush=True)
    res["machine"]["load_after"] = load()
    if not args.keep:
        for p in paths.values():
            p.unlink(missing_ok=True)
    write(res, args.out)


def _cps(rec: dict | None, key: str = "seconds") -> str:
    if not rec:
        return "-"
    if not rec.get("ok"):
        return f"failed ({rec.get('error', '')[:60]})"
    return f"{rec['cells'] / rec[key]:,.0f}" if "cells" in rec and rec.get(key) else "-"


def _gb(rec: dict | None) -> str:
    return f"{rec['peak_rss_gb']:.2f} GB" if rec and "peak_rss_gb" in rec else "-"


def write(res: dict, out: Path) -> None:
    """``out``.json with every number, ``out``.md with the tables."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    m = res["machine"]
    lines = [f"# Scale benchmark ({m['cpus']} CPUs; load average before {m['load_before']}, after {m.get('load_after')})", "",
             "load = 1-minute load average when each run (in-process / CLI / CellTypist) started. cells/s = cells / wall seconds of the call (in-process, CellTypist: file -> labels, package imported first) or of "
             "the whole process (CLI: file -> annotated file); per CPU-s = cells / CPU seconds of that call (all threads; whole "
             "process for the CLI), which a loaded machine changes less.", "",
             "| cells | load | in-process cells/s | per CPU-s | peak RSS | CLI cells/s | CLI peak RSS | CellTypist cells/s | per CPU-s "
             "| peak RSS | CellTypist time / cellatlas time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, row in res["runs"].items():
        ip, cli, ct = row.get("inprocess"), row.get("cli"), row.get("celltypist")
        cli_cps = f"{int(n) / cli['wall_s']:,.0f}" if cli and cli.get("ok") else _cps(cli)
        ratio = f"{ct['seconds'] / ip['seconds']:.2f}x" if ip and ct and ip.get("ok") and ct.get("ok") else "-"
        loads = "/".join(str(r.get("load_before", "-")) for r in (ip, cli, ct) if r)
        lines.append(f"| {int(n):,} | {loads} | {_cps(ip)} | {_cps(ip, 'call_cpu_s')} | {_gb(ip)} | {cli_cps} | {_gb(cli)} | "
                     f"{_cps(ct)} | {_cps(ct, 'call_cpu_s')} | {_gb(ct)} | {ratio} |")
    for d in res.get("dask", []):
        dk, ip = d["dask_2_workers"], d["inprocess"]
        ratio = f"{dk['seconds'] / ip['seconds']:.2f}x the in-process time" if dk.get("ok") and ip.get("ok") else ""
        lines += ["", f"Dask ({d['cells']:,} cells, 2-worker LocalCluster, 1 thread each): {_cps(dk)} cells/s, {ratio} "
                  f"(in-process {_cps(ip)} cells/s; cluster start {dk.get('cluster_start_s', float('nan')):.1f} s not counted; "
                  f"client peak RSS {_gb(dk)}, worker peak RSS {dk.get('worker_peak_rss_gb', '-')} GB); "
                  f"identical calls: {d['identical_calls']}"]
    for p in res.get("floor_pairs", []):
        f, ip = p["floor"], p["inprocess"]
        ratio = f" = {ip['seconds'] / f['seconds']:.2f}x the floor" if ip.get("ok") and f.get("ok") else ""
        lines += ["", f"Physical floor at {p['cells']:,} cells (load {f.get('load_before')}): read {f.get('read_s', 0):.2f} s + "
                  f"projection {f.get('projection_s', 0):.2f} s + search {f.get('search_s', 0):.2f} s = {f.get('seconds', 0):.2f} s; "
                  f"file -> labels in-process right after (load {ip.get('load_before')}) "
                  f"{ip['seconds'] if ip.get('ok') else float('nan'):.2f} s{ratio}"]
    lines += ["", *[f"- {n}" for n in res["notes"]]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
