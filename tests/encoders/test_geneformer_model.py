"""Geneformer checkpoints: real loading code on tiny random checkpoints, embeddings on real cells."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import scipy.sparse as sp

from cellatlas.config import Settings
from cellatlas.encoders import geneformer
from cellatlas.errors import InputError, ModelUnavailableError

from .conftest import TINY_INPUT, hand_dictionaries, make_geneformer_checkpoint

# The parameter names of a published Geneformer BertForMaskedLM checkpoint (transformers' BERT), per layer N.
PUBLISHED_LAYER_KEYS = [
    "attention.self.query.weight", "attention.self.query.bias", "attention.self.key.weight", "attention.self.key.bias",
    "attention.self.value.weight", "attention.self.value.bias", "attention.output.dense.weight",
    "attention.output.dense.bias", "attention.output.LayerNorm.weight", "attention.output.LayerNorm.bias",
    "intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight", "output.dense.bias",
    "output.LayerNorm.weight", "output.LayerNorm.bias",
]
PUBLISHED_KEYS = [
    "bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight", "bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias",
    "cls.predictions.bias", "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
]


@pytest.fixture(scope="module")
def encoder(geneformer_dir):
    return geneformer.load(model_path=geneformer_dir, settings=Settings())


def test_status_reports_a_usable_checkpoint(geneformer_dir):
    st = geneformer.status(Settings(), geneformer_dir)
    assert st["usable"] and st["kind"] == "foundation" and "V2" in st["reason"] and st["path"] == str(geneformer_dir)


def test_saved_checkpoint_has_the_published_parameter_names(geneformer_dir):
    from safetensors import safe_open

    with safe_open(str(geneformer_dir / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    expected = set(PUBLISHED_KEYS) | {f"bert.encoder.layer.{i}.{k}" for i in range(2) for k in PUBLISHED_LAYER_KEYS}
    assert keys == expected


def test_embeds_real_cells(encoder, pbmc):
    x = sp.csr_matrix(pbmc.X)
    emb = encoder.embed(x, pbmc.var_names.tolist())
    assert emb.shape == (pbmc.n_obs, 32) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert np.unique(emb.round(5), axis=0).shape[0] == pbmc.n_obs  # cells differ
    # deterministic, input order kept, independent of how cells are batched
    rev = encoder.embed(x[::-1], pbmc.var_names.tolist())[::-1]
    assert np.allclose(emb, rev, atol=1e-5)
    small = geneformer.GeneformerEncoder(encoder.bert, encoder.tokenizer, batch_tokens=300)
    assert np.allclose(small.embed(x[:12], pbmc.var_names.tolist()), emb[:12], atol=1e-5)


def test_pooling_follows_upstream_get_embs(encoder, pbmc, torch):
    """cls = position 0 of hidden_states[n_layers - 1]; cell = mean over genes without <cls>/<eos>."""
    genes = pbmc.var_names.tolist()
    x = sp.csr_matrix(pbmc.X[:3])
    tokens = encoder.tokenizer.tokenize(x, genes)
    assert all(len(t) <= TINY_INPUT and t[0] == 2 and t[-1] == 3 for t in tokens)
    cell = geneformer.GeneformerEncoder(encoder.bert, encoder.tokenizer, emb_mode="cell", emb_layer=0)
    with torch.no_grad():
        for i, t in enumerate(tokens):
            hs = encoder.bert(input_ids=torch.tensor(t[None]), output_hidden_states=True).hidden_states
            cls = hs[2 - 1][0, 0].numpy()  # emb_layer=-1: second to last of 2 layers
            mean = hs[2][0, 1:-1].mean(0).numpy()  # emb_layer=0: last layer
            assert np.allclose(encoder.embed(x[i], genes)[0], cls / np.linalg.norm(cls), atol=1e-5)
            assert np.allclose(cell.embed(x[i], genes)[0], mean / np.linalg.norm(mean), atol=1e-5)


def test_fingerprint_tracks_weights_and_settings(encoder, geneformer_dir, tmp_path):
    assert encoder.fingerprint() == geneformer.load(model_path=geneformer_dir).fingerprint()
    assert encoder.fingerprint() != geneformer.load(model_path=geneformer_dir, emb_layer=0).fingerprint()
    other = make_geneformer_checkpoint(tmp_path / "other", seed=1)
    assert geneformer.load(model_path=other).fingerprint() != encoder.fingerprint()


def test_legacy_pytorch_bin_loads_the_same_model(geneformer_dir, tmp_path, pbmc, encoder):
    legacy = make_geneformer_checkpoint(tmp_path / "bin", seed=0, safetensors=False)
    assert (legacy / "pytorch_model.bin").is_file() and not (legacy / "model.safetensors").exists()
    emb = geneformer.load(model_path=legacy).embed(pbmc.X[:4], pbmc.var_names.tolist())
    assert np.allclose(emb, encoder.embed(pbmc.X[:4], pbmc.var_names.tolist()), atol=1e-5)


def test_v1_checkpoint_uses_mean_pooling(tmp_path):
    ckpt = make_geneformer_checkpoint(tmp_path / "v1", dictionaries=hand_dictionaries("V1"), suffix="_gc30M")
    enc = geneformer.load(model_path=ckpt)
    assert enc.tokenizer.version == "V1" and enc.emb_mode == "cell"
    emb = enc.embed(sp.csr_matrix([[3, 1, 0, 2], [0, 0, 5, 1]]), ["GA", "GB", "GC", "GD"])
    assert emb.shape == (2, 32)
    with pytest.raises(InputError, match="emb_mode"):
        geneformer.GeneformerEncoder(enc.bert, enc.tokenizer, emb_mode="cls")


def test_cells_without_vocabulary_genes_are_reported(encoder):
    known = [g for g in encoder.tokenizer.dicts.name_id if encoder.tokenizer.ensembl_id(g)][:2]
    with pytest.raises(InputError, match="rows \\[1\\]"):
        encoder.embed(sp.csr_matrix([[4, 1, 0], [0, 0, 7]]), [*known, "NOT_A_GENE"])


def test_broken_checkpoints_raise_model_unavailable(geneformer_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(geneformer_dir, bad)
    for p in bad.glob("token_dictionary*.pkl"):
        p.unlink()
    from .conftest import write_pickles

    write_pickles(bad, hand_dictionaries("V1"), "_gc30M")  # a V1 set beside an incomplete V2 set
    with pytest.raises(ModelUnavailableError, match="vocabulary"):
        geneformer.load(model_path=bad)
    assert not geneformer.status(Settings(), bad)["usable"]

    lfs = tmp_path / "lfs"
    shutil.copytree(geneformer_dir, lfs)
    (lfs / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(ModelUnavailableError) as err:
        geneformer.load(model_path=lfs)
    assert "git lfs" in err.value.fix

    truncated = tmp_path / "truncated"
    shutil.copytree(geneformer_dir, truncated)
    from safetensors.torch import load_file, save_file

    state = load_file(str(truncated / "model.safetensors"))
    save_file({k: v for k, v in state.items() if ".layer.1." not in k}, str(truncated / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ModelUnavailableError, match="lack"):
        geneformer.load(model_path=truncated)


def test_missing_checkpoint_says_how_to_install(tmp_path):
    st = geneformer.status(Settings(models_dir=tmp_path), None)
    assert not st["usable"] and st["path"] == str(tmp_path / "geneformer")
    with pytest.raises(ModelUnavailableError) as err:
        geneformer.load(settings=Settings(models_dir=tmp_path))
    assert err.value.status_code == 409
    assert str(tmp_path / "geneformer") in err.value.message
    assert "pip install 'cellatlas[foundation]'" in err.value.fix
    assert "config.json" in err.value.fix and "token_dictionary" in err.value.fix


def test_mixed_precision_path(encoder, pbmc):
    """The autocast path used on GPUs (bf16 here on CPU) gives nearly the fp32 embeddings."""
    bf16 = geneformer.GeneformerEncoder(encoder.bert, encoder.tokenizer, precision="bf16")
    in_memory = geneformer.GeneformerEncoder(encoder.bert, encoder.tokenizer)  # fingerprint from the tensors
    assert str(bf16.dtype) == "torch.bfloat16" and bf16.fingerprint() == in_memory.fingerprint()
    a, b = encoder.embed(pbmc.X[:6], pbmc.var_names.tolist()), bf16.embed(pbmc.X[:6], pbmc.var_names.tolist())
    assert b.dtype == np.float32 and np.min(np.sum(a * b, axis=1)) > 0.98
    with pytest.raises(InputError, match="precision"):
        geneformer.GeneformerEncoder(encoder.bert, encoder.tokenizer, precision="fp8")
