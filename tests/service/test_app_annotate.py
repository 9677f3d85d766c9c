"""The single-cell routes end to end over the real engine (built-in atlas, PBMC cells)."""

from __future__ import annotations

import gzip
import io

import numpy as np
import orjson
import pytest
import zstandard

import cellatlas

pytestmark = pytest.mark.shared  # reads ../shared/data (skipped only when it is absent)

N = 60  # cells per request in these tests


@pytest.fixture(scope="module")
def cells(pbmc):
    """First N PBMC cells: (CSR counts, genes, in-process result)."""
    X = pbmc.X[:N].tocsr()
    genes = list(map(str, pbmc.var_names))
    return X, genes, cellatlas.annotate(X, genes)


def _balance(app, key_id):
    return app.state.ledger.get_key(key_id).credits


def test_annotate_json_matches_in_process_engine_and_charges(keyed, cells, csr_payload):
    tc, app, _s, key_id = keyed
    X, genes, ref = cells
    r = tc.post("/v1/singlecell/annotate", json=csr_payload(X, genes, model="default", reference_atlas="human-core-2026"))
    assert r.status_code == 200, r.text
    out = r.json()
    calls = out["calls"]
    assert len(calls) == N and out["n_cells"] == N
    assert [c["label"] for c in calls] == list(ref.label)
    np.testing.assert_allclose([c["confidence"] for c in calls], ref.confidence, atol=1e-4)
    for c in calls:
        assert 0 <= c["confidence"] <= 1 and len(c["alternates"]) <= 3
        assert all(set(a) == {"label", "score"} for a in c["alternates"])
        assert isinstance(c["markers"], list)
        expected_band = "confident" if c["confidence"] >= 0.7 else "review" if c["confidence"] >= 0.4 else "low"
        assert c["band"] == expected_band
        assert {"ontology_id", "evidence", "level", "novel"} <= set(c)
        assert {"knn_label", "marker_label", "agreement"} <= set(c["evidence"])
    prov = out["provenance"]
    assert {"code_version", "model", "atlas", "atlas_version", "atlas_sha256"} <= set(prov)
    assert prov["atlas"] == "human-core" and out["reference_atlas"] == "human-core"
    assert out["gene_report"]
    assert out["usage"] == {
        "cells": N, "credits_charged": 1, "credits_left": 499, "cells_per_credit": 1000,
        "pricing": "1 credit per started block of 1,000 cells",
    }
    assert r.headers["x-credits-remaining"] == "499" and _balance(app, key_id) == 499
    assert "embedding" not in out


@pytest.mark.parametrize("encoding", [None, "gzip", "zstd"])
def test_binary_npz_body_gives_the_same_calls(keyed, cells, npz_body, encoding):
    tc, *_ = keyed
    X, genes, ref = cells
    body = npz_body(X, genes, cell_ids=np.array([f"c{i}" for i in range(N)]))
    headers = {"Content-Type": "application/x-npz"}
    if encoding == "gzip":
        body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    elif encoding == "zstd":
        body, headers["Content-Encoding"] = zstandard.ZstdCompressor().compress(body), "zstd"
    r = tc.post("/v1/singlecell/annotate?model=default&reference_atlas=human-core", content=body, headers=headers)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["label"] for c in out["calls"]] == list(ref.label)
    assert out["cell_ids"] == [f"c{i}" for i in range(N)]


def test_h5ad_upload_uses_obs_names(keyed, pbmc, cells, tmp_path):
    tc, *_ = keyed
    _X, _genes, ref = cells
    a = pbmc[:N].copy()
    path = tmp_path / "q.h5ad"
    a.write_h5ad(path)
    r = tc.post("/v1/singlecell/annotate", content=path.read_bytes(), headers={"Content-Type": "application/x-h5ad"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["cell_ids"] == list(a.obs_names)
    assert [c["label"] for c in out["calls"]] == list(ref.label)


def test_return_embedding_adds_embedding_and_layout(make_client, cells, csr_payload):
    tc, _ = make_client(require_api_key=False)
    X, genes, ref = cells
    out = tc.post("/v1/singlecell/annotate", json=csr_payload(X, genes, return_embedding=True)).json()
    np.testing.assert_allclose(np.asarray(out["embedding"]), ref.embedding, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["layout"]), ref.layout, atol=1e-4)
    assert out["usage"]["credits_left"] is None and out["usage"]["credits_charged"] == 0


def test_embed_json_and_npz(keyed, cells, csr_payload):
    tc, app, _s, key_id = keyed
    X, genes, _ref = cells
    emb, layout, report = cellatlas.embed(X, genes)
    out = tc.post("/v1/singlecell/embed", json=csr_payload(X, genes)).json()
    assert out["n_cells"] == N and out["dim"] == emb.shape[1]
    np.testing.assert_allclose(np.asarray(out["embedding"]), emb, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["layout"]), layout, atol=1e-4)
    assert out["gene_report"] == orjson.loads(orjson.dumps(report, option=orjson.OPT_SERIALIZE_NUMPY))
    r = tc.post("/v1/singlecell/embed?format=npz&layout=false", json=csr_payload(X, genes))
    assert r.headers["content-type"].startswith("application/x-npz")
    z = np.load(io.BytesIO(r.content))
    assert "layout" not in z.files
    np.testing.assert_allclose(z["embedding"], emb, atol=1e-6)
    assert orjson.loads(z["meta_json"].tobytes())["usage"]["credits_charged"] == 1
    assert _balance(app, key_id) == 498


def test_atlas_markers_json_tsv_and_filters(keyed):
    tc, *_ = keyed
    table = cellatlas.load_atlas("human-core").marker_table()
    out = tc.get("/v1/singlecell/markers?reference_atlas=human-core-2026").json()
    assert out["reference_atlas"] == "human-core" and out["n_labels"] == table["label"].nunique()
    first = out["labels"][0]
    assert {"label", "ontology_id", "markers"} <= set(first) and {"gene", "sign", "source"} == set(first["markers"][0])
    assert sum(len(lab["markers"]) for lab in out["labels"]) == len(table)
    label = str(table["label"].iloc[0])
    tsv = tc.get("/v1/singlecell/markers", params={"label": label}, headers={"Accept": "text/tab-separated-values"})
    assert tsv.headers["content-type"].startswith("text/tab-separated-values")
    lines = tsv.text.strip().splitlines()
    assert lines[0].split("\t") == ["label", "ontology_id", "gene", "sign", "source"]
    assert len(lines) - 1 == int((table["label"] == label).sum())
    r = tc.get("/v1/singlecell/markers", params={"label": "Not a cell type"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "label"
    r = tc.get("/v1/singlecell/markers", params={"reference_atlas": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_atlas"


def test_query_markers_json_and_tsv(keyed, cells, csr_payload):
    tc, *_ = keyed
    X, genes, ref = cells
    out = tc.post("/v1/singlecell/markers", json=csr_payload(X, genes)).json()
    assert [c["markers"] for c in out["cells"]] == [list(m) for m in ref.markers]
    assert {lab["label"] for lab in out["labels"]} <= set(map(str, ref.label))
    tsv = tc.post("/v1/singlecell/markers?format=tsv", json=csr_payload(X, genes))
    rows = tsv.text.strip().splitlines()
    assert rows[0].split("\t") == ["cell_id", "label", "ontology_id", "confidence", "band", "markers"]
    assert len(rows) == N + 1 and rows[1].split("\t")[1] == ref.label[0]
    assert tsv.headers["x-credits-charged"] == "1"


@pytest.mark.parametrize(
    "change,status,code,field",
    [
        ({"model": "no-such-model"}, 404, "unknown_model", "model"),
        ({"reference_atlas": "no-such-atlas"}, 404, "unknown_atlas", "reference_atlas"),
        ({"model": "geneformer", "_nofallback": True}, 409, ("model_unavailable", "atlas_model_mismatch"), "model"),
        ({"_shuffle_genes": True}, 422, "gene_mismatch", "genes"),
    ],
)
def test_engine_errors_are_4xx_and_not_charged(make_client, cells, csr_payload, change, status, code, field):
    change = dict(change)
    kw = {"strict_models": True} if change.pop("_nofallback", False) else {}
    tc, app = make_client(require_api_key=True, **kw)
    secret, info = app.state.ledger.create_key("err")
    X, genes, _ref = cells
    if change.pop("_shuffle_genes", False):
        genes = [f"NOTAGENE{i}" for i in range(len(genes))]
    r = tc.post("/v1/singlecell/annotate", json=csr_payload(X, genes, **change), headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] in (code if isinstance(code, tuple) else (code,))
    assert err["field"] == field and err["fix"]
    assert _balance(app, info.id) == 500


def test_out_of_credits_is_402_with_balance_and_no_work_charged(make_client, cells, csr_payload):
    tc, app = make_client(require_api_key=True)
    secret, info = app.state.ledger.create_key("poor", credits=0)
    X, genes, _ref = cells
    r = tc.post("/v1/singlecell/annotate", json=csr_payload(X, genes), headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 402
    err = r.json()["error"]
    assert err["code"] == "insufficient_credits" and err["details"]["balance"] == 0 and err["details"]["price"] == 1
    app.state.ledger.topup(info.id, 1)
    r = tc.post("/v1/singlecell/annotate", json=csr_payload(X, genes), headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 200 and r.json()["usage"]["credits_left"] == 0


def test_idempotency_key_replays_identical_response_once_charged(keyed, cells, csr_payload, npz_body):
    tc, app, _s, key_id = keyed
    X, genes, _ref = cells
    h = {"Idempotency-Key": "retry-123"}
    a = tc.post("/v1/singlecell/annotate", json=csr_payload(X, genes), headers=h)
    b = tc.post("/v1/singlecell/annotate", json=csr_payload(X, genes), headers=h)
    assert a.status_code == b.status_code == 200
    assert a.content == b.content and b.headers["idempotent-replayed"] == "true"
    steps = dict(part.split(";dur=") for part in a.headers["server-timing"].split(", "))
    assert list(steps) == ["read", "parse", "engine", "respond"] and float(steps["engine"]) > 0
    assert "server-timing" not in b.headers  # a replay runs nothing
    assert _balance(app, key_id) == 499
    c = tc.post("/v1/singlecell/annotate", json=csr_payload(X[:10], genes), headers=h)
    assert c.status_code == 422 and c.json()["error"]["code"] == "idempotency_key_reused"
    metrics = tc.get("/metrics").text
    assert "cellatlas_idempotent_replays_total 1" in metrics
    assert f'cellatlas_cells_processed_total{{endpoint="annotate"}} {N}' in metrics


def test_server_busy_is_429_with_retry_after(make_client, cells, csr_payload, monkeypatch):
    from cellatlas.service import jobs

    class Saturated:
        available_tokens = 0

        def statistics(self):
            return type("S", (), {"tasks_waiting": 0})()

    tc, app = make_client(require_api_key=False)
    monkeypatch.setattr(jobs, "MAX_QUEUED_JOBS", 0)
    app.state.job_limiter = Saturated()
    X, genes, _ref = cells
    r = tc.post("/v1/singlecell/annotate", json=csr_payload(X, genes))
    assert r.status_code == 429 and r.headers["retry-after"] == "5"
    assert r.json()["error"]["code"] == "server_busy"


def test_unavailable_model_runs_on_the_fallback_by_default_and_says_so(make_client, cells, csr_payload):
    tc, _ = make_client(require_api_key=False)  # no setting: the fallback is on out of the box
    X, genes, ref = cells
    r = tc.post("/v1/singlecell/annotate", json=csr_payload(X, genes, model="geneformer"))
    out = r.json()
    assert [c["label"] for c in out["calls"]] == list(ref.label)
    assert out["model"] == "default" and out["provenance"]["model"] == "default"
    prov = out["provenance"]
    assert prov["model_requested"] == "geneformer" and prov["model_used"] == "default"
    fb = prov["fallback"]
    assert fb["requested_model"] == "geneformer" and fb["model"] == "default" and fb["reason"]
    assert [w["code"] for w in out["warnings"]] == ["model_fallback"] and "geneformer" in out["warnings"][0]["message"]
    assert r.headers["x-model-used"] == "default" and r.headers["x-model-requested"] == "geneformer"
    emb = tc.post("/v1/singlecell/embed", json=csr_payload(X[:5], genes, model="geneformer"))
    assert emb.json()["model"] == "default" and emb.json()["fallback"]["requested_model"] == "geneformer"
    assert emb.json()["model_requested"] == "geneformer" and emb.json()["warnings"][0]["code"] == "model_fallback"
    assert emb.headers["x-model-used"] == "default"
    mk = tc.post("/v1/singlecell/markers", json=csr_payload(X[:5], genes, model="geneformer")).json()
    assert mk["provenance"]["model_used"] == "default" and mk["warnings"][0]["code"] == "model_fallback"
    # a request that gets the model it asked for carries no warning and no X-Model-Requested
    plain = tc.post("/v1/singlecell/annotate", json=csr_payload(X[:5], genes))
    assert plain.json()["warnings"] == [] and plain.json()["provenance"]["model_requested"] == "default"
    assert plain.headers["x-model-used"] == "default" and "x-model-requested" not in plain.headers


def test_strict_models_restores_the_409(make_client, cells, csr_payload):
    tc, _ = make_client(require_api_key=False, strict_models=True)
    X, genes, _ref = cells
    r = tc.post("/v1/singlecell/annotate", json=csr_payload(X, genes, model="geneformer"))
    assert r.status_code == 409 and r.json()["error"]["code"] in ("model_unavailable", "atlas_model_mismatch")
    assert tc.get("/v1/models").json()["fallback_model"] is None


def test_healthz_answers_while_an_annotation_runs(make_client, serve_in_thread, cells, csr_payload, monkeypatch):
    import threading

    import httpx

    real, started, release = cellatlas.annotate, threading.Event(), threading.Event()

    def held(*args, **kwargs):  # the real engine, started only once the test has seen /healthz answer
        started.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(cellatlas, "annotate", held)
    _tc, app = make_client(require_api_key=False)
    url = serve_in_thread(app)
    X, genes, ref = cells
    box = {}
    job = threading.Thread(target=lambda: box.update(r=httpx.post(f"{url}/v1/singlecell/annotate", json=csr_payload(X, genes), timeout=60)))
    job.start()
    assert started.wait(30)
    assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    assert "cellatlas_jobs_in_progress 1" in httpx.get(f"{url}/metrics", timeout=5).text
    release.set()
    job.join(60)
    assert [c["label"] for c in box["r"].json()["calls"]] == list(ref.label)


def test_annotate_npz_response_carries_the_whole_result(keyed, cells, npz_body):
    from cellatlas.service.columnar import decode_result

    tc, *_ = keyed
    X, genes, ref = cells
    r = tc.post("/v1/singlecell/annotate", content=npz_body(X, genes), headers={"Content-Type": "application/x-npz", "Accept": "application/x-npz"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-npz")
    with np.load(io.BytesIO(r.content), allow_pickle=False) as z:
        res, meta = decode_result({k: z[k] for k in z.files})
    for name in ("label", "ontology_id", "level", "knn_label", "marker_label", "agreement", "novel", "parent_label"):
        assert list(getattr(res, name)) == list(getattr(ref, name)), name
    for name in ("confidence", "knn_prob", "marker_score", "distance", "parent_confidence"):
        np.testing.assert_allclose(getattr(res, name), getattr(ref, name), atol=1e-6)
    assert res.markers == [list(m) for m in ref.markers]
    assert [[a for a, _ in alts] for alts in res.alternates] == [[a for a, _ in alts] for alts in ref.alternates]
    assert list(res.band) == list(ref.band) and res.embedding is None
    assert meta["usage"]["credits_charged"] == 1 and res.provenance["atlas"] == "human-core"
    assert res.gene_report == orjson.loads(orjson.dumps(ref.gene_report, option=orjson.OPT_SERIALIZE_NUMPY))
