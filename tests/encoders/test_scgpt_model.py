"""scGPT: published state-dict names, the torch re-implementation, and embeddings of real cells."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.sparse as sp

from cellatlas.config import Settings
from cellatlas.encoders import scgpt
from cellatlas.errors import InputError, ModelUnavailableError

from .conftest import SCGPT_ARGS, make_scgpt_checkpoint, published_scgpt_state

# Every tensor of a published whole-human best_model.pt that the embedding needs, layer 0
# (flash-attn v1 layer names; layers 1..11 repeat the layer-0 names).
PUBLISHED_NEEDED = [
    "encoder.embedding.weight", "encoder.enc_norm.weight", "encoder.enc_norm.bias",
    "value_encoder.linear1.weight", "value_encoder.linear1.bias", "value_encoder.linear2.weight",
    "value_encoder.linear2.bias", "value_encoder.norm.weight", "value_encoder.norm.bias",
    "transformer_encoder.layers.0.self_attn.Wqkv.weight", "transformer_encoder.layers.0.self_attn.Wqkv.bias",
    "transformer_encoder.layers.0.self_attn.out_proj.weight", "transformer_encoder.layers.0.self_attn.out_proj.bias",
    "transformer_encoder.layers.0.linear1.weight", "transformer_encoder.layers.0.linear1.bias",
    "transformer_encoder.layers.0.linear2.weight", "transformer_encoder.layers.0.linear2.bias",
    "transformer_encoder.layers.0.norm1.weight", "transformer_encoder.layers.0.norm1.bias",
    "transformer_encoder.layers.0.norm2.weight", "transformer_encoder.layers.0.norm2.bias",
]


@pytest.fixture(scope="module")
def model_mod(torch):
    from cellatlas.encoders import scgpt_model

    return scgpt_model


@pytest.fixture(scope="module")
def encoder(scgpt_dir):
    return scgpt.load(model_path=scgpt_dir, settings=Settings())


def test_whole_human_shapes_load_from_published_names(model_mod, torch):
    """The published whole-human configuration (12 layers, 512 d, 8 heads, 60,697 tokens) loads strictly."""
    args = {**SCGPT_ARGS, "embsize": 512, "nheads": 8, "d_hid": 512, "nlayers": 12}
    model = model_mod.build_model(args, ntoken=60_697, pad_id=60_694)
    renamed = {model_mod.rename_key(k) for k in PUBLISHED_NEEDED}
    own = set(model.state_dict())
    assert renamed <= own
    assert own == {k.replace("layers.0.", f"layers.{i}.") for k in renamed for i in range(12)}
    assert sum(p.numel() for p in model.parameters()) > 50_000_000  # ~51M incl. the 31M gene embedding
    assert model_mod.rename_key("module.transformer_encoder.layers.3.self_attn._impl.Wqkv.weight") == (
        "transformer_encoder.layers.3.self_attn.in_proj_weight"
    )


def test_load_published_renames_and_skips_heads(model_mod, torch):
    state = published_scgpt_state(torch, ntoken=50)
    model = model_mod.build_model(SCGPT_ARGS, ntoken=50, pad_id=0)
    report = model_mod.load_published(model, state)
    assert report["renamed"] == sorted(k for k in state if ".Wqkv." in k)
    assert report["skipped"] and all(k.startswith(("decoder.", "mvc_decoder.")) for k in report["skipped"])
    loaded = model.state_dict()
    assert torch.equal(loaded["transformer_encoder.layers.1.self_attn.in_proj_weight"],
                       state["transformer_encoder.layers.1.self_attn.Wqkv.weight"])
    del state["value_encoder.norm.bias"]
    with pytest.raises(ModelUnavailableError, match="value_encoder.norm.bias"):
        model_mod.load_published(model_mod.build_model(SCGPT_ARGS, 50, 0), state)


def test_layers_compute_exactly_torch_transformer_encoder(model_mod, torch):
    """Upstream's non-flash path is torch.nn.TransformerEncoder; ours must give the same outputs."""
    torch.manual_seed(0)
    for pre_norm in (False, True):
        ref = torch.nn.TransformerEncoder(
            torch.nn.TransformerEncoderLayer(32, 4, 48, 0.2, batch_first=True, norm_first=pre_norm), 2,
            enable_nested_tensor=False,
        ).eval()
        ours = model_mod.TransformerEncoder(2, d_model=32, nhead=4, d_hid=48, dropout=0.2, pre_norm=pre_norm).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        x = torch.randn(3, 9, 32)
        pad = torch.zeros(3, 9, dtype=torch.bool)
        pad[1, 5:] = True
        with torch.no_grad():
            a, b = ref(x, src_key_padding_mask=pad), ours(x, src_key_padding_mask=pad)
        assert torch.allclose(a[~pad], b[~pad], atol=1e-5)


def test_embedding_is_the_normalised_cls_state_of_encode(encoder, torch):
    """Upstream get_batch_cell_embeddings: model._encode(...)[:, 0, :] / its L2 norm."""
    model, tk = encoder.model, encoder.tokenizer
    genes = list(tk.vocab)[:3]
    x = sp.csr_matrix([[5, 0, 2], [1, 1, 0]])
    ids, vals = tk.tokenize(x, genes)
    with torch.no_grad():
        g = torch.tensor(ids[0])[None]
        h = model.encoder(g) + model.value_encoder(torch.tensor(vals[0])[None])
        for layer in model.transformer_encoder.layers:
            h = layer(h, None)
        cls = h[0, 0].numpy()
    assert np.allclose(encoder.embed(x, genes)[0], cls / np.linalg.norm(cls), atol=1e-5)


def test_embeds_real_cells(scgpt_dir, pbmc):
    genes = pbmc.var_names.tolist()
    x = sp.csr_matrix(pbmc.X)
    short = scgpt.load(model_path=scgpt_dir, max_length=128)
    emb = short.embed(x, genes)
    assert emb.shape == (pbmc.n_obs, 32) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert np.unique(emb.round(5), axis=0).shape[0] == pbmc.n_obs
    assert np.allclose(short.embed(x[::-1], genes)[::-1], emb, atol=1e-5)  # deterministic, order kept
    rebatched = scgpt.ScGPTEncoder(short.model, short.tokenizer, batch_tokens=200)
    assert np.allclose(rebatched.embed(x[:10], genes), emb[:10], atol=1e-5)
    assert 0 < short.gene_coverage(genes) < 1


def test_fingerprint_tracks_weights_and_settings(encoder, scgpt_dir, tmp_path, torch):
    assert encoder.fingerprint() == scgpt.load(model_path=scgpt_dir).fingerprint()
    assert encoder.fingerprint() != scgpt.load(model_path=scgpt_dir, max_length=600).fingerprint()
    other = make_scgpt_checkpoint(tmp_path / "other", torch, seed=1)
    assert scgpt.load(model_path=other).fingerprint() != encoder.fingerprint()


def test_broken_checkpoints(scgpt_dir, tmp_path, torch):
    assert scgpt.status(Settings(), scgpt_dir)["usable"]
    small = tmp_path / "small-embedding"
    shutil.copytree(scgpt_dir, small)
    state = torch.load(small / "best_model.pt")
    state["encoder.embedding.weight"] = state["encoder.embedding.weight"][:10]
    torch.save(state, small / "best_model.pt")
    with pytest.raises(ModelUnavailableError, match="vocab.json"):
        scgpt.load(model_path=small)

    no_args = tmp_path / "no-args"
    shutil.copytree(scgpt_dir, no_args)
    (no_args / "args.json").unlink()
    st = scgpt.status(Settings(), no_args)
    assert not st["usable"] and "args.json" in st["reason"]

    bad_args = tmp_path / "bad-args"
    shutil.copytree(scgpt_dir, bad_args)
    (bad_args / "args.json").write_text(json.dumps({**SCGPT_ARGS, "input_emb_style": "category"}))
    with pytest.raises(ModelUnavailableError, match="category"):
        scgpt.load(model_path=bad_args)


def test_cells_without_vocabulary_genes_are_reported(encoder):
    genes = [list(encoder.tokenizer.vocab)[0], "NOT_A_GENE"]
    with pytest.raises(InputError, match="rows \\[0\\]"):
        encoder.embed(sp.csr_matrix([[0, 3], [2, 0]]), genes)


def test_mixed_precision_path(encoder):
    """The autocast path used on GPUs (bf16 here on CPU) gives nearly the fp32 embeddings."""
    bf16 = scgpt.ScGPTEncoder(encoder.model, encoder.tokenizer, precision="bf16")
    genes = list(encoder.tokenizer.vocab)[:40]
    x = sp.csr_matrix(np.random.default_rng(0).poisson(1.0, (5, 40)).astype(np.float32))
    a, b = encoder.embed(x, genes), bf16.embed(x, genes)
    assert b.dtype == np.float32 and np.min(np.sum(a * b, axis=1)) > 0.98
