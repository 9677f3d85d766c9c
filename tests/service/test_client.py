"""cellatlas.client.Client against the app (in-process transport, real engine)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

import cellatlas
from cellatlas.client import Client, ServiceUnreachableError
from cellatlas.errors import InputError, PaymentRequiredError, UnknownAtlasError

pytestmark = pytest.mark.shared  # reads ../shared/data (skipped only when it is absent)

N = 80


@pytest.fixture(scope="module")
def cells(pbmc):
    X = pbmc.X[:N].tocsr()
    genes = list(map(str, pbmc.var_names))
    return X, genes, cellatlas.annotate(X, genes)


class Flaky(httpx.BaseTransport):
    """Wraps a transport; fails the first POST requests as scripted.

    ``connect``: refused before reaching the server; ``lost``: processed by the
    server, response lost; an int: that HTTP status without reaching the server.
    """

    def __init__(self, inner, script):
        self.inner, self.script, self.keys, self.encodings = inner, list(script), [], []

    def handle_request(self, request):
        self.keys.append((request.url.path, request.headers.get("idempotency-key")))
        self.encodings.append(request.headers.get("content-encoding"))
        step = self.script.pop(0) if self.script and request.method == "POST" else None
        if step == "connect":
            raise httpx.ConnectError("refused", request=request)
        if step == "lost":
            resp = self.inner.handle_request(request)
            resp.read()
            raise httpx.ReadError("connection reset", request=request)
        if isinstance(step, int):
            return httpx.Response(step, json={"error": {"code": "x", "message": "busy", "fix": "retry"}}, headers={"Retry-After": "0"})
        return self.inner.handle_request(request)


@pytest.fixture
def server(make_client, serve_in_thread):
    """``(app, base_url, secret, key_id)`` for an app that requires keys, served on loopback."""
    _tc, app = make_client(require_api_key=True, max_cells_per_request=50)
    secret, info = app.state.ledger.create_key("client-tests")
    return app, serve_in_thread(app), secret, info.id


def _client(server, script=(), **kw):
    _app, url, secret, _ = server
    transport = Flaky(httpx.HTTPTransport(), script)
    http = httpx.Client(transport=transport, base_url=url)
    kw.setdefault("backoff", 0.001)
    return Client(f"{url}/v1/singlecell/annotate", secret, http=http, **kw), transport


@pytest.mark.parametrize("transport,compression", [("binary", "zstd"), ("binary", None), ("json", None), ("json", "gzip")])
def test_annotate_returns_the_in_process_result(server, cells, transport, compression):
    X, genes, ref = cells
    c, t = _client(server, transport=transport, compression=compression)
    res = c.annotate(X, genes)
    assert t.encodings[-1] == compression
    assert isinstance(res, cellatlas.AnnotationResult) and len(res) == N
    assert list(res.label) == list(ref.label)
    np.testing.assert_allclose(res.confidence, ref.confidence, atol=1e-4)
    assert list(res.cell_ids) == [str(i) for i in range(N)]
    assert res.provenance["atlas"] == ref.provenance["atlas"]
    assert c.last_usage == {"cells": N, "credits_charged": 2, "credits_left": 498}  # 2 chunks (limit 50)


def test_annotate_large_chunks_in_order(server, cells):
    app, *_rest, key_id = server
    X, genes, ref = cells
    c, t = _client(server)
    ids = [f"cell-{i}" for i in range(N)]
    res = c.annotate_large(X, genes, chunk_size=30, cell_ids=ids, progress=False)
    assert list(res.label) == list(ref.label) and list(res.cell_ids) == ids
    posts = [k for p, k in t.keys if p.endswith("/annotate")]
    assert len(posts) == 3 and len(set(posts)) == 3  # 30+30+20 cells, one key each
    assert app.state.ledger.get_key(key_id).credits == 497
    res = c.annotate_large(X, genes, chunk_size=10_000, progress=False)  # clamped to the server's 50
    assert list(res.label) == list(ref.label)


def test_annotate_adata_writes_the_in_process_columns(server, pbmc):
    local = pbmc[:N].copy()
    remote = pbmc[:N].copy()
    with pytest.warns(UserWarning, match="cell_type_uploaded"):  # pbmc carries the authors' cell_type
        cellatlas.annotate_adata(local)
    c, _ = _client(server)
    with pytest.warns(UserWarning, match="cell_type_uploaded"):
        res = c.annotate_adata(remote, progress=False)
    assert len(res) == N
    assert list(remote.obs.columns) == list(local.obs.columns)
    assert set(remote.obsm) == set(local.obsm) and set(remote.uns["cellatlas"]) == set(local.uns["cellatlas"])
    assert list(remote.obs["cell_type"]) == list(local.obs["cell_type"])
    np.testing.assert_allclose(remote.obsm["X_cellatlas"], local.obsm["X_cellatlas"], atol=1e-5)
    assert list(res.cell_ids) == list(local.obs_names)


def test_client_keeps_the_users_cell_type_and_supports_key_added_and_copy(server, pbmc):
    authors = list(pbmc.obs["cell_type"][:N].astype(str))
    a = pbmc[:N].copy()
    c, _ = _client(server)
    with pytest.warns(UserWarning, match=r"obs\['cell_type'\] -> obs\['cell_type_uploaded'\]"):
        c.annotate_adata(a, progress=False)
    assert list(a.obs["cell_type_uploaded"].astype(str)) == authors
    assert a.uns["cellatlas"]["moved_columns"] == {"cell_type": "cell_type_uploaded"}
    b = pbmc[:N].copy()
    out = c.annotate_adata(b, key_added="cellatlas", copy=True, progress=False)
    assert "cellatlas" not in b.obs and list(b.obs["cell_type"].astype(str)) == authors  # copy=True: b untouched
    assert list(out.obs["cell_type"].astype(str)) == authors and list(out.obs["cellatlas"]) == list(a.obs["cell_type"])
    assert "cellatlas_confidence" in out.obs and out.uns["cellatlas"]["key_added"] == "cellatlas"


def test_client_says_when_the_server_answered_with_another_model(server, cells):
    X, genes, ref = cells
    c, _ = _client(server)
    with pytest.warns(UserWarning, match="geneformer"):
        res = c.annotate(X[:20], genes, model="geneformer")
    assert list(res.label) == list(ref.label[:20])
    assert res.provenance["model_requested"] == "geneformer" and res.provenance["model_used"] == "default"
    assert [w["code"] for w in c.last_warnings] == ["model_fallback"]


def test_client_errors_carry_the_servers_message_and_fix(make_client, serve_in_thread, cells):
    from cellatlas.errors import CellAtlasError

    X, genes, _ref = cells
    _tc, app = make_client(require_api_key=False, strict_models=True)
    c = Client(serve_in_thread(app), backoff=0.001)
    with pytest.raises(CellAtlasError) as e:
        c.annotate(X[:5], genes, model="geneformer")
    err = e.value
    assert err.status_code == 409 and err.code in ("model_unavailable", "atlas_model_mismatch")
    assert "geneformer" in str(err) and "Fix:" in str(err) and err.fix in str(err)  # not only "409 Conflict"


def test_retries_reuse_the_idempotency_key_and_charge_once(server, cells):
    app, *_rest, key_id = server
    X, genes, ref = cells
    c, t = _client(server, script=["connect", 503, "lost"])
    res = c.annotate(X[:40], genes)
    assert list(res.label) == list(ref.label[:40])
    posts = [k for p, k in t.keys if p.endswith("/annotate")]
    assert len(posts) == 4 and len(set(posts)) == 1
    assert app.state.ledger.get_key(key_id).credits == 499  # the lost response was replayed, not re-run


def test_errors_come_back_typed(server, cells):
    app, _tc, _s, key_id = server
    X, genes, _ref = cells
    c, _ = _client(server)
    with pytest.raises(UnknownAtlasError) as e:
        c.annotate(X[:5], genes, atlas="nope")
    assert e.value.status_code == 404 and e.value.fix
    app.state.ledger.charge(key_id, 500_000)
    with pytest.raises(PaymentRequiredError) as e:
        c.annotate(X[:5], genes)
    assert e.value.details["balance"] == 0


def test_unreachable_server_raises_after_retries():
    c = Client("http://127.0.0.1:9", "sk-ca-x", max_retries=1, backoff=0.001, timeout=2)
    with pytest.raises(ServiceUnreachableError) as e:
        c.limits()
    assert "2 attempts" in e.value.message and e.value.fix


def test_configuration_from_environment(monkeypatch):
    monkeypatch.delenv("CELLATLAS_API_URL", raising=False)
    with pytest.raises(InputError):
        Client()
    monkeypatch.setenv("CELLATLAS_API_URL", "http://example.org/v1/")
    monkeypatch.setenv("CELLATLAS_API_KEY", "sk-ca-env")
    c = Client()
    assert c.base_url == "http://example.org" and c._http.headers["authorization"] == "Bearer sk-ca-env"
    assert c.compression == "zstd" and Client("http://127.0.0.1:8000").compression is None  # auto
    assert Client("http://127.0.0.1:8000", compression="gzip").compression == "gzip"
    with pytest.raises(InputError):
        Client(transport="grpc")


def test_embed_markers_and_discovery(server, cells):
    X, genes, _ref = cells
    c, _ = _client(server)
    emb, layout, report = c.embed(X, genes, progress=False)
    e_ref, l_ref, _ = cellatlas.embed(X, genes)
    np.testing.assert_allclose(emb, e_ref, atol=1e-5)
    np.testing.assert_allclose(layout, l_ref, atol=1e-4)
    assert report
    table = c.markers()
    assert list(table.columns) == ["label", "ontology_id", "gene", "sign", "source"] and len(table) > 0
    assert c.limits()["max_cells_per_request"] == 50
    assert any(m["name"] == "default" for m in c.models())
    assert any(a["name"] == "human-core" for a in c.atlases())
    assert c.usage()["credits"] < 500


def test_progress_bar_for_multiple_chunks(server, cells, capsys):
    X, genes, _ref = cells
    c, _ = _client(server)
    c.annotate_large(X, genes, chunk_size=40, progress=True)
    assert "annotating" in capsys.readouterr().err


def test_gene_list_mismatch_is_raised_typed_and_skippable(server, cells):
    from cellatlas.errors import GeneListMismatchError

    X, genes, _ref = cells
    c, _ = _client(server)
    with pytest.raises(GeneListMismatchError, match="shifted by 2 columns"):
        c.annotate(X, list(np.roll(genes, 2)))
    res = c.annotate(X, list(np.roll(genes, 2)), skip_gene_check=True)
    assert len(res) == N and res.gene_report["gene_check"]["verdict"] == "skipped"
