"""scGPT vocabulary and per-cell value binning: hand-worked examples and the real vocabulary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from cellatlas.encoders.scgpt_tokenizer import ScGPTTokenizer, bin_values, digitize, load_vocab
from cellatlas.errors import GeneMismatchError, InputError, ModelUnavailableError

from .conftest import FM, needs_shared

VOCAB = {"GA": 0, "GB": 1, "GC": 2, "GD": 3, "<pad>": 4, "<cls>": 5, "<eoc>": 6}


def test_binning_hand_worked():
    # non-zeros [3, 1, 2, 4]; 5 bins -> 4 edges = quantiles at 0, 1/3, 2/3, 1 = [1, 2, 3, 4]
    # left/right digitize: 3 -> 3/2, 1 -> 1/0, 2 -> 2/1, 4 -> 4/3; middle of each range: ceil(x.5) = left
    assert bin_values(np.array([0, 3, 1, 2, 0, 4]), n_bins=5).tolist() == [0, 3, 1, 2, 0, 4]


def test_binning_ties_take_the_middle_of_upstreams_random_range():
    # [1, 1, 1, 5] -> edges [1, 1, 1, 5]; value 1: left 3, right 0 -> upstream draws from {1, 2, 3}; middle 2
    assert bin_values(np.array([1, 1, 1, 5]), n_bins=5).tolist() == [2, 2, 2, 4]
    rng = np.random.default_rng(0)
    draws = np.concatenate([bin_values(np.array([1, 1, 1, 5]), 5, rng)[:3] for _ in range(50)])
    assert set(draws.tolist()) == {1, 2, 3}


def test_digitize_matches_numpy_when_edges_are_distinct():
    x = np.array([0.5, 1.0, 2.5, 3.0])
    edges = np.array([0.0, 1.0, 2.0, 3.0])
    # value on an edge e_i: left = i+1, right = i -> ceil(i + 0.5) = i + 1 = np.digitize
    assert digitize(x, edges).tolist() == np.digitize(x, edges).tolist()


def test_51_bins_are_invariant_to_per_cell_monotone_transforms():
    rng = np.random.default_rng(1)
    counts = rng.poisson(rng.gamma(0.3, 4, 2000)).astype(float)
    binned = bin_values(counts)
    assert binned.max() == 50 and binned.min() == 0 and (binned[counts == 0] == 0).all()
    lognorm = np.log1p(counts / counts.sum() * 1e4)
    assert (bin_values(lognorm) == binned).all()


def _tk(**kw):
    return ScGPTTokenizer(dict(VOCAB), **kw)


def test_tokenize_cell_layout():
    # columns: GB=3, GX (not in vocab)=7, GA=0, GC=1 -> <cls> + genes in column order, zeros and GX left out
    genes, values = _tk().tokenize(sp.csr_matrix([[3, 7, 0, 1]]), ["GB", "GX", "GA", "GC"])
    assert genes[0].tolist() == [5, 1, 2]
    assert values[0][0] == -2 and values[0][1] > values[0][2] > 0


def test_long_cells_keep_the_most_expressed_genes_by_default():
    x = sp.csr_matrix([[5, 1, 9, 3]])
    genes, _ = _tk(max_length=3).tokenize(x, ["GA", "GB", "GC", "GD"])
    assert genes[0].tolist() == [5, 0, 2]  # <cls>, GA (5), GC (9), in column order
    a = _tk(max_length=3, sampling=True, seed=1).tokenize(x, ["GA", "GB", "GC", "GD"])[0][0]
    b = _tk(max_length=3, sampling=True, seed=1).tokenize(x, ["GA", "GB", "GC", "GD"])[0][0]
    assert a.tolist() == b.tolist() and len(a) == 3 and a[0] == 5


def test_errors_and_coverage():
    tk = _tk()
    with pytest.raises(GeneMismatchError):
        tk.tokenize(sp.csr_matrix([[1.0]]), ["nope"])
    with pytest.raises(InputError):
        tk.tokenize(sp.csr_matrix([[1.0, 2.0]]), ["GA"])
    assert tk.gene_coverage(["GA", "GB", "<pad>", "GX"]) == pytest.approx(0.5)
    with pytest.raises(InputError):
        ScGPTTokenizer(dict(VOCAB), max_length=1)


def test_vocab_gets_special_tokens(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"GA": 0, "GB": 1}))
    assert load_vocab(tmp_path / "vocab.json") == {"GA": 0, "GB": 1, "<pad>": 2, "<cls>": 3, "<eoc>": 4}
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(ModelUnavailableError):
        load_vocab(tmp_path / "bad.json")


def test_real_census_vocabulary(pbmc):
    path = FM / "scgpt" / "default_census_vocab.json"
    needs_shared(path)
    vocab = load_vocab(path)
    assert len(vocab) == 60_697  # 60,694 symbols + <pad>, <cls>, <eoc>, as in scGPT#200's log
    tk = ScGPTTokenizer(vocab)
    ids = tk.gene_ids(pbmc.var_names.tolist())
    assert (ids >= 0).sum() > 11_000
    genes, values = tk.tokenize(pbmc.X[:5], pbmc.var_names.tolist())
    nnz = np.diff(sp.csr_matrix(pbmc.X[:5][:, ids >= 0]).indptr)
    assert [len(g) for g in genes] == [min(n, 1199) + 1 for n in nnz]
    assert all(v[1:].min() >= 1 and 45 <= v[1:].max() <= 50 for v in values)
