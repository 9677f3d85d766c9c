"""Geneformer encoder: rank-value tokens through a Hugging Face BERT checkpoint.

Checkpoint directory (``$CELLATLAS_MODELS_DIR/geneformer`` or an explicit path):
``config.json`` + ``model.safetensors`` or ``pytorch_model.bin`` (the files of
e.g. ``ctheodoris/Geneformer/Geneformer-V2-104M``) + the four dictionary
pickles (``token_dictionary*``, ``gene_median_dictionary*``,
``gene_name_id_dict*``, ``ensembl_mapping_dict*``). V1 vs V2 is read from the
dictionaries (``<cls>``/``<eos>`` present -> V2) and checked against the
checkpoint's vocabulary size.

Embedding, after ``geneformer/emb_extractor.py`` (``get_embs``) and
``perturber_utils.load_model``: ``BertForMaskedLM.from_pretrained(dir,
output_hidden_states=True)``; layer ``hidden_states[num_layers + emb_layer]``
(``emb_layer=-1``: second to last, upstream's default; ``0``: last);
``emb_mode="cls"`` takes the ``<cls>`` state (upstream's V2 default),
``"cell"`` the mean over gene tokens (excluding ``<cls>``/``<eos>``, the only
mode for V1). Unlike upstream: every cell is embedded (no ``max_ncells``
subsample), output rows keep the input order, the device is chosen (GPU with
bf16/fp16 autocast, else CPU fp32), and rows are L2-normalised (cosine kNN).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from cellatlas.config import Settings, get_settings
from cellatlas.encoders import _foundation as fnd
from cellatlas.encoders.geneformer_tokenizer import (
    GeneformerDictionaries,
    GeneformerTokenizer,
    find_dictionary_files,
)
from cellatlas.errors import InputError, ModelUnavailableError

NAME = "geneformer"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
FILES = (
    "config.json, model.safetensors or pytorch_model.bin, token_dictionary*.pkl, "
    "gene_median_dictionary*.pkl, gene_name_id_dict*.pkl, ensembl_mapping_dict*.pkl"
)
EMB_MODES = ("cls", "cell")
PACKAGES = ("torch", "transformers", "safetensors")
_CACHE = fnd.ModelCache(size=2)


# ----------------------------------------------------------------- checkpoint
def read_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of a BERT checkpoint, checked to be a BERT model."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelUnavailableError(
            f"Cannot read {directory / 'config.json'}: {err}.", fix=fnd.install_fix(NAME, FILES), field="model"
        ) from err
    if config.get("model_type") != "bert":
        raise ModelUnavailableError(
            f"{directory / 'config.json'} describes a '{config.get('model_type')}' model, not a Geneformer BERT.",
            fix="Point to a Geneformer checkpoint directory (model_type 'bert').", field="model",
        )
    absent = [k for k in ("vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers") if not isinstance(config.get(k), int)]
    if absent:
        raise ModelUnavailableError(
            f"{directory / 'config.json'} lacks {', '.join(absent)}.",
            fix="Use the config.json that came with the Geneformer weights.", field="model",
        )
    return config


def _check_directory(directory: Path) -> None:
    fnd.check_files(
        NAME, directory,
        {"config.json": [directory / "config.json"], "weights (model.safetensors or pytorch_model.bin)": [directory / f for f in WEIGHT_FILES]},
        fnd.install_fix(NAME, FILES),
    )


def load_dictionaries(directory: Path, vocab_size: int) -> GeneformerDictionaries:
    """The dictionary set in ``directory`` that matches the checkpoint's ``vocab_size``."""
    files = find_dictionary_files(directory, vocab_size)
    for path in files.values():
        if fnd.is_lfs_pointer(path):
            raise ModelUnavailableError(
                f"{path} is a Git-LFS pointer, not the dictionary.",
                fix="Run `git lfs pull` in the Geneformer repository and copy the real .pkl files.", field="model",
            )
    dicts = GeneformerDictionaries.from_files(files)
    _check_vocab(len(dicts.token), vocab_size, files["token"])
    return dicts


def _check_vocab(n_tokens: int, vocab_size: Any, token_file: Path) -> None:
    if n_tokens != vocab_size:
        raise ModelUnavailableError(
            f"The token dictionary {token_file.name} has {n_tokens:,} entries but the checkpoint's vocabulary "
            f"has {vocab_size:,} (V1 models use the gc30M dictionaries, V2 the gc95M/gc104M ones).",
            fix="Put the dictionaries that belong to this model version in the checkpoint directory.", field="model",
        )


def status(settings: Settings, model_path: str | Path | None = None) -> dict[str, Any]:
    """Whether Geneformer can run here and why not (cheap: nothing is loaded)."""
    directory = fnd.resolve_model_dir(NAME, settings, model_path)

    def probe() -> str:
        fnd.require_packages(NAME, PACKAGES, FILES)
        _check_directory(directory)
        config = read_config(directory)
        files = find_dictionary_files(directory, config.get("vocab_size"))
        n_tokens, version = _token_summary(files["token"])
        _check_vocab(n_tokens, config.get("vocab_size"), files["token"])
        return (
            f"Geneformer {version}: {config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}, "
            f"input {config.get('max_position_embeddings')}, dictionaries {files['token'].name}"
        )

    return fnd.status_from(NAME, probe, directory, settings, model_path is not None)


def _token_summary(token_file: Path) -> tuple[int, str]:
    import pickle

    try:
        with open(token_file, "rb") as fh:
            token = pickle.load(fh)
    except Exception as err:
        raise ModelUnavailableError(f"Cannot read {token_file}: {err}.", fix="Copy the real dictionary file (git lfs pull).") from err
    return len(token), ("V2" if "<cls>" in token and "<eos>" in token else "V1")


def load(
    *,
    atlas: Any = None,
    model_path: str | Path | None = None,
    settings: Settings | None = None,
    device: str | None = None,
    precision: str | None = None,
    emb_mode: str | None = None,
    emb_layer: int = -1,
    batch_tokens: int | None = None,
    **_: Any,
) -> "GeneformerEncoder":
    """Load the Geneformer checkpoint (cached) from ``model_path`` or ``$CELLATLAS_MODELS_DIR/geneformer``.

    Parameters
    ----------
    atlas
        Unused (accepted for the registry's uniform call).
    device, precision
        ``auto`` (GPU with bf16/fp16 when available, else CPU fp32), ``cpu``, ``cuda``;
        ``fp32``, ``fp16``, ``bf16``.
    emb_mode, emb_layer
        Pooling (``cls`` default for V2, ``cell`` = mean over genes, forced for V1) and
        layer (``-1`` second to last, ``0`` last), as in Geneformer's ``EmbExtractor``.
    batch_tokens
        Padded tokens per forward batch (memory bound).

    Raises
    ------
    ModelUnavailableError
        torch/transformers missing, or the checkpoint directory incomplete.
    """
    s = settings or get_settings()
    directory = fnd.resolve_model_dir(NAME, s, model_path)
    fnd.require_packages(NAME, PACKAGES, FILES)
    _check_directory(directory)
    options = {"device": device, "precision": precision, "emb_mode": emb_mode, "emb_layer": emb_layer, "batch_tokens": batch_tokens}
    return _CACHE.get_or_load(fnd.ModelCache.key(directory, options), lambda: _load(directory, **options))


def _load(directory: Path, **options: Any) -> "GeneformerEncoder":
    from cellatlas.encoders._torch import import_transformers

    transformers = import_transformers(NAME)
    config = read_config(directory)
    dicts = load_dictionaries(directory, int(config["vocab_size"]))
    tokenizer = GeneformerTokenizer(dicts, input_size=int(config["max_position_embeddings"]))
    try:
        model, info = transformers.BertForMaskedLM.from_pretrained(
            str(directory), output_hidden_states=True, output_loading_info=True
        )
    except Exception as err:  # corrupt or truncated weights
        raise ModelUnavailableError(
            f"Cannot load the Geneformer weights in {directory}: {err}.", fix=fnd.install_fix(NAME, FILES), field="model"
        ) from err
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("cls."))
    if missing:
        raise ModelUnavailableError(
            f"The Geneformer weights in {directory} lack {len(missing)} encoder tensors (e.g. {', '.join(missing[:3])}).",
            fix="Re-download the complete model.safetensors / pytorch_model.bin.", field="model",
        )
    weights = next(directory / f for f in WEIGHT_FILES if (directory / f).is_file())
    digests = [fnd.file_digest(directory / "config.json"), fnd.file_digest(weights)]
    digests += [fnd.file_digest(p) for p in dicts.files.values()]
    return GeneformerEncoder(model, tokenizer, weights_digest=":".join(digests), **options)


# ----------------------------------------------------------------- encoder
class GeneformerEncoder:
    """Embed cells with a Geneformer BERT.

    Parameters
    ----------
    model
        A ``transformers`` ``BertForMaskedLM`` (or ``BertModel``).
    tokenizer
        The :class:`GeneformerTokenizer` built from the matching dictionaries.
    weights_digest
        Digest of the checkpoint files (computed from the tensors if omitted).
    """

    name = NAME

    def __init__(
        self,
        model: Any,
        tokenizer: GeneformerTokenizer,
        *,
        device: str | None = None,
        precision: str | None = None,
        emb_mode: str | None = None,
        emb_layer: int = -1,
        batch_tokens: int | None = None,
        weights_digest: str | None = None,
    ) -> None:
        from cellatlas.encoders._torch import pick_device, pick_dtype, tensor_digest

        self.tokenizer = tokenizer
        self.emb_mode = emb_mode or ("cls" if tokenizer.version == "V2" else "cell")
        if self.emb_mode not in EMB_MODES or (self.emb_mode == "cls" and tokenizer.version == "V1"):
            raise InputError(
                f"emb_mode '{self.emb_mode}' is not available for Geneformer {tokenizer.version}.",
                fix="Use 'cls' (V2 only) or 'cell' (mean over gene tokens).", field="emb_mode",
            )
        self.bert = getattr(model, "bert", model)
        self.n_layers = int(self.bert.config.num_hidden_layers)
        if not -self.n_layers <= int(emb_layer) <= 0:
            raise InputError(f"emb_layer must be in [-{self.n_layers}, 0].", fix="Use -1 (second to last) or 0 (last).", field="emb_layer")
        self.emb_layer = int(emb_layer)
        self.dim = int(self.bert.config.hidden_size)
        self.device = pick_device(device)
        self.dtype = pick_dtype(precision, self.device)
        self.batch_tokens = int(batch_tokens or (65_536 if self.device.type == "cuda" else 8_192))
        self.bert.to(self.device).eval()
        self._digest = weights_digest or tensor_digest(self.bert.state_dict())

    # ----------------------------------------------------------- protocol
    def embed(self, counts: sp.spmatrix, genes: Sequence[str]) -> np.ndarray:
        """Tokenise raw counts and return L2-normalised float32 embeddings ``[n_cells, dim]`` (input order).

        Raises
        ------
        InputError
            If a cell expresses no gene of the model's vocabulary (it has no tokens to embed).
        """
        tokens = self.tokenizer.tokenize(counts, genes)
        empty = [i for i, t in enumerate(tokens) if self.tokenizer.n_gene_tokens(t) == 0]
        if empty:
            raise InputError(
                f"{len(empty)} cell(s) express none of the Geneformer vocabulary genes (rows {empty[:10]}), "
                "so they have no tokens to embed.",
                fix="Remove empty cells first (e.g. scanpy.pp.filter_cells(adata, min_genes=1)) or check the gene names.",
                field="matrix", details={"rows": empty[:100]},
            )
        return self.embed_tokens(tokens)

    def embed_tokens(self, tokens: Sequence[np.ndarray]) -> np.ndarray:
        """Embed pre-tokenised cells (output of :meth:`GeneformerTokenizer.tokenize`)."""
        from cellatlas.encoders._torch import autocast, import_torch

        torch = import_torch(NAME)
        out = np.zeros((len(tokens), self.dim), dtype=np.float32)
        batches = fnd.length_batches([len(t) for t in tokens], max_tokens=self.batch_tokens, max_cells=256)
        layer = self.n_layers + self.emb_layer
        with torch.inference_mode(), autocast(self.device, self.dtype):
            for idx in batches:
                rows = [tokens[i] for i in idx]
                ids = torch.from_numpy(fnd.pad_rows(rows, self.tokenizer.pad_id, np.int64)).to(self.device)
                lengths = torch.tensor([len(r) for r in rows], device=self.device)
                attention = (torch.arange(ids.shape[1], device=self.device)[None, :] < lengths[:, None]).long()
                hidden = self.bert(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states[layer]
                out[idx] = self._pool(hidden.float(), lengths).cpu().numpy()
        return fnd.l2_normalise(out)

    def _pool(self, hidden: Any, lengths: Any) -> Any:
        if self.emb_mode == "cls":
            return hidden[:, 0, :]
        import torch

        pos = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
        first = 1 if self.tokenizer.special else 0
        last = lengths[:, None] - (1 if self.tokenizer.special else 0)  # exclusive: drops <eos>
        mask = ((pos >= first) & (pos < last)).to(hidden.dtype)
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)

    def fingerprint(self) -> str:
        """Hash of the weights, dictionaries and the tokenisation/pooling settings."""
        settings = {
            "version": self.tokenizer.version, "input_size": self.tokenizer.input_size,
            "emb_mode": self.emb_mode, "emb_layer": self.emb_layer, "normalised": True,
        }
        return fnd.fingerprint_of(NAME, settings, [self._digest])

    def gene_coverage(self, genes: Sequence[str]) -> float:
        """Fraction of the model's gene tokens present in ``genes``."""
        return self.tokenizer.gene_coverage(genes)

    def describe(self) -> dict[str, Any]:
        """Provenance: version, sizes, pooling, device and precision."""
        return {
            "model": NAME, "version": self.tokenizer.version, "layers": self.n_layers, "dim": self.dim,
            "input_size": self.tokenizer.input_size, "emb_mode": self.emb_mode, "emb_layer": self.emb_layer,
            "device": str(self.device), "precision": str(self.dtype).replace("torch.", ""),
            "fingerprint": self.fingerprint(),
        }


def clear_cache() -> None:
    """Forget loaded Geneformer models (e.g. after replacing the checkpoint files)."""
    _CACHE.clear()
