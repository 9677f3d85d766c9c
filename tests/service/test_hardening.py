"""Rate limits, the decode budget, security headers, offline docs, key hashing, housekeeping."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import time

import pytest
from sqlalchemy import insert, select

ANNOTATE = "/v1/singlecell/annotate"


def run_async(coro):
    """``asyncio.run`` in a fresh thread (a browser test may have left a loop running in this one)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


# ---------------------------------------------------------------- rate limits
def test_failed_authentication_is_rate_limited_per_ip(make_client):
    tc, app = make_client(require_api_key=True, rate_limit_auth_failures_per_s=0.5, rate_limit_auth_failures_burst=5)
    codes = [tc.get("/v1/usage", headers={"Authorization": f"Bearer sk-ca-guess{i}"}).status_code for i in range(8)]
    assert codes[:5] == [401] * 5 and codes[5:] == [429] * 3
    r = tc.get("/v1/usage", headers={"Authorization": "Bearer sk-ca-guess"})
    assert r.json()["error"]["code"] == "rate_limited" and 1 <= int(r.headers["retry-after"]) <= 2
    secret, _ = app.state.ledger.create_key("real")
    assert tc.get("/v1/usage", headers={"Authorization": f"Bearer {secret}"}).status_code == 429  # not even checked
    time.sleep(2.1)
    assert tc.get("/v1/usage", headers={"Authorization": f"Bearer {secret}"}).status_code == 200


def test_requests_are_rate_limited_per_key(keyed_factory):
    tc, _app, _secret = keyed_factory(rate_limit_key_per_s=1, rate_limit_key_burst=3)
    codes = [tc.get("/v1/usage").status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    assert tc.get("/v1/models").status_code == 200  # public routes are not charged to the key


def test_requests_are_rate_limited_per_ip_except_health(make_client):
    tc, _ = make_client(require_api_key=False, rate_limit_ip_per_s=1, rate_limit_ip_burst=4)
    codes = [tc.get("/v1/limits").status_code for _ in range(6)]
    assert codes == [200] * 4 + [429] * 2
    r = tc.get("/v1/limits")
    assert r.headers["retry-after"] == "1" and r.headers["x-content-type-options"] == "nosniff"
    assert all(tc.get("/healthz").status_code == 200 for _ in range(10))


def test_default_limits_are_documented_and_advertised(make_client):
    from cellatlas.config import Settings

    tc, _ = make_client(require_api_key=False)
    lim = tc.get("/v1/limits").json()
    s = Settings()
    assert lim["rate_limits"]["per_ip"] == {"per_second": s.rate_limit_ip_per_s, "burst": s.rate_limit_ip_burst}
    assert lim["rate_limits"]["per_key"]["per_second"] == s.rate_limit_key_per_s
    doc = (__import__("pathlib").Path(__file__).resolve().parents[2] / "docs" / "service.md").read_text()
    for name in ("CELLATLAS_RATE_LIMIT_IP_PER_S", "CELLATLAS_RATE_LIMIT_KEY_PER_S", "CELLATLAS_RATE_LIMIT_AUTH_FAILURES_PER_S",
                 "CELLATLAS_MAX_CONCURRENT_DECODES", "CELLATLAS_MAX_ENCODING_RATIO", "CELLATLAS_MAX_GENES_PER_REQUEST"):
        assert name in doc, name


@pytest.fixture
def keyed_factory(make_client):
    def make(**kw):
        tc, app = make_client(require_api_key=True, **kw)
        secret, _ = app.state.ledger.create_key("t")
        tc.headers["Authorization"] = f"Bearer {secret}"
        return tc, app, secret

    return make


# ---------------------------------------------------------------- decode budget
def test_decode_budget_is_429_with_retry_after_when_full(tmp_path):
    from cellatlas.service.body import DecodeBudget
    from cellatlas.service.errors import ServerBusyError

    budget = DecodeBudget(1, tmp_path, wait_seconds=0.2)
    other = DecodeBudget(1, tmp_path, wait_seconds=0.2)  # a second worker process, same lock files

    async def main():
        async with budget.slot():
            assert budget.in_use == 1
            with pytest.raises(ServerBusyError) as e:
                async with other.slot():
                    pass
            assert e.value.status_code == 429 and e.value.details["retry_after"] >= 1
        async with other.slot():  # released: free again
            assert other.in_use == 1

    run_async(main())
    budget.close()
    other.close()


def test_decode_budget_queues_within_the_wait(tmp_path):
    from cellatlas.service.body import DecodeBudget

    budget = DecodeBudget(1, tmp_path, wait_seconds=5)
    order = []

    async def job(i):
        async with budget.slot():
            order.append(i)
            await asyncio.sleep(0.05)

    async def main():
        await asyncio.gather(*(job(i) for i in range(4)))

    run_async(main())
    assert sorted(order) == [0, 1, 2, 3]
    budget.close()


# ---------------------------------------------------------------- headers, docs
SECURITY = ("content-security-policy", "x-frame-options", "x-content-type-options", "referrer-policy")


@pytest.mark.parametrize("path", ["/v1/models", "/docs", "/redoc", "/workspace", "/", "/openapi.json", "/no/such/route", "/healthz"])
def test_security_headers_on_every_response(make_client, path):
    tc, _ = make_client(require_api_key=True)
    r = tc.get(path)
    for h in SECURITY:
        assert h in r.headers, (path, h)
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp
    if r.headers.get("content-type", "").startswith("text/html"):
        assert "script-src 'self'" in csp and "https:" not in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    else:
        assert csp.startswith("default-src 'none'")


def test_security_headers_on_early_errors(make_client):
    tc, _ = make_client(require_api_key=False, max_body_bytes=100)
    r = tc.post(ANNOTATE, content=b"x" * 1000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and all(h in r.headers for h in SECURITY)


def test_docs_render_offline_from_the_installed_package(make_client):
    tc, _ = make_client(require_api_key=False)
    for page in ("/docs", "/redoc"):
        html = tc.get(page).text
        assert "http://" not in html and "https://" not in html and "cdn" not in html.lower()
        assert not re.search(r"<script>(?!</script>)", html), "inline script would be blocked by the CSP"
        for src in re.findall(r'(?:src|href)="(/[^"]+)"', html):
            r = tc.get(src)
            assert r.status_code == 200 and len(r.content) > 100, src
    assert "SwaggerUIBundle" in tc.get("/docs/assets/swagger-ui-bundle.js").text
    assert tc.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"].startswith("text/javascript")
    assert tc.get("/docs/assets/../../etc/passwd").status_code == 404
    assert tc.get("/docs/assets/core.py").status_code == 404


# ---------------------------------------------------------------- keys
def test_legacy_sha256_keys_migrate_once_and_keep_working(tmp_path):
    from cellatlas.service.db import api_keys, make_engine, utcnow
    from cellatlas.service.ledger import LEGACY_PREFIX, Ledger

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    old_key = "sk-ca-" + "x" * 43
    with engine.begin() as conn:  # a row as the previous version wrote it
        conn.execute(insert(api_keys).values(id="key_old", name="old", prefix=old_key[:10], credits=7,
                                             key_hash=hashlib.sha256(old_key.encode()).hexdigest(), created_at=utcnow()))
    engine.dispose()
    led = Ledger(url, secret=b"s1")
    assert led.authenticate(old_key).key_id == "key_old"
    row = led.list_keys()[0]
    assert row.prefix == LEGACY_PREFIX and "xxxx" not in row.prefix
    with led.engine.connect() as conn:
        stored = conn.execute(select(api_keys.c.key_hash)).scalar_one()
    assert stored != hashlib.sha256(old_key.encode()).hexdigest()
    led.close()
    again = Ledger(url, secret=b"s1")  # a second start does not wrap the hash twice
    assert again.authenticate(old_key).key_id == "key_old"
    again.close()
    from cellatlas.errors import CellAtlasError

    with pytest.raises(CellAtlasError, match="secret differs"):
        Ledger(url, secret=b"another secret")


def test_key_secret_is_created_once_private(tmp_path):
    import os
    import stat

    from cellatlas.config import Settings
    from cellatlas.service.ledger import key_secret

    s = Settings(home=tmp_path / "h")
    a, b = key_secret(s), key_secret(s)
    assert a == b and len(a) >= 40
    assert stat.S_IMODE(os.stat(tmp_path / "h" / "api_key_secret").st_mode) == 0o600
    assert key_secret(Settings(home=tmp_path / "h", api_key_secret="from-env")) == b"from-env"


# ---------------------------------------------------------------- housekeeping
def test_expired_workspace_sessions_are_gone_at_once_and_swept(make_client, tmp_path):
    from cellatlas.service import housekeeping

    tc, app = make_client(require_api_key=False, workspace_ttl_hours=1.0)
    store = housekeeping.workspace_store(app)
    for sid in ("expired1", "expired2", "fresh"):
        d = store.root / sid
        d.mkdir(parents=True)
        touched = time.time() - (7200 if sid.startswith("expired") else 10)
        (d / "meta.json").write_text(json.dumps({"id": sid, "owner": None, "touched": touched, "stored_name": "x.h5ad"}))
    r = tc.get("/workspace/api/sessions/expired1")
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    removed = run_async(housekeeping.sweep_workspace(app))
    assert sorted(removed) == ["expired2"] and sorted(p.name for p in store.root.iterdir()) == ["fresh"]


def test_background_sweep_runs_in_the_lifespan(make_client):
    from fastapi.testclient import TestClient

    from cellatlas.service import housekeeping

    _tc, app = make_client(require_api_key=False, workspace_ttl_hours=1.0, workspace_sweep_seconds=0.1)
    store = housekeeping.workspace_store(app)
    d = store.root / "old"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"touched": time.time() - 7200}))
    with TestClient(app):
        deadline = time.time() + 5
        while d.exists() and time.time() < deadline:
            time.sleep(0.05)
    assert not d.exists()


def test_upload_tmp_dir_is_swept_at_start_and_left_empty(make_client, settings_factory, tmp_path):
    from benchmarks import bombs

    tmp = tmp_path / "home" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "leftover.h5ad").write_bytes(b"x" * 100)
    tc, _ = make_client(require_api_key=False)
    assert list(tmp.iterdir()) == []
    body, headers = bombs.gzip_bomb(64 << 20, piece=8 << 20)  # spills past 16 MiB to disk, then refused
    assert tc.post(ANNOTATE, content=body, headers=headers).status_code == 413
    assert list(tmp.iterdir()) == []


# ---------------------------------------------------------------- disconnects
def test_client_that_leaves_without_idempotency_key_is_not_charged(make_client, serve_in_thread, monkeypatch):
    import threading

    from cellatlas.service import routes_singlecell

    release = threading.Event()
    real = routes_singlecell._annotate_work

    def slow(parsed, settings):
        release.wait(10)
        return real(parsed, settings)

    monkeypatch.setattr(routes_singlecell, "_annotate_work", slow)
    _tc, app = make_client(require_api_key=True)
    secret, info = app.state.ledger.create_key("leaver")
    url = serve_in_thread(app)
    host, port = url.split("//")[1].split(":")
    import orjson

    from tests.service.test_hostile import _tiny

    body = orjson.dumps(_tiny())
    with socket.create_connection((host, int(port))) as s:
        s.sendall(f"POST {ANNOTATE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)
    release.set()
    time.sleep(2.0)
    assert app.state.ledger.get_key(info.id).credits == 500
    assert app.state.ledger.usage_summary(info.id)["totals"]["requests"] == 0
