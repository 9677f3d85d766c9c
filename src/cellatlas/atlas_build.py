"""Build an atlas from any labelled AnnData (``cellatlas atlas build``).

Steps: read counts and map genes (the same path as queries), choose the gene panel
(highly variable genes plus marker genes), fit the encoder, embed the reference,
derive marker sets from the reference and merge them with the curated ones, record
neighbour-distance and marker-score statistics (for out-of-distribution flags),
lay the reference out in 2-D, and fit the confidence calibration on held-out
reference cells (folds by donor/batch where known).

A reference may be cells (``reference_kind="cells"``) or pseudo-cells sampled from
averaged per-type profiles (``"profiles"``). Pseudo-cells vary within a label only by
sampling noise, so for them the panel's variable genes are chosen on the label means
(between-type variation; on the pseudo-cells the choice is mostly noise), and the
encoder works on log1p values without per-gene scaling (a gene's pseudo-cell variance
measures sampling noise, not its spread in real cells). The kind is recorded in the atlas.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas import fusion
from cellatlas.atlas import Atlas
from cellatlas.encoders import get_encoder
from cellatlas.encoders.default import DefaultEncoder
from cellatlas.errors import InputError
from cellatlas.markers import derive_markers, load_curated_markers, load_labels, merge_markers
from cellatlas.neighbours import neighbour_stats
from cellatlas.query import Query, prepare_query
from cellatlas.runtime import AtlasRuntime

GROUP_KEYS = ("donor", "batch", "sample", "sample_id")
REFERENCE_KINDS = ("cells", "profiles")
MIN_CELLS_PER_LABEL = 5
MIN_MARKERS = 3
RICH_CURATED = 5
"""A label with this many curated positive markers keeps only those (plus derived negatives)."""
"""A marker-defined label needs this many positive markers of its own to be a candidate."""


def label_means(counts: sp.csr_matrix, labels: np.ndarray) -> sp.csr_matrix:
    """Mean counts per label (rows in sorted label order).

    Parameters
    ----------
    counts
        Cells x genes counts.
    labels
        Label per cell.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``[n_labels, n_genes]`` float32.
    """
    names, codes = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    n = np.bincount(codes, minlength=len(names)).astype(np.float64)
    onehot = sp.csr_matrix((1.0 / n[codes], (codes, np.arange(len(codes)))), shape=(len(names), len(codes)))
    return sp.csr_matrix(onehot @ sp.csr_matrix(counts, dtype=np.float64), dtype=np.float32)


def _hvg(counts: sp.csr_matrix, genes: list[str], n_top: int) -> list[str]:
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(sp.csr_matrix(counts, dtype=np.float32))
    a.var_names = genes
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    keep = ~a.var_names.str.startswith(("MT-", "RPL", "RPS"))
    a = a[:, keep].copy()
    sc.pp.highly_variable_genes(a, n_top_genes=min(n_top, a.n_vars - 1), flavor="seurat")
    return list(a.var_names[a.var["highly_variable"].to_numpy()])


def _label_rows(ref_labels: list[str], extra: list[str], ontology: dict[str, str]) -> tuple[list[dict], dict[str, str]]:
    table = load_labels()
    rows: dict[str, dict] = {}
    todo = list(ref_labels) + [e for e in extra if e not in ref_labels]
    while todo:
        lab = todo.pop(0)
        if lab in rows:
            continue
        known = lab in table.index
        row = table.loc[lab] if known else None
        parent = str(row["parent"]) if known and isinstance(row["parent"], str) else ""
        rows[lab] = {
            "label": lab,
            "ontology_id": ontology.get(lab) or (str(row["ontology_id"]) if known else ""),
            "parent": parent,
            "lineage": str(row["lineage"]) if known else "",
        }
        if parent:
            todo.append(parent)
    parents = {k: v["parent"] for k, v in rows.items()}
    return list(rows.values()), parents


def _effective_markers(labels: list[str], base: dict[str, dict], parents: dict[str, str]) -> dict[str, dict]:
    """Own positives plus the parent's; own negatives plus every ancestor's."""
    out = {}
    for lab in labels:
        own = base.get(lab, {"positive": [], "negative": []})
        pos = list(own.get("positive", []))
        neg = list(own.get("negative", []))
        chain = []
        p = parents.get(lab, "")
        while p:
            chain.append(p)
            p = parents.get(p, "")
        if chain:
            pos += [g for g in base.get(chain[0], {}).get("positive", []) if g not in pos and g not in neg]
        for a in chain:
            neg += [g for g in base.get(a, {}).get("negative", []) if g not in neg and g not in pos]
        out[lab] = {"positive": pos, "negative": neg, "sources": own.get("sources", {})}
    return out


def assemble(
    query: Query,
    labels: np.ndarray,
    *,
    name: str,
    marker_labels: Sequence[str] = (),
    ontology: dict[str, str] | None = None,
    model: str = "default",
    encoder=None,
    embedding: np.ndarray | None = None,
    n_hvg: int = 2000,
    n_pcs: int = 50,
    transform: str = "rank",
    reference_kind: str = "cells",
) -> Atlas:
    """An atlas without layout or calibration (used by the build and its cross-validation)."""
    profiles = reference_kind == "profiles"
    ref_labels = sorted(set(labels.tolist()))
    codes = np.searchsorted(np.asarray(ref_labels, dtype=object), labels).astype(np.int32)
    rows, parents = _label_rows(ref_labels, list(marker_labels), ontology or {})
    curated = load_curated_markers()
    derived = derive_markers(query.counts, query.genes, labels)
    # Curated signatures stand alone where they are rich; reference-derived genes only fill
    # labels the curation covers thinly (small reference groups give noisy genes, e.g.
    # stromal transcripts among the markers derived for 14 platelets).
    derived = {
        lab: d if len(curated.get(lab, {}).get("positive", [])) < RICH_CURATED else {"positive": [], "negative": d.get("negative", [])}
        for lab, d in derived.items()
    }
    base = merge_markers(curated, derived)
    # Grouping nodes (parents in the label table) are roll-up targets, never candidates:
    # as candidates they would out-score their own children.
    grouping = {p for p in load_labels()["parent"] if isinstance(p, str) and p} | set(parents.values())
    candidates = ref_labels + [
        m for m in marker_labels
        if m not in ref_labels and m not in grouping and len(base.get(m, {}).get("positive", [])) >= MIN_MARKERS
    ]
    sets = _effective_markers([r["label"] for r in rows], base, parents)
    foils = _foil_sets(candidates, grouping, curated)
    have = set(query.genes)
    marker_genes = {g for lab in ref_labels for g in sets[lab]["positive"]} & have
    hvg_source = label_means(query.counts, labels) if profiles else query.counts
    panel = sorted(set(_hvg(hvg_source, query.genes, n_hvg)) | marker_genes)
    every_marker = {g for lab in candidates for side in ("positive", "negative") for g in sets[lab][side]}
    every_marker |= {g for f in foils.values() for side in ("positive", "negative") for g in f[side]}
    # Marker genes the reference never measured are stored as zero columns: a reference's
    # gene filter (e.g. min.cells) removes only genes it does not express.
    stored = sorted(set(panel) | every_marker)
    gi = {g: i for i, g in enumerate(query.genes)}
    present = [(gi[g], j) for j, g in enumerate(stored) if g in gi]
    sel = sp.csr_matrix(
        (np.ones(len(present), dtype=np.float32), ([r for r, _ in present], [c for _, c in present])),
        shape=(len(query.genes), len(stored)),
    )
    ref_counts = (query.counts @ sel).tocsr()
    panel_counts = ref_counts[:, np.searchsorted(np.asarray(stored, dtype=object), np.asarray(panel, dtype=object))]
    arrays: dict[str, np.ndarray] = {
        "panel": np.asarray(panel, dtype=str),
        "ref_genes": np.asarray(stored, dtype=str),
        "ref_labels": codes,
        "ref_label_names": np.asarray(ref_labels, dtype=str),
        "ref_data": ref_counts.data.astype(np.float32),
        "ref_indices": ref_counts.indices.astype(np.int32),
        "ref_indptr": ref_counts.indptr.astype(np.int64),
        "ref_shape": np.asarray(ref_counts.shape, dtype=np.int64),
        "ref_layout": np.zeros((len(labels), 2), dtype=np.float32),
    }
    if model == "default":
        enc = DefaultEncoder.fit(panel_counts, panel, panel, n_pcs=n_pcs, transform=transform, scale=not profiles)
        emb = enc.embed(panel_counts, panel)
        for k, v in enc.state().items():
            arrays[f"model__default__state__{k}"] = v
    else:
        enc = encoder
        emb = embedding if embedding is not None else enc.embed(query.counts, query.genes)
    arrays[f"model__{model}__embedding"] = emb.astype(np.float32)
    n_cells = np.bincount(codes, minlength=len(ref_labels))
    for r in rows:
        r["n_cells"] = int(n_cells[ref_labels.index(r["label"])]) if r["label"] in ref_labels else 0
        r["source"] = "reference" if r["n_cells"] else ("markers" if r["label"] in candidates else "hierarchy")
    meta = {
        "name": name,
        "reference_kind": reference_kind,
        "labels": rows,
        "candidates": candidates,
        "markers": sets,
        "foils": foils,
        "models": {model: {"fingerprint": enc.fingerprint(), "dim": int(emb.shape[1]), "neighbours": neighbour_stats(emb)}},
    }
    return Atlas(meta=meta, arrays=arrays)


def _foil_sets(candidates: Sequence[str], grouping: set[str], curated: dict[str, dict]) -> dict[str, dict]:
    """Curated cell types the atlas cannot call, as marker sets for the novel-type rule.

    A foil is a leaf of the curated vocabulary with at least ``MIN_MARKERS`` positive markers
    that is neither a candidate, a grouping node nor a descendant of a candidate (a finer
    type of a label the atlas has is not novel). Sets are built like the candidates' (own
    positives plus the parent's, every ancestor's negatives); ``own`` keeps the foil's own
    positives, whose coverage decides whether it is usable. See ``fusion.foil_lead``.
    """
    table = load_labels()
    parents = {lab: (p if isinstance(p, str) else "") for lab, p in table["parent"].items()}
    cand = set(candidates)

    def under_candidate(lab: str) -> bool:
        p = parents.get(lab, "")
        while p:
            if p in cand:
                return True
            p = parents.get(p, "")
        return False

    names = [
        lab for lab in table.index
        if lab not in cand and lab not in grouping and not under_candidate(lab)
        and len(curated.get(lab, {}).get("positive", [])) >= MIN_MARKERS
    ]
    sets = _effective_markers(names, curated, parents)
    return {
        lab: {"positive": v["positive"], "negative": v["negative"], "own": list(curated[lab]["positive"])}
        for lab, v in sets.items()
    }


def _folds(obs: pd.DataFrame | None, labels: np.ndarray, n_folds: int, seed: int) -> tuple[list[np.ndarray], str]:
    from sklearn.model_selection import GroupKFold, StratifiedKFold

    if obs is not None:
        for key in GROUP_KEYS:
            if key in obs.columns and obs[key].nunique() >= 3:
                groups = obs[key].astype(str).to_numpy()
                k = min(n_folds, obs[key].nunique())
                return [test for _, test in GroupKFold(n_splits=k).split(labels, labels, groups)], f"grouped by {key}"
    counts = pd.Series(labels).value_counts()
    k = int(max(2, min(n_folds, counts.min())))
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [test for _, test in skf.split(labels, labels)], "stratified random"


def calibrate(
    query: Query, labels: np.ndarray, obs: pd.DataFrame | None, assemble_kwargs: dict, *, n_folds: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Cross-validated calls on held-out reference cells -> logistic confidence models.

    One model gives the confidence of the call; a second one (``"parent"``) the
    confidence of the call's parent label, fitted on the same held-out cells judged at
    that label (is the cell's truth the parent or under it?).
    """
    folds, how = _folds(obs, labels, n_folds, seed)
    feats, correct, p_feats, p_correct = [], [], [], []
    model = assemble_kwargs.get("model", "default")
    for test in folds:
        train = np.setdiff1d(np.arange(len(labels)), test)
        kw = dict(assemble_kwargs)
        if kw.get("embedding") is not None:
            kw["embedding"] = kw["embedding"][train]
        sub = assemble(query.subset(train), labels[train], **kw)
        rt = AtlasRuntime(sub, model, query.genes, encoder=kw.get("encoder"))
        sc = rt.score(query.counts[test])
        nodes = rt.hierarchy.nodes
        parents = _parents_of(sub)
        truth = labels[test]

        def right(node: np.ndarray, truth: np.ndarray) -> np.ndarray:
            return np.array([nodes[c] == t or nodes[c] in _ancestors(t, parents) for c, t in zip(node, truth)], dtype=bool)

        feats.append(sc.features)
        correct.append(right(sc.call, truth))
        has = np.nonzero(sc.parent >= 0)[0]
        p_feats.append(fusion.calibration_features(
            sc.fused[has], sc.p_knn[has], sc.p_marker[has], sc.parent[has], np.ones(len(has), bool), rt.hierarchy, sc.o[has]
        ))
        p_correct.append(right(sc.parent[has], truth[has]))
    X, y = np.vstack(feats), np.concatenate(correct)
    cal = fusion.fit_calibration(X, y)
    cal["summary"].update({"folds": len(folds), "split": how, "features": list(fusion.CALIBRATION_FEATURES)})
    pX, py = np.vstack(p_feats), np.concatenate(p_correct)
    if len(py):
        cal["parent"] = fusion.fit_calibration(pX, py)
    return cal


def _parents_of(atlas: Atlas) -> dict[str, str]:
    return {r["label"]: r["parent"] for r in atlas.meta["labels"]}


def _ancestors(label: str, parents: dict[str, str]) -> list[str]:
    out, p = [], parents.get(label, "")
    while p:
        out.append(p)
        p = parents.get(p, "")
    return out


def _layout(emb: np.ndarray, seed: int = 0, method: str = "umap") -> np.ndarray:
    """2-D layout of the reference: UMAP (default) or the first two principal components (fast)."""
    if method == "pca":
        centred = emb - emb.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        return (centred @ vt[:2].T).astype(np.float32)
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(np.zeros((emb.shape[0], 1), dtype=np.float32))
    a.obsm["X_emb"] = emb
    sc.pp.neighbors(a, use_rep="X_emb", n_neighbors=15, random_state=seed)
    sc.tl.umap(a, random_state=seed)
    return a.obsm["X_umap"].astype(np.float32)


def _anchors(layout: np.ndarray, names: Sequence[str]) -> dict[str, list[float]]:
    """Places on a ring around the reference layout for labels without reference cells."""
    c = layout.mean(axis=0)
    r = float(np.max(np.linalg.norm(layout - c, axis=1))) * 1.25 + 1.0
    names = list(names) + ["__novel__"]
    ang = np.linspace(0, 2 * np.pi, len(names), endpoint=False)
    return {n: [float(c[0] + r * np.cos(a)), float(c[1] + r * np.sin(a))] for n, a in zip(names, ang)}


def build_atlas(
    source,
    label_key: str,
    *,
    name: str,
    version: str = "1",
    description: str = "",
    layer: str | None = None,
    use_raw: bool | None = None,
    label_map: dict[str, str] | None = None,
    ontology_key: str | None = None,
    marker_labels: str | Sequence[str] = "reference",
    model: str = "default",
    model_path: str | Path | None = None,
    n_hvg: int = 2000,
    n_pcs: int = 50,
    transform: str | None = None,
    reference_kind: str = "cells",
    calibrate_folds: int = 5,
    layout: str = "umap",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> Atlas:
    """Build an atlas from a labelled AnnData or .h5ad path.

    Parameters
    ----------
    source
        AnnData or path to an ``.h5ad`` with counts and a label column.
    label_key
        ``obs`` column with the cell-type labels.
    name, version, description
        Identity recorded in the file.
    label_map
        Optional renaming of labels (e.g. onto the curated vocabulary, which brings Cell
        Ontology ids, parents and curated markers).
    ontology_key
        Optional ``obs`` column with Cell Ontology ids per label.
    marker_labels
        ``"reference"`` (only the reference's labels), ``"all"`` (also every curated
        marker-defined label, for cells the reference does not cover) or a list.
    model, model_path
        Encoder to embed the reference with (``default`` is fitted here).
    transform
        Encoder transform: ``"rank"`` or ``"log1p"``; default ``"rank"`` for cells and
        ``"log1p"`` for profiles.
    reference_kind
        ``"cells"`` (single cells) or ``"profiles"`` (pseudo-cells sampled from averaged
        per-type profiles; see the module docstring for what changes).
    calibrate_folds
        Folds of held-out reference cells for the confidence calibration (0 = skip).
    layout
        ``"umap"`` or ``"pca"`` (first two principal components of the embedding; fast).
    """
    import anndata as ad

    log = log or (lambda m: None)
    src_desc: dict[str, Any] = {}
    if isinstance(source, (str, Path)):
        p = Path(source)
        src_desc = {"file": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        from cellatlas.io import read

        source = read(p)
    if not isinstance(source, ad.AnnData):
        raise InputError("build_atlas needs an AnnData or an .h5ad path.", fix="Pass a labelled AnnData.", field="source")
    if label_key not in source.obs.columns:
        raise InputError(
            f"obs has no column '{label_key}' (it has: {', '.join(map(str, source.obs.columns[:20]))}).",
            fix="Pass --label-key with the column holding cell-type labels.",
            field="label_key",
        )
    if reference_kind not in REFERENCE_KINDS:
        raise InputError(
            f"reference_kind must be one of {', '.join(REFERENCE_KINDS)}, not '{reference_kind}'.",
            fix="Pass 'cells' for single cells or 'profiles' for pseudo-cells made from averaged profiles.",
            field="reference_kind",
        )
    if transform is None:
        transform = "log1p" if reference_kind == "profiles" else "rank"
    raw_labels = source.obs[label_key].astype(str).to_numpy()
    labels = np.array([(label_map or {}).get(x, x) for x in raw_labels], dtype=object)
    vc = pd.Series(labels).value_counts()
    keep = np.isin(labels, vc[vc >= MIN_CELLS_PER_LABEL].index) & ~pd.isna(source.obs[label_key]).to_numpy()
    dropped = sorted(vc[vc < MIN_CELLS_PER_LABEL].index.tolist())
    if keep.sum() < 10 or len(set(labels[keep])) < 2:
        raise InputError("An atlas needs at least two labels with 5+ cells each.", fix="Check --label-key.", field="label_key")
    adata = source[keep]
    labels = labels[keep]
    log(f"reading {adata.n_obs} cells x {adata.n_vars} genes, {len(set(labels))} labels")
    query = prepare_query(adata, layer=layer, use_raw=use_raw, skip_gene_check=True)  # references: not checked (yet)
    ontology = {}
    if ontology_key:
        ontology = dict(zip(labels, adata.obs[ontology_key].astype(str)))
    if marker_labels == "all":
        table = load_labels()
        marker_labels = list(table.index)
    elif marker_labels == "reference":
        marker_labels = []
    encoder, embedding = None, None
    if model != "default":
        log(f"embedding the reference with {model}")
        encoder = get_encoder(model, model_path=model_path)
        embedding = encoder.embed(query.counts, query.genes)
    kw = dict(
        name=name, marker_labels=list(marker_labels), ontology=ontology, model=model, encoder=encoder,
        embedding=embedding, n_hvg=n_hvg, n_pcs=n_pcs, transform=transform, reference_kind=reference_kind,
    )
    log("fitting encoder, markers and statistics")
    atlas = assemble(query, labels, **kw)
    emb = atlas.embedding(model)
    log("laying out the reference in 2-D")
    atlas.arrays["ref_layout"] = _layout(emb, seed, layout)
    atlas.meta["anchors"] = _anchors(atlas.arrays["ref_layout"], [c for c in atlas.meta["candidates"] if c not in set(labels)])
    if calibrate_folds:
        log("calibrating confidence on held-out reference cells")
        atlas.meta["models"][model]["calibration"] = calibrate(query, labels, adata.obs, kw, n_folds=calibrate_folds, seed=seed)
    atlas.meta.update(
        {
            "version": version,
            "description": description,
            "species": "human",
            "provenance": {
                "source": src_desc,
                "label_key": label_key,
                "labels_dropped_too_few_cells": dropped,
                "n_reference_cells": int(adata.n_obs),
                "gene_report": query.report,
                "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "settings": {"n_hvg": n_hvg, "n_pcs": n_pcs, "transform": transform, "seed": seed,
                             "reference_kind": reference_kind},
            },
        }
    )
    return atlas
