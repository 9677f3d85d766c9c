"""Neighbour indexes of large references: approximate, tuned to a measured recall, recorded in the atlas."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from cellatlas import refindex


def _clusters(n: int, d: int = 16, seed: int = 0, spread: float = 0.35):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, d)).astype(np.float32)
    x = centres[rng.integers(0, 40, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_choice_follows_the_reference_size():
    assert refindex.choose(refindex.EXACT_MAX_CELLS, 50) == {"kind": "flat"}
    big = refindex.choose(1_000_000, 50)
    assert big["kind"] == "ivf" and big["nlist"] == 4096 and big["codecs"] == ["Flat"]
    huge = refindex.choose(refindex.PQ_MIN_CELLS, 50)
    assert huge["codecs"] == ["PQ25", "SQ8", "Flat"]  # compressed codes first where float32 stops fitting


def test_an_approximate_index_reaches_the_recall_it_reports(monkeypatch):
    monkeypatch.setattr(refindex, "EXACT_MAX_CELLS", 1000)
    emb, queries, fresh = _clusters(20_000), _clusters(500, seed=1), _clusters(1000, seed=2)
    index, info = refindex.make(emb, queries)
    assert info["kind"] == "ivf" and info["recall_at_15"] >= refindex.RECALL_TARGET
    assert 1 <= info["nprobe"] < info["nlist"]  # tuned, not an exhaustive scan
    _, exact = faiss.knn(fresh, emb, 15, metric=faiss.METRIC_INNER_PRODUCT)
    assert refindex.recall(index.search(fresh, 15)[1], exact) >= 0.98  # holds on queries it was not tuned on
    again = refindex.deserialize(refindex.serialize(index), info)
    np.testing.assert_array_equal(again.search(fresh, 15)[1], index.search(fresh, 15)[1])


def test_a_codec_that_cannot_reach_the_target_gives_way_to_a_finer_one(monkeypatch):
    emb, queries = _clusters(20_000, spread=0.8), _clusters(300, seed=1, spread=0.8)  # near ties everywhere
    _, info = refindex.make(emb, queries, spec={"kind": "ivf", "nlist": 128, "codecs": ["SQ8", "Flat"]})
    assert [t["codec"] for t in info["tried"]] == ["SQ8", "Flat"]
    assert info["tried"][0]["recall_at_15"] < refindex.RECALL_TARGET <= info["recall_at_15"]


def test_an_atlas_over_the_exact_limit_stores_its_index_and_recall(pbmc68k, isolated_home, monkeypatch):
    from typer.testing import CliRunner

    from cellatlas.atlas import read_atlas
    from cellatlas.atlas_build import build_atlas
    from cellatlas.cli import app
    from cellatlas.runtime import AtlasRuntime

    monkeypatch.setattr(refindex, "EXACT_MAX_CELLS", 200)  # 700 cells: an "approximate" reference
    at = build_atlas(pbmc68k.copy(), "bulk_labels", name="ivf-test", use_raw=True, fit_folds=0, layout="pca", n_hvg=300)
    info = at.index_info("default")
    assert info["kind"] == "ivf" and info["recall_at_15"] >= 0.99 and info["queries"] == "reference cells thinned to half depth"
    path = at.save(isolated_home / "atlases" / "ivf-test")
    loaded = read_atlas(path)
    assert loaded.index_info("default") == info
    out = CliRunner().invoke(app, ["atlas", "info", str(path)])
    assert out.exit_code == 0 and f"recall@15 {info['recall_at_15']:.4f}" in out.output

    genes = list(loaded.ref_genes)
    counts = loaded.reference_counts()
    rt = AtlasRuntime(loaded, "default", genes)
    assert rt.report["neighbour_index"]["kind"] == "ivf" and type(rt.index).__name__ != "IndexFlatIP"
    sc = rt.score(counts)
    assert set(rt.report["neighbour_index"]["level_recall_at_15"]) <= {str(lv) for lv in range(1, 11)}
    monkeypatch.setattr(refindex, "EXACT_MAX_CELLS", 10**9)
    exact_atlas = read_atlas(path)
    del exact_atlas.arrays["model__default__index"]
    exact_atlas.meta["models"]["default"].pop("index")
    exact = AtlasRuntime(exact_atlas, "default", genes).score(counts)
    assert (sc.call == exact.call).mean() >= 0.98
