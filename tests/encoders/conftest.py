"""Fixtures for the foundation-model encoder tests.

Checkpoints are created here, tiny and randomly initialised, in the exact file
layout of the published ones, then loaded back through the real loading code:

* Geneformer: ``BertForMaskedLM(config).save_pretrained(dir)`` + the four
  dictionary pickles (the real gc95M ones when ../shared/data is present, a
  small hand-made set otherwise);
* scGPT: ``vocab.json`` (the real census vocabulary when present), ``args.json``
  and a ``best_model.pt`` whose keys use the published flash-attn names
  (``self_attn.Wqkv.*``) and include the decoder heads.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(os.environ.get("CELLATLAS_SHARED_DATA") or Path(__file__).resolve().parents[2].parent / "shared" / "data")
FM = SHARED / "foundation_models"
PBMC = SHARED / "datasets" / "human_pbmc3k_10xv1_seurat_labels.h5ad"
TINY_INPUT = 256  # tiny checkpoints read at most this many tokens per cell (keeps CPU tests fast)


def needs_shared(path: Path) -> None:
    """Skip the calling test when a shared data file is absent."""
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")


def write_pickles(directory: Path, dicts: dict[str, dict], suffix: str = "") -> None:
    """Write the four Geneformer dictionaries as pickles named like the published ones."""
    names = {"token": "token_dictionary", "median": "gene_median_dictionary",
             "name_id": "gene_name_id_dict", "ensembl": "ensembl_mapping_dict"}
    directory.mkdir(parents=True, exist_ok=True)
    for kind, name in names.items():
        with open(directory / f"{name}{suffix}.pkl", "wb") as fh:
            pickle.dump(dicts[kind], fh)


def hand_dictionaries(version: str = "V2") -> dict[str, dict]:
    """Four genes A-D (ENSG...1-4) plus the special tokens of ``version``."""
    special = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if version == "V2" else [])
    token = {t: i for i, t in enumerate(special)}
    ens = [f"ENSG0000000000{i}" for i in range(1, 5)]
    for e in ens:
        token[e] = len(token)
    return {
        "token": token,
        "median": dict(zip(ens, [1.0, 2.0, 0.4, 4.0])),
        "name_id": dict(zip(["GA", "GB", "GC", "GD"], ens)),
        # upstream collapses ids through this map; "ENSG00000000009" is an old id merged into A
        "ensembl": {**{e: e for e in ens}, "ENSG00000000009": ens[0]},
    }


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def pbmc():
    """60 PBMC3k cells (raw counts), 6-7 of each of the 9 labels, and their gene symbols."""
    needs_shared(PBMC)
    import anndata as ad

    adata = ad.read_h5ad(PBMC)
    rng = np.random.default_rng(0)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    rows = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == lab), min(7, (labels == lab).sum()), replace=False)
                                   for lab in np.unique(labels)]))
    return adata[rows].copy()


def _dictionaries_for_checkpoint() -> tuple[dict[str, dict], str]:
    real = FM / "geneformer_dictionaries" / "gc95M"
    if real.is_dir():
        out = {}
        for kind, name in (("token", "token_dictionary"), ("median", "gene_median_dictionary"),
                           ("name_id", "gene_name_id_dict"), ("ensembl", "ensembl_mapping_dict")):
            with open(real / f"{name}_gc95M.pkl", "rb") as fh:
                out[kind] = pickle.load(fh)
        return out, "_gc95M"
    return hand_dictionaries("V2"), ""


def make_geneformer_checkpoint(directory: Path, *, seed: int = 0, dictionaries=None, suffix: str | None = None,
                               layers: int = 2, safetensors: bool = True) -> Path:
    """A tiny random Geneformer-layout checkpoint in ``directory``."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    if dictionaries is None:
        dictionaries, suffix = _dictionaries_for_checkpoint()
    config = BertConfig(
        vocab_size=len(dictionaries["token"]), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=TINY_INPUT, hidden_act="relu", pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = BertForMaskedLM(config)
    if safetensors:
        model.save_pretrained(directory)
    else:  # the legacy layout of older published checkpoints: config.json + pytorch_model.bin
        config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    write_pickles(directory, dictionaries, suffix or "")
    return directory


@pytest.fixture(scope="session")
def geneformer_dir(tmp_path_factory, torch):
    pytest.importorskip("transformers")
    return make_geneformer_checkpoint(tmp_path_factory.mktemp("gf") / "geneformer")


def scgpt_vocab() -> dict[str, int]:
    real = FM / "scgpt" / "default_census_vocab.json"
    if real.is_file():
        return json.loads(real.read_text())
    return {g: i for i, g in enumerate(["GA", "GB", "GC", "GD", "CD3E", "MS4A1", "LYZ"])}


SCGPT_ARGS = {"embsize": 32, "nheads": 4, "d_hid": 48, "nlayers": 2, "n_layers_cls": 3, "dropout": 0.2,
              "pad_token": "<pad>", "pad_value": -2, "n_bins": 51, "input_emb_style": "continuous"}


def published_scgpt_state(torch, ntoken: int, args: dict = SCGPT_ARGS, seed: int = 0) -> dict:
    """Random tensors under the parameter names of a published scGPT ``best_model.pt``.

    Names as saved by ``scgpt/model/model.py`` ``TransformerModel(do_mvc=True,
    use_fast_transformer=True)`` with flash-attn v1 ``FlashMHA`` layers.
    """
    g = torch.Generator().manual_seed(seed)
    d, h = args["embsize"], args["d_hid"]

    def t(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    state = {
        "encoder.embedding.weight": t(ntoken, d), "encoder.enc_norm.weight": 1 + t(d), "encoder.enc_norm.bias": t(d),
        "value_encoder.linear1.weight": t(d, 1), "value_encoder.linear1.bias": t(d),
        "value_encoder.linear2.weight": t(d, d), "value_encoder.linear2.bias": t(d),
        "value_encoder.norm.weight": 1 + t(d), "value_encoder.norm.bias": t(d),
    }
    for i in range(args["nlayers"]):
        p = f"transformer_encoder.layers.{i}."
        state.update({
            p + "self_attn.Wqkv.weight": t(3 * d, d), p + "self_attn.Wqkv.bias": t(3 * d),
            p + "self_attn.out_proj.weight": t(d, d), p + "self_attn.out_proj.bias": t(d),
            p + "linear1.weight": t(h, d), p + "linear1.bias": t(h), p + "linear2.weight": t(d, h), p + "linear2.bias": t(d),
            p + "norm1.weight": 1 + t(d), p + "norm1.bias": t(d), p + "norm2.weight": 1 + t(d), p + "norm2.bias": t(d),
        })
    state.update({
        "decoder.fc.0.weight": t(d, d), "decoder.fc.0.bias": t(d), "decoder.fc.2.weight": t(d, d),
        "decoder.fc.2.bias": t(d), "decoder.fc.4.weight": t(1, d), "decoder.fc.4.bias": t(1),
        "mvc_decoder.gene2query.weight": t(d, d), "mvc_decoder.gene2query.bias": t(d), "mvc_decoder.W.weight": t(d, d),
    })
    return state


def make_scgpt_checkpoint(directory: Path, torch, *, seed: int = 0) -> Path:
    """A tiny random scGPT-layout checkpoint folder."""
    from cellatlas.encoders.scgpt_tokenizer import load_vocab

    directory.mkdir(parents=True, exist_ok=True)
    raw = scgpt_vocab()
    (directory / "vocab.json").write_text(json.dumps(raw))
    vocab = load_vocab(directory / "vocab.json")  # + <pad>, <cls>, <eoc>
    (directory / "args.json").write_text(json.dumps(SCGPT_ARGS))
    torch.save(published_scgpt_state(torch, len(vocab), seed=seed), directory / "best_model.pt")
    return directory


@pytest.fixture(scope="session")
def scgpt_dir(tmp_path_factory, torch):
    return make_scgpt_checkpoint(tmp_path_factory.mktemp("sg") / "scgpt", torch)


@pytest.fixture(scope="session")
def models_dir(geneformer_dir, scgpt_dir, tmp_path_factory):
    """A CELLATLAS_MODELS_DIR holding both tiny checkpoints (as symlinks)."""
    root = tmp_path_factory.mktemp("models")
    (root / "geneformer").symlink_to(geneformer_dir, target_is_directory=True)
    (root / "scgpt").symlink_to(scgpt_dir, target_is_directory=True)
    return root
