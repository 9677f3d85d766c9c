"""Tiny Geneformer and scGPT checkpoints through atlas build, annotate, the CLI and HTTP, on real PBMC cells."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

import cellatlas
from cellatlas.config import Settings, get_settings
from cellatlas.errors import AtlasModelMismatchError

from .conftest import make_geneformer_checkpoint


@pytest.fixture(scope="module")
def split(pbmc):
    """Reference (5 cells per label) and query (the other 2 per label) from the same donor."""
    labels = pbmc.obs["cell_type"].astype(str).to_numpy()
    ref = np.concatenate([np.flatnonzero(labels == lab)[:5] for lab in np.unique(labels)])
    ref_mask = np.isin(np.arange(pbmc.n_obs), ref)
    return pbmc[ref_mask].copy(), pbmc[~ref_mask].copy()


@pytest.fixture(scope="module")
def env(tmp_path_factory, models_dir):
    """CELLATLAS_HOME / MODELS_DIR for everything run here (the engine reads get_settings())."""
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("CELLATLAS_HOME", str(home))
    mp.setenv("CELLATLAS_MODELS_DIR", str(models_dir))
    get_settings.cache_clear()
    yield home
    mp.undo()
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def fast_layout():
    """The reference layout (UMAP by default) is not what is tested here: use the PCA layout."""
    from cellatlas import atlas_build

    original = atlas_build._layout
    mp = pytest.MonkeyPatch()
    mp.setattr(atlas_build, "_layout", lambda emb, seed=0, method="umap": original(emb, seed, "pca"))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def cli_atlas(split, env, geneformer_dir, fast_layout, tmp_path_factory):
    """``cellatlas atlas build --model geneformer --model-path DIR`` on the reference cells."""
    from cellatlas.cli import app

    ref_file = tmp_path_factory.mktemp("ref") / "pbmc_ref.h5ad"
    split[0].write_h5ad(ref_file)
    out = env / "atlases" / "pbmc-gf.atlas.npz"
    res = CliRunner().invoke(app, [
        "atlas", "build", str(ref_file), "--label-key", "cell_type", "--name", "pbmc-gf", "--model", "geneformer",
        "--model-path", str(geneformer_dir), "--fit-folds", "2", "-o", str(out),
    ])
    assert res.exit_code == 0, res.output
    return out


def test_cli_build_then_annotate(cli_atlas, split, env, geneformer_dir, tmp_path):
    from cellatlas.atlas import load_atlas
    from cellatlas.cli import app
    from cellatlas.encoders import geneformer

    atlas = load_atlas(cli_atlas)
    assert atlas.models == ["geneformer"]
    assert atlas.fingerprint("geneformer") == geneformer.load(model_path=geneformer_dir).fingerprint()
    assert atlas.embedding("geneformer").shape == (split[0].n_obs, 32)

    query_file = tmp_path / "query.h5ad"
    split[1].write_h5ad(query_file)
    out_csv = tmp_path / "calls.csv"
    res = CliRunner().invoke(app, [
        "annotate", str(query_file), "--model", "geneformer", "--atlas", str(cli_atlas),
        "--model-path", str(geneformer_dir), "--csv", str(out_csv),
    ])
    assert res.exit_code == 0, res.output
    import pandas as pd

    calls = pd.read_csv(out_csv, index_col=0)
    assert calls.index.astype(str).tolist() == split[1].obs_names.astype(str).tolist()
    assert set(calls["cell_type"]) <= set(atlas.meta["candidates"])

    mismatch = CliRunner().invoke(app, ["annotate", str(query_file), "--model", "scgpt", "--atlas", str(cli_atlas)])
    assert mismatch.exit_code == 2 and "scgpt" in mismatch.output
    missing = CliRunner().invoke(app, ["annotate", str(query_file), "--model", "geneformer", "--atlas", str(cli_atlas),
                                       "--model-path", str(tmp_path / "no-such-checkpoint")])
    assert missing.exit_code == 2 and "pip install" in missing.output


def test_annotate_in_process_with_both_models(cli_atlas, split, env, scgpt_dir):
    from cellatlas.atlas_build import build_atlas

    ref, query = split
    res = cellatlas.annotate(query, model="geneformer", atlas=str(cli_atlas))
    assert len(res) == query.n_obs and res.provenance["model"] == "geneformer"
    assert res.gene_report["model_gene_coverage"] > 0
    assert np.allclose(np.linalg.norm(res.embedding, axis=1), 1, atol=1e-4)

    atlas = build_atlas(ref, "cell_type", name="pbmc-sg", model="scgpt", model_path=scgpt_dir, fit_folds=0, layout="pca")
    path = atlas.save(env / "atlases" / "pbmc-sg.atlas.npz")
    # the query's columns in another order: same calls, same order of cells
    perm = np.random.default_rng(0).permutation(query.n_vars)
    a = cellatlas.annotate(sp.csr_matrix(query.X), query.var_names.tolist(), model="scgpt", atlas=str(path))
    b = cellatlas.annotate(sp.csr_matrix(query.X)[:, perm], query.var_names[perm].tolist(), model="scgpt", atlas=str(path))
    assert list(a.label) == list(b.label) and len(a) == query.n_obs
    assert np.allclose(a.embedding, b.embedding, atol=1e-5)


def test_atlas_refuses_embeddings_from_other_weights(cli_atlas, split, tmp_path):
    other = make_geneformer_checkpoint(tmp_path / "other-geneformer", seed=7)
    with pytest.raises(AtlasModelMismatchError) as err:
        cellatlas.annotate(split[1], model="geneformer", atlas=str(cli_atlas), model_path=other)
    assert err.value.status_code == 409 and "rebuild" in err.value.fix
    with pytest.raises(AtlasModelMismatchError):
        cellatlas.annotate(split[1], model="scgpt", atlas=str(cli_atlas))


def test_http_models_and_annotate(cli_atlas, split, env, models_dir, tmp_path):
    from fastapi.testclient import TestClient

    from cellatlas.service.app import create_app

    settings = Settings(home=env, models_dir=models_dir, require_api_key=False)
    with TestClient(create_app(settings)) as client:
        listed = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        assert listed["geneformer"]["usable"] and listed["scgpt"]["usable"] and "path" not in listed["geneformer"]

        query = split[1]
        x = sp.csr_matrix(query.X)
        body = {
            "model": "geneformer", "reference_atlas": str(cli_atlas), "genes": query.var_names.tolist(),
            "matrix": {"indptr": x.indptr.tolist(), "indices": x.indices.tolist(), "data": x.data.tolist(), "shape": list(x.shape)},
        }
        r = client.post("/v1/singlecell/annotate", content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == "geneformer" and len(out["calls"]) == query.n_obs
        local = cellatlas.annotate(query, model="geneformer", atlas=str(cli_atlas))
        assert [c["label"] for c in out["calls"]] == list(local.label)

        r = client.post("/v1/singlecell/annotate", content=json.dumps({**body, "model": "scgpt"}),
                        headers={"content-type": "application/json"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "atlas_model_mismatch"

    empty = Settings(home=env, models_dir=tmp_path, require_api_key=False)
    with TestClient(create_app(empty)) as client:
        listed = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        assert not listed["geneformer"]["usable"] and "pip install" in listed["geneformer"]["reason"]
        assert str(tmp_path) not in listed["geneformer"]["reason"]
