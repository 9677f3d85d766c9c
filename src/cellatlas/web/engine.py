"""The workspace's only door into the engine: reading uploads, facts, choices, annotation.

Everything here calls the same public functions as the Python API and the HTTP
service (``cellatlas.io``, ``cellatlas.genes``, ``cellatlas.atlas``,
``cellatlas.encoders``, ``cellatlas.annotate``), so the browser gets exactly the
calls a script would.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import scipy.sparse as sp

from cellatlas.config import Settings
from cellatlas.errors import CellAtlasError, InputError

log = logging.getLogger("cellatlas.web")
ProgressFn = Callable[[str, float], None]
MIN_PROGRESS_CHUNK = 5000


@dataclass
class Dataset:
    """An uploaded dataset as the engine sees it.

    Attributes
    ----------
    adata
        The file as read (kept to write the annotated ``.h5ad``).
    X, genes, cell_ids
        Counts (cells x genes, CSR) and the names the engine annotates.
    source
        Where the counts came from (``X``, ``raw`` or a layer), as ``counts_from_adata`` says.
    mapping
        ``map_genes(genes)``: ``.symbols`` (mapped HGNC symbol per gene, ``None`` where unmapped).
    mapping_report
        ``mapping.report()``.
    value_type
        ``io.detect_values(X)``: ``counts``, ``lognorm``, ...
    """

    adata: Any
    X: sp.csr_matrix
    genes: list[str]
    cell_ids: list[str]
    source: str
    mapping: Any
    mapping_report: dict[str, Any]
    value_type: str

    @property
    def symbols(self) -> list[str | None]:
        """Mapped HGNC symbol per gene (``None`` where unmapped)."""
        return list(self.mapping.symbols)


def load_dataset(path: Path, display_name: str) -> Dataset:
    """Read an uploaded file and map its genes.

    Raises
    ------
    InputError
        The file cannot be read as the format its name says, or holds no cells/genes.
    """
    from cellatlas import genes as genes_mod
    from cellatlas import io

    try:
        adata = io.read(path, untrusted=True)
    except CellAtlasError:
        raise
    except Exception as e:  # any parser failure is a bad file, said plainly
        raise InputError(
            f"Could not read '{display_name}' as {_format_word(path)}: {type(e).__name__}: {e}".rstrip(": "),
            fix=_FORMAT_FIX,
            field="file",
        ) from e
    X, genes, cell_ids, source = io.counts_from_adata(adata)
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise InputError(
            f"'{display_name}' holds {X.shape[0]} cells and {X.shape[1]} genes; there is nothing to annotate.",
            fix="Upload a file with at least one cell and its gene expression values.",
            field="file",
        )
    mapping = genes_mod.map_genes(list(genes))
    return Dataset(
        adata=adata,
        X=X,
        genes=[str(g) for g in genes],
        cell_ids=[str(c) for c in cell_ids],
        source=source,
        mapping=mapping,
        mapping_report=mapping.report(),
        value_type=str(io.detect_values(X)),
    )


def dataset_facts(ds: Dataset, atlases: Sequence[dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """What the page shows before a run: sizes, id type, species, values and coverage per atlas.

    ``coverage[atlas]`` is :func:`cellatlas.genes.coverage` of the atlas panel plus the
    engine's own verdict (``ok``; ``problem`` holds its message and fix when the run
    would be refused for too few shared genes).
    """
    from cellatlas.atlas import load_atlas
    from cellatlas.genes import coverage
    from cellatlas.runtime import check_atlas_coverage

    cov = {}
    for info in atlases:
        if not info.get("usable", True):
            continue
        at = load_atlas(info["name"], settings)
        entry = dict(coverage(ds.mapping.symbols, at.panel), ok=True, problem=None)
        try:
            entry["neighbours"] = check_atlas_coverage(ds.mapping, at)
        except CellAtlasError as e:
            entry.update(ok=False, problem={"message": e.message, "fix": e.fix})
        cov[info["name"]] = entry
    rep = ds.mapping_report
    n_cells, n_genes = ds.X.shape
    examples = [gene_display_name(ds, j) if rep.get("species") == "mouse" else ds.genes[j] for j in range(min(6, n_genes))]
    notes = [str(x) for x in _read_notes(ds.adata)]
    changed = [(g, e) for g, e in zip(ds.genes, examples) if g != e]
    if changed:
        notes.append(f"mouse gene names are shown as MGI writes them (the file has '{changed[0][0]}' for '{changed[0][1]}')")
    return {
        "gene_check": gene_check(ds),
        "n_cells": int(n_cells),
        "n_genes": int(n_genes),
        "id_type": rep.get("id_type", "unknown"),
        "species": rep.get("species", "unknown"),
        "n_genes_mapped": int(rep.get("n_mapped", 0)),
        "fraction_genes_mapped": float(rep.get("fraction_mapped", 0.0)),
        "value_type": ds.value_type,
        "source": ds.source,
        "density": round(ds.X.nnz / max(n_cells * n_genes, 1), 4),
        "median_genes_per_cell": float(np.median(np.diff(ds.X.indptr))) if n_cells else 0.0,
        "example_genes": examples,
        "read_notes": notes,
        "mapping": rep,
        "coverage": cov,
    }


def gene_check(ds: Dataset) -> dict[str, Any]:
    """The engine's gene-list check (:func:`cellatlas.io_genecheck.check_gene_list`) on the upload, for the check page.

    A run of the same file is refused when the verdict is ``error`` unless the user ticks
    "Skip the gene-list check".
    """
    from cellatlas.io_genecheck import GeneCheck, check_gene_list

    if ds.value_type == "scaled":  # refused at run time anyway, with its own message
        return GeneCheck("unchecked", message="gene-list check not run: the values are scaled").report()
    return check_gene_list(ds.X, ds.mapping.symbols, values=ds.value_type).report()


def choices(settings: Settings) -> dict[str, Any]:
    """Models and atlases this server offers, with a usable default of each."""
    from cellatlas.atlas import list_atlases
    from cellatlas.encoders import available_models

    models = [dict(m) for m in available_models(settings)]
    atlases = [dict(a) for a in list_atlases(settings)]
    usable_m = [m["name"] for m in models if m.get("usable")]
    usable_a = [a["name"] for a in atlases if a.get("usable", True)]
    return {
        "models": models,
        "atlases": atlases,
        "default_model": "default" if "default" in usable_m else (usable_m[0] if usable_m else None),
        "default_atlas": "human-core" if "human-core" in usable_a else (usable_a[0] if usable_a else None),
    }


def annotate_dataset(
    ds: Dataset, *, model: str, atlas: str, settings: Settings, progress: ProgressFn, n_steps: int = 5, skip_gene_check: bool = False
):
    """Annotate every cell with :func:`cellatlas.annotate`, reporting progress after each chunk.

    Chunks are at least :data:`MIN_PROGRESS_CHUNK` cells (smaller ones cost more than the
    progress bar is worth) and at most ``settings.chunk_size``.

    Returns
    -------
    AnnotationResult
    """
    import cellatlas
    from cellatlas.atlas import load_atlas

    n = ds.X.shape[0]
    chunk = min(settings.chunk_size, max(MIN_PROGRESS_CHUNK, math.ceil(n / n_steps)))
    progress(f"Annotating {n:,} cells", 0.0)
    return cellatlas.annotate(
        ds.X,
        ds.genes,
        model=model,
        atlas=load_atlas(atlas, settings),
        cell_ids=ds.cell_ids,
        chunk_size=chunk,
        skip_gene_check=skip_gene_check,
        progress=lambda done, total: progress(f"Annotated {done:,} of {total:,} cells", done / max(total, 1)),
    )


def gene_display_name(ds: Dataset, col: int) -> str:
    """How to show the gene of column ``col``: its HGNC symbol for human data, the
    dataset's own name in MGI case for mouse data (files that upper-case mouse symbols
    are shown as MGI writes them)."""
    from cellatlas.genes import display_name

    species = ds.mapping_report.get("species", "human")
    if species == "mouse":
        return display_name(ds.genes[col], "mouse")
    return ds.mapping.symbols[col] or ds.genes[col]


def marker_display_names(ds: Dataset, marker_sets: dict[str, Any], col_of: dict[str, int]) -> dict[str, str]:
    """For mouse data, how each atlas marker (a human symbol) is shown: the dataset's own gene
    name in MGI case (``INS`` -> ``Ins1``); empty for human data, where the symbol is the name."""
    if ds.mapping_report.get("species") != "mouse":
        return {}
    genes = {g for entry in marker_sets.values() for g in entry.get("positive", [])}
    return {g: gene_display_name(ds, col_of[g]) for g in sorted(genes) if g in col_of}


def upload_groupings(ds: Dataset) -> dict[str, dict[str, Any]]:
    """Label or cluster columns of the upload's ``obs`` to compare the calls with.

    ``{column: {"kind": "labels"|"clusters", "codes": int32 per cell (-1 missing), "groups": [...]}}``,
    labels-like columns first (names with cell_type / label / annotation before others).
    """
    import pandas as pd

    from cellatlas.adata_out import written_before
    from cellatlas.tl import find_groupings, group_order

    obs = getattr(ds.adata, "obs", None)
    if obs is None or len(obs) != ds.X.shape[0]:
        return {}
    found = find_groupings(obs, exclude=written_before(ds.adata))

    def rank(g):
        named = any(w in g["column"].lower() for w in ("cell_type", "celltype", "label", "annot"))
        return (not named, g["kind"] != "labels", g["column"])

    out = {}
    for g in sorted(found, key=rank):
        col = obs[g["column"]]
        order = group_order(col)
        values = np.where(col.isna().to_numpy(), None, col.astype(str).to_numpy(dtype=object))
        cat = pd.Categorical(values, categories=order)
        out[g["column"]] = {"kind": g["kind"], "codes": np.asarray(cat.codes, dtype=np.int32), "groups": order}
    return out


_FORMAT_FIX = (
    "Check the file: an AnnData .h5ad, a 10x Genomics .h5 (filtered_feature_bc_matrix.h5), a .zip holding "
    "matrix.mtx(.gz) with features.tsv/genes.tsv and barcodes.tsv, or a CSV with cells as rows, genes as columns "
    "and cell ids in the first column."
)


def _format_word(path: Path) -> str:
    from cellatlas.web.sessions import ACCEPTED_SUFFIXES, upload_suffix

    try:
        return ACCEPTED_SUFFIXES[upload_suffix(path.name)]
    except CellAtlasError:
        return "a supported format"


def _read_notes(adata) -> list:
    io_info = adata.uns.get("cellatlas_io", {}) if hasattr(adata, "uns") else {}
    notes = io_info.get("notes", []) if isinstance(io_info, dict) else []
    return list(notes) if not isinstance(notes, str) else [notes]


_warm_lock = threading.Lock()
_warmed: set[str] = set()


def warm_up(settings: Settings, atlas: str | None) -> None:
    """Load the gene tables and ``atlas``, annotate a few of its reference cells and lay them
    out with a UMAP, in a thread.

    Called when the page first asks for its configuration, so the engine is warm by
    the time a file is uploaded (the first annotation after a server start otherwise
    pays for loading tables, the atlas and the encoder, and the first map of the user's
    cells for compiling UMAP's numba code, about 20 s). Runs once per atlas.
    """
    if not atlas:
        return
    with _warm_lock:
        if atlas in _warmed:
            return
        _warmed.add(atlas)

    def _run() -> None:
        import cellatlas
        from cellatlas.atlas import load_atlas
        from cellatlas.genes import load_tables

        try:
            load_tables()
            at = load_atlas(atlas, settings)
            res = cellatlas.annotate(at.reference_counts()[:60], at.ref_genes, atlas=at)
            if res.embedding is not None:  # compiles scanpy's UMAP (numba) before the first upload needs it
                from cellatlas.tl import embedding_umap

                embedding_umap(res.embedding)
        except Exception:  # warming is best effort; a real run reports any problem itself
            log.debug("workspace warm-up of %s failed", atlas, exc_info=True)

    threading.Thread(target=_run, name="cellatlas-warm-up", daemon=True).start()
