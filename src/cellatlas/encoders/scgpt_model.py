"""The scGPT transformer in plain torch, with the published parameter names.

Only the part that produces cell embeddings is built, after
``scgpt/model/model.py`` of bowang-lab/scGPT (``TransformerModel._encode``):
``GeneEncoder`` (``encoder.embedding``, ``encoder.enc_norm``) +
``ContinuousValueEncoder`` (``value_encoder.linear1/linear2/norm``) summed, then
the layers of upstream's non-flash path, ``torch.nn.TransformerEncoder`` of
``TransformerEncoderLayer`` (post-norm, ReLU, ``batch_first``), re-implemented
here with identical parameter names (``transformer_encoder.layers.N.self_attn.in_proj_weight``,
``...out_proj``, ``linear1``, ``linear2``, ``norm1``, ``norm2``) but attention
through ``scaled_dot_product_attention`` (torch's native MHA fast path is ~10x
slower on CPU with padding); the cell embedding is the ``<cls>`` state. No flash-attn: published checkpoints saved with
flash-attn layers (``self_attn.Wqkv.*``) are renamed on load with the rules of
``scgpt/utils/util.py:load_pretrained``. Heads that do not affect embeddings
(``decoder``, ``mvc_decoder``, ``cls_decoder``, ``flag_encoder``...) are
skipped.

This module imports torch; :mod:`cellatlas.encoders.scgpt` imports it lazily.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellatlas.errors import ModelUnavailableError

# scgpt/utils/util.py load_pretrained (non-flash target): flash-attn names -> torch MultiheadAttention names.
RENAME_RULES = {
    r"self_attn\._impl\.Wqkv\.": "self_attn.in_proj_",
    r"self_attn\.Wqkv\.": "self_attn.in_proj_",
    r"self_attn\._impl\.out_proj\.": "self_attn.out_proj.",
}
UNUSED_PREFIXES = (
    "decoder.", "mvc_decoder.", "cls_decoder.", "flag_encoder.", "grad_reverse_discriminator.",
    "batch_encoder.", "dsbn.", "bn.", "sim.", "creterion_cce.",
)


class GeneEncoder(nn.Module):
    """Gene-token embedding followed by LayerNorm (scGPT ``GeneEncoder``)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.enc_norm(self.embedding(x))


class ContinuousValueEncoder(nn.Module):
    """Binned value -> vector: Linear(1, d), ReLU, Linear(d, d), LayerNorm (scGPT ``ContinuousValueEncoder``)."""

    def __init__(self, d_model: int, dropout: float = 0.1, max_value: int = 512) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.max_value = max_value

    def forward(self, x: Tensor) -> Tensor:
        x = torch.clamp(x.unsqueeze(-1), max=self.max_value)
        return self.dropout(self.norm(self.linear2(self.activation(self.linear1(x)))))


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``torch.nn.MultiheadAttention``'s parameter names.

    ``in_proj_weight``/``in_proj_bias`` (packed q, k, v) and ``out_proj``; computed with
    ``scaled_dot_product_attention`` (memory-efficient kernels on CPU and GPU).
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model {d_model} is not divisible by nhead {nhead}")
        self.nhead = nhead
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        b, n, d = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.nhead, d // self.nhead).permute(2, 0, 3, 1, 4)
        keep = None if padding_mask is None else ~padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    """``torch.nn.TransformerEncoderLayer`` (ReLU, LayerNorm eps 1e-5, batch first), same parameter names."""

    def __init__(self, d_model: int, nhead: int, d_hid: int, dropout: float = 0.0, pre_norm: bool = False) -> None:
        super().__init__()
        self.self_attn = SelfAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _ff(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        if self.pre_norm:
            x = x + self.dropout1(self.self_attn(self.norm1(x), padding_mask))
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self.dropout1(self.self_attn(x, padding_mask)))
        return self.norm2(x + self._ff(x))


class TransformerEncoder(nn.Module):
    """A stack of :class:`EncoderLayer` under ``layers`` (``transformer_encoder.layers.N...``)."""

    def __init__(self, nlayers: int, **layer_kwargs: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**layer_kwargs) for _ in range(nlayers))

    def forward(self, x: Tensor, src_key_padding_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, src_key_padding_mask)
        return x


class ScGPTModel(nn.Module):
    """The embedding path of scGPT's ``TransformerModel``.

    Parameters
    ----------
    ntoken, d_model, nhead, d_hid, nlayers, dropout
        ``len(vocab)`` and ``args.json``'s ``embsize``, ``nheads``, ``d_hid``, ``nlayers``, ``dropout``.
    pad_id
        Vocabulary id of ``<pad>``.
    pre_norm
        ``args.json`` ``pre_norm`` (published whole-human models: post-norm).
    """

    def __init__(
        self, ntoken: int, d_model: int, nhead: int, d_hid: int, nlayers: int,
        dropout: float = 0.0, pad_id: int | None = None, pre_norm: bool = False,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.encoder = GeneEncoder(ntoken, d_model, padding_idx=pad_id)
        self.value_encoder = ContinuousValueEncoder(d_model, dropout)
        self.transformer_encoder = TransformerEncoder(
            nlayers, d_model=d_model, nhead=nhead, d_hid=d_hid, dropout=dropout, pre_norm=pre_norm
        )

    def encode(self, genes: Tensor, values: Tensor, padding_mask: Tensor) -> Tensor:
        """Hidden states ``[batch, seq, d_model]`` (``padding_mask`` True at padding)."""
        total = self.encoder(genes) + self.value_encoder(values)
        return self.transformer_encoder(total, src_key_padding_mask=padding_mask)

    def cell_embedding(self, genes: Tensor, values: Tensor, padding_mask: Tensor) -> Tensor:
        """The ``<cls>`` state ``[batch, d_model]`` (not yet normalised)."""
        return self.encode(genes, values, padding_mask)[:, 0, :]


def build_model(args: Mapping[str, Any], ntoken: int, pad_id: int) -> ScGPTModel:
    """An :class:`ScGPTModel` shaped by ``args.json``."""
    if args.get("input_emb_style", "continuous") != "continuous":
        raise ModelUnavailableError(
            f"scGPT input_emb_style '{args.get('input_emb_style')}' is not supported (only 'continuous', "
            "the style of the published pretrained models).",
            fix="Use a published scGPT checkpoint (whole-human or an organ model).", field="model",
        )
    try:
        return ScGPTModel(
            ntoken=ntoken, d_model=int(args["embsize"]), nhead=int(args["nheads"]), d_hid=int(args["d_hid"]),
            nlayers=int(args["nlayers"]), dropout=float(args.get("dropout", 0.0)), pad_id=pad_id,
            pre_norm=bool(args.get("pre_norm", False)),
        )
    except KeyError as err:
        raise ModelUnavailableError(
            f"scGPT args.json lacks {err}.", fix="Copy the args.json that came with best_model.pt.", field="model"
        ) from err


def rename_key(key: str) -> str:
    """One published (flash-attn, possibly DataParallel ``module.``) parameter name -> this module's name."""
    key = key.removeprefix("module.")
    for pattern, replacement in RENAME_RULES.items():
        key = re.sub(pattern, replacement, key)
    return key


def rename_published(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Published parameter names -> this module's names (see :data:`RENAME_RULES`)."""
    return {rename_key(k): v for k, v in state.items()}


def load_published(model: ScGPTModel, state: Mapping[str, Tensor]) -> dict[str, list[str]]:
    """Load a published ``best_model.pt`` state dict into ``model``, strictly for every tensor it uses.

    Returns
    -------
    dict
        ``{"renamed": [...], "skipped": [...]}``: flash-attn keys that were renamed and
        checkpoint tensors not needed for embeddings (decoders, heads).

    Raises
    ------
    ModelUnavailableError
        A tensor the model needs is missing or has another shape.
    """
    renamed_state = rename_published(state)
    renamed = sorted(k for k in state if rename_key(k) != k)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in renamed_state)
    wrong = sorted(
        f"{k} {tuple(renamed_state[k].shape)} != {tuple(own[k].shape)}"
        for k in own if k in renamed_state and tuple(renamed_state[k].shape) != tuple(own[k].shape)
    )
    if missing or wrong:
        raise ModelUnavailableError(
            "best_model.pt does not match args.json/vocab.json: "
            + (f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])}) " if missing else "")
            + (f"shape mismatch {'; '.join(wrong[:3])}" if wrong else ""),
            fix="Use the vocab.json and args.json that were saved with this best_model.pt.", field="model",
        )
    model.load_state_dict({k: renamed_state[k] for k in own}, strict=True)
    skipped = sorted(k for k in renamed_state if k not in own)
    return {"renamed": renamed, "skipped": skipped}


def read_state_dict(path: Any) -> dict[str, Tensor]:
    """``torch.load`` a ``best_model.pt`` (plain state dict, or wrapped under ``state_dict``/``model_state_dict``)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelUnavailableError(
            f"Cannot read scGPT weights {path}: {err}.", fix="Re-download best_model.pt of the scGPT checkpoint.", field="model"
        ) from err
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ModelUnavailableError(
            f"{path} is not a state dict of tensors.", fix="Use the best_model.pt of a published scGPT checkpoint.", field="model"
        )
    return dict(obj)
