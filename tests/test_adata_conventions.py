"""scanpy conventions of annotate_adata: key_added, copy=, and the user's columns never overwritten.

The same rule at every door: in-process here and through the CLI; the HTTP client in
tests/service/test_client.py; the workspace download in tests/web/test_browser.py.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from typer.testing import CliRunner

import cellatlas
from cellatlas.cli import app


@pytest.fixture()
def labelled(pbmc68k):
    """pbmc68k_reduced with the authors' labels in obs['cell_type'] (as the shared files have them)."""
    a = pbmc68k.copy()
    a.obs["cell_type"] = a.obs["bulk_labels"].astype(str).to_numpy()
    return a


def test_existing_cell_type_is_moved_aside_with_a_warning(labelled):
    authors = list(labelled.obs["cell_type"])
    with pytest.warns(UserWarning, match=r"obs\['cell_type'\] -> obs\['cell_type_uploaded'\]"):
        res = cellatlas.annotate_adata(labelled)
    assert list(labelled.obs["cell_type_uploaded"]) == authors
    assert list(labelled.obs["cell_type"]) == list(res.label)  # the seed-compatible name holds the calls
    rec = labelled.uns["cellatlas"]
    assert rec["key_added"] == "cell_type" and rec["moved_columns"] == {"cell_type": "cell_type_uploaded"}
    assert "cell_type_confidence" in rec["obs_columns"]
    # a second run replaces its own columns and keeps the authors' labels where they were
    res2 = cellatlas.annotate_adata(labelled)
    assert list(labelled.obs["cell_type_uploaded"]) == authors and "cell_type_uploaded2" not in labelled.obs
    assert list(labelled.obs["cell_type"]) == list(res2.label)
    # what was moved aside survives the round trip through .h5ad
    assert labelled.uns["cellatlas"]["moved_columns"] == {"cell_type": "cell_type_uploaded"}


def test_key_added_writes_other_names_and_touches_nothing_else(labelled):
    before = labelled.obs.copy()
    cellatlas.annotate_adata(labelled, key_added="cellatlas")
    assert list(labelled.obs["cell_type"]) == list(before["cell_type"])
    assert {"cellatlas", "cellatlas_confidence", "cellatlas_band", "cellatlas_parent"} <= set(labelled.obs.columns)
    assert list(labelled.obs.columns[: before.shape[1]]) == list(before.columns)
    assert cellatlas.tl.label_key(labelled) == "cellatlas"


def test_copy_returns_an_annotated_copy(labelled):
    before = labelled.obs.copy()
    with pytest.warns(UserWarning):
        out = cellatlas.annotate_adata(labelled, copy=True)
    assert isinstance(out, ad.AnnData) and out is not labelled
    assert labelled.obs.equals(before) and "X_cellatlas" not in labelled.obsm
    assert list(out.obs["cell_type_uploaded"]) == list(before["cell_type"])
    assert out.obsm["X_cellatlas_projection"].shape == (out.n_obs, 2)


def test_a_user_column_named_like_ours_is_kept_too(labelled):
    labelled.obs["cell_type_confidence"] = 1.0  # someone else's score under our name
    with pytest.warns(UserWarning):
        cellatlas.annotate_adata(labelled)
    assert (labelled.obs["cell_type_confidence_uploaded"] == 1.0).all()
    assert labelled.obs["cell_type_confidence"].between(0, 1).all() and labelled.obs["cell_type_confidence"].nunique() > 1


def test_cli_keeps_the_files_cell_type(labelled, tmp_path):
    src, out = tmp_path / "labelled.h5ad", tmp_path / "out.h5ad"
    labelled.write_h5ad(src)
    r = CliRunner().invoke(app, ["annotate", str(src), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "kept the file's obs['cell_type'] as obs['cell_type_uploaded']" in r.output
    a = ad.read_h5ad(out)
    assert list(a.obs["cell_type_uploaded"].astype(str)) == list(labelled.obs["cell_type"])
    r = CliRunner().invoke(app, ["annotate", str(src), "-o", str(out), "--key-added", "cellatlas"])
    assert r.exit_code == 0, r.output
    a = ad.read_h5ad(out)
    assert list(a.obs["cell_type"].astype(str)) == list(labelled.obs["cell_type"]) and "cellatlas_band" in a.obs


def test_result_prints_in_a_few_lines(pbmc68k):
    res = cellatlas.annotate(pbmc68k)
    text = repr(res)
    assert text.startswith("AnnotationResult: 700 cells") and len(text) < 600 and text.count("\n") <= 4
    labels, counts = np.unique(res.label.astype(str), return_counts=True)
    assert f"{labels[counts.argmax()]} {counts.max():,}" in text and "confident" in text
    assert str(res) == text


def test_models_list_shows_the_extra_to_install():
    r = CliRunner().invoke(app, ["models", "list"])
    assert r.exit_code == 0
    assert "pip install 'cellatlas[foundation]'" in " ".join(r.output.split())  # not swallowed as rich markup
