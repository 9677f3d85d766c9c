"""What a runtime precomputes is kept for the next process and sent to Dask workers, unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from cellatlas.atlas import load_atlas
from cellatlas.neighbours import DepthMatchedIndex, thin
from cellatlas.runtime import AtlasRuntime


@pytest.fixture()
def query():
    """Built-in reference cells over its stored genes, all but 40 of the panel kept (so the encoder is
    refitted), thinned to 1/3 of their depth (so several depth levels are searched)."""
    at = load_atlas("human-core")
    genes = at.ref_genes
    drop = set(at.panel[:40])
    keep = np.array([i for i, g in enumerate(genes) if g not in drop])
    counts = thin(at.reference_counts()[::5][:, keep].tocsr(), 1 / 3, seed=4)
    return at, [genes[i] for i in keep], counts


def _score(rt, counts):
    sc = rt.score(counts)
    return sc.embedding, sc.idx, sc.confidence, sc.call


def test_a_second_process_reads_levels_centres_and_refit_from_the_store(query, isolated_home, monkeypatch):
    at, genes, counts = query
    first = AtlasRuntime(at, "default", genes)
    assert first.report["panel_adapted"]
    a = _score(first, counts)
    stored = sorted(p.name.split(".", 1)[1] for p in (isolated_home / "cache" / "runtime").glob("*.npz"))
    assert "centre.npz" in stored and "refit.npz" in stored and sum(s.startswith("level") for s in stored) >= 2

    def no_build(*args, **kwargs):
        raise AssertionError("a stored level was built again")

    monkeypatch.setattr(DepthMatchedIndex, "_build", no_build)
    monkeypatch.setattr("cellatlas.runtime.depth_level_scores", no_build)
    monkeypatch.setattr("cellatlas.encoders.default.DefaultEncoder.fit", no_build)
    second = AtlasRuntime(at, "default", genes)  # a new runtime, as in a fresh process
    for x, y in zip(a, _score(second, counts)):
        np.testing.assert_array_equal(x, y)


def test_preloaded_groups_need_no_disk_and_a_broken_file_is_recomputed(query, isolated_home, tmp_path, monkeypatch):
    at, genes, counts = query
    first = AtlasRuntime(at, "default", genes)
    a = _score(first, counts)
    sent = first.precomputed()  # what a Dask client broadcasts: every level built
    assert sum(k.startswith("level") for k in sent) == first.depth_index.n_levels - 1

    monkeypatch.setenv("CELLATLAS_HOME", str(tmp_path / "elsewhere"))  # a worker on another machine
    from cellatlas.config import get_settings

    get_settings.cache_clear()
    monkeypatch.setattr(DepthMatchedIndex, "_build", lambda *a, **k: pytest.fail("a preloaded level was built"))
    worker = AtlasRuntime(at, "default", genes, preloaded=sent)
    for x, y in zip(a, _score(worker, counts)):
        np.testing.assert_array_equal(x, y)
    monkeypatch.undo()
    get_settings.cache_clear()

    for p in (isolated_home / "cache" / "runtime").glob("*.npz"):
        p.write_bytes(b"not an npz")  # truncated or from a crashed writer
    again = AtlasRuntime(at, "default", genes)
    for x, y in zip(a, _score(again, counts)):
        np.testing.assert_array_equal(x, y)
