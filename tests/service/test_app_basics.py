"""Routes and error paths of the HTTP app that need no annotation run."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import scipy.sparse as sp


def _tiny(csr_payload, n=3, g=5):
    X = sp.csr_matrix(np.arange(1, n * g + 1, dtype=np.float32).reshape(n, g))
    return csr_payload(X, [f"G{i}" for i in range(g)])


def _assert_error(r, status, code=None, field=None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["message"] and err["fix"], err
    if code:
        assert err["code"] == code
    if field:
        assert err["field"] == field
    return err


@pytest.mark.parametrize("auth", [None, "Bearer sk-ca-not-a-real-key", "Basic abc", "Bearer "])
def test_annotate_without_a_valid_key_is_401(keyed, csr_payload, auth):
    tc = keyed[0]
    headers = {"Authorization": auth} if auth is not None else {}
    if auth is None:
        tc.headers.pop("Authorization")
    r = tc.post("/v1/singlecell/annotate", json=_tiny(csr_payload), headers=headers)
    _assert_error(r, 401, "unauthorized", "Authorization")
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_revoked_key_is_401(keyed, csr_payload):
    tc, app, _secret, key_id = keyed
    app.state.ledger.revoke(key_id)
    _assert_error(tc.post("/v1/singlecell/annotate", json=_tiny(csr_payload)), 401, "unauthorized")


def test_body_over_limit_is_413_before_parsing(make_client):
    tc, _ = make_client(require_api_key=False, max_body_bytes=1000)
    r = tc.post("/v1/singlecell/annotate", content=b"{" + b" " * 5000, headers={"Content-Type": "application/json"})
    err = _assert_error(r, 413, "payload_too_large", "body")
    assert err["details"]["max_body_bytes"] == 1000 and "split" in err["fix"].lower()
    assert r.headers["x-cellatlas-max-body-bytes"] == "1000"


def test_chunked_body_over_limit_is_413(make_client):
    tc, _ = make_client(require_api_key=False, max_body_bytes=1000)

    def gen():
        for _ in range(10):
            yield b" " * 400

    r = tc.post("/v1/singlecell/annotate", content=gen(), headers={"Content-Type": "application/json"})
    _assert_error(r, 413, "payload_too_large")


def test_gzip_bomb_is_413(make_client):
    tc, _ = make_client(require_api_key=False, max_body_bytes=10_000)
    bomb = gzip.compress(b" " * 1_000_000)
    assert len(bomb) < 10_000
    r = tc.post("/v1/singlecell/annotate", content=bomb, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    _assert_error(r, 413, "payload_too_large")


def test_too_many_cells_is_413_with_limit(make_client, csr_payload):
    tc, _ = make_client(require_api_key=False, max_cells_per_request=2)
    err = _assert_error(tc.post("/v1/singlecell/annotate", json=_tiny(csr_payload, n=3)), 413, "payload_too_large")
    assert err["details"]["max_cells_per_request"] == 2


@pytest.mark.parametrize(
    "content,ctype,enc,status,field",
    [
        (b"a,b", "text/csv", None, 415, "Content-Type"),
        (b"{}", "application/json", "br", 415, "Content-Encoding"),
        (b"{oops", "application/json", None, 422, "body"),
        (b'{"genes": ["A"]}', "application/json", None, 422, "matrix"),
        (b"PK\x03\x04junk", "application/x-npz", None, 422, "body"),
    ],
)
def test_bad_bodies_are_4xx_with_field(make_client, content, ctype, enc, status, field):
    tc, _ = make_client(require_api_key=False)
    headers = {"Content-Type": ctype}
    if enc:
        headers["Content-Encoding"] = enc
    _assert_error(tc.post("/v1/singlecell/annotate", content=content, headers=headers), status, field=field)


@pytest.mark.parametrize("route", ["/v1/singlecell/annotate", "/v1/singlecell/embed", "/v1/singlecell/markers"])
def test_malformed_csr_is_422_on_every_post_route(make_client, csr_payload, route):
    tc, _ = make_client(require_api_key=False)
    body = _tiny(csr_payload)
    body["matrix"]["indices"][0] = 99
    _assert_error(tc.post(route, json=body), 422, "invalid_input", "matrix.indices")


def test_bad_query_parameters_are_422(make_client, csr_payload):
    tc, _ = make_client(require_api_key=False)
    _assert_error(tc.post("/v1/singlecell/embed?format=xml", json=_tiny(csr_payload)), 422, field="format")
    _assert_error(tc.get("/v1/usage?limit=-1"), 422, field="limit")
    _assert_error(tc.post("/v1/singlecell/annotate?modle=x", json=_tiny(csr_payload)), 422, field="modle")


def test_bad_idempotency_key_is_422(make_client, csr_payload):
    tc, _ = make_client(require_api_key=False)
    r = tc.post("/v1/singlecell/annotate", json=_tiny(csr_payload), headers={"Idempotency-Key": "has space"})
    _assert_error(r, 422, field="Idempotency-Key")


def test_unknown_route_and_method_use_the_error_shape(make_client):
    tc, _ = make_client(require_api_key=False)
    _assert_error(tc.get("/v1/nope"), 404, "not_found")
    _assert_error(tc.get("/v1/singlecell/annotate"), 405, "method_not_allowed")


def test_limits_are_advertised(make_client):
    tc, _ = make_client(require_api_key=True, max_cells_per_request=1234, max_body_bytes=99_999)
    r = tc.get("/v1/limits")
    assert r.status_code == 200
    lim = r.json()
    assert lim["max_cells_per_request"] == 1234 and lim["max_body_bytes"] == 99_999
    assert lim["pricing"]["cells_per_credit"] == 1000 and lim["free_credits"] == 500
    assert "application/x-npz" in lim["content_types"] and "zstd" in lim["content_encodings"]
    assert r.headers["x-cellatlas-max-cells"] == "1234"


def test_health_and_docs(make_client):
    tc, _ = make_client(require_api_key=True)
    assert tc.get("/healthz").json()["status"] == "ok"
    assert tc.get("/docs").status_code == 200
    spec = tc.get("/openapi.json").json()
    for path in ["/v1/singlecell/annotate", "/v1/singlecell/embed", "/v1/singlecell/markers", "/v1/models", "/v1/atlases", "/v1/usage"]:
        assert path in spec["paths"], path
    body = spec["paths"]["/v1/singlecell/annotate"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/x-npz", "application/x-h5ad"} <= set(body)
    assert "matrix" in body["application/json"]["schema"]["properties"]


def test_readyz_reports_failing_checks(make_client, tmp_path):
    tc, app = make_client(require_api_key=True)
    r = tc.get("/readyz")
    checks = r.json().get("checks") or r.json()["error"]["details"]["checks"]
    assert checks["database"]["ok"] is True
    assert r.status_code == (200 if all(c["ok"] for c in checks.values()) else 503)
    from sqlalchemy import create_engine

    app.state.ledger.engine.dispose()
    app.state.ledger.engine = create_engine(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'x.db'}")
    r = tc.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    assert r.json()["error"]["details"]["checks"]["database"]["ok"] is False


def test_usage_requires_key_and_reports_balance(keyed):
    tc, app, _secret, key_id = keyed
    app.state.ledger.charge(key_id, 1500)
    u = tc.get("/v1/usage").json()
    assert u["key_id"] == key_id and u["credits"] == 498
    assert u["totals"] == {"requests": 1, "cells": 1500, "credits": 2}
    assert u["pricing"]["cells_per_credit"] == 1000
    tc.headers.pop("Authorization")
    _assert_error(tc.get("/v1/usage"), 401)


def test_models_and_atlases_listings(make_client):
    tc, _ = make_client(require_api_key=True)
    models = tc.get("/v1/models").json()
    names = {m["name"]: m for m in models["models"]}
    assert {"default", "geneformer", "scgpt"} <= set(names)
    assert all("usable" in m and "path" not in m for m in models["models"])
    atl = tc.get("/v1/atlases").json()
    assert atl["default"] == "human-core" and isinstance(atl["atlases"], list)


def test_metrics_count_requests_by_route(make_client):
    tc, _ = make_client(require_api_key=False)
    tc.get("/healthz")
    tc.get("/healthz")
    tc.get("/v1/does-not-exist")
    text = tc.get("/metrics").text
    assert 'cellatlas_http_requests_total{method="GET",route="/healthz",status="200"} 2' in text
    assert 'route="unmatched",status="404"' in text
    assert "# TYPE cellatlas_http_request_duration_seconds histogram" in text
    assert 'cellatlas_http_request_duration_seconds_count{route="/healthz"} 2' in text
