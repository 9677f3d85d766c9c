"""Build an atlas from labelled data (``cellatlas atlas build``).

Steps: read counts and map genes (the same path as queries) for every source, stack the
reference sources into one reference, choose the gene panel (highly variable genes, per
source when there are several, plus marker genes), fit the encoder, embed the reference,
derive marker sets from the reference and merge them with the curated ones, record
neighbour-distance statistics, lay the reference out in 2-D, and fit the fusion model on
held-out cells (:mod:`cellatlas.training`).

A reference may be single cells or pseudo-cells drawn from averaged per-type profiles
(:mod:`cellatlas.sources`). When all reference cells are pseudo-cells
(``reference_kind="profiles"``) they vary within a label only by sampling noise, so the
panel's variable genes are chosen on the label means and the encoder works on log1p values
without per-gene scaling. The kind is recorded in the atlas.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas.atlas import Atlas
from cellatlas.encoders import get_encoder
from cellatlas.encoders.default import DefaultEncoder
from cellatlas.errors import InputError
from cellatlas.markers import derive_markers, load_curated_markers, load_labels, merge_markers, parent_chain
from cellatlas.neighbours import neighbour_stats
from cellatlas.sources import Source, measured_by_all, prepare_sources, source_table, stack

REFERENCE_KINDS = ("cells", "profiles")
MIN_MARKERS = 3
"""A marker-defined label needs this many positive markers of its own to be a candidate."""
RICH_CURATED = 5
"""A label with this many curated positive markers keeps only those (plus derived negatives)."""


def label_means(counts: sp.csr_matrix, labels: np.ndarray) -> sp.csr_matrix:
    """Mean counts per label (rows in sorted label order), ``[n_labels, n_genes]`` float32."""
    names, codes = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    n = np.bincount(codes, minlength=len(names)).astype(np.float64)
    onehot = sp.csr_matrix((1.0 / n[codes], (codes, np.arange(len(codes)))), shape=(len(names), len(codes)))
    return sp.csr_matrix(onehot @ sp.csr_matrix(counts, dtype=np.float64), dtype=np.float32)


def _hvg(counts: sp.csr_matrix, genes: list[str], n_top: int, batches: np.ndarray | None = None) -> list[str]:
    """Highly variable genes (Seurat flavour; ranked within each batch and combined when ``batches`` vary)."""
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(sp.csr_matrix(counts, dtype=np.float32))
    a.var_names = genes
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    keep = ~a.var_names.str.startswith(("MT-", "RPL", "RPS"))
    a = a[:, keep].copy()
    kw: dict[str, Any] = {}
    if batches is not None and len(set(batches.tolist())) > 1:
        a.obs["batch"] = pd.Categorical(np.asarray(batches).astype(str))
        kw["batch_key"] = "batch"
    sc.pp.highly_variable_genes(a, n_top_genes=min(n_top, a.n_vars - 1), flavor="seurat", **kw)
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
    """Own positives plus the nearest grouping ancestor's; own negatives plus every ancestor's.

    A parent that is a cell type of its own ("Fibroblast" above "Pancreatic stellate cell") is
    skipped for positives: its markers describe its own kind of cell, not what its finer types share.
    """
    out = {}
    kind = load_labels()["kind"]
    for lab in labels:
        own = base.get(lab, {"positive": [], "negative": []})
        pos = list(own.get("positive", []))
        neg = list(own.get("negative", []))
        chain = parent_chain(lab, parents)
        shared = next((a for a in chain if kind.get(a) != "type"), None)
        if shared is not None:
            pos += [g for g in base.get(shared, {}).get("positive", []) if g not in pos and g not in neg]
        for a in chain:
            neg += [g for g in base.get(a, {}).get("negative", []) if g not in neg and g not in pos]
        out[lab] = {"positive": pos, "negative": neg, "sources": own.get("sources", {})}
    return out


def _candidates(ref_labels: list[str], marker_labels: Sequence[str], base: dict, parents: dict[str, str]) -> list[str]:
    """Labels a cell can be called: reference labels and marker-defined ones, minus grouping nodes.

    A label with another candidate below it is a grouping node (a roll-up target, never a
    candidate: it would out-score its own children); its reference cells vote for it, and so
    for every candidate below it. A label the vocabulary calls a ``type`` of its own stays a
    candidate with finer types below it ("Fibroblast" above "Pancreatic stellate cell"): its
    reference cells vote for it alone, and its node's mass includes its children's.
    """
    table = load_labels()
    table_parents = {lab: (p if isinstance(p, str) else "") for lab, p in table["parent"].items()}
    groups = set(table.index[table["kind"] == "group"])
    pool = list(dict.fromkeys(list(ref_labels) + [
        m for m in marker_labels if len(base.get(m, {}).get("positive", [])) >= MIN_MARKERS
    ]))
    merged = {**table_parents, **parents}
    above = {a for lab in pool for a in parent_chain(lab, merged)}
    return [lab for lab in pool if lab not in above or (lab in table.index and lab not in groups)]


def _foil_sets(candidates: Sequence[str], grouping: set[str], curated: dict[str, dict]) -> dict[str, dict]:
    """Curated cell types the atlas cannot call, as marker sets for the "novel" options of the fusion model.

    A foil is a leaf of the curated vocabulary with at least ``MIN_MARKERS`` positive markers
    that is neither a candidate, a grouping node nor a relative of a candidate (a finer or
    coarser type of a label the atlas has is not novel). Sets are built like the candidates'.
    """
    table = load_labels()
    parents = {lab: (p if isinstance(p, str) else "") for lab, p in table["parent"].items()}
    cand = set(candidates)
    related = cand | {a for c in cand for a in parent_chain(c, parents)}
    names = [
        lab for lab in table.index
        if lab not in related and lab not in grouping and not (set(parent_chain(lab, parents)) & cand)
        and len(curated.get(lab, {}).get("positive", [])) >= MIN_MARKERS
    ]
    sets = _effective_markers(names, curated, parents)
    return {lab: {"positive": v["positive"], "negative": v["negative"]} for lab, v in sets.items()}


def assemble(
    counts: sp.csr_matrix,
    genes: list[str],
    labels: np.ndarray,
    *,
    name: str,
    sources: tuple[np.ndarray, list[str], list[str]] | None = None,
    measured: set[str] | None = None,
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
    """An atlas without layout or fusion model (the build and its held-out folds both use it).

    ``sources``: the source of every cell (index), and the sources' names and kinds (``cells`` or
    ``profiles``), recorded with the reference; highly variable genes are chosen per source.
    ``measured``: the genes every reference source measured (default: all of ``genes``). The
    encoder's panel is chosen among them, so that no reference cell looks different for a gene
    its dataset did not measure.
    """
    profiles = reference_kind == "profiles"
    ref_labels = sorted(set(labels.tolist()))
    codes = np.searchsorted(np.asarray(ref_labels, dtype=object), labels).astype(np.int32)
    rows, parents = _label_rows(ref_labels, list(marker_labels), ontology or {})
    curated = load_curated_markers()
    derived = derive_markers(counts, genes, labels)
    # Curated signatures stand alone where they are rich; reference-derived genes only fill
    # labels the curation covers thinly (small reference groups give noisy genes).
    derived = {
        lab: d if len(curated.get(lab, {}).get("positive", [])) < RICH_CURATED else {"positive": [], "negative": d.get("negative", [])}
        for lab, d in derived.items()
    }
    base = merge_markers(curated, derived)
    candidates = _candidates(ref_labels, marker_labels, base, parents)
    if not candidates:
        raise InputError("The reference gives no label the atlas could call (every label is a grouping of others).",
                         fix="Label the reference cells with specific types, or pass marker_labels='all'.", field="label_key")
    grouping = {p for p in load_labels()["parent"] if isinstance(p, str) and p} | set(parents.values())
    sets = _effective_markers([r["label"] for r in rows], base, parents)
    foils = _foil_sets(candidates, grouping, curated)
    have = set(genes) if measured is None else set(measured) & set(genes)
    marker_genes = {g for lab in ref_labels for g in sets[lab]["positive"]} & have
    cols = np.array([i for i, g in enumerate(genes) if g in have], dtype=np.int64)
    hvg_source = (label_means(counts, labels) if profiles else counts)[:, cols]
    source_of, source_names, source_kinds = sources or (np.zeros(len(labels), int), ["reference"], [reference_kind])
    batches = None if profiles else np.asarray(source_names, dtype=object)[source_of]
    panel = sorted(set(_hvg(hvg_source, [genes[i] for i in cols], n_hvg, batches)) | marker_genes)
    every_marker = {g for lab in candidates for side in ("positive", "negative") for g in sets[lab][side]}
    every_marker |= {g for f in foils.values() for side in ("positive", "negative") for g in f[side]}
    # Marker genes the reference never measured are stored as zero columns: a reference's
    # gene filter (e.g. min.cells) removes only genes it does not express.
    stored = sorted(set(panel) | every_marker)
    gi = {g: i for i, g in enumerate(genes)}
    present = [(gi[g], j) for j, g in enumerate(stored) if g in gi]
    sel = sp.csr_matrix(
        (np.ones(len(present), dtype=np.float32), ([r for r, _ in present], [c for _, c in present])),
        shape=(len(genes), len(stored)),
    )
    ref_counts = (counts @ sel).tocsr()
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
        "ref_source": np.asarray(source_of, dtype=np.int16),
        "ref_source_names": np.asarray(source_names, dtype=str),
        "ref_source_kinds": np.asarray(source_kinds, dtype=str),
    }
    if model == "default":
        enc = DefaultEncoder.fit(panel_counts, panel, panel, n_pcs=n_pcs, transform=transform, scale=not profiles)
        emb = enc.embed(panel_counts, panel)
        for k, v in enc.state().items():
            arrays[f"model__default__state__{k}"] = v
    else:
        enc = encoder
        emb = embedding if embedding is not None else enc.embed(counts, genes)
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


def build_from_sources(
    sources: Sequence[Source],
    *,
    name: str,
    version: str = "1",
    description: str = "",
    marker_labels: str | Sequence[str] = "reference",
    ontology: dict[str, str] | None = None,
    model: str = "default",
    model_path: str | Path | None = None,
    n_hvg: int = 2000,
    n_pcs: int = 50,
    transform: str | None = None,
    reference_kind: str | None = None,
    fit_folds: int = 5,
    layout: str = "umap",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    provenance: dict | None = None,
) -> Atlas:
    """Build an atlas from one or more labelled :class:`~cellatlas.sources.Source` s.

    Parameters
    ----------
    sources
        Reference datasets (``kind`` ``"cells"`` / ``"profiles"``) and held-out ones
        (``"heldout"``: used only to fit the fusion model).
    marker_labels
        ``"reference"`` (only the reference's labels), ``"all"`` (also every curated
        marker-defined label, for cells the reference does not cover) or a list.
    fit_folds
        Folds of held-out reference cells for the fusion model when there is one reference
        group (0 = no fit: the unfitted default model; tests only). With several groups, each
        group is held out in turn.
    transform
        Encoder transform, ``"rank"`` or ``"log1p"``; default ``"rank"`` for cells and ``"log1p"``
        for profiles.
    reference_kind
        ``"cells"`` or ``"profiles"``; default ``"profiles"`` when every reference source is a profile.
    layout
        ``"umap"`` or ``"pca"`` (first two principal components of the embedding; fast).
    """
    from cellatlas.training import fit_fusion

    log = log or (lambda m: None)
    prepared, dropped, dispersion = prepare_sources(sources, seed=seed)
    ref_parts = [p for p in prepared if p.kind != "heldout"]
    reference_kind = reference_kind or ("profiles" if all(p.kind == "profiles" for p in ref_parts) else "cells")
    transform = transform or ("log1p" if reference_kind == "profiles" else "rank")
    counts, genes, labels, part = stack(ref_parts)
    log(f"reference: {counts.shape[0]} cells x {len(genes)} genes, {len(set(labels))} labels from {len(ref_parts)} source(s)")
    if marker_labels == "all":
        marker_labels = list(load_labels().index)
    elif marker_labels == "reference":
        marker_labels = []
    encoder, embedding = None, None
    if model != "default":
        log(f"embedding the reference with {model}")
        encoder = get_encoder(model, model_path=model_path)
        embedding = encoder.embed(counts, genes)
    kw = dict(
        name=name, marker_labels=list(marker_labels), ontology=ontology or {}, model=model, encoder=encoder,
        n_hvg=n_hvg, n_pcs=n_pcs, transform=transform, reference_kind=reference_kind,
    )
    log("fitting encoder, markers and statistics")
    atlas = assemble(counts, genes, labels, sources=source_table(ref_parts, part), measured=measured_by_all(ref_parts),
                     embedding=embedding, **kw)
    emb = atlas.embedding(model)
    index_reference(atlas, model, encoder, counts, genes, seed, log)
    log("laying out the reference in 2-D")
    atlas.arrays["ref_layout"] = _layout(emb, seed, layout)
    atlas.meta["anchors"] = _anchors(atlas.arrays["ref_layout"], [c for c in atlas.meta["candidates"] if c not in set(labels)])
    if fit_folds:
        log("fitting the fusion model on held-out cells")
        fitted, calibration = fit_fusion(prepared, kw, atlas, embedding=embedding, n_folds=fit_folds, seed=seed, log=log)
        atlas.meta["models"][model]["fusion"] = {**fitted.to_dict(), "calibration": calibration.to_dict()}
    atlas.meta.update(
        {
            "version": version,
            "description": description,
            "species": "human",
            "provenance": {
                **(provenance or {}),
                "sources": [{"name": p.name, "group": p.group, "kind": p.kind, "n_cells": int(len(p.labels)),
                             "values": p.report.get("values"), "species": p.report.get("species")} for p in prepared],
                "labels_dropped_too_few_cells": dropped,
                "n_reference_cells": int(counts.shape[0]),
                "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "settings": {"n_hvg": n_hvg, "n_pcs": n_pcs, "transform": transform, "seed": seed,
                             "reference_kind": reference_kind, "fit_folds": fit_folds,
                             "pseudo_cell_dispersion": round(dispersion, 4)},
            },
        }
    )
    return atlas


def index_reference(atlas: Atlas, model: str, encoder, counts: sp.csr_matrix, genes: list[str], seed: int = 0,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Choose, build and tune the reference's neighbour index (:mod:`cellatlas.refindex`); record it in the atlas.

    An approximate index is tuned on reference cells thinned to half their depth and embedded
    (query cells are shallower than reference cells) and stored with the atlas; its recall@15
    against the exact search goes to ``meta["models"][model]["index"]``.
    """
    from cellatlas import refindex
    from cellatlas.neighbours import thin

    emb = atlas.embedding(model)
    spec = refindex.choose(*emb.shape)
    queries = None
    if spec["kind"] != "flat":
        (log or (lambda m: None))(f"indexing {emb.shape[0]} reference cells (approximate: tuning for recall@15 >= "
                                  f"{refindex.RECALL_TARGET})")
        n_q = min(emb.shape[0], refindex.RECALL_QUERIES)
        rows = np.sort(np.random.default_rng(seed).choice(emb.shape[0], n_q, replace=False))
        if model == "default":
            enc = DefaultEncoder.from_state(atlas.encoder_state("default"))
            stored = atlas.reference_counts()[rows]
            pos = {g: i for i, g in enumerate(atlas.ref_genes)}
            queries = enc.embed(thin(stored[:, [pos[g] for g in enc.panel]].tocsr(), 0.5, seed=seed), enc.panel)
        else:
            queries = encoder.embed(thin(counts[rows], 0.5, seed=seed), genes)
    index, info = refindex.make(emb, queries, spec=spec, seed=seed)
    atlas.meta["models"][model]["index"] = info
    if info["kind"] != "flat":
        atlas.arrays[f"model__{model}__index"] = refindex.serialize(index)
    return info


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
    fit_folds: int = 5,
    layout: str = "umap",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> Atlas:
    """Build an atlas from one labelled AnnData or .h5ad path.

    Parameters
    ----------
    source
        AnnData or path to an ``.h5ad`` with counts and a label column.
    label_key
        ``obs`` column with the cell-type labels.
    label_map
        Optional renaming of labels (e.g. onto the curated vocabulary, which brings Cell
        Ontology ids, parents and curated markers).
    ontology_key
        Optional ``obs`` column with Cell Ontology ids per label.
    reference_kind
        ``"cells"`` (single cells) or ``"profiles"`` (pseudo-cells already drawn from averaged
        per-type profiles; see the module docstring for what changes).
    fit_folds, marker_labels, transform, layout
        See :func:`build_from_sources`.
    """
    import anndata as ad

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
    obs_labels = source.obs[label_key]
    table = {str(x): (label_map or {}).get(str(x), str(x)) for x in obs_labels.astype(str).unique()}
    if obs_labels.isna().any():
        table["nan"] = None
    ontology = {}
    if ontology_key:
        ontology = {table[str(k)]: str(v) for k, v in zip(obs_labels.astype(str), source.obs[ontology_key].astype(str))}
    src = Source(name, source, label_key, table, kind="cells", layer=layer, use_raw=use_raw)
    atlas = build_from_sources(
        [src], name=name, version=version, description=description, marker_labels=marker_labels, ontology=ontology,
        model=model, model_path=model_path, n_hvg=n_hvg, n_pcs=n_pcs, transform=transform, reference_kind=reference_kind,
        fit_folds=fit_folds, layout=layout, seed=seed, log=log, provenance={"source": src_desc, "label_key": label_key},
    )
    return atlas
