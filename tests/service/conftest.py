"""Fixtures for the HTTP service tests: ledgers on SQLite and PostgreSQL, apps, a live server."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("CELLATLAS_SHARED_DATA") or REPO.parent / "shared" / "data")
SEEDS = SHARED_DATA.parent / "seeds"
PBMC3K = SHARED_DATA / "datasets" / "human_pbmc3k_10xv1_seurat_labels.h5ad"


# ---------------------------------------------------------------- databases
def _postgres_url() -> str | None:
    url = os.environ.get("CELLATLAS_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but CELLATLAS_TEST_POSTGRES_URL is unset: start PostgreSQL with scripts/ci_postgres.sh")
        pytest.skip("PostgreSQL not configured (set CELLATLAS_TEST_POSTGRES_URL, see scripts/ci_postgres.sh)")
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """A fresh, empty ledger database: a SQLite file, or a private schema on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    import psycopg
    from sqlalchemy.engine import make_url

    url = _postgres_url()
    schema = "t_" + uuid.uuid4().hex[:12]
    u = make_url(url)
    conninfo = dict(host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database)
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in url else "?"
    yield f"{url}{sep}options=-csearch_path%3D{schema}"
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def ledger(db_url):
    from cellatlas.service.ledger import Ledger

    led = Ledger(db_url, free_credits=500, cells_per_credit=1000, secret=b"test-secret")
    yield led
    led.close()


# ---------------------------------------------------------------- data
def _need_shared() -> None:
    if not PBMC3K.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set CELLATLAS_SHARED_DATA)")


@pytest.fixture(scope="session")
def pbmc():
    """300 PBMC 3k cells (raw counts, all labels present), as AnnData."""
    _need_shared()
    import anndata as ad

    full = ad.read_h5ad(PBMC3K)
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(full.n_obs, 300, replace=False))
    sub = full[idx].copy()
    sub.layers = {}
    return sub


# ---------------------------------------------------------------- apps
@pytest.fixture
def settings_factory(tmp_path):
    """Build Settings for an isolated home; extra kwargs override fields."""
    from cellatlas.config import Settings

    def make(**kw):
        kw.setdefault("home", tmp_path / "home")
        kw.setdefault("database_url", f"sqlite:///{tmp_path / 'home' / 'cellatlas.db'}")  # never a real ledger
        return Settings(**kw)

    return make


@pytest.fixture
def make_client(settings_factory):
    """``make_client(**settings) -> (TestClient, app)``; the app's ledger is closed afterwards."""
    from fastapi.testclient import TestClient

    from cellatlas.service.app import create_app

    made = []

    def make(ledger=None, **kw):
        app = create_app(settings_factory(**kw), ledger=ledger)
        tc = TestClient(app, raise_server_exceptions=False)
        made.append(tc)
        return tc, app

    yield make
    for tc in made:
        tc.close()
        tc.app.state.ledger.close()


@pytest.fixture
def keyed(make_client):
    """An app that requires keys, plus a fresh key: ``(client, app, secret, key_id)``."""
    tc, app = make_client(require_api_key=True)
    secret, info = app.state.ledger.create_key("tests")
    tc.headers["Authorization"] = f"Bearer {secret}"
    return tc, app, secret, info.id


def _csr_payload(X, genes, **extra) -> dict:
    """The articles' JSON body for a CSR matrix."""
    import scipy.sparse as sp

    X = sp.csr_matrix(X)
    body = {
        "genes": list(map(str, genes)),
        "matrix": {"indptr": X.indptr.tolist(), "indices": X.indices.tolist(), "data": X.data.tolist(), "shape": list(X.shape)},
    }
    body.update(extra)
    return body


def _npz_body(X, genes, **extra) -> bytes:
    import io

    import scipy.sparse as sp

    X = sp.csr_matrix(X)
    buf = io.BytesIO()
    np.savez(buf, indptr=X.indptr, indices=X.indices, data=X.data, shape=np.array(X.shape), genes=np.array(list(genes), dtype=str), **extra)
    return buf.getvalue()


@pytest.fixture(scope="session")
def seeds_dir():
    """../shared/seeds (the articles); skipped only when shared/ is absent."""
    if not SEEDS.is_dir():
        pytest.skip(f"seeds not found at {SEEDS} (shared/ is absent)")
    return SEEDS


@pytest.fixture(scope="session")
def csr_payload():
    """``csr_payload(X, genes, **extra) -> dict``: the articles' JSON body."""
    return _csr_payload


@pytest.fixture(scope="session")
def npz_body():
    """``npz_body(X, genes, **extra_arrays) -> bytes``: the binary body."""
    return _npz_body


# ---------------------------------------------------------------- live server
@pytest.fixture
def live_server(make_client, serve_in_thread):
    """A live server on loopback (uvicorn, keys required, settings as shipped): ``(url, ledger)``."""
    _tc, app = make_client(require_api_key=True)
    return serve_in_thread(app), app.state.ledger


@pytest.fixture
def serve_in_thread():
    """``serve(app) -> base_url``: run an app under uvicorn on loopback in a thread of this process."""
    import threading

    import uvicorn

    servers = []

    def serve(app) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.time() + 30
        while not server.started:
            if time.time() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield serve
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
