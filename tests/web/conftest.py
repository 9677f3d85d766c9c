"""Fixtures for the workspace tests: datasets, live uvicorn servers and headless Chromium.

Browser tests drive Debian's ``/usr/bin/chromium`` through Playwright for Python
(Playwright cannot download its own browser here). They skip when Chromium is
absent, unless ``CI=true``, where a missing browser is a failure
(``scripts/ci_browser.sh`` installs it).

``CELLATLAS_SCREENSHOTS=DIR`` makes the browser flow save 1280x800 screenshots of
each page into ``DIR`` (the ones in ``docs/screenshots/`` come from there).
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

CHROMIUM = os.environ.get("CELLATLAS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 800}


# ------------------------------------------------------------------ datasets
def atlas_cells(n: int, atlas: str = "human-core"):
    """``n`` real reference cells of a built-in atlas (raw counts on its panel and marker genes), evenly spread.

    The built-in atlas ships with the package, so these tests need no downloaded data.
    """
    import anndata as ad
    import pandas as pd

    from cellatlas.atlas import load_atlas

    at = load_atlas(atlas)
    X = at.reference_counts()
    rows = np.linspace(0, X.shape[0] - 1, n).astype(int)
    names = np.asarray(at.reference_labels, dtype=object)[at.ref_codes[rows]]
    obs = pd.DataFrame({"cell_type": names}, index=[f"cell-{i:04d}" for i in rows])
    return ad.AnnData(X=sp.csr_matrix(X[rows]), obs=obs, var=pd.DataFrame(index=at.ref_genes))


def _write_mtx_zip(adata, path: Path) -> Path:
    """A zipped 10x-style Matrix Market folder (genes x cells matrix, features, barcodes)."""
    buf = io.BytesIO()
    scipy.io.mmwrite(buf, sp.csr_matrix(adata.X).T.tocoo().astype(np.int64), field="integer")
    feats = "".join(f"GENE{i:05d}\t{g}\tGene Expression\n" for i, g in enumerate(adata.var_names))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("filtered_feature_bc_matrix/matrix.mtx", buf.getvalue())
        z.writestr("filtered_feature_bc_matrix/features.tsv", feats)
        z.writestr("filtered_feature_bc_matrix/barcodes.tsv", "".join(f"{c}\n" for c in adata.obs_names))
    return path


def pbmc68k_reduced():
    """``scanpy.datasets.pbmc68k_reduced()``, read from scanpy's package folder without importing scanpy (slow)."""
    import importlib.util

    import anndata as ad

    import warnings

    root = Path(importlib.util.find_spec("scanpy").submodule_search_locations[0])
    with warnings.catch_warnings():  # the bundled file is written by an old anndata
        warnings.simplefilter("ignore")
        return ad.read_h5ad(root / "datasets" / "10x_pbmc68k_reduced.h5ad")


def pbmc68k_counts(n: int | None = None):
    """scanpy's bundled pbmc68k_reduced ``.raw`` (log-normalised) turned back into its integer counts.

    ``.raw`` holds ``log1p(counts / n_counts * 1e4)``; ``expm1(x) * n_counts / 1e4`` gives the
    counts back (integers to within float error).
    """
    import anndata as ad

    a = pbmc68k_reduced()
    a = a[:n] if n else a
    lognorm = a.raw.X.toarray() if sp.issparse(a.raw.X) else np.asarray(a.raw.X)
    counts = np.rint(np.expm1(lognorm) * a.obs["n_counts"].to_numpy()[:, None] / 1e4).astype(np.float32)
    return ad.AnnData(X=sp.csr_matrix(counts), obs=a.obs[["bulk_labels"]].copy(), var=a.raw.var[[]].copy())


@dataclass
class Datasets:
    cells_h5ad: Path
    pbmc68k_h5ad: Path
    pbmc68k_zip: Path
    mismatch_h5ad: Path
    corrupt_h5ad: Path
    n_cells: int
    n_genes: int
    n_zip_cells: int


@pytest.fixture(scope="session")
def datasets(tmp_path_factory) -> Datasets:
    """Test uploads.

    - ``cells_h5ad``: 700 reference PBMCs of the built-in atlas, raw counts, with the authors'
      labels (``obs["cell_type"]``) and clusters (``obs["leiden"]``);
    - ``pbmc68k_h5ad``: scanpy's pbmc68k_reduced ``.raw`` as shipped (log-normalised, 765 genes);
    - ``pbmc68k_zip``: 300 of those cells as counts, in a zipped 10x Matrix Market folder;
    - ``mismatch_h5ad``: real counts whose gene names are row numbers (the classic mistake);
    - ``corrupt_h5ad``: not an HDF5 file at all.
    """
    d = tmp_path_factory.mktemp("web-data")
    cells = atlas_cells(700)
    # clusters as an upload carries them: whole numbers, two of the authors' types merged into one
    codes = pd.Categorical(cells.obs["cell_type"]).codes
    cells.obs["leiden"] = pd.Categorical(np.minimum(codes, 5).astype(str))
    cells.write_h5ad(d / "pbmc_cells.h5ad")
    pbmc68k_reduced().raw.to_adata().write_h5ad(d / "pbmc68k_raw.h5ad")
    _write_mtx_zip(pbmc68k_counts(300), d / "pbmc68k_mtx.zip")
    wrong = atlas_cells(200)
    wrong.var_names = [str(i + 1) for i in range(wrong.n_vars)]
    wrong.write_h5ad(d / "numbered_genes.h5ad")
    (d / "corrupt.h5ad").write_bytes(b"this is not an HDF5 file\n" * 40)
    return Datasets(
        d / "pbmc_cells.h5ad", d / "pbmc68k_raw.h5ad", d / "pbmc68k_mtx.zip", d / "numbered_genes.h5ad",
        d / "corrupt.h5ad", cells.n_obs, cells.n_vars, 300,
    )


# ------------------------------------------------------------------ servers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    app: object
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(app) -> LiveServer:
    """Run ``app`` with a real uvicorn server on 127.0.0.1 and a free port, in a thread."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", app, server, thread)


def make_settings(home: Path, **kw):
    from cellatlas.config import Settings

    return Settings(home=home, database_url=f"sqlite:///{home / 'ledger.db'}", **kw)


@pytest.fixture(scope="session")
def settings_factory():
    """``settings_factory(home, **overrides)``: Settings with a private home and SQLite ledger."""
    return make_settings


@pytest.fixture(scope="session")
def cells_factory():
    """``cells_factory(n)``: an AnnData of ``n`` real reference cells (see :func:`atlas_cells`)."""
    return atlas_cells


@pytest.fixture(scope="module")
def local_server(tmp_path_factory):
    """The app in local mode (no API keys), as ``cellatlas serve --local`` runs it."""
    from cellatlas.service import create_app

    srv = serve(create_app(make_settings(tmp_path_factory.mktemp("home-local"), require_api_key=False)))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """The app requiring API keys; ``srv.key`` / ``srv.key_id`` is a key with 500 credits."""
    from cellatlas.service import create_app

    app = create_app(make_settings(tmp_path_factory.mktemp("home-keyed"), require_api_key=True))
    key, info = app.state.ledger.create_key("browser-test", credits=500)
    srv = serve(app)
    srv.key, srv.key_id = key, info.id
    yield srv
    srv.stop()


# ------------------------------------------------------------------ browser
def _require_chromium() -> None:
    if Path(CHROMIUM).exists():
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {CHROMIUM} is missing: run scripts/ci_browser.sh first")
    pytest.skip(f"headless Chromium not installed at {CHROMIUM} (install it with scripts/ci_browser.sh)")


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the whole test session."""
    _require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="session")
def browser_context(browser):
    """One context (so the browser's HTTP cache keeps plotly.js between tests); each test gets its own tab."""
    # bypass_csp: Playwright's wait_for_function evaluates its predicate string with eval, which the
    # app's Content-Security-Policy forbids; the policy itself is tested in tests/service/test_csp_browser.py.
    ctx = browser.new_context(viewport=VIEWPORT, accept_downloads=True, bypass_csp=True)
    yield ctx
    ctx.close()


@pytest.fixture
def page(browser_context):
    """A fresh 1280x800 tab (own sessionStorage) that fails the test on uncaught JS errors."""
    pg = browser_context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(30_000)
    yield pg
    pg.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def shot():
    """``shot(page, name)`` saves a screenshot when ``CELLATLAS_SCREENSHOTS`` names a folder."""
    out = os.environ.get("CELLATLAS_SCREENSHOTS")

    def _shot(pg, name: str, full_page: bool = False) -> None:
        if not out:
            return
        Path(out).mkdir(parents=True, exist_ok=True)
        pg.wait_for_timeout(400)  # let transitions and Plotly finish drawing
        pg.screenshot(path=str(Path(out) / f"{name}.png"), full_page=full_page)

    return _shot
