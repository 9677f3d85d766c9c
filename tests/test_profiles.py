"""Atlases built from pseudo-cells of averaged profiles (``reference_kind="profiles"``)."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from cellatlas.atlas import load_atlas
from cellatlas.atlas_build import build_atlas, label_means
from cellatlas.encoders.default import DefaultEncoder
from cellatlas.errors import InputError
from cellatlas.runtime import AtlasRuntime


@pytest.fixture(scope="module")
def genes():
    return [g for g in load_atlas("human-core").ref_genes if not g.startswith(("MT-", "RPL", "RPS"))][:4000]


def pseudo_cells(genes, seed, n_types=5, per_type=40, n_de=40):
    """Poisson pseudo-cells of ``n_types`` fixed profiles (the profiles do not depend on ``seed``)."""
    prof_rng = np.random.default_rng(123)
    base = prof_rng.gamma(0.3, 1.0, len(genes))
    profiles = np.tile(base, (n_types, 1))
    for t in range(n_types):
        profiles[t, t * n_de:(t + 1) * n_de] *= 4.0
    profiles /= profiles.sum(axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    depth = rng.integers(1500, 3000, n_types * per_type)
    X = rng.poisson(depth[:, None] * np.repeat(profiles, per_type, axis=0)).astype(np.float32)
    a = ad.AnnData(sp.csr_matrix(X))
    a.var_names = list(genes)
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    a.obs["cell_type"] = np.repeat([f"type{t}" for t in range(n_types)], per_type)
    return a


def build(a, kind):
    return build_atlas(a, "cell_type", name=f"p-{kind}", reference_kind=kind, fit_folds=0, layout="pca", n_hvg=100, n_pcs=10)


def test_label_means():
    X = sp.csr_matrix(np.array([[1, 0], [3, 2], [10, 10]], dtype=np.float32))
    m = label_means(X, np.array(["b", "b", "a"], dtype=object)).toarray()
    np.testing.assert_allclose(m, [[10, 10], [2, 1]])


def test_unscaled_encoder_state_roundtrip():
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(2.0, (60, 30)).astype(np.float32))
    g = [f"g{i}" for i in range(30)]
    enc = DefaultEncoder.fit(X, g, g, n_pcs=5, transform="log1p", scale=False)
    assert not enc.scaled and np.all(enc.std == 1.0)
    back = DefaultEncoder.from_state(enc.state())
    assert not back.scaled
    np.testing.assert_allclose(back.embed(X, g), enc.embed(X, g), atol=1e-6)
    assert DefaultEncoder.fit(X, g, g, n_pcs=5, transform="log1p").scaled


def test_profiles_atlas_records_kind_and_encoder(genes):
    at = build(pseudo_cells(genes, 0), "profiles")
    assert at.meta["reference_kind"] == "profiles"
    state = at.encoder_state("default")
    assert str(state["transform"]) == "log1p" and not bool(state["scaled"])
    assert at.meta["provenance"]["settings"]["reference_kind"] == "profiles"
    # A query missing part of the panel refits the encoder the same way (unscaled).
    query_genes = [g for g in genes if g not in set(at.panel[::10])]
    rt = AtlasRuntime(at, "default", query_genes)
    assert rt.report["panel_adapted"] and not rt.encoder.scaled


def test_profile_panel_is_not_chosen_by_sampling_noise(genes):
    """As profiles, far more of the panel are genes that differ between the types."""
    de = set(genes[: 5 * 40])
    a = pseudo_cells(genes, 0)
    prof, cells = (len(set(p) & de) / len(p) for p in (build(a, kind).panel for kind in ("profiles", "cells")))
    assert prof > 0.8
    assert prof > cells + 0.1


def test_unknown_reference_kind(genes):
    with pytest.raises(InputError):
        build(pseudo_cells(genes, 0), "bulk")
