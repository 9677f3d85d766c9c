"""The workspace's HTTP routes, through the real app (no browser needed)."""

from __future__ import annotations

import io
import math
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

API = "/workspace/api"


def _csv_bytes(adata) -> bytes:
    df = pd.DataFrame(np.asarray(adata.X.todense(), dtype=int), index=adata.obs_names, columns=adata.var_names)
    return df.to_csv(index_label="cell_id").encode()


def _wait(client, sid: str, headers=None) -> dict:
    deadline = time.time() + 60
    while time.time() < deadline:
        st = client.get(f"{API}/sessions/{sid}/status", headers=headers).json()
        if st["state"] in ("done", "error"):
            return st
        time.sleep(0.05)
    raise AssertionError("run did not finish")


@pytest.fixture(scope="module")
def cells(cells_factory):
    return cells_factory(240)


@pytest.fixture(scope="module")
def client(tmp_path_factory, settings_factory):
    from cellatlas.service import create_app

    settings = settings_factory(tmp_path_factory.mktemp("api-home"), require_api_key=False, workspace_max_upload_bytes=4_000_000)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def finished(client, cells):
    """A CSV upload annotated with QC flags: ``(session id, upload response, total counts)``."""
    r = client.post(f"{API}/sessions", params={"filename": "cells.csv"}, content=_csv_bytes(cells))
    assert r.status_code == 201, r.text
    sid = r.json()["session"]
    totals = np.asarray(cells.X.sum(axis=1)).ravel()
    run = client.post(f"{API}/sessions/{sid}/run", json={"min_counts": float(np.median(totals)), "max_mito_fraction": 0.2})
    assert run.status_code == 202, run.text
    assert _wait(client, sid)["state"] == "done"
    return sid, r.json(), totals


def test_page_static_and_config(client):
    for path in ("/", "/workspace"):
        r = client.get(path)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        assert "Cell Atlas workspace" in r.text and 'src="/static/js/app.js"' in r.text
        assert "cdn" not in r.text.lower() and "https://" not in r.text  # works offline
    cfg = client.get(f"{API}/config").json()
    assert cfg["require_api_key"] is False
    assert "human-core" in [a["name"] for a in cfg["atlases"]] and cfg["default_atlas"] == "human-core"
    assert cfg["default_model"] == "default"
    assert {".h5ad", ".h5", ".zip", ".csv"} <= set(cfg["accepted"])
    import plotly

    js = client.get(cfg["plotly_url"])
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    with open(f"{plotly.__path__[0]}/package_data/plotly.min.js", "rb") as fh:
        assert js.content == fh.read()
    assert client.get("/static/js/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/css/app.css").status_code == 200
    assert client.get("/static/..%2F..%2Fconfig.py").status_code == 404
    assert client.get("/static/nope.js").status_code == 404


def test_csv_upload_facts(finished, cells):
    _, up, _ = finished
    f = up["facts"]
    assert up["format"] == "CSV" and up["filename"] == "cells.csv"
    assert (f["n_cells"], f["n_genes"]) == cells.shape
    assert f["value_type"] == "counts" and f["species"] == "human" and f["id_type"].startswith("symbol")
    cov = f["coverage"]["human-core"]
    assert cov["fraction"] == 1.0 and cov["ok"] and cov["problem"] is None  # the reference's own genes


def test_results_payload(client, finished, cells):
    sid, _, totals = finished
    res = client.get(f"{API}/sessions/{sid}/results").json()
    n = cells.n_obs
    p = res["points"]
    assert res["n_cells"] == n and all(len(p[k]) == n for k in ("x", "y", "label", "confidence", "band", "qc_pass"))
    assert sum(r["n"] for r in res["label_table"]) == n
    assert [r["label"] for r in res["label_table"]] == res["labels"]
    assert sum(res["histogram"]["counts"]) == n
    assert res["histogram"]["thresholds"] == {"review": 0.4, "confident": 0.7}
    bands = res["summary"]["bands"]
    conf = np.asarray(p["confidence"])
    confident = np.asarray(p["band"]) == 0  # band codes: 0 confident, 1 review, 2 low
    assert bands["confident"] == int(confident.sum()) and sum(bands.values()) == n
    # bands come from the unrounded confidence; the payload's is rounded to 3 decimals
    assert confident[conf >= 0.7005].all() and not confident[conf < 0.6995].any()
    # QC flags: computed from the counts, flagged cells kept
    qc = res["summary"]["qc"]
    assert qc["n_flagged"] == qc["n_low_counts"] == int((totals < np.median(totals)).sum())
    assert np.array_equal(np.asarray(p["qc_pass"], bool), totals >= np.median(totals))
    assert qc["notes"] and "mitochondrial" in qc["notes"][0]
    dp = res["dotplot"]
    assert dp["genes"] and np.asarray(dp["fraction"]).shape == (len(dp["labels"]), len(dp["genes"]))
    assert np.all((np.asarray(dp["fraction"]) >= 0) & (np.asarray(dp["fraction"]) <= 1))
    assert res["reference"]["n_total"] >= len(res["reference"]["x"]) > 0


def test_review_and_cell_detail(client, finished):
    sid, _, _ = finished
    res = client.get(f"{API}/sessions/{sid}/results").json()
    page = client.get(f"{API}/sessions/{sid}/review", params={"band": "all", "limit": 200}).json()
    assert page["total"] == res["n_cells"]
    conf = [c["confidence"] for c in page["cells"]]
    assert conf == sorted(conf)  # least confident first
    unc = client.get(f"{API}/sessions/{sid}/review", params={"band": "uncertain"}).json()
    assert unc["total"] == res["summary"]["bands"]["review"] + res["summary"]["bands"]["low"]
    lab = res["labels"][0]
    by_label = client.get(f"{API}/sessions/{sid}/review", params={"band": "all", "label": lab, "limit": 200}).json()
    assert by_label["total"] == res["label_table"][0]["n"] and {c["label"] for c in by_label["cells"]} == {lab}
    c = client.get(f"{API}/sessions/{sid}/cells/3").json()
    assert c["index"] == 3 and c["cell_id"] and 0 <= c["confidence"] <= 1
    assert {"knn_label", "marker_label", "agreement"} <= set(c["evidence"]) and "pass" in c["qc"]
    assert c["parent"]["label"] and c["parent"]["confidence"] >= c["confidence"] - 1e-4
    bad = client.get(f"{API}/sessions/{sid}/cells/{res['n_cells']}")
    assert bad.status_code == 422 and bad.json()["error"]["fix"]
    assert client.get(f"{API}/sessions/{sid}/review", params={"band": "maybe"}).status_code == 422


def test_relabel_and_downloads(client, finished, cells):
    sid, _, _ = finished
    res = client.get(f"{API}/sessions/{sid}/results").json()
    post = lambda body: client.post(f"{API}/sessions/{sid}/relabel", json=body)  # noqa: E731
    for body in ({"label": "x"}, {"label": "x", "cells": [0], "group": "B cell"}, {"label": " ", "cells": [0]},
                 {"label": "x", "cells": [10_000]}, {"label": "x", "group": "no such label"}):
        r = post(body)
        assert r.status_code == 422 and r.json()["error"]["fix"], body
    assert post({"cells": [0, 1], "label": "Curated A"}).json() == {"changed": 2, "n_relabelled": 2}
    group, group_n = res["label_table"][-1]["label"], res["label_table"][-1]["n"]
    assert post({"group": group, "label": "Curated B"}).json()["changed"] == group_n
    assert post({"cells": [1], "label": None}).json()["n_relabelled"] == 1 + group_n  # revert one
    res2 = client.get(f"{API}/sessions/{sid}/results").json()
    assert "Curated A" in res2["labels"] and group not in res2["labels"] and res2["summary"]["n_relabelled"] == 1 + group_n

    csv = client.get(f"{API}/sessions/{sid}/download/csv")
    assert csv.status_code == 200 and 'filename="cells.cellatlas.csv"' in csv.headers["content-disposition"]
    df = pd.read_csv(io.BytesIO(csv.content), index_col=0)
    assert list(df.index.astype(str)) == list(cells.obs_names) and len(df) == cells.n_obs
    assert df["cell_type"].iloc[0] == "Curated A" and df["relabelled"].iloc[0]
    assert df["cell_type"].iloc[1] == df["cell_type_original"].iloc[1] and not df["relabelled"].iloc[1]
    assert (df["cell_type"] == "Curated B").sum() == group_n and set(df.loc[df["cell_type"] == "Curated B", "cell_type_original"]) == {group}
    assert df["qc_pass"].sum() == sum(res["points"]["qc_pass"])

    h5 = client.get(f"{API}/sessions/{sid}/download/h5ad")
    assert h5.status_code == 200
    out = ad.read_h5ad(io.BytesIO(h5.content))
    assert out.shape == cells.shape and np.allclose(out.X.toarray(), cells.X.toarray())  # the uploaded counts, untouched
    assert out.obs["cell_type"].iloc[0] == "Curated A" and bool(out.obs["cell_type_relabelled"].iloc[0])
    assert out.obs["cell_type_original"].iloc[0] == df["cell_type_original"].iloc[0]
    assert out.uns["cellatlas"]["workspace"]["n_relabelled"] == 1 + group_n
    assert client.get(f"{API}/sessions/{sid}/download/pdf").status_code == 422


def test_bad_uploads_and_requests(client, cells):
    r = client.post(f"{API}/sessions", params={"filename": "notes.pdf"}, content=b"%PDF")
    assert r.status_code == 415 and ".h5ad" in r.json()["error"]["fix"]
    r = client.post(f"{API}/sessions", params={"filename": "empty.h5ad"}, content=b"")
    assert r.status_code == 415 and "empty" in r.json()["error"]["message"]
    r = client.post(f"{API}/sessions", params={"filename": "big.csv"}, content=b"x" * 4_000_001)
    assert r.status_code == 413 and r.json()["error"]["fix"]
    r = client.post(f"{API}/sessions", params={"filename": "broken.h5ad"}, content=b"not hdf5" * 100)
    assert r.status_code == 422 and "broken.h5ad" in r.json()["error"]["message"] and r.json()["error"]["fix"]
    r = client.post(f"{API}/sessions", params={"filename": "matrix.zip"}, content=b"PK not really a zip")
    assert r.status_code == 422 and "matrix.zip" in r.json()["error"]["message"]
    assert client.get(f"{API}/sessions/doesnotexist/results").json()["error"]["code"] == "session_not_found"
    # a fresh upload has no results yet; unknown/unavailable models are refused before any work
    sid = client.post(f"{API}/sessions", params={"filename": "c.csv"}, content=_csv_bytes(cells[:20])).json()["session"]
    assert "no finished annotation" in client.get(f"{API}/sessions/{sid}/results").json()["error"]["message"]
    assert client.post(f"{API}/sessions/{sid}/run", json={"model": "nope"}).status_code == 404
    r = client.post(f"{API}/sessions/{sid}/run", json={"model": "geneformer"})
    assert r.status_code == 409 and r.json()["error"]["fix"]
    assert client.post(f"{API}/sessions/{sid}/run", json={"max_mito_fraction": 3}).status_code == 422
    assert client.delete(f"{API}/sessions/{sid}").status_code == 204
    assert client.get(f"{API}/sessions/{sid}").status_code == 404


def test_keys_ownership_and_credits(tmp_path, cells, settings_factory):
    from cellatlas.service import create_app

    app = create_app(settings_factory(tmp_path, require_api_key=True))
    key, info = app.state.ledger.create_key("a", credits=3)
    broke, _ = app.state.ledger.create_key("b", credits=0)
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(app) as c:
        assert c.get(f"{API}/config").json()["require_api_key"] is True  # readable before signing in
        assert c.post(f"{API}/sessions", params={"filename": "c.csv"}, content=b"x").status_code == 401
        assert c.get(f"{API}/whoami", headers=auth).json() == {"local": False, "key_id": info.id, "name": "a", "credits": 3}
        sub = cells[:150]
        sid = c.post(f"{API}/sessions", params={"filename": "c.csv"}, content=_csv_bytes(sub), headers=auth).json()["session"]
        other = {"Authorization": f"Bearer {broke}"}
        r = c.get(f"{API}/sessions/{sid}", headers=other)
        assert r.status_code == 401 and "different API key" in r.json()["error"]["message"]
        assert c.post(f"{API}/sessions/{sid}/run", json={}, headers=auth).status_code == 202
        st = _wait(c, sid, auth)
        assert st["state"] == "done" and st["usage"]["credits_charged"] == math.ceil(sub.n_obs / 1000)
        assert app.state.ledger.get_key(info.id).credits == 3 - math.ceil(sub.n_obs / 1000)
        sid2 = c.post(f"{API}/sessions", params={"filename": "c.csv"}, content=_csv_bytes(sub), headers=other).json()["session"]
        r = c.post(f"{API}/sessions/{sid2}/run", json={}, headers=other)
        assert r.status_code == 402 and r.json()["error"]["fix"]


def test_store_expires_idle_sessions(tmp_path):
    import asyncio

    from cellatlas.web.sessions import SessionStore

    store = SessionStore(tmp_path, max_upload_bytes=100, ttl_seconds=60)

    async def one_chunk():
        yield b"a,b\n1,2\n"

    s = asyncio.run(store.create_from_stream("t.csv", one_chunk(), owner=None))
    assert (tmp_path / s.id / "t.csv").read_bytes() == b"a,b\n1,2\n"
    evil = asyncio.run(store.create_from_stream("../../my data?.CSV", one_chunk(), owner="k1"))
    assert evil.upload_path.parent == tmp_path / evil.id and evil.upload_path.name == "my_data.csv"
    with pytest.raises(Exception, match="different API key"):
        store.get(evil.id, owner="k2")
    assert store.cleanup(now=time.time() + 30) == []
    assert sorted(store.cleanup(now=time.time() + 120)) == sorted([s.id, evil.id]) and not (tmp_path / s.id).exists()


def test_run_interrupted_by_a_restart_is_reported(client, cells):
    sid = client.post(f"{API}/sessions", params={"filename": "c.csv"}, content=_csv_bytes(cells[:20])).json()["session"]
    store = client.app.state.workspace_store
    s = store.get(sid, None)
    s.update(status={"state": "running", "stage": "Annotating", "progress": 0.5, "pid": 2**22 + 7, "process": "gone"})
    st = client.get(f"{API}/sessions/{sid}/status").json()
    assert st["state"] == "error" and st["error"]["code"] == "run_interrupted" and st["error"]["fix"]


def _upload_h5ad(client, adata, tmp_path, name="own.h5ad") -> str:
    adata.write_h5ad(tmp_path / name)
    r = client.post(f"{API}/sessions", params={"filename": name}, content=(tmp_path / name).read_bytes())
    assert r.status_code == 201, r.text
    sid = r.json()["session"]
    assert client.post(f"{API}/sessions/{sid}/run", json={}).status_code == 202
    assert _wait(client, sid)["state"] == "done"
    return sid


def test_upload_with_its_own_umap_labels_and_clusters(client, cells, tmp_path):
    """The upload's X_umap is the map shown (as sent); its label and cluster columns are compared."""
    own = cells.copy()
    rng = np.random.default_rng(1)
    own.obsm["X_umap"] = rng.normal(size=(own.n_obs, 2)).astype(np.float32)
    own.obs["louvain"] = pd.Categorical((np.arange(own.n_obs) % 3).astype(str))
    own.obs["n_counts"] = np.asarray(own.X.sum(axis=1)).ravel()  # a number, not a grouping
    sid = _upload_h5ad(client, own, tmp_path)
    res = client.get(f"{API}/sessions/{sid}/results").json()
    um = res["user_map"]
    assert um["state"] == "done" and um["source"] == "uploaded" and "X_umap" in um["title"]
    assert np.allclose(um["x"], own.obsm["X_umap"][:, 0], atol=1e-3) and np.allclose(um["y"], own.obsm["X_umap"][:, 1], atol=1e-3)
    cmps = {c["column"]: c for c in res["comparisons"]}
    assert list(cmps) == ["cell_type", "louvain"]  # labels first; n_counts is not a grouping
    lab = cmps["cell_type"]
    assert lab["kind"] == "labels" and sum(lab["n"]) == own.n_obs
    for row, share, summary in zip(lab["rows"], lab["share"], lab["summary"]):
        calls = np.asarray(res["labels"])[np.asarray(res["points"]["label"])][own.obs["cell_type"].to_numpy() == row]
        top, n_top = np.unique(calls, return_counts=True)
        assert summary["group"] == row and summary["majority"] == top[n_top.argmax()]
        assert math.isclose(summary["share"], n_top.max() / len(calls), abs_tol=1e-3) and math.isclose(sum(share), 1, abs_tol=1e-3)
    assert cmps["louvain"]["kind"] == "clusters" and cmps["louvain"]["rows"] == ["0", "1", "2"]


def test_dotplot_shows_each_labels_own_markers_first(client, finished):
    sid, _, _ = finished
    res = client.get(f"{API}/sessions/{sid}/results").json()
    dp = res["dotplot"]
    from cellatlas.atlas import load_atlas
    from cellatlas.tl import own_markers

    sets = load_atlas("human-core").marker_sets
    for lab in set(dp["gene_label"]):
        genes = [g for g, l in zip(dp["genes"], dp["gene_label"]) if l == lab]
        own = own_markers(sets[lab])
        assert set(genes) <= set(own), (lab, genes)  # never a gene the label only inherits
    # lineage genes every leukocyte expresses are not shown under a cell type that only inherits them
    leuko = set(sets["Leukocyte"]["positive"])
    assert not any(g in leuko for g, l in zip(dp["genes"], dp["gene_label"]) if l not in ("Leukocyte", "Lymphocyte"))
    if "Platelet" in dp["labels"]:
        assert [g for g, l in zip(dp["genes"], dp["gene_label"]) if l == "Platelet"][:2] == ["PPBP", "PF4"]


def test_review_queue_offers_no_zero_score_alternates(client, finished):
    sid, _, _ = finished
    page = client.get(f"{API}/sessions/{sid}/review", params={"band": "all", "limit": 200}).json()
    alts = [a for c in page["cells"] for a in c["alternates"]]
    assert alts and all(a["score"] >= 0.005 for a in alts)


def test_mouse_upload_shows_mouse_gene_names(client, tmp_path):
    """Mouse genes are shown as MGI writes them, also where the file upper-cases them."""
    import os
    from pathlib import Path

    shared = Path(os.environ.get("CELLATLAS_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
    path = shared / "datasets" / "mouse_pancreas_baron2016_mouse1_indrop.h5ad"
    if not path.exists():
        pytest.skip(f"{path} not available")
    mouse = ad.read_h5ad(path)[:200].copy()
    mouse.var_names = [g.upper() for g in mouse.var_names]  # as some files ship them ('0610007P14RIK')
    mouse.var_names_make_unique()
    mouse.write_h5ad(tmp_path / "mouse.h5ad")
    r = client.post(f"{API}/sessions", params={"filename": "mouse.h5ad"}, content=(tmp_path / "mouse.h5ad").read_bytes())
    assert r.status_code == 201, r.text
    facts = r.json()["facts"]
    assert facts["species"] == "mouse" and facts["example_genes"][0] == "0610007P14Rik"
    assert any("as MGI writes them" in n for n in facts["read_notes"])
    sid = r.json()["session"]
    client.post(f"{API}/sessions/{sid}/run", json={})
    assert _wait(client, sid)["state"] == "done"
    dp = client.get(f"{API}/sessions/{sid}/results").json()["dotplot"]
    assert dp["genes"] and all(g != g.upper() for g in dp["genes"] if any(c.isalpha() for c in g))  # 'Ins1', not 'INS'
    cell = client.get(f"{API}/sessions/{sid}/cells/0").json()
    assert cell["markers"] and all(m != m.upper() for m in cell["markers"])
