"""The per-(atlas, model, gene set) machinery that scores cells.

:class:`AtlasRuntime` holds everything annotation needs that does not depend on the
individual cells: the encoder (re-fitted on the genes the query shares with the atlas
panel when some are missing, never zero-filled), the faiss index of the reference
embedding, the candidate labels and their hierarchy, marker sets compiled against the
query's genes with the reference's marker-score statistics at each sequencing depth, and
the fitted fusion model. :meth:`AtlasRuntime.evidence` turns a chunk of counts into the
evidence the model reads; :meth:`AtlasRuntime.score` into probabilities and calls.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import faiss
import numpy as np
import scipy.sparse as sp

from cellatlas import calls, fusion
from cellatlas.atlas import Atlas
from cellatlas.encoders import get_encoder
from cellatlas.encoders.default import DefaultEncoder
from cellatlas.errors import AtlasModelMismatchError, GeneMismatchError
from cellatlas.markers import compile_markers, marker_null_z, rank_scores, score_markers
from cellatlas.neighbours import DepthMatchedIndex, faiss_threads, fill_missing, neighbour_stats, thin
from cellatlas.result import Alternates
from cellatlas.runtime_store import RuntimeStore, pack_json, runtime_key, unpack_json
from cellatlas.sparse import ColumnPlan

MIN_SHARED_PANEL = 0.05
"""Fewest fraction of the atlas panel a query must share (and at least MIN_SHARED_GENES)."""
MIN_SHARED_GENES = 100
DEPTH_LEVELS = 6
"""Reference marker statistics are computed at depths 1, 1/2, ..., 1/32 of the reference's own."""


def check_atlas_coverage(mapping, atlas: Atlas) -> bool:
    """Refuse a query sharing too few of the atlas's genes; return whether neighbours can be used.

    At least ``MIN_SHARED_GENES`` of the atlas's stored genes (panel and markers) must be
    measured, else :class:`~cellatlas.errors.GeneMismatchError` names the likely cause (barcodes
    as genes, unmapped ids, wrong species, ...). Neighbours also need ``MIN_SHARED_PANEL`` of the
    panel; below that the call rests on markers alone.
    """
    from cellatlas.genes import check_coverage, coverage

    check_coverage(mapping, atlas.ref_genes, min_fraction=0.0, min_genes=MIN_SHARED_GENES)
    n = coverage(mapping.symbols, atlas.panel)["n_present"]
    return n >= max(MIN_SHARED_GENES, MIN_SHARED_PANEL * len(atlas.panel))


def depth_level_scores(ref: sp.csr_matrix, compiled) -> list[np.ndarray]:
    """Raw marker scores of the reference cells thinned to each of the ``DEPTH_LEVELS`` depths (level 0: as stored)."""
    return [score_markers(rank_scores(thin(ref, 0.5**lv) if lv else ref), compiled, ranked=True) for lv in range(DEPTH_LEVELS)]


def marker_centre(raw: np.ndarray, related: np.ndarray) -> np.ndarray:
    """Every label's mean raw marker score over reference cells of other types (0 = a typical other cell).

    ``raw`` is ``[n_ref, n_labels]``; ``related[i, j]`` marks reference cells whose label is on
    label ``j``'s lineage (the label, above or below it), which are left out.
    """
    other = ~related
    n_other = other.sum(axis=0)
    mean_all = raw.mean(axis=0) if len(raw) else np.zeros(raw.shape[1])
    return np.where(n_other > 0, (raw * other).sum(axis=0) / np.maximum(n_other, 1), mean_all).astype(np.float32)


def core_genes(atlas: Atlas) -> list[str]:
    """Stored genes the encoder refit may read: the panel and the candidates' marker genes."""
    sets = atlas.marker_sets
    keep = set(atlas.panel) | {
        g for c in atlas.meta["candidates"] for side in ("positive", "negative") for g in sets.get(c, {}).get(side, [])
    }
    return [g for g in atlas.ref_genes if g in keep]


@dataclass
class Scored:
    """Per-cell outputs of one chunk."""

    embedding: np.ndarray
    sim: np.ndarray
    idx: np.ndarray
    evidence: fusion.Evidence
    prob: np.ndarray  # [n, n_cand + n_foil + 1]: candidates, foils, novel
    vote: np.ndarray  # [n, n_ref_labels] neighbour-vote shares over reference labels
    marker_prob: np.ndarray  # [n, n_cand] what the marker terms alone say
    call: np.ndarray  # called hierarchy node
    coarse: np.ndarray  # the call is above a candidate (a grouping node)
    confidence: np.ndarray  # calibrated probability that the call is right (calls.NodeCalibration), capped by 1 - P(novel)
    parent: np.ndarray  # parent node of the call, -1 at a root
    parent_confidence: np.ndarray  # the parent's calibrated probability (NaN: no parent)
    novel: np.ndarray
    ranks: sp.csr_matrix

    @property
    def distance(self) -> np.ndarray:
        return self.evidence.distance


class AtlasRuntime:
    """Score cells against ``atlas`` with ``model`` for a query whose genes are ``genes``.

    What does not depend on the cells (a refitted encoder, marker centres, depth levels) is
    kept in a :class:`~cellatlas.runtime_store.RuntimeStore`: read from ``CELLATLAS_HOME``
    when an earlier process computed it, or from ``preloaded`` (a Dask client's
    :meth:`precomputed`).
    """

    def __init__(self, atlas: Atlas, model: str, genes: Sequence[str], *, model_path=None, encoder=None,
                 preloaded: dict | None = None):
        self.atlas, self.model, self.genes = atlas, model, list(genes)
        meta = atlas.stats(model)
        self.report: dict[str, Any] = {}
        self.store = RuntimeStore(runtime_key(atlas.sha256, model, self.genes), preloaded=preloaded)
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
        self.index = None
        if self.ref_emb is not None:
            self.index, self.report["neighbour_index"] = self._base_index(atlas, model)
        self.ref_codes = atlas.ref_codes.astype(np.int64)
        self.layout_ref = atlas.arrays["ref_layout"].astype(np.float32)
        self.model_fusion = fusion.FusionModel.from_dict(meta.get("fusion"))
        self.node_calibration = calls.NodeCalibration.from_dict((meta.get("fusion") or {}).get("calibration"))
        self._init_labels(atlas)
        # The default encoder can embed downsampled reference cells on the fly; foundation
        # models search the stored full-depth embedding only.
        self.depth_index = (
            DepthMatchedIndex(lambda x: self.encoder.embed(x, self.universe), self._ref_universe, self.index, self.dist,
                              store=self.store, approximate=self.report["neighbour_index"]["kind"] != "flat")
            if model == "default" and self.index is not None else None
        )
        if self.depth_index is not None and self.depth_index._approximate:
            self.report["neighbour_index"]["level_recall_at_15"] = self.depth_index.recall  # filled as levels are built

    def precomputed(self) -> dict:
        """Everything this runtime precomputes, every depth level built: what a Dask client sends its workers."""
        if self.depth_index is not None:
            self.depth_index.build_all()
        return self.store.export()

    # ------------------------------------------------------------------ setup
    def _base_index(self, atlas: Atlas, model: str) -> tuple[Any, dict[str, Any]]:
        """The reference's faiss index: the atlas's stored approximate index, or an exact one.

        A refitted encoder (some panel genes missing) re-embeds the reference; a large
        reference's index is then rebuilt and tuned like the atlas build's (kept in the store).
        """
        from cellatlas import refindex

        info = dict(atlas.index_info(model))
        if not self.report.get("panel_adapted"):
            stored = atlas.reference_index(model)
            if stored is not None:
                return stored, info
            info = {"kind": "flat"}
        elif info.get("kind") != "flat":
            group = self.store.get("refit_index")
            if group is not None:
                info = unpack_json(group["info"])
                return refindex.deserialize(group["index"], info), info
            index, info = refindex.make(self.ref_emb, spec=refindex.choose(*self.ref_emb.shape))
            self.store.put("refit_index", {"index": refindex.serialize(index), "info": pack_json(info)})
            return index, info
        index = faiss.IndexFlatIP(self.ref_emb.shape[1])
        index.add(np.ascontiguousarray(self.ref_emb, dtype=np.float32))
        return index, {"kind": "flat"}

    def _init_default(self, atlas: Atlas, meta: dict) -> None:
        panel = atlas.panel
        have = set(self.genes)
        shared = [g for g in panel if g in have]
        self.report.update({"panel_genes": len(panel), "panel_shared": len(shared), "panel_coverage": round(len(shared) / len(panel), 4)})
        state = atlas.encoder_state("default")
        if len(shared) < max(MIN_SHARED_GENES, MIN_SHARED_PANEL * len(panel)):  # as check_atlas_coverage
            # Too few panel genes for neighbours to mean anything (every cell would look alike):
            # the call rests on the markers alone, and the model knows it (no label is "seen").
            self.encoder, self.ref_emb, self.dist = DefaultEncoder.from_state(state), None, meta["neighbours"]
            self.report["neighbours"] = (f"off: only {len(shared)} of the atlas panel's {len(panel)} genes are measured; "
                                         "calls rest on marker genes alone")
            return
        if len(shared) == len(panel):
            self.encoder = DefaultEncoder.from_state(state)
            self.ref_emb = atlas.embedding("default")
            self.dist = meta["neighbours"]
            self.report["panel_adapted"] = False
            return
        # Some panel genes are missing: refit on every gene the query shares with the stored
        # reference (panel + marker genes), never zero-filling the missing ones.
        genes = [g for g in core_genes(atlas) if g in have]
        stored = self.store.get("refit")
        if stored is not None:
            self.encoder = DefaultEncoder.from_state({k[len("state__"):]: v for k, v in stored.items() if k.startswith("state__")})
            self.ref_emb, self.dist = stored["ref_emb"], unpack_json(stored["dist"])
        else:
            gi = {g: i for i, g in enumerate(atlas.ref_genes)}
            ref = atlas.reference_counts()[:, np.array([gi[g] for g in genes])]
            self.encoder = DefaultEncoder.fit(
                ref, genes, genes, n_pcs=int(state["components"].shape[0]), transform=str(state["transform"]),
                scale=bool(state.get("scaled", True)),
            )
            self.ref_emb = self.encoder.embed(ref, genes)
            self.dist = neighbour_stats(self.ref_emb)
            self.store.put("refit", {**{f"state__{k}": v for k, v in self.encoder.state().items()},
                                     "ref_emb": self.ref_emb, "dist": pack_json(self.dist)})
        self.report.update({"panel_adapted": True, "adapted_panel_genes": len(genes)})

    def _init_labels(self, atlas: Atlas) -> None:
        labels = atlas.labels
        self.candidates: list[str] = list(atlas.meta["candidates"])
        self.foils: list[str] = list(atlas.meta.get("foils") or {})
        parents = {lab: (p if isinstance(p, str) else "") for lab, p in labels["parent"].items()}
        self.hierarchy = fusion.Hierarchy.build(self.candidates, parents, extra=atlas.reference_labels)
        pos = {n: j for j, n in enumerate(self.hierarchy.nodes)}
        self.ref_node = np.array([pos[lab] for lab in atlas.reference_labels], dtype=np.int64)
        h = self.hierarchy
        n_cand = len(self.candidates)
        # seen[c]: some reference label is the candidate or above it; own[c]: is the candidate.
        # A reference label that is itself a candidate votes for itself alone, even where finer
        # candidates sit below it (its cells are of that type, not of every type below it).
        vote_map = h.member[:, self.ref_node].T.copy()  # [ref labels, candidates]
        is_cand = self.ref_node < n_cand
        vote_map[is_cand] = np.eye(n_cand, dtype=bool)[self.ref_node[is_cand]]
        self.knn_map = vote_map.astype(np.float32)
        self.seen = self.knn_map.any(axis=0)
        self.own = np.zeros(n_cand, dtype=bool)
        self.own[self.ref_node[is_cand]] = True
        # Marker evidence is read on every stored gene the query has, ranked within that
        # universe for the query and the reference alike, in the query's column order.
        ref_pos = {g: i for i, g in enumerate(atlas.ref_genes)}
        self.q_cols = np.array([i for i, g in enumerate(self.genes) if g in ref_pos], dtype=np.int64)
        self.read_genes = [self.genes[i] for i in self.q_cols]
        self.universe = self.read_genes
        self.q_plan = ColumnPlan.select(len(self.genes), self.q_cols)
        sets = atlas.marker_sets
        foil_sets = atlas.meta.get("foils") or {}
        self.compiled = compile_markers({**{c: sets[c] for c in self.candidates}, **{f: foil_sets[f] for f in self.foils}}, self.universe)
        node_sets = {n: sets.get(n, {"positive": [], "negative": []}) for n in h.nodes}
        self.node_markers = compile_markers(node_sets, self.universe)
        ref = atlas.reference_counts()[:, np.array([ref_pos[g] for g in self.universe], dtype=np.int64)].tocsr()
        self._ref_universe = ref
        self.ref_depth = float(np.median(np.asarray(ref.sum(axis=1)).ravel()))
        # Which reference cells are on each option's lineage (left out of its centre).
        option_nodes = [pos.get(o, -1) for o in self.candidates + self.foils]
        node_of_cell = self.ref_node[self.ref_codes]
        related = np.zeros((len(node_of_cell), len(option_nodes)), dtype=bool)
        for j, nd in enumerate(option_nodes):
            if nd >= 0:
                related[:, j] = h.above[node_of_cell, nd] | h.above[nd, node_of_cell]
        stored = self.store.get("centre")
        if stored is not None:
            self.marker_centre = stored["marker_centre"]
        else:
            self.marker_centre = np.stack([marker_centre(raw, related) for raw in depth_level_scores(ref, self.compiled)])  # [levels, options]
            self.store.put("centre", {"marker_centre": self.marker_centre})
        self.ontology = np.array(
            [labels["ontology_id"].get(n, "") if isinstance(labels["ontology_id"].get(n, ""), str) else "" for n in h.nodes],
            dtype=object,
        )
        cov = self.compiled.coverage[:n_cand]
        self.report["marker_coverage"] = {c: round(float(v), 3) for c, v in zip(self.candidates, cov)}

    # ------------------------------------------------------------------ scoring
    def evidence(self, counts: sp.csr_matrix | None, stored: sp.csr_matrix | None = None):
        """Evidence for one chunk: ``(Evidence, embedding, sim, idx, vote, ranks)``.

        Parameters
        ----------
        counts
            Rows over ``self.genes`` (may be ``None`` for the default model when ``stored`` is given).
        stored
            The same rows already read over :attr:`read_genes` (e.g. by
            :meth:`cellatlas.query.Query.take` with :attr:`q_cols`), saving a selection.
        """
        stored = stored if stored is not None else self.q_plan.apply(counts)
        n = stored.shape[0] if stored is not None else counts.shape[0]
        if self.index is None:  # markers only (see _init_default)
            emb, sim, idx = np.zeros((n, 0), np.float32), np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
            dz, vote = np.zeros(n, np.float32), np.zeros((n, len(self.ref_node)))
        else:
            emb = self.encoder.embed(stored, self.universe) if self.model == "default" else self._foundation_embed(counts)
            sim, idx, dz = self._neighbours(emb, np.asarray(stored.sum(axis=1)).ravel())
            vote = fusion.knn_vote(sim, idx, self.ref_codes, len(self.ref_node), self.dist["bandwidth"])
        depth = np.asarray(stored.sum(axis=1)).ravel()
        ranks = rank_scores(stored)
        raw = score_markers(ranks, self.compiled, ranked=True)
        level = np.clip(np.rint(np.log2(self.ref_depth / np.maximum(depth, 1.0))), 0, DEPTH_LEVELS - 1).astype(int)
        n_cand = len(self.candidates)
        ev = fusion.Evidence(
            raw_centred=raw - self.marker_centre[level],
            z=marker_null_z(raw, ranks, self.compiled),
            knn=vote @ self.knn_map,
            distance=np.nan_to_num(dz, nan=0.0),
            log_expressed=np.log2(1.0 + np.diff(ranks.indptr)).astype(np.float32),
            seen=self.seen & (self.index is not None),
            coverage=self.compiled.coverage.astype(np.float32),
            knn_top=self.ref_node[vote.argmax(axis=1)] if self.index is not None else np.full(n, -1),
            n_foil=len(self.foils),
        )
        return ev, emb, sim, idx, vote, ranks

    def score(self, counts: sp.csr_matrix | None, stored: sp.csr_matrix | None = None) -> Scored:
        """Score one chunk of cells (arguments as :meth:`evidence`)."""
        ev, emb, sim, idx, vote, ranks = self.evidence(counts, stored)
        return self.decide(ev, emb, sim, idx, vote, ranks)

    def decide(self, ev: fusion.Evidence, emb, sim, idx, vote, ranks) -> Scored:
        """Probabilities, call, confidences and novel flag from the evidence (:mod:`cellatlas.calls`)."""
        prob = self.model_fusion.probabilities(ev)
        call, conf, parent, p_conf, novel = calls.decide(ev, prob, self.hierarchy, self.node_calibration)
        return Scored(emb, sim, idx, ev, prob, vote, self.model_fusion.marker_probabilities(ev), call,
                      call >= len(self.candidates), conf, parent, p_conf, novel, ranks)

    def place(self, counts: sp.csr_matrix | None, stored: sp.csr_matrix | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Embedding and neighbour-weighted layout position only (no marker scoring; arguments as :meth:`score`)."""
        if self.index is None:
            raise GeneMismatchError(
                f"Too few of the atlas '{self.atlas.name}' panel genes are in your data to place cells among its reference "
                f"cells ({self.report.get('neighbours')}).",
                fix="Embed data that measures more genes (a whole transcriptome rather than a targeted panel).",
                field="genes",
            )
        if self.model == "default":
            stored = stored if stored is not None else self.q_plan.apply(counts)
            emb, depth = self.encoder.embed(stored, self.universe), np.asarray(stored.sum(axis=1)).ravel()
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
        with faiss_threads(1):
            sim, idx = fill_missing(*self.index.search(np.ascontiguousarray(emb, dtype=np.float32), k))
        return sim, idx, fusion.ood_z((1.0 - sim).mean(axis=1), self.dist["median"], self.dist["mad"])

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
        if sim.shape[1] == 0:
            return np.zeros((len(sim), 2), dtype=np.float32)
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
        marker_only = np.nonzero(~self.own)[0]
        for i in np.nonzero(sc.novel | np.isin(sc.call, marker_only))[0]:
            a = anchors.get(names[sc.call[i]]) or anchors.get("__novel__")
            if a is not None:
                # Deterministic per cell (not per chunk position): seeded by the cell's embedding.
                hsh = zlib.crc32(sc.embedding[i].tobytes())
                xy[i] = (a[0] + (hsh % 1000) / 1000.0 - 0.5, a[1] + (hsh // 1000 % 1000) / 1000.0 - 0.5)
        return xy.astype(np.float32)

    def expressed_markers(self, sc: Scored, n_top: int = 10) -> list[list[str]]:
        """Per cell: the called label's positive markers that the cell expresses, strongest first.

        Ties in expression rank keep the order of the label's marker list.
        """
        cols, slot = self._marker_slots
        R = self._marker_plan.apply(sc.ranks)  # only genes that are some node's positive marker
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
    def _marker_plan(self) -> ColumnPlan:
        """Selection of the :attr:`_marker_slots` columns from rows over the universe."""
        return ColumnPlan.select(len(self.universe), self._marker_slots[0])

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
        """Up to ``n`` runner-up candidate labels with their probabilities."""
        p = sc.prob[:, : len(self.candidates)]
        n = min(n, p.shape[1] - 1)
        if n <= 0:
            return Alternates(np.empty((len(sc.call), 0), dtype=object), np.empty((len(sc.call), 0), dtype=np.float32))
        top = np.argsort(-p, axis=1)[:, : n + 1]
        # Drop the called label where it is among the top; otherwise drop the last.
        is_call = top == sc.call[:, None]
        drop = np.where(is_call.any(axis=1), is_call.argmax(axis=1), n)
        keep = np.ones_like(top, dtype=bool)
        keep[np.arange(len(top)), drop] = False
        alt = top[keep].reshape(len(top), n)
        return Alternates(np.asarray(self.candidates, dtype=object)[alt], np.take_along_axis(p, alt, axis=1))
