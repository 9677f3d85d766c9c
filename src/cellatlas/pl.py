"""Plots of an annotated AnnData, drawn with scanpy and matplotlib (scanpy's ``pl`` naming).

>>> cellatlas.annotate_adata(adata)
>>> cellatlas.pl.embedding(adata)                  # the user's own cells: label, band, confidence
>>> cellatlas.pl.compare(adata, "louvain")         # the calls against the user's clusters or labels
>>> cellatlas.pl.cluster_summary(adata, "louvain") # per cluster: majority call, share, confidence
>>> cellatlas.pl.markers(adata)                    # each label's own defining markers (dot plot)
>>> cellatlas.pl.projection(adata)                 # the cells placed on the atlas's reference layout

Every function returns a :class:`matplotlib.figure.Figure` (closed, so a notebook shows it
once; ``save=`` writes it, ``show=True`` calls ``plt.show()``). The computations are in
:mod:`cellatlas.tl`. Colours match the workspace: bands green / orange / vermilion,
``Unassigned`` grey.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cellatlas import tl

BAND_COLORS = {"confident": "#009e73", "review": "#e69f00", "low": "#d55e00"}
UNASSIGNED_COLOR = "#b8bcc6"
REFERENCE_COLOR = "#dcdfe6"
CONFIDENCE_CMAP = "viridis"


def _finish(fig, save: str | Path | None, show: bool):
    if save:
        fig.savefig(save, bbox_inches="tight", dpi=150)
    import matplotlib.pyplot as plt

    if show:
        plt.show()
    else:
        plt.close(fig)  # returned, not left open: a notebook draws it once
    return fig


def label_colors(labels: Sequence[str]) -> list[str]:
    """scanpy's default palette for ``labels`` in order, ``Unassigned`` grey."""
    from scanpy.plotting import palettes

    pal = palettes.default_20 if len(labels) <= 20 else palettes.default_28 if len(labels) <= 28 else palettes.default_102
    out, k = [], 0
    for lab in labels:
        if lab == tl.UNASSIGNED:
            out.append(UNASSIGNED_COLOR)
        else:
            out.append(pal[k % len(pal)])
            k += 1
    return out


def _color_calls(adata, key: str) -> dict[str, str]:
    """Fix the colours scanpy reads from ``uns[<column>_colors]`` for the calls and bands,
    so that every plot gives a label the same colour; returns ``{label: colour}``."""
    import pandas as pd

    if not isinstance(adata.obs[key].dtype, pd.CategoricalDtype):
        adata.obs[key] = pd.Categorical(adata.obs[key].astype(str))
    cats = [str(c) for c in adata.obs[key].cat.categories]
    adata.uns[f"{key}_colors"] = label_colors(cats)
    band = f"{key}_band"
    if band in adata.obs.columns:
        adata.obs[band] = pd.Categorical(adata.obs[band].astype(str), categories=list(BAND_COLORS))
        adata.uns[f"{band}_colors"] = list(BAND_COLORS.values())
    return dict(zip(cats, adata.uns[f"{key}_colors"]))


_WHAT = {"label": "", "band": "_band", "confidence": "_confidence"}
_BASIS_TITLE = {"X_umap": "your UMAP", tl.USER_UMAP: "UMAP of the cellatlas embedding"}


def embedding(
    adata,
    color: str | Sequence[str] = ("label", "band", "confidence"),
    *,
    basis: str | None = None,
    key: str | None = None,
    save: str | Path | None = None,
    show: bool = False,
    **kwargs: Any,
):
    """The user's own cells on their 2-D map, coloured by call, confidence band and confidence.

    Parameters
    ----------
    color
        ``"label"``, ``"band"``, ``"confidence"`` (the calls under ``key``) or any other
        ``obs`` column or gene, one panel each.
    basis
        ``obsm`` key to draw; default the user's ``X_umap``, else a UMAP computed with scanpy
        on the cellatlas embedding (:func:`cellatlas.tl.user_basis`).
    key
        ``obs`` column of the calls (default: the last run's ``key_added``).
    **kwargs
        Passed to :func:`scanpy.pl.embedding`.
    """
    import scanpy as sc

    key = tl.label_key(adata, key)
    name = tl.user_basis(adata, basis)
    colors = [key + _WHAT[c] if c in _WHAT else c for c in ([color] if isinstance(color, str) else list(color))]
    _color_calls(adata, key)
    conf = f"{key}_confidence"
    kwargs.setdefault("vmin", [0.0 if c == conf else None for c in colors])
    kwargs.setdefault("vmax", [1.0 if c == conf else None for c in colors])
    kwargs.setdefault("color_map", CONFIDENCE_CMAP)
    kwargs.setdefault("wspace", 0.75)  # room for the label legend beside each panel
    where = _BASIS_TITLE.get(name, name)
    kwargs.setdefault("title", [f"{c.replace('_', ' ')} ({where})" for c in colors])
    fig = sc.pl.embedding(adata, basis=name, color=colors, return_fig=True, show=False, **kwargs)
    return _finish(fig, save, show)


def projection(
    adata,
    color: str = "label",
    *,
    key: str | None = None,
    reference: bool = True,
    atlas=None,
    save: str | Path | None = None,
    show: bool = False,
    **kwargs: Any,
):
    """The cells placed on the atlas's 2-D reference layout (grey: the atlas's own cells).

    Each cell sits at the weighted position of its nearest reference cells; labels without
    reference cells sit on fixed anchors. This shows where a cell lands in the atlas, not how
    the user's cells relate to each other (that is :func:`embedding`).
    """
    import matplotlib.pyplot as plt
    import scanpy as sc

    key = tl.label_key(adata, key)
    name = tl.projection_key(adata)
    _color_calls(adata, key)
    fig, ax = plt.subplots(figsize=(7.5, 6))
    if reference:
        from cellatlas.atlas import DEFAULT_ATLAS, load_atlas

        rec = adata.uns.get("cellatlas", {})
        at = load_atlas(atlas or rec.get("provenance", {}).get("atlas") or DEFAULT_ATLAS)
        ref = at.layout_reference()
        ax.scatter(ref["x"], ref["y"], s=4, c=REFERENCE_COLOR, linewidths=0, rasterized=True, label="atlas reference cells")
    target = key + _WHAT[color] if color in _WHAT else color
    kwargs.setdefault("title", f"Atlas projection: {target.replace('_', ' ')}")
    sc.pl.embedding(adata, basis=name, color=target, ax=ax, show=False, **kwargs)
    return _finish(fig, save, show)


def compare(
    adata,
    reference_key: str,
    key: str | None = None,
    *,
    min_share: float = 0.05,
    save: str | Path | None = None,
    show: bool = False,
):
    """Heatmap of the calls against ``obs[reference_key]``, each row normalised to 1.

    Rows are the user's labels or clusters, columns the calls; shares of at least
    ``min_share`` are written in the cells.
    """
    import matplotlib.pyplot as plt

    share = tl.compare(adata, reference_key, key)
    counts = tl.compare(adata, reference_key, key, normalize=False).sum(axis=1)
    n_r, n_c = share.shape
    fig, ax = plt.subplots(figsize=(2.8 + 0.42 * n_c, 1.6 + 0.36 * n_r))
    im = ax.imshow(share.to_numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(n_c), share.columns, rotation=60, ha="right")
    ax.set_yticks(range(n_r), [f"{r} ({counts[r]:,})" for r in share.index])
    ax.set_xlabel("cellatlas call")
    ax.set_ylabel(f"{reference_key} (cells)")
    for (i, j), v in np.ndenumerate(share.to_numpy()):
        if v >= min_share:
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7, color="white" if v > 0.6 else "#1b1f2a")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="share of the row's cells")
    ax.set_title(f"{reference_key} vs cellatlas calls")
    return _finish(fig, save, show)


def cluster_summary(
    adata,
    groupby: str,
    key: str | None = None,
    *,
    save: str | Path | None = None,
    show: bool = False,
):
    """Per group of ``obs[groupby]``: the mix of calls (stacked bars), majority call and confidence."""
    import matplotlib.pyplot as plt

    key = tl.label_key(adata, key)
    summ = tl.cluster_summary(adata, groupby, key)
    share = tl.compare(adata, groupby, key)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.38 * len(share)))
    colors = _color_calls(adata, key)
    share.iloc[::-1].plot.barh(stacked=True, ax=ax, width=0.8, color=[colors[c] for c in share.columns], legend=False)
    for i, (g, row) in enumerate(summ.iloc[::-1].iterrows()):
        ax.text(1.01, i, f"{row.majority_label} {row.majority_share:.0%} · conf. {row.mean_confidence:.2f} · {row.n_cells:,} cells",
                va="center", fontsize=8, transform=ax.get_yaxis_transform())
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the group's cells per call")
    ax.set_ylabel(groupby)
    ax.set_title(f"cellatlas calls per {groupby}: majority call, its share, mean confidence")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[c]) for c in share.columns]
    ax.legend(handles, share.columns, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.6 / max(len(share), 1)),
              ncol=4, fontsize=7, frameon=False)
    return _finish(fig, save, show)


def markers(
    adata,
    key: str | None = None,
    *,
    n_genes: int = 3,
    atlas=None,
    save: str | Path | None = None,
    show: bool = False,
    **kwargs: Any,
):
    """Dot plot of each called label's own defining markers (curated first, then derived).

    Dot size: fraction of the label's cells expressing the gene; colour: mean log1p(CP10k)
    from the counts. ``**kwargs`` go to :func:`scanpy.pl.dotplot`.
    """
    import scanpy as sc

    key = tl.label_key(adata, key)
    expr, groups = tl.marker_expression(adata, key, n_genes=n_genes, atlas=atlas)
    if not groups:
        raise tl.InputError("None of the called labels' markers are among the data's genes.", fix="Check the gene names (adata.var_names).")
    kwargs.setdefault("colorbar_title", "mean log1p(CP10k)")
    kwargs.setdefault("cmap", "Reds")
    dp = sc.pl.dotplot(expr, var_names=groups, groupby=key, return_fig=True, show=False, **kwargs)
    dp.make_figure()
    return _finish(dp.fig, save, show)


__all__ = ["BAND_COLORS", "cluster_summary", "compare", "embedding", "label_colors", "markers", "projection"]
