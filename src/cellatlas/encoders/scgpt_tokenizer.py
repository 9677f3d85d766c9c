"""scGPT input preparation: gene vocabulary and per-cell value binning (numpy only).

Follows bowang-lab/scGPT (``scgpt/tasks/cell_emb.py`` ``embed_data`` /
``get_batch_cell_embeddings``, ``scgpt/data_collator.py`` ``DataCollator``,
``scgpt/preprocess.py`` ``binning``/``_digitize``; see
../shared/research/anchors.md §2.7):

* genes are matched by symbol against ``vocab.json``; ``<pad>``, ``<cls>``,
  ``<eoc>`` are appended when absent (as ``embed_data`` does); genes outside the
  vocabulary are left out;
* per cell, the non-zero in-vocabulary values are binned into ``n_bins`` (51)
  by the cell's own quantiles ``np.quantile(nonzero, linspace(0, 1, n_bins-1))``
  and ``_digitize`` (zeros are never tokens); raw counts are used, and any
  monotone per-cell transform would give the same bins;
* the sequence is ``<cls>`` (value ``pad_value``) followed by the expressed
  genes in column order, padded with ``<pad>``/``pad_value``, at most
  ``max_length`` (1,200) tokens.

Deterministic by default, two documented departures: where equal values span
several bin edges, upstream picks a bin at random between the left and right
edge (``_digitize(side="both")``); here the middle of that range is used (the
expected value of upstream's draw). Cells with more than ``max_length - 1``
expressed genes keep their most expressed genes (upstream samples at random);
``sampling=True`` with a ``seed`` restores upstream's random behaviour.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from cellatlas.errors import GeneMismatchError, InputError, ModelUnavailableError
from cellatlas.encoders._foundation import checked_counts

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
N_BINS = 51
MAX_LENGTH = 1200


def load_vocab(path: Path) -> dict[str, int]:
    """``vocab.json`` (token -> id) with the special tokens appended if missing."""
    try:
        vocab = {str(k): int(v) for k, v in json.loads(Path(path).read_text()).items()}
    except (OSError, ValueError, AttributeError) as err:
        raise ModelUnavailableError(
            f"Cannot read the scGPT vocabulary {path}: {err}.",
            fix="Copy vocab.json from the scGPT checkpoint folder.", field="model",
        ) from err
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            vocab[token] = max(vocab.values(), default=-1) + 1
    return vocab


def digitize(x: np.ndarray, bins: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """scGPT's ``_digitize(side="both")``: bin index, spreading values that sit on repeated edges.

    With ``rng=None`` the middle of the tied range is taken instead of a random draw.
    """
    left = np.digitize(x, bins)
    right = np.digitize(x, bins, right=True)
    u = np.full(len(x), 0.5) if rng is None else rng.random(len(x))
    return np.ceil(u * (right - left) + left).astype(np.int64)


def bin_values(values: np.ndarray, n_bins: int = N_BINS, rng: np.random.Generator | None = None) -> np.ndarray:
    """Per-cell quantile binning of one cell's values (zeros stay 0, non-zeros get 1..n_bins-1).

    Parameters
    ----------
    values
        The cell's expression values (any length; zeros allowed).
    n_bins
        Number of bins including the zero bin (scGPT: 51).
    """
    values = np.asarray(values, dtype=np.float64)
    out = np.zeros(len(values), dtype=np.int64)
    nonzero = np.flatnonzero(values > 0)
    if nonzero.size == 0:
        return out
    edges = np.quantile(values[nonzero], np.linspace(0, 1, n_bins - 1))
    out[nonzero] = digitize(values[nonzero], edges, rng)
    return out


class ScGPTTokenizer:
    """Gene ids and binned values per cell for an scGPT model.

    Parameters
    ----------
    vocab
        Token -> id (from :func:`load_vocab`).
    n_bins, max_length, pad_token, pad_value
        From the checkpoint's ``args.json`` (defaults: 51, 1200, ``<pad>``, -2).
    sampling, seed
        Upstream's random choice of genes for cells longer than ``max_length``
        (off by default: the most expressed genes are kept).
    """

    def __init__(
        self,
        vocab: dict[str, int],
        *,
        n_bins: int = N_BINS,
        max_length: int = MAX_LENGTH,
        pad_token: str = "<pad>",
        pad_value: float = -2,
        sampling: bool = False,
        seed: int = 0,
    ) -> None:
        if max_length < 2:
            raise InputError("scGPT max_length must be at least 2 (<cls> and one gene).", field="max_length")
        self.vocab = vocab
        self.n_bins = int(n_bins)
        self.max_length = int(max_length)
        self.pad_id = int(vocab[pad_token])
        self.pad_value = float(pad_value)
        self.cls_id = int(vocab["<cls>"])
        self.sampling = bool(sampling)
        self.seed = int(seed)
        self.vocab_genes = [g for g in vocab if g not in SPECIAL_TOKENS]

    def gene_ids(self, genes: Sequence[str | None]) -> np.ndarray:
        """Vocabulary id per input gene (``-1`` when the symbol is not in the vocabulary)."""
        return np.array(
            [self.vocab[g] if g is not None and g in self.vocab and g not in SPECIAL_TOKENS else -1 for g in genes],
            dtype=np.int64,
        )

    def gene_coverage(self, genes: Sequence[str | None]) -> float:
        """Fraction of the vocabulary's genes present in ``genes``."""
        found = {int(i) for i in self.gene_ids(genes) if i >= 0}
        return len(found) / max(len(self.vocab_genes), 1)

    def tokenize(self, counts: sp.spmatrix, genes: Sequence[str | None]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Gene ids and binned values per cell, both starting with ``<cls>``/``pad_value``.

        Raises
        ------
        GeneMismatchError
            If no column's gene is in the vocabulary.
        """
        x = checked_counts(counts, genes)
        ids = self.gene_ids(genes)
        keep = np.flatnonzero(ids >= 0)
        if keep.size == 0:
            raise GeneMismatchError(
                f"None of the {len(genes)} genes is in the scGPT vocabulary (e.g. {', '.join(map(str, list(genes)[:5]))}).",
                fix="Pass human gene symbols (HGNC, as in CELLxGENE feature_name), one per column.", field="genes",
            )
        xv = x[:, keep].tocsr()
        xv.sort_indices()
        xv.eliminate_zeros()
        rng = np.random.default_rng(self.seed) if self.sampling else None
        kept_ids = ids[keep]
        gene_rows, value_rows = [], []
        for start, stop in zip(xv.indptr[:-1], xv.indptr[1:]):
            vals, cols = xv.data[start:stop], xv.indices[start:stop]
            binned = bin_values(vals, self.n_bins, rng)
            chosen = self._select(vals, rng)
            gene_rows.append(np.concatenate([[self.cls_id], kept_ids[cols[chosen]]]).astype(np.int64))
            value_rows.append(np.concatenate([[self.pad_value], binned[chosen]]).astype(np.float32))
        return gene_rows, value_rows

    def _select(self, vals: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """Positions kept for a cell: all, or ``max_length - 1`` of them (top-expressed or sampled)."""
        limit = self.max_length - 1
        if len(vals) <= limit:
            return np.arange(len(vals))
        if rng is not None:
            return rng.permutation(len(vals))[:limit]
        return np.sort(np.argsort(-vals, kind="stable")[:limit])
