"""The per-(atlas, model, gene set) machinery that scores cells.

:class:`AtlasRuntime` holds everything annotation needs that does not depend on
the individual cells: the encoder (re-fitted on the genes the query shares with the
atlas panel when some are missing, never zero-filled), the faiss index of the
reference embedding, neighbour-distance statistics, the candidate labels and their
hierarchy, marker sets compiled against the query's genes and the calibration.
:meth:`AtlasRuntime.score` turns a chunk of counts into raw per-cell arrays.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import faiss
import numpy as np
import scipy.sparse as sp

from cellatlas import fusion
from cellatlas.atlas import Atlas
from cellatlas.encoders import get_encoder
from cellatlas.encoders.default import DefaultEncoder
from cellatlas.errors import AtlasModelMismatchError, GeneMismatchError
from cellatlas.markers import ancestors, compile_markers, load_labels, rank_scores, score_markers
from cellatlas.neighbours import DepthMatchedIndex, neighbour_stats, thin
from cellatlas.result import Alternates
from cellatlas.sparse import ColumnPlan

MIN_SHARED_PANEL = 0.05
"""Fewest fraction of the atlas panel a query must share (and at least MIN_SHARED_GENES)."""
MIN_SHARED_GENES = 100
NOVEL_FIT = 0.4
"""No label fits: the best standardised marker score of any candidate is below this (1 = a typical cell of the label)."""
NOVEL_NEIGHBOUR_FIT = 0.2
"""The cell does not look like its neighbours' label: that label's standardised marker score is below this."""
NOVEL_Z = 3.0
"""...or the cell is this far (robust z of neighbour distance) from every reference cell."""
FOIL_NEIGHBOUR_FIT = 0.6
"""The foil rule flags a cell only while its neighbours' label fits it below this (1 = a typical cell of
the label): as in MISPLACED_FIT, a label "fits" from 0.6. With NOVEL_FIT (0.4) here, Xin delta cells
left out of a Xin atlas were 75.5% flagged; with 0.6, 83.7% (81.6% with depth-matched neighbours),
and known types' false flags unchanged (benchmarks/accuracy.py --sections novel)."""
MISPLACED_FIT = 0.6
"""A marker-defined label fits this well (standardised) while the neighbours' label fits below
NOVEL_NEIGHBOUR_FIT and the call is neither that label nor above it: flagged. Chosen on the
built-in atlas's zero-shot section of benchmarks/accuracy.py (Yan embryo cells 91% flagged;
Kang PBMC flags 2.6% -> 4.3%)."""


DEPTH_LEVELS = 6
"""Reference marker statistics are computed at depths 1, 1/2, ..., 1/32 of the reference's own."""


def depth_level_scores(ref: sp.csr_matrix, compiled) -> list[np.ndarray]:
    """Raw marker scores of the reference cells thinned to each of the ``DEPTH_LEVELS`` depths (level 0: as stored)."""
    return [score_markers(rank_scores(thin(ref, 0.5**lv) if lv else ref), compiled, ranked=True) for lv in range(DEPTH_LEVELS)]


def marker_standardisation(ref_scores: np.ndarray, ref_codes: np.ndarray, ref_to_cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and scale per candidate so that 0 = typical other cell, 1 = typical cell of the label.

    Computed on the reference: the centre is the mean score among reference cells of
    other labels; the scale is the gap to the mean among the label's own cells. Labels
    without reference cells get the median gap of those that have them.
    """
    n_cand = ref_scores.shape[1]
    own = ref_to_cand[ref_codes]
    centre = np.empty(n_cand)
    scale = np.full(n_cand, np.nan)
    for c in range(n_cand):
        mine = own == c
        centre[c] = ref_scores[~mine, c].mean() if (~mine).any() else 0.0
        if mine.any():
            scale[c] = ref_scores[mine, c].mean() - centre[c]
    fallback = np.nanmedian(scale) if np.isfinite(scale).any() else 0.3
    scale = np.where(np.isfinite(scale), scale, fallback)
    return centre.astype(np.float32), np.maximum(scale, 0.02).astype(np.float32)


def core_genes(atlas: Atlas) -> list[str]:
    """Stored genes that the encoder and the candidates' marker scores read: the panel and candidate markers.

    Genes stored only for foils (see ``atlas_build._foil_sets``) are left out, so storing
    them changes no call.
    """
    if not atlas.meta.get("foils"):
        return list(atlas.ref_genes)
    sets = atlas.marker_sets
    keep = set(atlas.panel) | {
        g for c in atlas.meta["candidates"] for side in ("positive", "negative") for g in sets.get(c, {}).get(side, [])
    }
    return [g for g in atlas.ref_genes if g in keep]


@dataclass
class Scored:
    """Raw per-cell outputs of one chunk (before calibration is turned into a result)."""

    embedding: np.ndarray
    sim: np.ndarray
    idx: np.ndarray
    p_knn: np.ndarray
    p_marker: np.ndarray
    marker_scores: np.ndarray
    fused: np.ndarray
    call: np.ndarray
    coarse: np.ndarray
    z: np.ndarray
    o: np.ndarray
    features: np.ndarray
    confidence: np.ndarray
    novel: np.ndarray
    ranks: sp.csr_matrix
    parent: np.ndarray  # parent node of the call, -1 at a root
    parent_confidence: np.ndarray  # calibrated probability that the parent is right (NaN: none)


class AtlasRuntime:
    """Score cells against ``atlas`` with ``model`` for a query whose genes are ``genes``."""

    def __init__(self, atlas: Atlas, model: str, genes: Sequence[str], *, model_path=None, encoder=None):
        self.atlas, self.model, self.genes = atlas, model, list(genes)
        meta = atlas.stats(model)
        self.report: dict[str, Any] = {}
        if model == "default":
            self._init_default(atlas, meta)
        else:
            self.encoder = encoder or get_encoder(model, model_path=model_path)
            if self.encoder.fingerprint() != meta["fingerprint"]:
                raise AtlasModelMismatchError(
                    f"Atlas '{atlas.name}' was embedded with other {model} weights ({meta['fingerprint']}) "
                    f"than the ones loaded ({self.encoder.fingerprint()}).",
                    fix="Use the checkpoint the atlas was built with, or rebuild the atlas with this checkpoint.",
                    field="model",
                )
            self.ref_emb = atlas.embedding(model)
            self.dist = meta["neighbours"]
            self.report["model_gene_coverage"] = round(float(self.encoder.gene_coverage(self.genes)), 4)
        self.index = faiss.IndexFlatIP(self.ref_emb.shape[1])
        self.index.add(np.ascontiguousarray(self.ref_emb, dtype=np.float32))
        self.ref_codes = atlas.ref_codes.astype(np.int64)
        self.layout_ref = atlas.arrays["ref_layout"].astype(np.float32)
        cal = meta.get("calibration") or {}
        self.coef = np.asarray(cal.get("coef", [1.0, 0, 0, 0, 0, 0]), dtype=np.float64)
        self.intercept = float(cal.get("intercept", 0.0))
        pcal = cal.get("parent")
        self.parent_cal = (np.asarray(pcal["coef"], dtype=np.float64), float(pcal["intercept"])) if pcal else None
        self._init_labels(atlas)
        # The default encoder can embed downsampled reference cells on the fly; foundation
        # models search the stored full-depth embedding only.
        self.depth_index = (
            DepthMatchedIndex(lambda x: self.encoder.embed(x, self.universe), self._ref_universe, self.index, self.dist)
            if model == "default" else None
        )

    # ------------------------------------------------------------------ setup
    def _init_default(self, atlas: Atlas, meta: dict) -> None:
        panel = atlas.panel
        have = set(self.genes)
        shared = [g for g in panel if g in have]
        self.report.update({"panel_genes": len(panel), "panel_shared": len(shared), "panel_coverage": round(len(shared) / len(panel), 4)})
        if len(shared) < max(MIN_SHARED_GENES, MIN_SHARED_PANEL * len(panel)):
            raise GeneMismatchError(
                f"Only {len(shared)} of the atlas '{atlas.name}' panel's {len(panel)} genes are in your data "
                f"({len(shared) / len(panel):.0%}); a call on so few genes would be meaningless (every cell would look alike).",
                fix="Check that the gene names are HGNC symbols or Ensembl ids of the matrix columns, in the same order "
                "as the columns, and for a supported species (human, or mouse via orthologs).",
                field="genes",
                details={"panel_shared": len(shared), "panel_genes": len(panel)},
            )
        state = atlas.encoder_state("default")
        if len(shared) == len(panel):
            self.encoder = DefaultEncoder.from_state(state)
            self.ref_emb = atlas.embedding("default")
            self.dist = meta["neighbours"]
            self.report["panel_adapted"] = False
            return
        # Some panel genes are missing: refit on every gene the query shares with the stored
        # reference (panel + marker genes), never zero-filling the missing ones.
        genes = [g for g in core_genes(atlas) if g in have]
        gi = {g: i for i, g in enumerate(atlas.ref_genes)}
        ref = atlas.reference_counts()[:, np.array([gi[g] for g in genes])]
        self.encoder = DefaultEncoder.fit(
            ref, genes, genes, n_pcs=int(state["components"].shape[0]), transform=str(state["transform"]),
            scale=bool(state.get("scaled", True)),
        )
        self.ref_emb = self.encoder.embed(ref, genes)
        self.dist = neighbour_stats(self.ref_emb)
        self.report.update({"panel_adapted": True, "adapted_panel_genes": len(genes)})

    def _init_labels(self, atlas: Atlas) -> None:
        labels = atlas.labels
        self.candidates: list[str] = list(atlas.meta["candidates"])
        cand_pos = {c: i for i, c in enumerate(self.candidates)}
        self.ref_to_cand = np.array([cand_pos[lab] for lab in atlas.reference_labels])
        self.marker_only = np.ones(len(self.candidates), dtype=bool)
        self.marker_only[self.ref_to_cand] = False
        parents = {lab: (p if isinstance(p, str) else "") for lab, p in labels["parent"].items()}
        self.hierarchy = fusion.Hierarchy.build(self.candidates, parents)
        sets = atlas.marker_sets
        # Marker evidence is read on the genes both the query and the stored reference have,
        # ranked within that universe for both, so reference statistics apply to the query.
        # Every stored gene the query has is read once per chunk, in the query's column order
        # (so the selection keeps rows sorted); candidates and the encoder use the core of
        # them, foils all of them.
        ref_pos = {g: i for i, g in enumerate(atlas.ref_genes)}
        self.q_cols = np.array([i for i, g in enumerate(self.genes) if g in ref_pos], dtype=np.int64)
        self.read_genes = [self.genes[i] for i in self.q_cols]
        core = set(core_genes(atlas))
        in_core = np.array([i for i, g in enumerate(self.read_genes) if g in core], dtype=np.int64)
        self.core_plan = ColumnPlan.select(len(self.read_genes), in_core)
        universe = [self.read_genes[i] for i in in_core]
        r_cols = np.array([ref_pos[g] for g in universe], dtype=np.int64)
        self.universe = universe
        self.q_plan = ColumnPlan.select(len(self.genes), self.q_cols)
        self.compiled = compile_markers({c: sets[c] for c in self.candidates}, universe)
        node_sets = {n: sets.get(n, {"positive": [], "negative": []}) for n in self.hierarchy.nodes}
        self.node_markers = compile_markers(node_sets, universe)
        ref = atlas.reference_counts()[:, r_cols].tocsr()
        self._ref_universe = ref
        self.ref_depth = float(np.median(np.asarray(ref.sum(axis=1)).ravel()))
        raws = depth_level_scores(ref, self.compiled)
        levels = [marker_standardisation(raw, self.ref_codes, self.ref_to_cand) for raw in raws]
        ref_std = (raws[0] - levels[0][0]) / levels[0][1]  # the reference's own, to judge which foils are usable
        self.marker_centre = np.stack([c for c, _ in levels])  # [levels, candidates]
        self.marker_scale = np.stack([s for _, s in levels])
        self._init_foils(atlas, ref_std)
        self.ontology = np.array(
            [labels["ontology_id"].get(n, "") if isinstance(labels["ontology_id"].get(n, ""), str) else "" for n in self.hierarchy.nodes],
            dtype=object,
        )
        cov = self.compiled.coverage
        self.report["marker_coverage"] = {c: round(float(v), 3) for c, v in zip(self.candidates, cov)}

    def _init_foils(self, atlas: Atlas, ref_std: np.ndarray) -> None:
        """Curated types the atlas cannot call, scored on every stored gene the query has.

        They are ranked over their own gene universe (stored panel, candidate and foil
        genes) so that adding them leaves the candidates' scores exactly as before.
        """
        foils = atlas.meta.get("foils") or {}
        self.foils: list[str] = []
        if not foils:
            return
        universe = self.read_genes
        gi = {g: i for i, g in enumerate(atlas.ref_genes)}
        ref = atlas.reference_counts()[:, np.array([gi[g] for g in universe], dtype=np.int64)].tocsr()
        compiled = compile_markers(foils, universe)
        raws = depth_level_scores(ref, compiled)
        levels = [fusion.foil_standardisation(raw, scale) for raw, scale in zip(raws, self.marker_scale)]
        ref_foil = (raws[0] - levels[0][0]) / levels[0][1]  # which foils may flag cells, judged on the reference's own cells
        present = set(universe)
        coverage = np.array([np.mean([g in present for g in (foils[f].get("own") or foils[f]["positive"])]) for f in compiled.labels])
        cols = np.nonzero(fusion.usable_foils(coverage, ref_std, ref_foil, self.ref_codes))[0]
        self.foils = [compiled.labels[j] for j in cols]
        self.foil_markers = compile_markers({f: foils[f] for f in self.foils}, universe)
        self.foil_centre = np.stack([c[cols] for c, _ in levels])  # [levels, usable foils]
        self.foil_scale = np.stack([sc[cols] for _, sc in levels])
        self.report["novel_foils"] = list(self.foils)
        # Which hierarchy nodes lie above each foil in the curated vocabulary (for the roll-up).
        table = load_labels()
        pos = {n: j for j, n in enumerate(self.hierarchy.nodes)}
        self.foil_above = np.zeros((len(self.foils), len(pos)), dtype=bool)
        for i, foil in enumerate(self.foils):
            for p in ancestors(foil, table) if foil in table.index else []:
                if p in pos:
                    self.foil_above[i, pos[p]] = True

    # ------------------------------------------------------------------ scoring
    def score(self, counts: sp.csr_matrix | None, stored: sp.csr_matrix | None = None) -> Scored:
        """Score one chunk of cells.

        Parameters
        ----------
        counts
            Rows over ``self.genes`` (may be ``None`` for the default model when
            ``stored`` is given).
        stored
            The same rows already read over :attr:`read_genes` (e.g. by
            :meth:`cellatlas.query.Query.take` with :attr:`q_cols`), saving a selection.
        """
        stored = stored if stored is not None else self.q_plan.apply(counts)
        sub = self.core_plan.apply(stored)
        # The default encoder's genes are a subset of the universe: slice the matrix once.
        emb = self.encoder.embed(sub, self.universe) if self.model == "default" else self._foundation_embed(counts)
        depth = np.asarray(sub.sum(axis=1)).ravel()
        sim, idx, z = self._neighbours(emb, depth)
        p_ref = fusion.knn_vote(sim, idx, self.ref_codes, len(self.ref_to_cand), self.dist["bandwidth"])
        o = fusion.ood_weight(z)
        ranks = rank_scores(sub)
        raw = score_markers(ranks, self.compiled, ranked=True)
        level = np.clip(np.rint(np.log2(self.ref_depth / np.maximum(depth, 1.0))), 0, DEPTH_LEVELS - 1).astype(int)
        s = (raw - self.marker_centre[level]) / self.marker_scale[level]
        p_marker = fusion.marker_probs(s)
        o = np.maximum(o, fusion.marker_ood(s, self.marker_only))
        p_knn = fusion.spread_knn(p_ref, self.ref_to_cand, o, p_marker, self.marker_only)
        fused = fusion.fuse(p_knn, p_marker)
        masses = (self.hierarchy.mass(fused), self.hierarchy.mass(p_knn), self.hierarchy.mass(p_marker))
        call, coarse = fusion.hierarchical_call(fused, self.hierarchy, mass=masses[0])
        # Novel: no candidate's markers fit, and the neighbours' label does not fit either (or the
        # cell is far from every reference cell). Operating point chosen on the drop-one-label
        # benchmark (benchmarks/accuracy.py); the label is still reported, only flagged.
        knn_cand = self.ref_to_cand[p_ref.argmax(axis=1)]
        rows = np.arange(len(knn_cand))
        misfit = s.max(axis=1) < NOVEL_FIT
        novel = misfit & ((s[rows, knn_cand] < NOVEL_NEIGHBOUR_FIT) | (z > NOVEL_Z))
        # ...or the neighbours' label does not fit, a marker-defined label does, and the call went
        # elsewhere: the embedding placed the cell among reference cells it does not resemble
        # (e.g. RPKM embryo cells next to T cells, called "Lymphocyte").
        best = s.argmax(axis=1)
        novel |= (
            (s[rows, knn_cand] < NOVEL_NEIGHBOUR_FIT)
            & self.marker_only[best]
            & (s[rows, best] >= MISPLACED_FIT)
            & ~self.hierarchy.member[best, call]
        )
        # ...or a curated type the atlas cannot call fits better than every label it can, and the
        # neighbours' label fits no better than a label must for the cell to count as fitting at all.
        if self.foils:
            f_ranks = rank_scores(stored)
            f = (score_markers(f_ranks, self.foil_markers, ranked=True) - self.foil_centre[level]) / self.foil_scale[level]
            by_foil = (fusion.foil_lead(s, f) > 0) & (s[rows, knn_cand] < FOIL_NEIGHBOUR_FIT)
            novel |= by_foil
            # When, besides, the markers' best label is not the call (the neighbours say one type,
            # the markers another, and a type the atlas cannot call fits best), the call rises to
            # the deepest label all three share: a CD8 T cell among NK cells in an atlas without
            # CD8 T cells is "Lymphocyte", not "NK cell".
            conflict = np.nonzero(by_foil & ~self.hierarchy.member[best, call])[0]
            if len(conflict):
                shared = self.foil_above[f[conflict].argmax(axis=1)] & self.hierarchy.member[best[conflict]]
                up = fusion.roll_up_to_shared(call[conflict], shared, self.hierarchy)
                moved = (up >= 0) & (up != call[conflict])
                call[conflict[moved]], coarse[conflict[moved]] = up[moved], True
        feats = fusion.calibration_features(fused, p_knn, p_marker, call, coarse, self.hierarchy, o, masses)
        conf = fusion.apply_calibration(feats, self.coef, self.intercept)
        parent = self.hierarchy.parent[call]
        p_conf = np.full(len(call), np.nan, dtype=np.float32)
        if self.parent_cal is not None:
            pf = fusion.calibration_features(
                fused, p_knn, p_marker, np.maximum(parent, 0), np.ones(len(call), bool), self.hierarchy, o, masses
            )
            # A label's parent is at least as likely as the label itself; a top-level label has none.
            p_conf = np.where(parent >= 0, np.maximum(fusion.apply_calibration(pf, *self.parent_cal), conf), np.nan).astype(np.float32)
        return Scored(emb, sim, idx, p_knn, p_marker, s, fused, call, coarse, z, o, feats, conf, novel, ranks, parent, p_conf)

    def place(self, counts: sp.csr_matrix | None, stored: sp.csr_matrix | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Embedding and neighbour-weighted layout position only (no marker scoring; arguments as :meth:`score`)."""
        if self.model == "default":
            stored = stored if stored is not None else self.q_plan.apply(counts)
            sub = self.core_plan.apply(stored)
            emb, depth = self.encoder.embed(sub, self.universe), np.asarray(sub.sum(axis=1)).ravel()
        else:  # foundation models search the full-depth index only: no depth needed
            emb, depth = self._foundation_embed(counts), None
        sim, idx, _ = self._neighbours(emb, depth)
        return emb, self._neighbour_layout(sim, idx)

    def _neighbours(self, emb: np.ndarray, depth: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Similarities and indices of the nearest reference cells, and the robust z of their distance.

        ``depth`` (counts per cell over the universe) is read only by the depth-matched index.
        """
        k = min(fusion.K_NEIGHBOURS, self.index.ntotal)
        if self.depth_index is not None:
            return self.depth_index.search(emb, depth, k)
        sim, idx = self.index.search(np.ascontiguousarray(emb, dtype=np.float32), k)
        return sim, idx, fusion.ood_score((1.0 - sim).mean(axis=1), self.dist["median"], self.dist["mad"])[0]

    def _foundation_embed(self, counts: sp.csr_matrix) -> np.ndarray:
        """A foundation encoder's embedding, with genes in symbol order.

        scGPT reads genes in column order; sorting them first makes the embedding
        independent of the order of the input's columns.
        """
        if not hasattr(self, "_symbol_order"):
            order = np.argsort(np.asarray(self.genes, dtype=object), kind="stable")
            self._symbol_order = (ColumnPlan.select(len(self.genes), order), [self.genes[i] for i in order])
        plan, genes = self._symbol_order
        return self.encoder.embed(plan.apply(counts), genes)

    # ------------------------------------------------------------------ per-cell details
    def _neighbour_layout(self, sim: np.ndarray, idx: np.ndarray) -> np.ndarray:
        d = 1.0 - sim
        w = np.exp(-(d - d[:, :1]) / max(self.dist["bandwidth"], 1e-3))
        w /= w.sum(axis=1, keepdims=True)
        return np.einsum("nk,nkd->nd", w, self.layout_ref[idx])

    def layout(self, sc: Scored) -> np.ndarray:
        """Query positions: kernel-weighted mean of the neighbours' layout positions.

        Cells called a label without reference cells (or flagged novel) are placed at that
        label's anchor on a ring around the reference instead.
        """
        xy = self._neighbour_layout(sc.sim, sc.idx)
        anchors = self.atlas.meta.get("anchors", {})
        names = self.hierarchy.nodes
        for i in np.nonzero(sc.novel | np.isin(sc.call, np.nonzero(self.marker_only)[0]))[0]:
            a = anchors.get(names[sc.call[i]]) or anchors.get("__novel__")
            if a is not None:
                # Deterministic per cell (not per chunk position): seeded by the cell's embedding.
                h = zlib.crc32(sc.embedding[i].tobytes())
                xy[i] = (a[0] + (h % 1000) / 1000.0 - 0.5, a[1] + (h // 1000 % 1000) / 1000.0 - 0.5)
        return xy.astype(np.float32)

    def expressed_markers(self, sc: Scored, n_top: int = 10) -> list[list[str]]:
        """Per cell: the called label's positive markers that the cell expresses, strongest first.

        Ties in expression rank keep the order of the label's marker list.
        """
        cols, slot = self._marker_slots
        R = sc.ranks[:, cols].tocsr()  # only genes that are some node's positive marker
        n = R.shape[0]
        rows = np.repeat(np.arange(n), np.diff(R.indptr))
        pos = slot[R.indices, sc.call[rows]]  # place in the called node's list, -1: not its marker
        keep = (pos >= 0) & (R.data > 0)
        r, c, v, pos = rows[keep], R.indices[keep], R.data[keep], pos[keep]
        # Sort by (cell, expression rank descending, list place) with one integer key: the dense
        # rank of -v keeps ties tied (as np.lexsort((pos, -v, r)) would, 3-4x slower).
        _, vr = np.unique(-v, return_inverse=True)
        n_v, n_pos = int(vr.max(initial=0)) + 1, int(pos.max(initial=0)) + 1
        order = np.argsort((r.astype(np.int64) * n_v + vr) * n_pos + pos, kind="stable")
        r, c = r[order], c[order]
        starts = np.searchsorted(r, np.arange(n))
        top = np.arange(len(r)) - starts[r] < n_top
        names = np.asarray(self.universe, dtype=object)[cols][c[top]]
        bounds = np.searchsorted(r[top], np.arange(n + 1)).tolist()
        flat = names.tolist()
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    @cached_property
    def _marker_slots(self) -> tuple[np.ndarray, np.ndarray]:
        """Universe columns that are a positive marker of some node, and ``slot[col, node]``:
        the column's place in the node's marker list (``-1`` when not its marker)."""
        nm = self.node_markers
        cols = np.unique(np.concatenate([np.asarray(m, dtype=np.int64) for m in nm.marker_idx] + [np.zeros(0, np.int64)]))
        where = {int(c): i for i, c in enumerate(cols)}
        slot = np.full((len(cols), len(nm.marker_idx)), -1, dtype=np.int32)
        for node, idx in enumerate(nm.marker_idx):
            for k, c in enumerate(np.asarray(idx, dtype=np.int64).tolist()):
                slot[where[c], node] = k
        return cols, slot

    def alternates(self, sc: Scored, n: int = 3) -> Alternates:
        """Up to ``n`` runner-up candidate labels with their fused probabilities."""
        n = min(n, sc.fused.shape[1] - 1)
        if n <= 0:
            return Alternates(np.empty((len(sc.call), 0), dtype=object), np.empty((len(sc.call), 0), dtype=np.float32))
        top = np.argsort(-sc.fused, axis=1)[:, : n + 1]
        # Drop the called label where it is among the top; otherwise drop the last.
        is_call = top == sc.call[:, None]
        drop = np.where(is_call.any(axis=1), is_call.argmax(axis=1), n)
        keep = np.ones_like(top, dtype=bool)
        keep[np.arange(len(top)), drop] = False
        alt = top[keep].reshape(len(top), n)
        return Alternates(np.asarray(self.candidates, dtype=object)[alt], np.take_along_axis(sc.fused, alt, axis=1))
