"""scGPT encoder: binned expression through the scGPT transformer, ``<cls>`` embedding.

Checkpoint folder (``$CELLATLAS_MODELS_DIR/scgpt`` or an explicit path), as
distributed by bowang-lab/scGPT (e.g. ``scGPT_human``): ``vocab.json``,
``args.json``, ``best_model.pt``. Loading mirrors ``scgpt.tasks.embed_data``:
vocabulary with ``<pad>``/``<cls>``/``<eoc>``, model shaped by ``args.json``,
weights through ``load_pretrained``'s flash-attn renaming
(:mod:`cellatlas.encoders.scgpt_model`); the embedding is the ``<cls>`` state,
L2-normalised, as in ``get_batch_cell_embeddings``. Tokenisation details and
the two deterministic departures are in :mod:`cellatlas.encoders.scgpt_tokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from cellatlas.config import Settings, get_settings
from cellatlas.encoders import _foundation as fnd
from cellatlas.encoders.scgpt_tokenizer import MAX_LENGTH, N_BINS, ScGPTTokenizer, load_vocab
from cellatlas.errors import InputError, ModelUnavailableError

NAME = "scgpt"
FILES = "vocab.json, args.json, best_model.pt"
_CACHE = fnd.ModelCache(size=2)


def read_args(directory: Path) -> dict[str, Any]:
    """The checkpoint's ``args.json``."""
    try:
        args = json.loads((directory / "args.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelUnavailableError(
            f"Cannot read {directory / 'args.json'}: {err}.", fix=fnd.install_fix(NAME, FILES), field="model"
        ) from err
    if not isinstance(args, dict):
        raise ModelUnavailableError(f"{directory / 'args.json'} is not a JSON object.", fix=fnd.install_fix(NAME, FILES), field="model")
    return args


def _check_directory(directory: Path) -> None:
    fnd.check_files(NAME, directory, {f: [directory / f] for f in FILES.split(", ")}, fnd.install_fix(NAME, FILES))


def status(settings: Settings, model_path: str | Path | None = None) -> dict[str, Any]:
    """Whether scGPT can run here and why not (cheap: the weights are not read)."""
    directory = fnd.resolve_model_dir(NAME, settings, model_path)

    def probe() -> str:
        fnd.require_packages(NAME, ("torch",), FILES)
        _check_directory(directory)
        args = read_args(directory)
        vocab = load_vocab(directory / "vocab.json")
        return (
            f"scGPT: {args.get('nlayers')} layers, {args.get('embsize')} d, {args.get('nheads')} heads, "
            f"vocabulary {len(vocab):,}"
        )

    return fnd.status_from(NAME, probe, directory, settings, model_path is not None)


def load(
    *,
    atlas: Any = None,
    model_path: str | Path | None = None,
    settings: Settings | None = None,
    device: str | None = None,
    precision: str | None = None,
    max_length: int = MAX_LENGTH,
    sampling: bool = False,
    seed: int = 0,
    batch_tokens: int | None = None,
    **_: Any,
) -> "ScGPTEncoder":
    """Load the scGPT checkpoint (cached) from ``model_path`` or ``$CELLATLAS_MODELS_DIR/scgpt``.

    Parameters
    ----------
    atlas
        Unused (accepted for the registry's uniform call).
    device, precision
        As for Geneformer: ``auto`` = GPU with bf16/fp16 autocast when available, else CPU fp32.
    max_length
        Tokens per cell including ``<cls>`` (upstream ``embed_data`` default: 1,200).
    sampling, seed
        Upstream's random gene sampling for long cells (off: keep the most expressed genes).

    Raises
    ------
    ModelUnavailableError
        torch missing, or the folder lacks one of vocab.json, args.json, best_model.pt.
    """
    s = settings or get_settings()
    directory = fnd.resolve_model_dir(NAME, s, model_path)
    fnd.require_packages(NAME, ("torch",), FILES)
    _check_directory(directory)
    options = {
        "device": device, "precision": precision, "max_length": max_length,
        "sampling": sampling, "seed": seed, "batch_tokens": batch_tokens,
    }
    return _CACHE.get_or_load(fnd.ModelCache.key(directory, options), lambda: _load(directory, **options))


def _load(directory: Path, *, max_length: int, sampling: bool, seed: int, **options: Any) -> "ScGPTEncoder":
    from cellatlas.encoders import scgpt_model

    args = read_args(directory)
    vocab = load_vocab(directory / "vocab.json")
    state = scgpt_model.read_state_dict(directory / "best_model.pt")
    emb = state.get("encoder.embedding.weight", state.get("module.encoder.embedding.weight"))
    ntoken = int(emb.shape[0]) if emb is not None else len(vocab)
    if max(vocab.values()) >= ntoken:
        raise ModelUnavailableError(
            f"vocab.json has ids up to {max(vocab.values())} but best_model.pt embeds only {ntoken} tokens.",
            fix="Use the vocab.json saved with this best_model.pt.", field="model",
        )
    pad_token = args.get("pad_token", "<pad>")
    model = scgpt_model.build_model(args, ntoken, vocab[pad_token])
    scgpt_model.load_published(model, state)
    tokenizer = ScGPTTokenizer(
        vocab, n_bins=int(args.get("n_bins", N_BINS)), max_length=max_length, pad_token=pad_token,
        pad_value=float(args.get("pad_value", -2)), sampling=sampling, seed=seed,
    )
    digests = [fnd.file_digest(directory / f) for f in FILES.split(", ")]
    return ScGPTEncoder(model, tokenizer, weights_digest=":".join(digests), **options)


class ScGPTEncoder:
    """Embed cells with an scGPT model.

    Parameters
    ----------
    model
        An :class:`~cellatlas.encoders.scgpt_model.ScGPTModel` with weights loaded.
    tokenizer
        The :class:`~cellatlas.encoders.scgpt_tokenizer.ScGPTTokenizer` of its vocabulary.
    weights_digest
        Digest of the checkpoint files (computed from the tensors if omitted).
    """

    name = NAME

    def __init__(
        self,
        model: Any,
        tokenizer: ScGPTTokenizer,
        *,
        device: str | None = None,
        precision: str | None = None,
        batch_tokens: int | None = None,
        weights_digest: str | None = None,
    ) -> None:
        from cellatlas.encoders._torch import pick_device, pick_dtype, tensor_digest

        self.model = model
        self.tokenizer = tokenizer
        self.dim = int(model.d_model)
        self.device = pick_device(device)
        self.dtype = pick_dtype(precision, self.device)
        self.batch_tokens = int(batch_tokens or (65_536 if self.device.type == "cuda" else 16_384))
        self.model.to(self.device).eval()
        self._digest = weights_digest or tensor_digest(self.model.state_dict())

    def embed(self, counts: sp.spmatrix, genes: Sequence[str]) -> np.ndarray:
        """Bin raw counts and return L2-normalised ``<cls>`` embeddings ``[n_cells, dim]`` (input order).

        Raises
        ------
        InputError
            If a cell expresses no gene of the vocabulary (only ``<cls>`` would be embedded).
        """
        genes_ids, values = self.tokenizer.tokenize(counts, genes)
        empty = [i for i, g in enumerate(genes_ids) if len(g) <= 1]
        if empty:
            raise InputError(
                f"{len(empty)} cell(s) express none of the scGPT vocabulary genes (rows {empty[:10]}), "
                "so they have nothing to embed.",
                fix="Remove empty cells first (e.g. scanpy.pp.filter_cells(adata, min_genes=1)) or check the gene names.",
                field="matrix", details={"rows": empty[:100]},
            )
        return self.embed_tokens(genes_ids, values)

    def embed_tokens(self, gene_ids: Sequence[np.ndarray], values: Sequence[np.ndarray]) -> np.ndarray:
        """Embed pre-tokenised cells (output of :meth:`ScGPTTokenizer.tokenize`)."""
        from cellatlas.encoders._torch import autocast, import_torch

        torch = import_torch(NAME)
        tk = self.tokenizer
        out = np.zeros((len(gene_ids), self.dim), dtype=np.float32)
        batches = fnd.length_batches([len(g) for g in gene_ids], max_tokens=self.batch_tokens, max_cells=256)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            for idx in batches:
                genes = torch.from_numpy(fnd.pad_rows([gene_ids[i] for i in idx], tk.pad_id, np.int64)).to(self.device)
                vals = torch.from_numpy(fnd.pad_rows([values[i] for i in idx], tk.pad_value, np.float32)).to(self.device)
                out[idx] = self.model.cell_embedding(genes, vals, genes.eq(tk.pad_id)).float().cpu().numpy()
        return fnd.l2_normalise(out)

    def fingerprint(self) -> str:
        """Hash of the checkpoint files and the binning/length settings."""
        tk = self.tokenizer
        settings = {"n_bins": tk.n_bins, "max_length": tk.max_length, "sampling": tk.sampling, "seed": tk.seed if tk.sampling else None}
        return fnd.fingerprint_of(NAME, settings, [self._digest])

    def gene_coverage(self, genes: Sequence[str]) -> float:
        """Fraction of the vocabulary's genes present in ``genes``."""
        return self.tokenizer.gene_coverage(genes)

    def describe(self) -> dict[str, Any]:
        """Provenance: sizes, length, device and precision."""
        return {
            "model": NAME, "dim": self.dim, "layers": len(self.model.transformer_encoder.layers),
            "max_length": self.tokenizer.max_length, "n_bins": self.tokenizer.n_bins,
            "device": str(self.device), "precision": str(self.dtype).replace("torch.", ""),
            "fingerprint": self.fingerprint(),
        }


def clear_cache() -> None:
    """Forget loaded scGPT models (e.g. after replacing the checkpoint files)."""
    _CACHE.clear()
