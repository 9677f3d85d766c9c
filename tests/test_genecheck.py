"""The gene-list check: a list that does not belong to the matrix columns is named, not annotated.

Unit tests use the built-in atlas's reference cells (shipped with the package) and scanpy's
bundled ``pbmc68k_reduced``; the ``shared`` tests run the done-when matrix over every dataset
in ``../shared/data`` (packaged prior) and over the prior's own sources with a prior rebuilt
without each of them (so a source is never judged by a prior that memorised it).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from cellatlas.atlas import load_atlas
from cellatlas.errors import GeneListMismatchError, GeneMismatchError, InputError
from cellatlas.genes import map_genes
from cellatlas.io_genecheck import ALT_MARGIN, RHO_ERROR, RHO_OK, check_gene_list, column_log_means
from benchmarks.input_checks import VARIANTS, corrupt
from cellatlas.query import prepare_query
from tests.conftest import SHARED, shared_file

SHIFTS = (1, -1, 2, 5, 50)


@pytest.fixture(scope="module")
def ref_cells():
    """300 reference cells of the built-in atlas (raw counts on its ~2,500 panel and marker genes)."""
    at = load_atlas("human-core")
    X = sp.csr_matrix(at.reference_counts())
    rows = np.linspace(0, X.shape[0] - 1, 300).astype(int)
    return X[rows], list(at.ref_genes)


def _symbols(genes):
    return map_genes(genes).symbols


def test_aligned_list_passes(ref_cells):
    X, genes = ref_cells
    check = check_gene_list(X, _symbols(genes))
    assert check.verdict == "ok", check.message
    assert check.rho >= RHO_OK
    assert check.ubiquitous_percentile is None or check.ubiquitous_percentile > 75


@pytest.mark.parametrize("k", SHIFTS)
def test_shift_is_named_with_its_size_and_direction(ref_cells, k):
    X, genes = ref_cells
    check = check_gene_list(X, _symbols(list(np.roll(genes, k))))
    assert check.verdict == "error" and check.cause == "shifted" and check.shift == k
    assert f"shifted by {abs(k)} column" in check.message and f"genes[j{k:+d}]" in check.message
    assert f"genes[{k}:] + genes[:{k}]" in check.fix and "skip_gene_check" in check.fix
    assert check.rho_alternative >= max(RHO_OK, check.rho + ALT_MARGIN)


def test_realigning_as_the_fix_says_passes(ref_cells):
    X, genes = ref_cells
    given = list(np.roll(genes, 2))
    k = check_gene_list(X, _symbols(given)).shift
    assert check_gene_list(X, _symbols(given[k:] + given[:k])).verdict == "ok"


def test_reversed_and_shuffled_lists_are_refused(ref_cells):
    X, genes = ref_cells
    rev = check_gene_list(X, _symbols(genes[::-1]))
    assert rev.verdict == "error" and rev.cause == "reversed" and "reversed" in rev.message
    shuf = check_gene_list(X, _symbols(list(np.random.default_rng(0).permutation(genes))))
    assert shuf.verdict == "error" and shuf.cause == "mismatched"
    assert "do not belong to the matrix columns" in shuf.message and abs(shuf.rho) < RHO_ERROR


def test_partly_wrong_list_is_a_warning_in_the_gene_report(ref_cells):
    """About two thirds of the names shuffled: agreement is weak, not absent -> a warning, the run goes on."""
    X, genes = ref_cells
    rng = np.random.default_rng(3)
    g = np.asarray(genes, dtype=object)
    idx = rng.choice(len(g), int(0.68 * len(g)), replace=False)
    g[idx] = g[rng.permutation(idx)]
    check = check_gene_list(X, _symbols(list(g)))
    assert check.verdict == "warning", (check.rho, check.message)
    assert RHO_ERROR <= check.rho < RHO_OK
    with pytest.warns(UserWarning, match="only weakly"):
        q = prepare_query(X, list(g))
    assert q.report["gene_check"]["verdict"] == "warning"


def test_prepare_query_raises_a_typed_422_error_naming_the_field(ref_cells):
    X, genes = ref_cells
    with pytest.raises(GeneListMismatchError) as exc:
        prepare_query(X, list(np.roll(genes, 1)))
    e = exc.value
    assert isinstance(e, GeneMismatchError) and isinstance(e, InputError)
    assert e.status_code == 422 and e.field == "genes" and e.code == "gene_list_mismatch"
    body = e.to_dict()["error"]
    assert "shifted by 1 column" in body["message"] and body["details"]["gene_check"]["shift"] == 1


def test_skip_flag_says_what_it_skips(ref_cells):
    X, genes = ref_cells
    q = prepare_query(X, list(np.roll(genes, 1)), skip_gene_check=True)
    rep = q.report["gene_check"]
    assert rep["verdict"] == "skipped" and "shifted, reversed, shuffled or foreign" in rep["message"]


def test_too_few_cells_or_known_genes_is_not_judged(ref_cells):
    X, genes = ref_cells
    few = check_gene_list(X[:5], _symbols(list(np.roll(genes, 1))))
    assert few.verdict == "unchecked" and "non-empty cells" in few.message
    unknown = check_gene_list(X, [None] * X.shape[1])
    assert unknown.verdict == "unchecked" and "genes with a known typical expression" in unknown.message
    assert prepare_query(X[:5], list(np.roll(genes, 1))).report["gene_check"]["verdict"] == "unchecked"


def test_column_log_means_reads_relative_expression():
    X = sp.csr_matrix(np.array([[1, 3, 0], [0, 0, 0], [2, 2, 0]], dtype=np.float32))
    q, n = column_log_means(X)
    assert n == 2  # the empty row is not counted
    np.testing.assert_allclose(10 ** q - 0.01, [(0.25 + 0.5) / 2 * 1e4, (0.75 + 0.5) / 2 * 1e4, 0.0], rtol=1e-6)


def test_lognormalised_input_unseen_by_the_prior(pbmc68k):
    """scanpy's pbmc68k_reduced .raw: 765 genes, log-normalised, not among the prior's sources."""
    raw = pbmc68k.raw
    genes = list(map(str, raw.var_names))
    assert prepare_query(pbmc68k, use_raw=True).report["gene_check"]["verdict"] == "ok"
    with pytest.raises(GeneListMismatchError, match="shifted by 5 columns"):
        prepare_query(raw.X, list(np.roll(genes, 5)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the aligned list raises no warning either
        prepare_query(raw.X, genes)


# ---------------------------------------------------------------------------- shared data


@pytest.fixture(scope="module")
def corpus():
    """Every dataset file as (name, prepared query of the list as given, gene names), plus pbmc68k_reduced."""
    import anndata as ad
    import scanpy as sc

    paths = sorted((SHARED / "datasets").glob("*.h5ad"))
    if not paths:
        shared_file("datasets")  # skips (or fails in CI) with the path it wanted
    items = []
    for p in paths:
        a = ad.read_h5ad(p)
        items.append((p.stem, prepare_query(a, skip_gene_check=True), list(map(str, a.var_names))))
    p68 = sc.datasets.pbmc68k_reduced()
    items.append(("pbmc68k_reduced", prepare_query(p68, use_raw=True, skip_gene_check=True), list(map(str, p68.raw.var_names))))
    return items


def _variant_symbols(q, genes, variant, others):
    """Mapped symbols of the variant's gene list (shift/reverse/shuffle permute the mapping of the list as given)."""
    if variant == "other":
        return map_genes(corrupt(genes, variant, others)).symbols
    return corrupt(list(q.mapping.symbols), variant, others)


def _matrix(items, prior=None, only=None):
    lists = [g for _, _, g in items]
    out = {}
    for i, (name, q, genes) in enumerate(items):
        if only is not None and name not in only:
            continue
        others = lists[i + 1:] + lists[:i] + [max(lists, key=len) + [f"PAD{j}" for j in range(len(genes))]]
        for v in VARIANTS:
            out[name, v] = check_gene_list(q.raw, _variant_symbols(q, genes, v, others), prior=prior)
    return out


def _assert_done_when(results):
    for (name, v), c in results.items():
        if v == "given":
            assert c.verdict == "ok", f"false alarm on {name}: {c.message}"
        else:
            assert c.verdict in ("error", "warning"), f"{name} {v} not detected (rho {c.rho})"
            if v.startswith("shift") and c.verdict == "error":
                assert c.shift == int(v[5:]), f"{name} {v} named as {c.alternative}"


@pytest.mark.shared
def test_every_dataset_and_pbmc68k_corrupted_lists_detected_given_lists_pass(corpus):
    results = _matrix(corpus)
    assert len(results) == len(corpus) * len(VARIANTS) and len(corpus) >= 13
    _assert_done_when(results)
    # the mouse files are checked through their human orthologs
    assert any("mouse" in name and v == "given" for name, v in results)


@pytest.mark.shared
def test_through_prepare_query_a_mouse_file(corpus):
    name, q, genes = next(item for item in corpus if item[0].startswith("mouse_lung"))
    with pytest.raises(GeneListMismatchError, match="shifted by 2 columns"):
        prepare_query(q.raw, list(np.roll(genes, 2)))


@pytest.mark.shared
def test_leave_one_source_out_prior_still_separates(corpus):
    """Each single-cell source of the prior, judged by a prior rebuilt without it."""
    import anndata as ad

    from scripts.build_expression_prior import SOURCES, as_lookup, combine, source_profile

    profiles = {k: source_profile(ad.read_h5ad(shared_file(*rel.split("/"))), values) for k, (rel, values, _) in SOURCES.items()}
    held = {k: rel.split("/")[-1][:-5] for k, (rel, _, _) in SOURCES.items() if rel.startswith("datasets/")}
    assert len(held) >= 6
    for k, stem in held.items():
        prior = as_lookup(combine({n: p for n, p in profiles.items() if n != k}))
        results = _matrix(corpus, prior=prior, only={stem})
        assert len(results) == len(VARIANTS), stem
        _assert_done_when(results)
