"""Shared fixtures: real data from ../shared/data when present, scanpy's bundled PBMC otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The workspace's warm-up thread annotates and lays out cells in the background; in a test session it
# outlives the test that loaded the page and races the next test's warnings filters.
os.environ.setdefault("CELLATLAS_WORKSPACE_WARM_UP", "0")

SHARED = Path(os.environ.get("CELLATLAS_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def shared_file(*parts: str) -> Path:
    """Path in ../shared/data, skipping the test when the shared data is not beside the repo."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{p} is missing in CI (../shared must be beside the repository)")
        pytest.skip(f"{p} not available")
    return p


@pytest.fixture(scope="session")
def pbmc3k():
    import anndata as ad

    return ad.read_h5ad(shared_file("datasets", "human_pbmc3k_10xv1_seurat_labels.h5ad"))


@pytest.fixture(scope="session")
def pbmc68k():
    """scanpy's bundled 700-cell PBMC subset (log-normalised .raw, 765 genes)."""
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()


@pytest.fixture()
def isolated_home(tmp_path, monkeypatch):
    """A fresh CELLATLAS_HOME so tests never touch the user's atlases or database."""
    from cellatlas.config import get_settings

    monkeypatch.setenv("CELLATLAS_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()
