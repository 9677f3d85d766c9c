"""cellatlas.tl and cellatlas.pl on real data: scanpy's bundled pbmc68k_reduced (the authors'
bulk labels, louvain clusters and UMAP) and, where ../shared is present, PBMC3k counts with
the Seurat tutorial labels. Every plot is written as a PNG into a temporary folder."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import cellatlas  # noqa: E402
from cellatlas import pl, tl  # noqa: E402
from cellatlas.errors import InputError  # noqa: E402
from cellatlas.genes import map_genes  # noqa: E402


@pytest.fixture(scope="module")
def annotated(pbmc68k):
    a = pbmc68k.copy()
    cellatlas.annotate_adata(a)
    return a


def _png(fig, path) -> None:
    fig.savefig(path)
    assert path.stat().st_size > 10_000  # a drawn figure, not an empty canvas
    from PIL import Image

    with Image.open(path) as im:
        px = np.asarray(im.convert("L"))
    assert px.std() > 5  # something other than one flat colour


def test_compare_is_a_row_normalised_crosstab(annotated):
    ct = tl.compare(annotated, "bulk_labels")
    counts = tl.compare(annotated, "bulk_labels", normalize=False)
    assert np.allclose(ct.sum(axis=1), 1)
    assert int(counts.to_numpy().sum()) == annotated.n_obs
    assert list(ct.columns)[0] == annotated.obs["cell_type"].value_counts().index[0]  # most common call first
    b = ct.loc["CD19+ B"]  # sorted-bulk labels: B cells and plasmablasts
    assert b.idxmax() == "B cell" and b.get("B cell", 0) + b.get("Plasma cell", 0) > 0.9
    with pytest.raises(InputError, match="no column 'nope'"):
        tl.compare(annotated, "nope")


def test_cluster_summary_gives_majority_share_and_confidence(annotated):
    s = tl.cluster_summary(annotated, "louvain")
    assert list(s.index) == sorted(annotated.obs["louvain"].cat.categories, key=int)
    assert s["n_cells"].sum() == annotated.n_obs
    obs = annotated.obs
    for g, row in s.iterrows():
        cells = obs[obs["louvain"] == g]
        top = cells["cell_type"].astype(str).value_counts()
        assert row.majority_label == top.index[0] and row.majority_share == pytest.approx(top.iloc[0] / len(cells))
        assert row.mean_confidence == pytest.approx(cells["cell_type_confidence"].mean())


def test_find_groupings_detects_labels_and_clusters(annotated):
    found = {g["column"]: g["kind"] for g in tl.find_groupings(annotated.obs, exclude=annotated.uns["cellatlas"]["obs_columns"])}
    assert found["louvain"] == "clusters" and found["bulk_labels"] == "labels"
    assert "n_counts" not in found and "cell_type" not in found  # numbers and our own columns are not groupings


def test_marker_genes_are_the_labels_own(annotated):
    genes = tl.marker_genes(annotated, n_genes=3)
    assert genes["B cell"][:2] == ["MS4A1", "CD79A"] and genes["NK cell"][0] == "GNLY"
    measured = set(map_genes(list(annotated.raw.var_names)).symbols)  # approved symbols (IGJ -> JCHAIN)
    assert all(g in measured for gs in genes.values() for g in gs)
    assert "PTPRC" not in genes["B cell"]  # inherited from Lymphocyte, not a B cell's own marker
    flat = [g for gs in genes.values() for g in gs]
    assert len(flat) == len(set(flat))


def test_plots_return_figures_from_real_data(annotated, tmp_path):
    for name, fig in {
        "embedding": pl.embedding(annotated),
        "projection": pl.projection(annotated),
        "compare": pl.compare(annotated, "bulk_labels"),
        "clusters": pl.cluster_summary(annotated, "louvain"),
        "markers": pl.markers(annotated),
    }.items():
        assert isinstance(fig, matplotlib.figure.Figure), name
        _png(fig, tmp_path / f"{name}.png")
    # the user's own UMAP is used as it is
    fig = pl.embedding(annotated, color="label", save=tmp_path / "own.png")
    assert "X_umap_cellatlas" not in annotated.obsm and (tmp_path / "own.png").stat().st_size > 10_000
    assert "your UMAP" in fig.axes[0].get_title()


def test_embedding_computes_a_umap_when_the_data_have_none(annotated, tmp_path):
    a = annotated.copy()
    del a.obsm["X_umap"]
    fig = pl.embedding(a, color=["label", "confidence"])
    assert a.obsm["X_umap_cellatlas"].shape == (a.n_obs, 2) and "X_umap" not in a.obsm  # the user's slot stays theirs
    assert "UMAP of the cellatlas embedding" in fig.axes[0].get_title()
    _png(fig, tmp_path / "computed.png")
    # cells the cellatlas embedding puts together are together on the map: B cells are one island
    # (medians, so that a few cells called B cell elsewhere do not decide the test)
    xy, b = a.obsm["X_umap_cellatlas"], (a.obs["cell_type"] == "B cell").to_numpy()
    centre = np.median(xy[b], axis=0)
    d_in, d_out = (np.median(np.linalg.norm(xy[m] - centre, axis=1)) for m in (b, ~b))
    assert d_in < 0.25 * d_out, (d_in, d_out)


def test_unassigned_is_grey_and_last(annotated):
    colors = pl.label_colors(["B cell", "Unassigned", "NK cell"])
    assert colors[1] == pl.UNASSIGNED_COLOR and colors[0] != colors[2]
    calls = np.array(["B cell"] * 3 + ["Unassigned"] * 5 + ["NK cell"] * 2, dtype=object)
    ct = tl.crosstab(np.array(["x"] * 10), calls)
    assert list(ct.columns) == ["B cell", "NK cell", "Unassigned"]


def test_projection_reads_files_written_before_the_rename(annotated, tmp_path):
    a = annotated.copy()
    a.obsm["X_cellatlas_umap"] = a.obsm.pop("X_cellatlas_projection")
    assert tl.projection_key(a) == "X_cellatlas_umap"
    _png(pl.projection(a, reference=False), tmp_path / "old.png")


def test_plots_need_calls_first(pbmc68k):
    with pytest.raises(InputError, match="annotate_adata"):
        pl.embedding(pbmc68k.copy(), key="cell_type")
