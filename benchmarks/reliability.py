"""Reliability of the HTTP service under hostile input, load and crashes (one command, loopback).

    python benchmarks/reliability.py [--sections bombs,rates,load,kills,fuzz] [--clients 50]
                                     [--seconds 60] [--fuzz-scale 5] [--postgres-url URL] [--out DIR]

Starts ``uvicorn --factory cellatlas.service.app:create_app`` (one worker) on 127.0.0.1 in a
temporary home, as many times as the sections need, and stops by itself (about 15 min):

* **bombs**: each hostile body of issue #14 at full size, sent by a key that can pay and by a
  key with 0 credits; the server's peak RSS above idle (``/proc/PID/status`` sampled every
  2 ms plus ``VmHWM`` after resetting it), status and time.
* **rates**: the default rate limits: 300 bad keys, one key hammering, one IP hammering.
* **load**: ``--clients`` threads for ``--seconds`` mixing billed and free routes, on SQLite and
  on PostgreSQL: p50/p95/p99, statuses, and the ledger against what the clients saw.
* **kills**: 20 clients for 45 s on each database with 3 SIGKILLs of the server (restarted at
  once); ``PRAGMA integrity_check``, the ledger, leftover upload files.
* **fuzz**: the decoder property fuzz and schemathesis of ``tests/service`` at ``--fuzz-scale``
  times their CI example counts.

Writes ``reliability_service.json`` and ``.md`` to ``--out`` (``benchmarks/results``).
PostgreSQL comes from ``--postgres-url``, ``CELLATLAS_TEST_POSTGRES_URL`` or
``scripts/ci_postgres.sh`` (root + apt); without one its rows are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import bombs  # noqa: E402
from benchmarks.reliability_load import ledger_check, payloads, run_load, summarise  # noqa: E402

SECRET = "reliability-benchmark-secret"
MB = 1 << 20


# ------------------------------------------------------------------ server
class Server:
    """One ``uvicorn`` server process on a free loopback port, restartable on the same port and home."""

    def __init__(self, home: Path, db_url: str | None = None, **env: str) -> None:
        self.home, self.db_url = home, db_url or f"sqlite:///{home / 'cellatlas.db'}"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ, CELLATLAS_HOME=str(home), CELLATLAS_DATABASE_URL=self.db_url,
                        CELLATLAS_API_KEY_SECRET=SECRET, CELLATLAS_REQUIRE_API_KEY="true", **env)
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Start and wait for /healthz; returns the seconds it took."""
        import httpx

        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "cellatlas.service.app:create_app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "error"], env=self.env)
        while time.perf_counter() - t0 < 120:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def rss(self) -> tuple[int, int]:
        """``(VmRSS, VmHWM)`` in bytes."""
        vals = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                vals[k] = int(v.split()[0]) * 1024
        return vals["VmRSS"], vals["VmHWM"]

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def ledger(self):
        from cellatlas.service.ledger import Ledger

        return Ledger(self.db_url, secret=SECRET)


def make_keys(server: Server, n: int, credits: int) -> tuple[list[str], list[str]]:
    led = server.ledger()
    made = [led.create_key(f"bench-{i}", credits=credits) for i in range(n)]
    led.close()
    return [s for s, _ in made], [info.id for _, info in made]


def postgres_url(given: str | None) -> str | None:
    """A fresh schema on the given/configured/started PostgreSQL, or ``None``."""
    url = given or os.environ.get("CELLATLAS_TEST_POSTGRES_URL")
    if not url and os.geteuid() == 0:
        proc = subprocess.run(["bash", str(REPO / "scripts" / "ci_postgres.sh")], capture_output=True, text=True)
        url = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else None
    if not url:
        return None
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    schema = "bench_" + uuid.uuid4().hex[:10]
    with psycopg.connect(host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database, autocommit=True) as c:
        c.execute(f'CREATE SCHEMA "{schema}"')
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


# ------------------------------------------------------------------ bombs
def _measure(server: Server, send) -> dict:
    """Status, seconds and peak RSS above idle of one request."""
    idle, _ = server.rss()
    server.reset_peak()
    peak = [idle]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], server.rss()[0])
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    r = send()
    secs = time.perf_counter() - t0
    done.set()
    t.join()
    peak_rss = max(peak[0], server.rss()[1])
    err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
    return {"status": r.status_code, "code": err.get("code"), "field": err.get("field"), "seconds": round(secs, 3),
            "idle_mb": round(idle / MB), "peak_above_idle_mb": round((peak_rss - idle) / MB, 1)}


def section_bombs(home: Path, X, genes) -> dict:
    import httpx

    made = {
        "gzip JSON, 10 GB of zeros": bombs.gzip_bomb(10 * 1024 * MB),
        "zstd npz, 2.7 GB of zeros": bombs.zstd_bomb(2700 * MB),
        "npz zip member, 2.5 GB declared + deflated": bombs.npz_zip_bomb(2500 * MB),
        "npz header declaring 1e12 float64": bombs.npz_header_bomb(),
        "h5ad fill value, 100,000 x 6,700 float32 (2.7 GB)": bombs.h5ad_fill_bomb(),
        "h5ad external link to /etc/passwd": bombs.h5ad_reaching_out("external_link"),
        "h5ad external storage of /etc/passwd": bombs.h5ad_reaching_out("external_storage"),
    }
    server = Server(home)
    server.start()
    try:
        (payer,), _ = make_keys(server, 1, 10**6)
        (broke,), _ = make_keys(server, 1, 0)
        warm = payloads(X, genes, variants=1)
        with httpx.Client(base_url=server.url, timeout=600) as http:
            for kind in ("annotate_json", "annotate_npz"):  # load the engine, atlas and parsers first
                body, headers = warm[kind][0]
                http.post("/v1/singlecell/annotate", content=body, headers={**headers, "Authorization": f"Bearer {payer}"})
            _h5ad_warm(http, payer, X, genes)
            rows = []
            for kind, label in (("annotate_json", "JSON"), ("annotate_npz", "npz")):  # what an honest request costs
                body, headers = payloads(X[:10_000], genes, variants=1, n_cells=10_000)[kind][0]
                m = _measure(server, lambda: http.post("/v1/singlecell/annotate", content=body, headers={**headers, "Authorization": f"Bearer {payer}"}))
                rows.append({"bomb": f"(not a bomb) 10,000 real cells, {label}", "body_mb": round(len(body) / MB, 2), "key": "can pay", **m})
                print(f"  {rows[-1]['bomb']:<52} {'can pay':<9} {m['status']} {m['peak_above_idle_mb']:>7.1f} MB  {m['seconds']:.2f} s")
            for name, (body, headers) in made.items():
                for who, key in (("can pay", payer), ("0 credits", broke)):
                    m = _measure(server, lambda: http.post("/v1/singlecell/annotate", content=body,
                                                           headers={**headers, "Authorization": f"Bearer {key}"}))
                    rows.append({"bomb": name, "body_mb": round(len(body) / MB, 2), "key": who, **m})
                    print(f"  {name:<52} {who:<9} {m['status']} {m['code'] or '':<20} {m['peak_above_idle_mb']:>7.1f} MB  {m['seconds']:.2f} s")
    finally:
        server.stop()
    hostile = [r for r in rows if not r["bomb"].startswith("(not a bomb)")]
    return {"rows": rows, "max_peak_above_idle_mb": max(r["peak_above_idle_mb"] for r in hostile),
            "all_refused": all(400 <= r["status"] < 500 for r in hostile),
            "zero_credit_all_402": all(r["status"] == 402 for r in hostile if r["key"] == "0 credits")}


def _h5ad_warm(http, key, X, genes) -> None:
    import anndata as ad
    import pandas as pd

    a = ad.AnnData(X=X[:50], var=pd.DataFrame(index=genes))
    with tempfile.NamedTemporaryFile(suffix=".h5ad") as fh:
        a.write_h5ad(fh.name)
        http.post("/v1/singlecell/annotate", content=Path(fh.name).read_bytes(),
                  headers={"Content-Type": "application/x-h5ad", "Authorization": f"Bearer {key}"})


# ------------------------------------------------------------------ rates
def section_rates(home: Path) -> dict:
    import httpx

    from cellatlas.config import Settings

    s = Settings()
    out = {"defaults": {"ip": [s.rate_limit_ip_per_s, s.rate_limit_ip_burst], "key": [s.rate_limit_key_per_s, s.rate_limit_key_burst],
                        "auth_failures": [s.rate_limit_auth_failures_per_s, s.rate_limit_auth_failures_burst]}}
    for scenario in ("bad_keys", "one_key", "one_ip"):
        server = Server(home / scenario)
        server.start()
        try:
            (key,), _ = make_keys(server, 1, 1000)
            with httpx.Client(base_url=server.url, timeout=30) as http:
                t0 = time.perf_counter()
                if scenario == "bad_keys":
                    codes = [_code(http.get("/v1/usage", headers={"Authorization": f"Bearer sk-ca-guess{i}"})) for i in range(300)]
                    after = http.get("/v1/usage", headers={"Authorization": f"Bearer {key}"})
                    extra = {"valid_key_right_after": _code(after), "retry_after_s": after.headers.get("retry-after")}
                elif scenario == "one_key":
                    codes = [_code(http.get("/v1/usage", headers={"Authorization": f"Bearer {key}"})) for i in range(200)]
                    extra = {}
                else:
                    codes = [_code(http.get("/v1/limits")) for i in range(400)]
                    extra = {"healthz_during": _code(http.get("/healthz"))}
                secs = time.perf_counter() - t0
            counts = {c: codes.count(c) for c in sorted(set(codes))}
            first = next((i for i, c in enumerate(codes) if c.startswith("429")), None)
            out[scenario] = {"requests": len(codes), "seconds": round(secs, 2), "status": counts, "first_429_at": first, **extra}
            print(f"  {scenario:<9} {len(codes)} requests in {secs:.2f} s: {counts}, first 429 at #{first} {extra}")
        finally:
            server.stop()
    return out


def _code(r) -> str:
    """``"200"``, or ``"429 <limit>"`` naming the bucket that refused."""
    if r.status_code != 429:
        return str(r.status_code)
    return f"429 {r.json()['error']['details'].get('limit', '?')}"


# ------------------------------------------------------------------ load and kills
LOAD_ENV = {"CELLATLAS_RATE_LIMIT_IP_PER_S": "2000", "CELLATLAS_RATE_LIMIT_IP_BURST": "4000"}
"""All clients share 127.0.0.1, so the per-IP bucket is raised for the load runs (the per-key one is the default)."""


def section_load(home: Path, db_url: str | None, bodies, n_clients: int, seconds: float, kills: int = 0) -> dict:
    server = Server(home, db_url, **LOAD_ENV)
    server.start()
    keys, key_ids = make_keys(server, 10, 10**7)
    initial = dict.fromkeys(key_ids, 10**7)
    events = []

    def killer():
        for i in range(kills):
            time.sleep(max(0.0, t0 + (i + 1) * seconds / (kills + 1) - time.time()))
            at = time.time() - t0
            server.kill()
            events.append({"at_s": round(at, 1), "restart_s": round(server.start(), 2)})

    t0 = time.time()
    k = threading.Thread(target=killer, daemon=True)
    k.start()
    results = run_load(server.url, keys, bodies, n_clients, seconds)
    k.join()
    wall = time.time() - t0
    leftovers = [p.name for p in (home / "tmp").iterdir()] if (home / "tmp").is_dir() else []
    server.stop()
    out = {"clients": n_clients, "seconds": seconds, **summarise(results, wall), "kills": events,
           "ledger": ledger_check(server.db_url, SECRET, key_ids, initial, results), "upload_tmp_leftovers": leftovers}
    if server.db_url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(server.db_url.split("///", 1)[1]) as c:
            out["integrity_check"] = c.execute("PRAGMA integrity_check").fetchone()[0]
    else:
        out["integrity_check"] = "n/a (PostgreSQL)"
    led = out["ledger"]
    print(f"  {out['requests']} requests ({out['per_second']}/s), p50/p95/p99 {out['latency_all']}, final {out['final_status']}, "
          f"retried {out['retried_status']}, ledger diffs {led['diff_balance_vs_usage']}/{led['diff_usage_vs_clients']}, "
          f"double {led['double_charges']}, undelivered {led['charged_but_never_delivered']}, integrity {out['integrity_check']}")
    return out


# ------------------------------------------------------------------ fuzz
def section_fuzz(scale: float) -> dict:
    env = dict(os.environ, CELLATLAS_FUZZ_SCALE=str(scale), CELLATLAS_SCHEMATHESIS_EXAMPLES=str(int(25 * scale)))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/service/test_fuzz.py",
                           "tests/service/test_schemathesis.py"], cwd=REPO, env=env, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    cases = int((900 + 600 + 150 + 300 + 300) * scale)
    print(f"  {cases} decoder cases + schemathesis x{scale}: {tail} ({time.perf_counter() - t0:.0f} s)")
    return {"scale": scale, "decoder_cases": cases, "schemathesis_examples_per_operation": int(25 * scale),
            "pytest": tail, "passed": proc.returncode == 0, "seconds": round(time.perf_counter() - t0)}


# ------------------------------------------------------------------ report
def markdown(res: dict, command: str) -> str:
    """The tables docs/reliability.md shows."""
    lines = [f"Command: `{command}` ({res['date']}, {res['machine']})", ""]
    if "bombs" in res:
        lines += ["| hostile body | sent | key | status | code | server peak RSS above idle | time |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['bomb']} | {r['body_mb']} MB | {r['key']} | {r['status']} | {r['code']} | {r['peak_above_idle_mb']} MB | {r['seconds']} s |"
                  for r in res["bombs"]["rows"]]
        lines.append("")
    runs = [(n, res[n]) for n in ("load_sqlite", "load_postgres", "kills_sqlite", "kills_postgres") if n in res]
    if runs:
        lines += ["| run | clients x s | requests (/s) | p50 / p95 / p99 all | billed | free | final statuses | retried on the way | "
                  "kills (at s: restart s) | ledger diffs (balance-usage, usage-clients) | double charges | charged, never delivered | "
                  "integrity | upload tmp leftovers |", "|" + "---|" * 14]
        for name, r in runs:
            if "skipped" in r:
                lines.append(f"| {name} | skipped: {r['skipped']} |" + " |" * 12)
                continue
            led = r["ledger"]
            lat = lambda k: "/".join(str(r[k][f"p{q}_s"]) for q in (50, 95, 99))  # noqa: E731
            kills = ", ".join(f"{k['at_s']}: {k['restart_s']}" for k in r["kills"]) or "-"
            lines.append(
                f"| {name} | {r['clients']} x {r['seconds']:g} | {r['requests']} ({r['per_second']}) | {lat('latency_all')} s | "
                f"{lat('latency_billed')} s | {lat('latency_free')} s | {r['final_status']} | {r['retried_status'] or '-'} | {kills} | "
                f"{led['diff_balance_vs_usage']}, {led['diff_usage_vs_clients']} ({led['credits_spent']} credits, {led['usage_rows']} rows) | "
                f"{led['double_charges']} | {led['charged_but_never_delivered']} | {r['integrity_check']} | {len(r['upload_tmp_leftovers'])} |")
        lines.append("")
    if "rates" in res:
        d = res["rates"]["defaults"]
        lines += [f"Rate limits at their defaults (per IP {d['ip'][0]:g}/s burst {d['ip'][1]}, per key {d['key'][0]:g}/s burst "
                  f"{d['key'][1]}, failed auth per IP {d['auth_failures'][0]:g}/s burst {d['auth_failures'][1]}):", "",
                  "| scenario | requests | seconds | answers | first 429 at | then |", "|---|---|---|---|---|---|"]
        for k, v in res["rates"].items():
            if k == "defaults":
                continue
            then = (f"a valid key right after: {v['valid_key_right_after']} (Retry-After {v['retry_after_s']} s)" if "valid_key_right_after" in v
                    else f"/healthz during: {v['healthz_during']}" if "healthz_during" in v else "")
            lines.append(f"| {k} | {v['requests']} | {v['seconds']} | {v['status']} | #{v['first_429_at']} | {then} |")
        lines.append("")
    if "fuzz" in res:
        f = res["fuzz"]
        lines += [f"Fuzz: {f['decoder_cases']:,} generated decoder cases (JSON, npz, h5ad, over HTTP) and schemathesis at "
                  f"{f['schemathesis_examples_per_operation']} examples per operation: `{f['pytest']}`", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default="bombs,rates,load,kills,fuzz")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--fuzz-scale", type=float, default=5)
    ap.add_argument("--postgres-url")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--render", action="store_true", help="only re-render the .md from the .json in --out")
    ap.add_argument("--merge", action="store_true", help="update the sections run in an existing .json instead of replacing it")
    args = ap.parse_args()
    if args.render:
        res = json.loads((args.out / "reliability_service.json").read_text())
        print(markdown(res, res.get("command", "python benchmarks/reliability.py")))
        return 0
    sections = args.sections.split(",")
    from benchmarks.service import pbmc_like

    X, genes = pbmc_like(10_000, seed=1)
    res: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs, {sys.platform}",
                 "command": " ".join(["python benchmarks/reliability.py", *sys.argv[1:]])}
    with tempfile.TemporaryDirectory(prefix="cellatlas-reliability-") as tmp:
        tmp = Path(tmp)
        if "bombs" in sections:
            print("bombs:")
            res["bombs"] = section_bombs(tmp / "bombs", X, genes)
        if "rates" in sections:
            print("rate limits:")
            res["rates"] = section_rates(tmp / "rates")
        bodies = payloads(X, genes) if {"load", "kills"} & set(sections) else None
        for section, clients, seconds, kills in (("load", args.clients, args.seconds, 0), ("kills", 20, 45, 3)):
            if section not in sections:
                continue
            for db in ("sqlite", "postgres"):
                print(f"{section} on {db}:")
                url = None if db == "sqlite" else postgres_url(args.postgres_url)
                if db == "postgres" and url is None:
                    res[f"{section}_{db}"] = {"skipped": "no PostgreSQL (set CELLATLAS_TEST_POSTGRES_URL or run as root)"}
                    continue
                res[f"{section}_{db}"] = section_load(tmp / f"{section}-{db}", url, bodies, clients, seconds, kills)
        if "fuzz" in sections:
            print("fuzz:")
            res["fuzz"] = section_fuzz(args.fuzz_scale)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "reliability_service.json"
    if args.merge and path.exists():
        res = {**json.loads(path.read_text()), **res, "command": "python benchmarks/reliability.py (sections merged from several runs)"}
    path.write_text(json.dumps(res, indent=1))
    md = markdown(res, res["command"])
    (args.out / "reliability_service.md").write_text(md + "\n")
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
