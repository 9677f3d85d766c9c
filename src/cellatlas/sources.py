"""Labelled datasets that go into an atlas build, made into one reference.

An atlas may be built from several labelled datasets of different tissues, technologies
and species (mouse genes map through orthologs, like queries). Each :class:`Source` says
what it is:

* ``"cells"``: single cells; their counts become reference cells.
* ``"profiles"``: averaged per-type expression (bulk, microarray or cluster means): each
  profile becomes ``n_pseudo`` pseudo-cells, drawn at droplet-like depths with the
  overdispersion of the build's real cells (:func:`dispersion_of`), so that types with no
  single cells still have reference cells that vary like cells.
* ``"heldout"``: never reference cells; used only as held-out queries when the fusion model
  is fitted (e.g. datasets measuring too few genes to serve as a reference).

Values that are not counts (log TPM of full-length protocols) are turned back into relative
expression (:func:`cellatlas.io.to_counts_like`) and drawn as pseudo-counts at
``pseudo_depth``, so every reference cell is on a count scale. Sources sharing cells or a study
carry the same ``group`` and are left out together when the model is fitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas.errors import InputError
from cellatlas.query import prepare_query

SOURCE_KINDS = ("cells", "profiles", "heldout")
MIN_CELLS_PER_LABEL = 5
NOVEL = "__novel__"
"""Truth label of held-out cells of a type outside every vocabulary (e.g. embryo stages)."""


@dataclass
class Source:
    """One labelled dataset of an atlas build.

    Parameters
    ----------
    name
        Short name (recorded in the atlas provenance).
    adata
        AnnData with counts (``X``, ``.raw`` or ``layer``) and a label column.
    label_key
        ``obs`` column with the labels.
    label_map
        Renaming of labels onto the atlas vocabulary; a label mapped to ``None`` is left out,
        one mapped to :data:`NOVEL` is a type no atlas label covers (held-out sources only).
    kind
        ``"cells"``, ``"profiles"`` or ``"heldout"`` (module docstring).
    group
        Sources with the same group are held out together (default: the name).
    n_pseudo
        Pseudo-cells per profile (``kind="profiles"``).
    layer, use_raw
        Which AnnData matrix holds the counts.
    """

    name: str
    adata: Any
    label_key: str = "cell_type"
    label_map: dict[str, str | None] | None = None
    kind: str = "cells"
    group: str = ""
    n_pseudo: int = 40
    layer: str | None = None
    use_raw: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise InputError(f"Source {self.name!r}: kind must be one of {', '.join(SOURCE_KINDS)}, not {self.kind!r}.",
                             fix="Use 'cells', 'profiles' or 'heldout'.", field="kind")
        self.group = self.group or self.name


@dataclass
class Prepared:
    """A source as counts over approved human symbols with one label per row."""

    name: str
    group: str
    kind: str
    counts: sp.csr_matrix
    genes: list[str]
    labels: np.ndarray
    obs: pd.DataFrame = field(default_factory=pd.DataFrame)
    report: dict = field(default_factory=dict)


def pseudo_counts(rel: sp.csr_matrix, depths: np.ndarray, seed: int = 0, dispersion: float = 0.0) -> sp.csr_matrix:
    """Draws of about ``depths[i]`` counts from each row's relative expression.

    With ``dispersion`` 0 the draw is multinomial; above 0 every gene's rate is first scaled by a
    Gamma variate of mean 1 and variance ``dispersion`` (negative-binomial counts), so that
    pseudo-cells vary like real cells of one type instead of clustering tightly around their
    profile (where they would be every query's nearest neighbours).
    """
    rng = np.random.default_rng(seed)
    rel = sp.csr_matrix(rel, dtype=np.float64)
    rows = []
    for i in range(rel.shape[0]):
        lo, hi = rel.indptr[i], rel.indptr[i + 1]
        p = np.clip(rel.data[lo:hi], 0, None)
        total = p.sum()
        if total <= 0:
            rows.append(sp.csr_matrix((1, rel.shape[1]), dtype=np.float32))
            continue
        if dispersion > 0:
            rate = depths[i] * p / total * rng.gamma(1.0 / dispersion, dispersion, len(p))
            draw = rng.poisson(rate)
        else:
            draw = rng.multinomial(int(depths[i]), p / total)
        keep = draw > 0
        rows.append(sp.csr_matrix((draw[keep].astype(np.float32), (np.zeros(keep.sum(), int), rel.indices[lo:hi][keep])),
                                  shape=(1, rel.shape[1])))
    return sp.vstack(rows).tocsr() if rows else sp.csr_matrix((0, rel.shape[1]), dtype=np.float32)


def dispersion_of(parts: Sequence["Prepared"], min_cells: int = 50) -> float:
    """Typical within-type overdispersion of real cells: median over labels of the median gene's
    ``(var - mean) / mean**2`` on depth-normalised counts (genes with mean above 0.5); 0 without such cells."""
    phis = []
    for p in parts:
        if p.kind != "cells" or p.report.get("values") != "counts":
            continue
        for lab in np.unique(p.labels.astype(str)):
            m = p.labels.astype(str) == lab
            if m.sum() < min_cells:
                continue
            Y = p.counts[m]
            size = np.asarray(Y.sum(axis=1)).ravel()
            Y = sp.diags(np.median(size) / np.maximum(size, 1.0)) @ Y
            mu = np.asarray(Y.mean(axis=0)).ravel()
            var = np.asarray(Y.multiply(Y).mean(axis=0)).ravel() - mu**2
            ok = mu > 0.5
            if ok.sum() >= 10:
                phis.append(float(np.median((var[ok] - mu[ok]) / mu[ok] ** 2)))
    return max(0.0, float(np.median(phis))) if phis else 0.0


def droplet_depths(n: int, rng: np.random.Generator, median: float = 3000.0, spread: float = 0.5) -> np.ndarray:
    """Log-normal library sizes around ``median`` (droplet-like), at least 200."""
    return np.maximum(200, np.rint(median * np.exp(rng.normal(0.0, spread, n)))).astype(np.int64)


def prepare(src: Source, *, seed: int = 0, pseudo_depth: float = 3000.0, dispersion: float = 0.0) -> Prepared:
    """Counts over human symbols and vocabulary labels for one source (rows with no label dropped).

    ``dispersion`` is the overdispersion of pseudo-cells drawn from profiles (:func:`pseudo_counts`).
    """
    a = src.adata
    if src.label_key not in a.obs.columns:
        raise InputError(f"Source {src.name!r}: obs has no column {src.label_key!r}.", fix="Pass label_key.", field="label_key")
    col = a.obs[src.label_key]
    has = col.notna().to_numpy()  # cells without a label are left out, never labelled "nan"
    raw = col.astype(str).to_numpy()
    table = src.label_map
    labels = np.array([(table.get(x, x) if table is not None else x) if h else None for x, h in zip(raw, has)], dtype=object)
    if table is not None:
        missing = sorted({x for x, h in zip(raw, has) if h and x not in table})
        if missing:
            raise InputError(f"Source {src.name!r}: labels {missing[:5]} are not in its label map.",
                             fix="Map every label (to None to leave it out).", field="label_map")
    keep = np.array([lab is not None and lab == lab for lab in labels], dtype=bool)
    # A labelled reference is read as given: the gene-list check is for queries (synthetic test references fail it).
    q = prepare_query(a[keep] if not keep.all() else a, layer=src.layer, use_raw=src.use_raw, skip_gene_check=True)
    counts, labels = q.counts, labels[keep]
    rng = np.random.default_rng(seed)
    if src.kind == "profiles":
        reps = np.repeat(np.arange(counts.shape[0]), src.n_pseudo)
        counts = pseudo_counts(counts[reps], droplet_depths(len(reps), rng, pseudo_depth), seed, dispersion)
        labels = labels[reps]
        obs = pd.DataFrame({"profile": reps}, index=[f"{src.name}:{i}" for i in range(len(reps))])
    else:
        if q.report.get("values") != "counts":
            counts = pseudo_counts(counts, droplet_depths(counts.shape[0], rng, pseudo_depth), seed)
        obs = a.obs.loc[keep].copy() if not keep.all() else a.obs.copy()
    return Prepared(src.name, src.group, src.kind, sp.csr_matrix(counts, dtype=np.float32), list(q.genes), labels, obs, q.report)


def stack(parts: Sequence[Prepared]) -> tuple[sp.csr_matrix, list[str], np.ndarray, np.ndarray]:
    """One matrix over the union of the parts' genes (unmeasured genes are zero).

    Returns counts, genes (sorted), labels and the part index of every row.
    """
    genes = sorted({g for p in parts for g in p.genes})
    pos = {g: i for i, g in enumerate(genes)}
    mats = []
    for p in parts:
        cols = np.array([pos[g] for g in p.genes], dtype=np.int64)
        X = p.counts.tocoo()
        mats.append(sp.csr_matrix((X.data, (X.row, cols[X.col])), shape=(X.shape[0], len(genes)), dtype=np.float32))
    counts = sp.vstack(mats).tocsr() if mats else sp.csr_matrix((0, len(genes)), dtype=np.float32)
    counts.sum_duplicates()
    labels = np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, dtype=object)
    part = np.concatenate([np.full(len(p.labels), i) for i, p in enumerate(parts)]) if parts else np.zeros(0, int)
    return counts, genes, labels, part


def source_table(parts: Sequence[Prepared], part: np.ndarray) -> tuple[np.ndarray, list[str], list[str]]:
    """``(source index of every stacked row, source names, source kinds)`` for :func:`cellatlas.atlas_build.assemble`."""
    return np.asarray(part), [p.name for p in parts], [p.kind for p in parts]


def measured_by_all(parts: Sequence[Prepared]) -> set[str]:
    """Genes every part measured."""
    return set.intersection(*(set(p.genes) for p in parts)) if parts else set()


def _profiles_fill_gaps(prepared: list[Prepared]) -> None:
    """Keep profile pseudo-cells only for labels no single-cell source of the same species has (in place).

    Pseudo-cells drawn from a type's average are more "typical" than any real cell, so where
    real cells of the type exist, pseudo-cells would take their place as every query's
    nearest neighbours; they stand in for cells of their species that the build lacks.
    """
    def species(p: Prepared) -> str:
        return str(p.report.get("species", "human"))

    for p in prepared:
        if p.kind == "profiles":
            real = {lab for q in prepared if q.kind == "cells" and species(q) == species(p) for lab in q.labels.tolist()}
            keep = ~np.isin(p.labels, list(real))
            p.counts, p.labels, p.obs = p.counts[keep], p.labels[keep], p.obs.iloc[np.flatnonzero(keep)]


def _check_labels(prepared: list[Prepared]) -> list[str]:
    """Drop reference labels with too few cells (in place); returns the dropped labels."""
    ref = [p for p in prepared if p.kind != "heldout"]
    counts = pd.Series(np.concatenate([p.labels for p in ref]) if ref else []).value_counts()
    small = set(counts[counts < MIN_CELLS_PER_LABEL].index) - {NOVEL}
    for p in ref:
        keep = ~np.isin(p.labels, list(small)) & (p.labels != NOVEL)
        if not keep.all():
            p.counts, p.labels, p.obs = p.counts[keep], p.labels[keep], p.obs.iloc[np.flatnonzero(keep)]
    labels = {lab for p in ref for lab in p.labels.tolist()}
    if sum(len(p.labels) for p in ref) < 10 or len(labels) < 2:
        raise InputError("An atlas needs at least two labels with 5+ cells each.", fix="Check --label-key.", field="label_key")
    return sorted(small)


def prepare_sources(sources: Sequence[Source], seed: int = 0) -> tuple[list[Prepared], list[str], float]:
    """Every source as counts over human symbols, ready to stack.

    Profiles are drawn as pseudo-cells with the overdispersion of the real cells and kept only
    where they fill a gap (:func:`_profiles_fill_gaps`); reference labels with too few cells are
    dropped. Returns the prepared sources, the dropped labels and the pseudo-cell dispersion.
    """
    prepared = [prepare(s, seed=seed) if s.kind != "profiles" else None for s in sources]
    dispersion = dispersion_of([p for p in prepared if p is not None])
    prepared = [p if p is not None else prepare(s, seed=seed, dispersion=dispersion) for p, s in zip(prepared, sources)]
    dropped = _check_labels(prepared)
    _profiles_fill_gaps(prepared)
    return [p for p in prepared if len(p.labels)], dropped, dispersion
