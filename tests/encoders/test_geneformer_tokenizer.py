"""Geneformer rank-value tokenisation: hand-worked examples and the real dictionaries."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from cellatlas.encoders.geneformer_tokenizer import (
    GeneformerDictionaries,
    GeneformerTokenizer,
    find_dictionary_files,
)
from cellatlas.errors import GeneMismatchError, InputError, ModelUnavailableError

from .conftest import FM, hand_dictionaries, needs_shared, write_pickles

A, B, C, D = 4, 5, 6, 7  # token ids of genes GA..GD in the V2 hand dictionary (after 4 special tokens)


def _tokenizer(tmp_path, version="V2", input_size=None):
    write_pickles(tmp_path, hand_dictionaries(version))
    return GeneformerTokenizer(GeneformerDictionaries.from_files(find_dictionary_files(tmp_path)), input_size)


def test_hand_worked_cell_v2(tmp_path):
    # counts GA=2, GB=8, GC=1, GD=0, GX=9 (not in the vocabulary): n_counts = 20 (all genes)
    # x_norm = c / 20 * 10,000 / median: GA 1000/1.0 = 1000, GB 4000/2.0 = 2000, GC 500/0.4 = 1250
    # ranked: GB, GC, GA; V2 frames them with <cls>=2 ... <eos>=3
    tk = _tokenizer(tmp_path)
    assert tk.version == "V2" and tk.input_size == 4096
    tokens = tk.tokenize(sp.csr_matrix([[2, 8, 1, 0, 9]]), ["GA", "GB", "GC", "GD", "GX"])
    assert tokens[0].tolist() == [2, B, C, A, 3]


def test_normalisation_uses_total_counts_of_all_genes(tmp_path):
    # Raising only the unmapped gene changes n_counts equally for all genes: ranks unchanged, but
    # GA=1 (x_norm 1/n*1e4) vs GD=4 (4/n*1e4/4): a tie, broken by token id (GA first).
    tk = _tokenizer(tmp_path)
    for other in (0, 50):
        tokens = tk.tokenize(sp.csr_matrix([[1, 0, 0, 4, other]]), ["GA", "GB", "GC", "GD", "GX"])
        assert tokens[0].tolist() == [2, A, D, 3]


def test_v1_has_no_special_tokens_and_truncates(tmp_path):
    tk = _tokenizer(tmp_path, "V1", input_size=2)
    assert tk.version == "V1" and not tk.special
    # V1 tokens: A=2, B=3, C=4 (only <pad>, <mask> before them)
    assert tk.tokenize(sp.csr_matrix([[2, 8, 1]]), ["GA", "GB", "GC"])[0].tolist() == [3, 4]


def test_v2_truncation_keeps_cls_and_eos(tmp_path):
    tk = _tokenizer(tmp_path, input_size=3)
    assert tk.tokenize(sp.csr_matrix([[2, 8, 1]]), ["GA", "GB", "GC"])[0].tolist() == [2, B, 3]


def test_duplicate_ids_are_summed_and_ensembl_ids_accepted(tmp_path):
    # "ENSG00000000009" collapses onto GA (ensembl_mapping_dict), so GA = 1 + 3 = 4 -> x_norm 4/8*1e4 = 5000 > GB 4/8*1e4/2
    tk = _tokenizer(tmp_path)
    tokens = tk.tokenize(sp.csr_matrix([[1, 3, 4]]), ["GA", "ENSG00000000009", "ENSG00000000002.7"])
    assert tokens[0].tolist() == [2, A, B, 3]
    assert tk.gene_tokens(["ga", "ENSG00000000004", "nope", None, ""]).tolist() == [A, D, -1, -1, -1]


def test_gene_coverage_counts_vocabulary_genes(tmp_path):
    tk = _tokenizer(tmp_path)
    assert tk.gene_coverage(["GA", "GB", "GX"]) == pytest.approx(0.5)


def test_bad_inputs_raise_typed_errors(tmp_path):
    tk = _tokenizer(tmp_path)
    with pytest.raises(GeneMismatchError):
        tk.tokenize(sp.csr_matrix([[1, 2]]), ["X1", "X2"])
    with pytest.raises(InputError, match="columns"):
        tk.tokenize(sp.csr_matrix([[1, 2]]), ["GA"])
    with pytest.raises(InputError, match="negative"):
        tk.tokenize(sp.csr_matrix([[-1, 2]]), ["GA", "GB"])


def test_dictionary_sets_are_matched_to_the_vocabulary(tmp_path):
    write_pickles(tmp_path / "v1", hand_dictionaries("V1"), "_gc30M")
    write_pickles(tmp_path / "v2", hand_dictionaries("V2"), "_gc95M")
    assert find_dictionary_files(tmp_path, vocab_size=6)["token"].name == "token_dictionary_gc30M.pkl"
    assert find_dictionary_files(tmp_path, vocab_size=8)["token"].name == "token_dictionary_gc95M.pkl"
    (tmp_path / "v1" / "ensembl_mapping_dict_gc30M.pkl").unlink()
    assert find_dictionary_files(tmp_path, vocab_size=6)["token"].name == "token_dictionary_gc95M.pkl"
    with pytest.raises(ModelUnavailableError, match="No complete set"):
        find_dictionary_files(tmp_path / "v1")


def test_corrupt_pickle_is_reported(tmp_path):
    write_pickles(tmp_path, hand_dictionaries())
    (tmp_path / "gene_median_dictionary.pkl").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ModelUnavailableError, match="gene_median_dictionary"):
        GeneformerDictionaries.from_files(find_dictionary_files(tmp_path))


# ------------------------------------------------------------------ real dictionaries
@pytest.fixture(scope="module")
def gc95m():
    needs_shared(FM / "geneformer_dictionaries" / "gc95M")
    return GeneformerDictionaries.from_files(find_dictionary_files(FM / "geneformer_dictionaries" / "gc95M"))


def test_real_v2_dictionaries(gc95m):
    tk = GeneformerTokenizer(gc95m)
    assert (tk.version, tk.input_size, len(gc95m.token)) == ("V2", 4096, 20275)
    assert [gc95m.token[t] for t in ("<pad>", "<mask>", "<cls>", "<eos>")] == [0, 1, 2, 3]
    ens = gc95m.name_id["CD3E"]
    assert tk.gene_tokens(["CD3E", ens])[0] == tk.gene_tokens(["CD3E", ens])[1] == gc95m.token[ens]


def test_real_v1_dictionaries():
    needs_shared(FM / "geneformer_dictionaries" / "gc30M")
    d = GeneformerDictionaries.from_files(find_dictionary_files(FM / "geneformer_dictionaries" / "gc30M"))
    tk = GeneformerTokenizer(d)
    assert (tk.version, tk.input_size, len(d.token), tk.special) == ("V1", 2048, 25426, False)
    assert all(isinstance(v, int) for v in list(d.token.values())[:10])  # numpy int16 in the pickle


def _upstream_reference(x, ens_ids, d, input_size):
    """Upstream tokenize_anndata + create_dataset, written out literally for Ensembl-id input."""
    mapped = [d.ensembl.get(str(e).upper()) for e in ens_ids]
    keep = [i for i, e in enumerate(mapped) if e in d.token and e in d.median]
    tokens = np.array([d.token[mapped[i]] for i in keep])
    medians = np.array([d.median[mapped[i]] for i in keep])
    out = []
    for row in x.toarray():
        norm = row[keep] / row.sum() * 10_000 / medians
        nz = np.nonzero(norm)[0]
        ranked = tokens[nz][np.argsort(-norm[nz], kind="stable")]
        out.append([d.token["<cls>"], *ranked[: input_size - 2], d.token["<eos>"]])
    return out


def test_real_dataset_matches_upstream_algorithm(gc95m, pbmc):
    ens = pbmc.var["ensembl_id"].astype(str).tolist()
    # upstream sums duplicate ids; keep the first of each so the literal reference needs no collapsing
    _, first = np.unique([gc95m.ensembl.get(e.upper(), f"none{i}") for i, e in enumerate(ens)], return_index=True)
    cols = np.sort(first)
    x = sp.csr_matrix(pbmc.X)[:12][:, cols]
    genes = [ens[i] for i in cols]
    tk = GeneformerTokenizer(gc95m, input_size=512)
    ours = tk.tokenize(x, genes)
    ref = _upstream_reference(x, genes, gc95m, 512)
    for mine, theirs in zip(ours, ref):
        assert len(mine) == len(theirs) and mine[0] == 2 and mine[-1] == 3
        assert sorted(mine.tolist()) == sorted(theirs) or len(mine) == 512  # same genes (ties may reorder at the cut)
        assert np.mean(np.asarray(mine) == np.asarray(theirs)) > 0.9  # same order apart from ties


def test_symbols_and_ensembl_ids_give_the_same_tokens(gc95m, pbmc):
    tk = GeneformerTokenizer(gc95m)
    by_symbol = tk.gene_tokens(pbmc.var_names.tolist())
    by_ensembl = tk.gene_tokens(pbmc.var["ensembl_id"].astype(str).tolist())
    both = (by_symbol >= 0) & (by_ensembl >= 0)
    assert both.sum() > 11_000
    assert np.mean(by_symbol[both] == by_ensembl[both]) > 0.999
