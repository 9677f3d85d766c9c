"""Tools on an annotated AnnData, named as in scanpy's ``tl`` (the plots are in :mod:`cellatlas.pl`).

- :func:`umap`: a UMAP of the query's own cells, computed with scanpy on the cellatlas
  embedding ``obsm["X_cellatlas"]``; :func:`user_basis` picks the map to draw (the
  user's own ``obsm["X_umap"]`` first).
- :func:`compare`: the calls cross-tabulated against labels or clusters the user already has.
- :func:`cluster_summary`: per cluster, the majority call, its share and the mean confidence.
- :func:`marker_genes` / :func:`marker_expression`: each called label's own defining
  markers in the data (its curated positives, then those derived from the reference).

The array-level functions (:func:`crosstab`, :func:`summarise_groups`,
:func:`defining_markers`, :func:`expression_for_genes`, :func:`find_groupings`,
:func:`embedding_umap`) are what the browser workspace computes its views with.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas.errors import InputError

UNASSIGNED = "Unassigned"
"""The label of cells without enough information for a call (drawn grey, listed last)."""
USER_UMAP = "X_umap_cellatlas"
"""Where :func:`umap` stores a UMAP of the query's cells computed on the cellatlas embedding."""
PROJECTION_KEYS = ("X_cellatlas_projection", "X_cellatlas_umap")
"""The cells placed on the atlas's reference layout (the second name: files written before it was renamed)."""
CLUSTER_NAME = re.compile(r"leiden|louvain|cluster|clust|kmeans|k_means|seurat_clusters|snn_res", re.I)
MAX_GROUPS = 100


# ------------------------------------------------------------------ which columns
def label_key(adata, key: str | None = None) -> str:
    """The ``obs`` column holding the calls: ``key``, else the ``key_added`` of the last run."""
    rec = adata.uns.get("cellatlas", {})
    key = key or (rec.get("key_added") if isinstance(rec, Mapping) else None) or "cell_type"
    if key not in adata.obs.columns:
        raise InputError(
            f"adata.obs has no column '{key}' with cellatlas calls.",
            fix="Run cellatlas.annotate_adata(adata) first, or pass key=... naming the column it wrote.",
            field="key",
        )
    return str(key)


def _obs_column(adata, name: str, what: str) -> pd.Series:
    if name not in adata.obs.columns:
        raise InputError(
            f"adata.obs has no column '{name}' to {what}.",
            fix=f"Pick one of: {', '.join(map(str, adata.obs.columns[:30]))}.",
            field="reference_key",
        )
    return adata.obs[name]


def find_groupings(obs: pd.DataFrame, exclude: Sequence[str] = (), max_groups: int = MAX_GROUPS) -> list[dict[str, Any]]:
    """Columns of ``obs`` that hold labels or clusters to compare the calls with.

    A column qualifies when it is categorical, text or whole numbers with 2 to
    ``max_groups`` distinct values (fewer than the cells). ``kind`` is ``"clusters"`` when
    the name says so (leiden, louvain, cluster, seurat_clusters, ...) or the values are whole
    numbers, else ``"labels"``.
    """
    out = []
    n = len(obs)
    skip = set(map(str, exclude))
    for col in obs.columns:
        s = obs[col]
        if str(col) in skip or pd.api.types.is_bool_dtype(s) or pd.api.types.is_float_dtype(s):
            continue
        if not (isinstance(s.dtype, pd.CategoricalDtype) or pd.api.types.is_object_dtype(s)
                or pd.api.types.is_string_dtype(s) or pd.api.types.is_integer_dtype(s)):
            continue
        k = int(s.nunique(dropna=True))
        if not 2 <= k <= max_groups or k >= n:
            continue
        values = s.dropna().astype(str)
        numeric = bool(values.str.fullmatch(r"\d+").all())
        kind = "clusters" if CLUSTER_NAME.search(str(col)) or numeric else "labels"
        out.append({"column": str(col), "kind": kind, "n_groups": k})
    return out


def group_order(values: pd.Series) -> list[str]:
    """Categories in their own order; whole numbers numerically; other text by size."""
    s = values.dropna()
    if isinstance(s.dtype, pd.CategoricalDtype):
        present = set(s.astype(str))
        return [str(c) for c in s.cat.categories if str(c) in present]
    text = s.astype(str)
    uniq = text.unique().tolist()
    if all(u.isdigit() for u in uniq):
        return sorted(uniq, key=int)
    counts = text.value_counts()
    return sorted(uniq, key=lambda u: (-counts[u], u))


def call_order(calls: pd.Series) -> list[str]:
    """Calls by number of cells, ``Unassigned`` last."""
    counts = calls.astype(str).value_counts()
    return sorted(counts.index, key=lambda lab: (lab == UNASSIGNED, -counts[lab], lab))


# ------------------------------------------------------------------ compare and summarise
def crosstab(reference: Sequence[Any], calls: Sequence[Any], *, normalize: bool = True) -> pd.DataFrame:
    """Rows: the user's labels or clusters; columns: the calls (most common first).

    ``normalize=True`` divides each row by its number of cells (each row sums to 1): the share
    of a cluster's cells given each call. Cells without a reference value are left out.
    """
    ref = (reference if isinstance(reference, pd.Series) else pd.Series(np.asarray(reference, dtype=object))).reset_index(drop=True)
    call = pd.Series(np.asarray(calls, dtype=object)).astype(str)
    keep = ref.notna().to_numpy()
    ref, call = ref[keep].reset_index(drop=True), call[keep].reset_index(drop=True)
    rows, cols = group_order(ref), call_order(call)
    ct = pd.crosstab(ref.astype(str), call).reindex(index=rows, columns=cols, fill_value=0)
    ct.index.name, ct.columns.name = "reference", "cellatlas"
    if normalize:
        ct = ct.div(ct.sum(axis=1).replace(0, 1), axis=0)
    return ct


def summarise_groups(groups: Sequence[Any], calls: Sequence[Any], confidence: Sequence[float]) -> pd.DataFrame:
    """Per group: cells, majority call and its share, runner-up call, mean and median confidence."""
    grp = pd.Series(groups).reset_index(drop=True)
    conf = pd.Series(np.asarray(confidence, dtype=float))
    counts = crosstab(grp, calls, normalize=False)
    rows = []
    for g, row in counts.iterrows():
        n = int(row.sum())
        top = row.sort_values(ascending=False, kind="stable")
        c = conf[(grp.astype(str) == g).to_numpy()]
        rows.append(
            {
                "group": g,
                "n_cells": n,
                "majority_label": str(top.index[0]),
                "majority_share": float(top.iloc[0] / max(n, 1)),
                "second_label": str(top.index[1]) if len(top) > 1 and top.iloc[1] > 0 else "",
                "second_share": float(top.iloc[1] / max(n, 1)) if len(top) > 1 else 0.0,
                "mean_confidence": float(c.mean()) if len(c) else float("nan"),
                "median_confidence": float(c.median()) if len(c) else float("nan"),
            }
        )
    return pd.DataFrame(rows).set_index("group")


def compare(adata, reference_key: str, key: str | None = None, *, normalize: bool = True) -> pd.DataFrame:
    """The calls cross-tabulated against ``obs[reference_key]`` (the user's labels or clusters).

    Returns rows = the user's groups, columns = calls; with ``normalize`` each row gives the
    share of that group's cells per call (see :func:`cellatlas.pl.compare`).
    """
    key = label_key(adata, key)
    ct = crosstab(_obs_column(adata, reference_key, "compare with"), adata.obs[key], normalize=normalize)
    ct.index.name = reference_key
    return ct


def cluster_summary(adata, groupby: str, key: str | None = None) -> pd.DataFrame:
    """Per group of ``obs[groupby]`` (e.g. ``"leiden"``): majority call, its share, mean confidence."""
    key = label_key(adata, key)
    groups = _obs_column(adata, groupby, "summarise by")
    out = summarise_groups(groups, adata.obs[key], adata.obs[f"{key}_confidence"])
    out.index.name = groupby
    return out


# ------------------------------------------------------------------ maps of the user's cells
def embedding_umap(embedding: np.ndarray, *, n_neighbors: int = 15, random_state: int = 0, n_epochs: int = 200) -> np.ndarray:
    """2-D UMAP coordinates ``[n, 2]`` of cells from their embedding (scanpy neighbours + UMAP).

    Neighbours are exact (scikit-learn), so results do not depend on an approximate index.
    """
    import anndata as ad
    import scanpy as sc

    emb = np.asarray(embedding, dtype=np.float32)
    n = emb.shape[0]
    if n < 3:
        raise InputError(f"A UMAP needs at least 3 cells; there are {n}.", fix="Plot more cells, or use the atlas projection.")
    a = ad.AnnData(obs=pd.DataFrame(index=pd.RangeIndex(n).astype(str)))
    a.obsm["X_rep"] = emb
    sc.pp.neighbors(a, use_rep="X_rep", n_neighbors=max(2, min(n_neighbors, n - 1)), random_state=random_state, transformer="sklearn")
    # spectral initialisation needs a connected graph of some size; tiny inputs start at random.
    # 200 epochs (umap-learn's own choice above 10,000 cells; it uses 500 below) keep a
    # 10,000-cell map about 2.5x faster for a picture that is as readable.
    sc.tl.umap(a, random_state=random_state, init_pos="spectral" if n > 50 else "random", maxiter=n_epochs)
    return np.asarray(a.obsm["X_umap"], dtype=np.float32)


def umap(adata, *, use_rep: str = "X_cellatlas", n_neighbors: int = 15, random_state: int = 0, key_added: str = USER_UMAP) -> str:
    """A UMAP of the query's own cells on the cellatlas embedding, stored in ``obsm[key_added]``.

    Not written to ``obsm["X_umap"]``, which stays the user's own. Returns ``key_added``.
    """
    if use_rep not in adata.obsm:
        raise InputError(
            f"adata.obsm has no '{use_rep}'.",
            fix="Run cellatlas.annotate_adata(adata) first (it writes obsm['X_cellatlas']).",
            field="use_rep",
        )
    adata.obsm[key_added] = embedding_umap(adata.obsm[use_rep], n_neighbors=n_neighbors, random_state=random_state)
    adata.uns[key_added] = {"params": {"use_rep": use_rep, "n_neighbors": n_neighbors, "random_state": random_state}}
    return key_added


def user_basis(adata, basis: str | None = None, *, compute: bool = True) -> str:
    """The ``obsm`` key of a map of the user's own cells.

    ``basis`` when given; else the user's ``X_umap``; else a UMAP on the cellatlas
    embedding (``X_umap_cellatlas``, computed with :func:`umap` when absent and ``compute``).
    """
    if basis:
        name = basis if basis in adata.obsm else f"X_{basis}"
        if name not in adata.obsm:
            raise InputError(f"adata.obsm has no '{basis}'.", fix=f"Pick one of: {', '.join(adata.obsm.keys())}.", field="basis")
        return name
    for name in ("X_umap", USER_UMAP):
        if name in adata.obsm:
            return name
    if not compute:
        raise InputError("adata has no UMAP.", fix="Run cellatlas.tl.umap(adata) or sc.tl.umap(adata).", field="basis")
    return umap(adata)


def projection_key(adata) -> str:
    """``obsm`` key of the cells' placement on the atlas's reference layout."""
    for name in PROJECTION_KEYS:
        if name in adata.obsm:
            return name
    raise InputError(
        "adata.obsm has no atlas projection ('X_cellatlas_projection').",
        fix="Run cellatlas.annotate_adata(adata) (the HTTP client writes it too).",
        field="basis",
    )


# ------------------------------------------------------------------ markers
def own_markers(entry: Mapping[str, Any]) -> list[str]:
    """A label's own positive markers: curated first, then derived from the reference.

    Positives inherited from parent labels (lineage genes every leukocyte expresses) are
    not the label's own: atlases record the source of each own marker in ``sources``.
    """
    pos = list(entry.get("positive", []))
    src = entry.get("sources")
    if not src:
        return pos
    curated = [g for g in pos if str(src.get(g, "")).startswith("curated")]
    derived = [g for g in pos if g in src and not str(src[g]).startswith("curated")]
    return curated + derived


def defining_markers(
    labels: Sequence[str], marker_sets: Mapping[str, Mapping[str, Any]], available: set[str] | Mapping[str, Any], per_label: int = 3
) -> list[tuple[str, str]]:
    """Up to ``per_label`` of each label's own markers present in the data, as ``(label, gene)``.

    Curated positives come first, then those derived from the reference; a gene is listed
    once, under the first label (in ``labels`` order) that claims it.
    """
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for lab in labels:
        k = 0
        for g in own_markers(marker_sets.get(lab) or {}):
            if k >= per_label:
                break
            if g in available and g not in seen:
                out.append((lab, g))
                seen.add(g)
                k += 1
    return out


def expression_for_genes(X: sp.spmatrix | np.ndarray, columns: Sequence[int], *, values: str = "counts") -> sp.csr_matrix:
    """Expression of the selected columns on a log1p(CP10k) scale.

    ``values="counts"``: each cell is scaled to 10,000 counts over *all* its genes, then
    log1p. Anything else (already normalised input): the values are used as they are.
    """
    X = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
    sub = X[:, np.asarray(columns, dtype=np.int64)].astype(np.float32).tocsr()
    if values == "counts":
        total = np.asarray(X.sum(axis=1)).ravel()
        scale = np.where(total > 0, 1e4 / np.where(total > 0, total, 1), 0.0).astype(np.float32)
        sub = sp.diags(scale) @ sub
        sub.data = np.log1p(sub.data)
    return sp.csr_matrix(sub)


def marker_expression(adata, key: str | None = None, n_genes: int = 3, atlas=None):
    """log1p(CP10k) of each called label's defining markers, ready for ``sc.pl.dotplot``.

    Returns
    -------
    expr, groups
        An AnnData (cells x marker genes, ``obs[key]`` the calls ordered by size) and
        ``{label: [genes]}``. Genes are named by their approved symbol for human data and by
        the dataset's own (MGI-cased) name for mouse data.
    """
    import anndata as ad

    from cellatlas.atlas import DEFAULT_ATLAS, load_atlas
    from cellatlas.genes import display_name, map_genes
    from cellatlas.io import counts_from_adata, detect_values

    key = label_key(adata, key)
    if atlas is None:
        rec = adata.uns.get("cellatlas", {})
        atlas = (rec.get("provenance", {}) if isinstance(rec, Mapping) else {}).get("atlas") or DEFAULT_ATLAS
    at = load_atlas(atlas) if isinstance(atlas, str) else atlas
    X, genes, _, _ = counts_from_adata(adata)
    mapping = map_genes(genes)
    col_of: dict[str, int] = {}
    for j, s in enumerate(mapping.symbols):
        if s and s not in col_of:
            col_of[s] = j
    calls = adata.obs[key].astype(str)
    order = call_order(calls)
    pairs = defining_markers(order, at.marker_sets, col_of, per_label=n_genes)
    cols = [col_of[g] for _, g in pairs]
    shown = [g if mapping.species == "human" else display_name(genes[col_of[g]], mapping.species) for _, g in pairs]
    expr = ad.AnnData(
        X=expression_for_genes(X, cols, values=str(detect_values(X))),
        obs=pd.DataFrame({key: pd.Categorical(calls.to_numpy(), categories=order)}, index=adata.obs_names.copy()),
        var=pd.DataFrame({"symbol": [g for _, g in pairs]}, index=pd.Index(shown, dtype=object)),
    )
    groups: dict[str, list[str]] = {}
    for (lab, _), name in zip(pairs, shown):
        groups.setdefault(lab, []).append(name)
    return expr, groups


def marker_genes(adata, key: str | None = None, n_genes: int = 3, atlas=None) -> dict[str, list[str]]:
    """``{label: genes}``: each called label's own defining markers present in the data."""
    return marker_expression(adata, key, n_genes, atlas)[1]


__all__ = [
    "UNASSIGNED", "USER_UMAP", "cluster_summary", "compare", "crosstab", "defining_markers", "embedding_umap",
    "expression_for_genes", "find_groupings", "label_key", "marker_expression", "marker_genes", "own_markers", "projection_key",
    "summarise_groups", "umap", "user_basis",
]
