import numpy as np
import pandas as pd
import pytest

import cellatlas
from cellatlas.atlas import load_atlas
from cellatlas.errors import GeneMismatchError, InputError
from tests.conftest import shared_file

BLOOD_LINEAGE = "immune"


@pytest.fixture(scope="module")
def pbmc_small(pbmc3k):
    idx = np.random.default_rng(0).choice(pbmc3k.n_obs, 600, replace=False)
    return pbmc3k[np.sort(idx)].copy()


@pytest.fixture(scope="module")
def pbmc_result(pbmc_small):
    return cellatlas.annotate(pbmc_small.X, list(pbmc_small.var_names), cell_ids=list(pbmc_small.obs_names))


def test_result_shape_order_and_bands(pbmc_small, pbmc_result):
    res = pbmc_result
    assert len(res) == pbmc_small.n_obs
    assert list(res.cell_ids) == list(pbmc_small.obs_names)
    c = res.confidence
    assert ((c >= 0) & (c <= 1)).all()
    band = res.band
    assert (band[c >= 0.7] == "confident").all() and (band[c < 0.4] == "low").all()
    assert all(len(a) <= 3 for a in res.alternates)
    assert all(lab != alt for lab, alts in zip(res.label, res.alternates) for alt, _ in alts)
    assert res.embedding.shape[0] == len(res) and res.layout.shape == (len(res), 2)
    assert res.provenance["atlas"] == "human-core" and len(res.provenance["atlas_sha256"]) == 64


def test_parent_label_and_confidence(pbmc_small, pbmc_result):
    at = cellatlas.load_atlas("human-core")
    parent = {lab: (p if isinstance(p, str) else "") for lab, p in at.labels["parent"].items()}
    res = pbmc_result
    assert list(res.parent_label) == [parent[lab] for lab in res.label]
    has = res.parent_label != ""
    assert has.mean() > 0.9
    pc = res.parent_confidence
    assert np.isnan(pc[~has]).all() and np.isfinite(pc[has]).all()
    # A label's parent is at least as likely as the label, and where the fine call is under
    # review the parent is often confident (the point of reporting it).
    assert (pc[has] >= res.confidence[has] - 1e-6).all() and (pc[has] <= 1).all()
    review = has & (res.confidence < 0.7)
    assert review.any() and (pc[review] >= 0.7).mean() > 0.5
    df = res.to_dataframe()
    assert list(df["cell_type_parent"]) == list(res.parent_label)


def test_markers_are_expressed_and_belong_to_the_label(pbmc_small, pbmc_result):
    from cellatlas.query import prepare_query

    at = cellatlas.load_atlas("human-core")
    q = prepare_query(pbmc_small.X, list(pbmc_small.var_names))  # markers are approved symbols
    genes, X = q.genes, q.counts
    checked = 0
    for i in range(0, len(pbmc_result), 37):
        lab, markers = pbmc_result.label[i], pbmc_result.markers[i]
        allowed = set(at.marker_sets.get(lab, {}).get("positive", []))
        for g in markers:
            assert g in allowed
            assert X[i, genes.index(g)] > 0
            checked += 1
    assert checked > 20


def test_markers_come_strongest_first_ties_in_list_order(pbmc_small):
    from cellatlas.query import prepare_query
    from cellatlas.runtime import AtlasRuntime

    q = prepare_query(pbmc_small.X, list(pbmc_small.var_names))
    rt = AtlasRuntime(cellatlas.load_atlas("human-core"), "default", q.genes)
    sc = rt.score(None, q.take(q.plan(rt.q_cols)))
    got = rt.expressed_markers(sc)
    universe, ranks = np.asarray(rt.universe, dtype=object), sc.ranks.tocsr()
    for i in range(0, len(got), 7):  # a direct per-cell sort as the reference
        idx = np.asarray(rt.node_markers.marker_idx[sc.call[i]], dtype=np.int64)
        vals = ranks[i].toarray().ravel()[idx]
        order = sorted((-vals[k], k) for k in range(len(idx)) if vals[k] > 0)[:10]
        assert got[i] == [universe[idx[k]] for _, k in order], i


def test_accuracy_on_reference_lineages(pbmc_small, pbmc_result):
    # The atlas is built from PBMC3k, so this is a sanity check, not a benchmark.
    truth = pbmc_small.obs["cell_type"].astype(str).to_numpy()
    lineage = {"B": "B cell", "NK": "NK cell", "CD14+ Mono": "CD14 monocyte"}
    for t, lab in lineage.items():
        m = truth == t
        assert (pbmc_result.label[m] == lab).mean() > 0.85, t


def test_deterministic_and_chunk_invariant(pbmc_small, pbmc_result):
    again = cellatlas.annotate(pbmc_small.X, list(pbmc_small.var_names), chunk_size=97)
    assert np.array_equal(again.label, pbmc_result.label)
    np.testing.assert_allclose(again.confidence, pbmc_result.confidence, rtol=1e-5, atol=1e-6)


def test_permuting_cells_permutes_calls(pbmc_small, pbmc_result):
    perm = np.random.default_rng(1).permutation(pbmc_small.n_obs)
    res = cellatlas.annotate(pbmc_small.X[perm], list(pbmc_small.var_names))
    assert np.array_equal(res.label, pbmc_result.label[perm])


def test_ensembl_ids_give_the_same_calls(pbmc_small, pbmc_result):
    from cellatlas.genes import map_genes

    ens = pbmc_small.var["ensembl_id"].astype(str).to_numpy()
    ok = np.array([e.startswith("ENSG") for e in ens]) & ~pd.Series(ens).duplicated(keep=False).to_numpy()
    # The same genes under both names: columns whose symbol and Ensembl id map to the same approved symbol.
    by_sym = map_genes(list(pbmc_small.var_names)).symbols
    by_ens = map_genes(list(ens)).symbols
    same = ok & np.array([a is not None and a == b for a, b in zip(by_sym, by_ens)])
    assert same.sum() > 0.95 * ok.sum()
    sym = cellatlas.annotate(pbmc_small.X[:, same], list(pbmc_small.var_names[same]))
    by_id = cellatlas.annotate(pbmc_small.X[:, same], list(ens[same]))
    assert by_id.gene_report["id_type"] == "ensembl_human"
    assert np.array_equal(sym.label, by_id.label)
    np.testing.assert_allclose(sym.confidence, by_id.confidence, rtol=1e-5)
    # all Ensembl ids as sent (a few map to other symbols than the old names): nearly the same calls
    full = cellatlas.annotate(pbmc_small.X[:, ok], list(ens[ok]))
    assert (full.label == pbmc_result.label).mean() > 0.9


def test_mouse_symbols_give_the_same_calls(pbmc_small):
    import gzip
    from pathlib import Path

    import cellatlas.genes as cg

    table = Path(cg.__file__).parent / "data" / "genes" / "mouse_to_human.tsv.gz"
    with gzip.open(table, "rt") as fh:
        df = pd.read_csv(fh, sep="\t")
    mouse_col = [c for c in df.columns if "mouse" in c.lower()][0]
    human_col = [c for c in df.columns if "human" in c.lower()][0]
    df = df[~df[mouse_col].astype(str).str.startswith("ENSMUSG")]
    one_to_one = df.groupby(human_col).filter(lambda g: len(g) == 1)
    to_mouse = dict(zip(one_to_one[human_col], one_to_one[mouse_col]))
    genes = list(pbmc_small.var_names)
    ok = np.array([g in to_mouse for g in genes])
    human = cellatlas.annotate(pbmc_small.X[:, ok], [g for g, k in zip(genes, ok) if k])
    mouse = cellatlas.annotate(pbmc_small.X[:, ok], [to_mouse[g] for g, k in zip(genes, ok) if k])
    assert mouse.gene_report["species"] == "mouse"
    assert (mouse.label == human.label).mean() > 0.99


def test_gene_mismatch_is_an_error_not_an_answer(pbmc_small):
    junk = [f"GENE{i}" for i in range(pbmc_small.n_vars)]
    with pytest.raises(GeneMismatchError) as e:
        cellatlas.annotate(pbmc_small.X, junk)
    assert e.value.status_code == 422 and e.value.fix


def test_scaled_input_is_refused(pbmc68k):
    with pytest.raises(InputError) as e:
        cellatlas.annotate(pbmc68k.X, list(pbmc68k.var_names))  # z-scored values
    assert "raw" in (e.value.fix or "").lower() or "raw" in e.value.message.lower()


def test_lognormalised_anndata_and_obs_columns(pbmc68k):
    a = pbmc68k.copy()
    res = cellatlas.annotate_adata(a)
    assert res.gene_report["matrix_source"] == "raw.X" and res.gene_report["values"] == "lognorm"
    for col in ("cell_type", "cell_type_confidence", "cell_type_band", "cell_type_ontology_id", "cell_type_alternates", "cell_type_markers"):
        assert col in a.obs
    assert a.obsm["X_cellatlas"].shape[0] == a.n_obs and a.obsm["X_cellatlas_projection"].shape == (a.n_obs, 2)
    assert a.uns["cellatlas"]["provenance"]["atlas"] == "human-core"
    mono = a.obs["bulk_labels"] == "CD14+ Monocyte"
    assert a.obs.loc[mono, "cell_type"].isin(["CD14 monocyte", "CD16 monocyte", "Monocyte", "Dendritic cell"]).mean() > 0.8
    # "CD19+ B" (labels from sorted bulk profiles) includes plasmablasts: MS4A1-negative cells
    # expressing JCHAIN/MZB1/TNFRSF17. Either B-lineage call is right; plasma calls must be those cells.
    b = (a.obs["bulk_labels"] == "CD19+ B").to_numpy()
    call = a.obs["cell_type"].to_numpy()
    assert np.isin(call[b], ["B cell", "Plasma cell"]).mean() > 0.9 and (call[b] == "B cell").mean() > 0.6
    raw = a.raw.to_adata()
    ms4a1, mzb1 = (np.asarray(raw[:, g].X.todense()).ravel() > 0 for g in ("MS4A1", "MZB1"))
    plasma = b & (call == "Plasma cell")
    assert ms4a1[plasma].mean() < 0.2 and mzb1[plasma].mean() > 0.8


def test_non_blood_cells_are_not_called_blood():
    import anndata as ad

    xin = ad.read_h5ad(shared_file("datasets", "human_pancreas_xin2016_scclassify_subset.h5ad"))
    res = cellatlas.annotate(xin)
    labels = cellatlas.load_atlas("human-core").labels
    lineage = labels["lineage"].reindex(res.label).fillna("").to_numpy()
    assert (lineage != BLOOD_LINEAGE).mean() > 0.9
    beta = xin.obs["cell_type"].astype(str).to_numpy() == "beta"
    assert (res.label[beta] == "Pancreatic beta cell").mean() > 0.7


def test_cluster_vote_keeps_order_and_records_changes(pbmc_small, pbmc_result):
    res = cellatlas.annotate(pbmc_small.X, list(pbmc_small.var_names), cluster_vote=True)
    assert len(res) == len(pbmc_result)
    changed = int((res.label != pbmc_result.label).sum())
    assert res.provenance["cluster_vote_changed"] == changed
    assert changed < 0.2 * len(res)
    # A relabelled cell takes its new label's parent, with no parent confidence.
    moved = res.label != pbmc_result.label
    assert moved.any()
    at = cellatlas.load_atlas("human-core")
    parent = {lab: (p if isinstance(p, str) else "") for lab, p in at.labels["parent"].items()}
    assert [parent[lab] for lab in res.label[moved]] == list(res.parent_label[moved])
    assert np.isnan(res.parent_confidence[moved]).all()


def test_embed(pbmc_small):
    emb, lay, report = cellatlas.embed(pbmc_small.X, list(pbmc_small.var_names))
    assert emb.shape[0] == pbmc_small.n_obs and lay.shape == (pbmc_small.n_obs, 2)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-4)
    assert report["panel_coverage"] > 0.9


def test_unknown_and_unavailable_models(pbmc_small, isolated_home):
    from cellatlas.errors import ModelUnavailableError, UnknownModelError

    with pytest.raises(UnknownModelError) as e:
        cellatlas.annotate(pbmc_small.X[:5], list(pbmc_small.var_names), model="gpt-cell")
    assert e.value.status_code == 404
    with pytest.raises(ModelUnavailableError) as e:  # no weights in the fresh CELLATLAS_HOME
        cellatlas.annotate(pbmc_small.X[:5], list(pbmc_small.var_names), model="geneformer")
    assert e.value.status_code == 409 and "geneformer" in e.value.message.lower()


@pytest.mark.parametrize("drop, kang_label, min_flagged", [("B", "B cells", 0.7), ("NK", "NK cells", 0.8)])
def test_cells_of_a_type_missing_from_the_atlas_are_flagged(pbmc3k, drop, kang_label, min_flagged):
    """Drop B (or NK) cells from the reference and the candidates: Kang's B (NK) cells must be flagged.

    Labels are mapped onto the curated vocabulary, as the built-in atlas does: curated
    markers (with negatives) are what tell "no label fits" apart from "a similar label fits".
    NK cells sit next to PBMC3k's CD8 T cells and fit their markers partly; they are found
    because the curated NK signature (a foil the atlas cannot call) fits them better.
    """
    import anndata as ad

    from cellatlas.atlas_build import build_atlas
    from scripts.build_builtin_atlas import PBMC3K_TO_CORE

    kang = ad.read_h5ad(shared_file("datasets", "human_pbmc_kang2018_muscat_subset.h5ad"))
    ref = pbmc3k[pbmc3k.obs["cell_type"] != drop].copy()
    at = build_atlas(ref, "cell_type", name=f"minus-{drop}", label_map=PBMC3K_TO_CORE, fit_folds=3, layout="pca")
    assert PBMC3K_TO_CORE[drop] not in at.meta["candidates"]
    res = cellatlas.annotate(kang, atlas=at)
    truth = kang.obs["cell_type"].astype(str).to_numpy()
    new = truth == kang_label
    flagged = res.novel | (res.band == "low")
    assert flagged[new].mean() > min_flagged
    assert flagged[~new].mean() < 0.12


def test_cells_placed_among_reference_cells_they_do_not_resemble_are_flagged():
    """Yan's RPKM embryo cells land next to PBMC3k T cells in the built-in atlas's embedding.

    Cleavage-stage cells (zygote to 16 cells) fit no label's markers: they must be flagged
    novel. Late blastocyst cells express the epithelial programme (KRT8/18, EPCAM, CLDN4, CDH1:
    the trophectoderm is the first epithelium): each must be flagged or called a label outside
    the blood lineage, never an unflagged blood type. The same model must leave a PBMC
    dataset's cells nearly all unflagged (Kang, 2,511 genes; its 1,267-gene example subset,
    which lacks CD79A/B, CD19 and most other B-cell markers, has 26% of its B cells flagged).
    """
    import anndata as ad

    yan = ad.read_h5ad(shared_file("datasets", "human_preimplantation_embryo_yan2013_scmap_rpkm.h5ad"))
    res = cellatlas.annotate(yan)
    stage = yan.obs["cell_type"].astype(str).to_numpy()
    early = stage != "blast"
    assert early.sum() >= 50 and res.novel[early].mean() > 0.9
    parents = load_atlas("human-core").labels["parent"].to_dict()

    def in_blood(label: str) -> bool:
        while isinstance(label, str) and label:
            if label == "Leukocyte":
                return True
            label = parents.get(label, "")
        return False

    blast = ~early
    unflagged_blood = [lab for lab, nv in zip(res.label[blast], res.novel[blast]) if not nv and in_blood(lab)]
    assert blast.sum() >= 20 and not unflagged_blood
    kang = ad.read_h5ad(shared_file("datasets", "human_pbmc_kang2018_muscat_subset.h5ad"))
    assert cellatlas.annotate(kang).novel.mean() < 0.03


def test_chunk_slices_cover_every_row_once_in_order():
    from cellatlas.annotate import chunk_slices

    for n, size, threads in [(1, 8192, 2), (20_000, 8192, 2), (20_000, 8192, 1), (9_999, 1000, 4), (700, 8192, 8)]:
        parts = chunk_slices(n, size, threads)
        assert parts[0].start == 0 and parts[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
        assert max(p.stop - p.start for p in parts) <= size
        if n >= 2 * threads * 256 and threads > 1:
            assert len(parts) % threads == 0  # every thread gets work


def test_one_blas_thread_holds_until_the_last_concurrent_user_leaves():
    """Engine runs that overlap (service requests, threads of a user) share one BLAS limit: it is
    set by the first to enter and the original limits come back only when the last one leaves."""
    import numpy as np  # noqa: F401  (loads numpy's BLAS, the library limited)
    from threadpoolctl import threadpool_info, threadpool_limits

    from cellatlas.annotate import one_blas_thread

    def blas_threads():
        return sorted(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        assert before and max(before) == 2
        first, second = one_blas_thread(), one_blas_thread()
        first.__enter__()
        second.__enter__()
        assert max(blas_threads()) == 1
        first.__exit__(None, None, None)
        assert max(blas_threads()) == 1  # the other run is still scoring
        second.__exit__(None, None, None)
        assert blas_threads() == before
