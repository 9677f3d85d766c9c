"""Load clients and ledger checks for ``benchmarks/reliability.py``.

:func:`run_load` starts ``n_clients`` threads that, until the deadline, send a mix of
billed requests (annotate as JSON and npz, embed, query markers; each with its own
``Idempotency-Key``, retried with the same key on connection errors, 429 and 5xx, as
``cellatlas.client.Client`` does) and free ones (models, atlases, limits, usage, atlas
markers, health). :func:`ledger_check` then compares the database with what the
clients saw: credits lost or created, double charges, and charges for responses no
client received.
"""

from __future__ import annotations

import io
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

BILLED = {"annotate_json": 0.30, "annotate_npz": 0.25, "embed_npz": 0.10, "markers_json": 0.10}
FREE = {"GET /v1/models": 0.04, "GET /v1/atlases": 0.04, "GET /v1/limits": 0.04, "GET /v1/usage": 0.05,
        "GET /v1/singlecell/markers": 0.04, "GET /healthz": 0.04}
GIVE_UP_S = 90.0
"""A request still failing after this long (the server is down) is recorded as given up."""


@dataclass
class Outcome:
    route: str
    status: int
    seconds: float
    attempts: int
    idem: str | None = None
    charged: int = 0
    replayed: bool = False
    transient: list[str] = field(default_factory=list)


def payloads(X, genes, seed: int = 0, variants: int = 6, n_cells: int | None = None) -> dict[str, list[tuple[bytes, dict]]]:
    """Pre-encoded bodies per billed kind (several cell subsets each), so clients spend no CPU on encoding.

    ``n_cells`` overrides the per-kind cell counts (100 JSON, 300 npz, 200 embed, 100 markers)."""
    import orjson
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    out: dict[str, list[tuple[bytes, dict]]] = defaultdict(list)

    def npz(M) -> bytes:
        M = sp.csr_matrix(M)
        buf = io.BytesIO()
        np.savez(buf, indptr=M.indptr, indices=M.indices.astype(np.uint16), data=M.data.astype(np.uint16),
                 shape=np.array(M.shape), genes=np.array(genes, dtype=str))
        return buf.getvalue()

    def js(M) -> bytes:
        M = sp.csr_matrix(M)
        return orjson.dumps({"genes": list(genes), "model": "default", "reference_atlas": "human-core-2026",
                             "matrix": {"indptr": M.indptr.tolist(), "indices": M.indices.tolist(),
                                        "data": M.data.tolist(), "shape": list(M.shape)}})

    for _ in range(variants):
        rows = lambda n: np.sort(rng.choice(X.shape[0], n_cells or n, replace=False))  # noqa: E731
        out["annotate_json"].append((js(X[rows(100)]), {"Content-Type": "application/json"}))
        out["annotate_npz"].append((npz(X[rows(300)]), {"Content-Type": "application/x-npz", "Accept": "application/x-npz"}))
        out["embed_npz"].append((npz(X[rows(200)]), {"Content-Type": "application/x-npz"}))
        out["markers_json"].append((js(X[rows(100)]), {"Content-Type": "application/json"}))
    return out


_ROUTES = {"annotate_json": "/v1/singlecell/annotate", "annotate_npz": "/v1/singlecell/annotate",
           "embed_npz": "/v1/singlecell/embed", "markers_json": "/v1/singlecell/markers"}


def _one(http, kind: str, bodies, rng: random.Random) -> Outcome:
    import httpx

    billed = kind in BILLED
    idem = str(uuid.uuid4()) if billed else None
    body, headers = rng.choice(bodies[kind]) if billed else (None, None)  # a retry resends the same bytes
    t0 = time.perf_counter()
    attempts, transient = 0, []
    while True:
        attempts += 1
        try:
            if billed:
                r = http.post(_ROUTES[kind], content=body, headers={**headers, "Idempotency-Key": idem})
            else:
                method, path = kind.split(" ", 1)
                r = http.request(method, path, params={"reference_atlas": "human-core"} if path.endswith("markers") else None)
        except httpx.TransportError:
            transient.append("connection error")  # refused/reset: the server is restarting
            if time.perf_counter() - t0 > GIVE_UP_S:
                return Outcome(kind, -1, time.perf_counter() - t0, attempts, idem, transient=transient)
            time.sleep(min(2.0, 0.2 * attempts) * (0.5 + rng.random()))
            continue
        if r.status_code == 429 or r.status_code >= 500:
            transient.append(_why(r))
            if time.perf_counter() - t0 > GIVE_UP_S:
                return Outcome(kind, r.status_code, time.perf_counter() - t0, attempts, idem, transient=transient)
            time.sleep(float(r.headers.get("retry-after", 1)) * (0.5 + rng.random()))
            continue
        charged = int(r.headers.get("x-credits-charged", 0)) if r.status_code == 200 else 0
        return Outcome(kind, r.status_code, time.perf_counter() - t0, attempts, idem, charged,
                       r.headers.get("idempotent-replayed") == "true", transient)


def _why(r) -> str:
    """``"429 server_busy"``, ``"429 rate_limited key"``, ``"503"``...: what a retried answer was."""
    try:
        err = r.json()["error"]
    except Exception:  # noqa: BLE001 - not our JSON error body
        return str(r.status_code)
    limit = (err.get("details") or {}).get("limit")
    return f"{r.status_code} {err.get('code')}" + (f" {limit}" if limit else "")


def run_load(url: str, keys: list[str], bodies, n_clients: int, seconds: float, seed: int = 0) -> list[Outcome]:
    """``n_clients`` threads for ``seconds``; client ``i`` uses ``keys[i % len(keys)]``. Returns every outcome."""
    import httpx

    kinds = list(BILLED) + list(FREE)
    weights = [BILLED.get(k, FREE.get(k)) for k in kinds]
    deadline = time.time() + seconds
    results: list[Outcome] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys[i % len(keys)]}"}, timeout=300) as http:
            while time.time() < deadline:
                out = _one(http, rng.choices(kinds, weights)[0], bodies, rng)
                with lock:
                    results.append(out)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + GIVE_UP_S + 60)
    return results


def summarise(results: list[Outcome], seconds: float) -> dict:
    """Latency percentiles (all, billed, free), final statuses, retried statuses, throughput."""
    def pct(values):
        v = np.asarray(values) if values else np.zeros(1)
        return {f"p{q}_s": round(float(np.percentile(v, q)), 3) for q in (50, 95, 99)}

    ok = [r for r in results if r.status == 200]
    return {
        "requests": len(results),
        "per_second": round(len(results) / seconds, 1),
        "latency_all": pct([r.seconds for r in ok]),
        "latency_billed": pct([r.seconds for r in ok if r.route in BILLED]),
        "latency_free": pct([r.seconds for r in ok if r.route not in BILLED]),
        "final_status": dict(sorted(Counter(str(r.status) for r in results).items())),
        "retried_status": dict(sorted(Counter(s for r in results for s in r.transient).items())),
        "by_route": dict(sorted(Counter(r.route for r in results).items())),
        "replayed": sum(r.replayed for r in results),
    }


def ledger_check(db_url: str, secret: str, key_ids: list[str], initial: dict[str, int], results: list[Outcome]) -> dict:
    """Compare the ledger with the clients' view (all differences should be 0)."""
    from sqlalchemy import select

    from cellatlas.service.db import api_keys, usage
    from cellatlas.service.ledger import Ledger

    led = Ledger(db_url, secret=secret)
    try:
        with led.engine.connect() as conn:
            credits = dict(conn.execute(select(api_keys.c.id, api_keys.c.credits).where(api_keys.c.id.in_(key_ids))).all())
            rows = conn.execute(select(usage.c.key_id, usage.c.credits, usage.c.idempotency_key).where(usage.c.key_id.in_(key_ids))).all()
    finally:
        led.close()
    spent = sum(initial[k] - credits[k] for k in key_ids)
    recorded = sum(r.credits for r in rows)
    seen = sum(r.charged for r in results)  # one outcome per Idempotency-Key, replayed or not
    per_idem = Counter(r.idempotency_key for r in rows if r.idempotency_key)
    delivered = {r.idem for r in results if r.status == 200 and r.idem}
    lost = [k for k in per_idem if k not in delivered]
    return {
        "credits_spent": spent,
        "credits_in_usage_rows": recorded,
        "credits_seen_by_clients": seen,
        "diff_balance_vs_usage": spent - recorded,
        "diff_usage_vs_clients": recorded - seen,
        "double_charges": sum(1 for n in per_idem.values() if n > 1),
        "charged_but_never_delivered": len(lost),
        "usage_rows": len(rows),
    }
