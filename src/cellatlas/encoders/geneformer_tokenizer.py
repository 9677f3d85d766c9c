"""Geneformer rank-value tokenisation (numpy only, no torch).

Follows ``geneformer/tokenizer.py`` of ctheodoris/Geneformer
(``TranscriptomeTokenizer.tokenize_anndata`` + ``create_dataset``, read at the
upstream V2-era code, see ../shared/research/anchors.md §2.6):

1. gene ids are upper-cased and mapped through ``ensembl_mapping_dict``;
   columns that map to the same Ensembl id are summed (``sum_ensembl_ids``);
   only genes in ``token_dictionary`` are kept;
2. ``x_norm = counts / n_counts * 10,000 / gene_nonzero_median`` where
   ``n_counts`` is the cell's total count over *all* input genes;
3. zeros dropped, genes sorted by ``x_norm`` descending -> token ids;
4. V2 (dictionaries with ``<cls>``/``<eos>``): truncate to ``input_size - 2``,
   prepend ``<cls>``, append ``<eos>``; V1: truncate to ``input_size``.

Differences, all deliberate: the input here is gene *symbols* (cellatlas maps
user ids to approved HGNC symbols), mapped to Ensembl through
``gene_name_id_dict`` (then the symbol keys of ``ensembl_mapping_dict``);
Ensembl ids are accepted as well. Ties in ``x_norm`` are broken by token id
(upstream's ``np.argsort`` leaves them to the sort implementation).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from cellatlas.errors import GeneMismatchError, InputError, ModelUnavailableError
from cellatlas.encoders._foundation import checked_counts

TARGET_SUM = 10_000
KINDS = {
    "token": "token_dictionary",
    "median": "gene_median_dictionary",
    "name_id": "gene_name_id_dict",
    "ensembl": "ensembl_mapping_dict",
}
SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<eos>")
INPUT_SIZE = {"V1": 2048, "V2": 4096}


@dataclass
class GeneformerDictionaries:
    """The four Geneformer dictionaries and the files they came from."""

    token: dict[str, int]
    median: dict[str, float]
    name_id: dict[str, str]
    ensembl: dict[str, str]
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def version(self) -> str:
        """``"V2"`` when the token dictionary has ``<cls>`` and ``<eos>`` (gc95M/gc104M), else ``"V1"``."""
        return "V2" if "<cls>" in self.token and "<eos>" in self.token else "V1"

    @classmethod
    def from_files(cls, files: dict[str, Path]) -> "GeneformerDictionaries":
        """Unpickle the four files (``files`` maps each of :data:`KINDS` to a path)."""
        loaded = {}
        for kind in KINDS:
            try:
                with open(files[kind], "rb") as fh:
                    loaded[kind] = pickle.load(fh)
            except Exception as err:  # corrupt pickle, LFS pointer, wrong file
                raise ModelUnavailableError(
                    f"Cannot read the Geneformer {KINDS[kind]} at {files[kind]}: {err}.",
                    fix="Copy the dictionary .pkl files from the Geneformer repository (git lfs pull first).",
                    field="model",
                ) from err
        token = {str(k): int(v) for k, v in loaded["token"].items()}
        median = {str(k): float(v) for k, v in loaded["median"].items()}
        return cls(token, median, dict(loaded["name_id"]), dict(loaded["ensembl"]), dict(files))


def find_dictionary_files(directory: Path, vocab_size: int | None = None) -> dict[str, Path]:
    """Locate one complete set of the four dictionary pickles in ``directory`` or a subfolder.

    Sets are grouped by folder and file-name suffix (``_gc95M``, ``_gc30M``, none).
    With several complete sets, the one whose token dictionary has ``vocab_size``
    entries is chosen.
    """
    sets: dict[tuple[Path, str], dict[str, Path]] = {}
    folders = [directory] + sorted(p for p in directory.iterdir() if p.is_dir())
    for folder in folders:
        for kind, prefix in KINDS.items():
            for path in sorted(folder.glob(f"{prefix}*.pkl")):
                sets.setdefault((folder, path.name[len(prefix) : -4]), {})[kind] = path
    complete = [s for s in sets.values() if len(s) == len(KINDS)]
    if not complete:
        raise ModelUnavailableError(
            f"No complete set of Geneformer dictionaries in {directory}.",
            fix=(
                "Copy token_dictionary*.pkl, gene_median_dictionary*.pkl, gene_name_id_dict*.pkl and "
                "ensembl_mapping_dict*.pkl (the set matching the model: gc104M/gc95M for V2, gc30M for V1) "
                "into the checkpoint directory."
            ),
            field="model",
        )
    if len(complete) == 1 or vocab_size is None:
        return complete[0]
    for files in complete:
        with open(files["token"], "rb") as fh:
            if len(pickle.load(fh)) == vocab_size:
                return files
    return complete[0]  # the vocabulary check in the caller reports the mismatch


class GeneformerTokenizer:
    """Turn raw counts into Geneformer rank-value token sequences.

    Parameters
    ----------
    dictionaries
        The four dictionaries (:meth:`GeneformerDictionaries.from_files`).
    input_size
        Model input size; default 4,096 for V2 dictionaries and 2,048 for V1.
    """

    def __init__(self, dictionaries: GeneformerDictionaries, input_size: int | None = None) -> None:
        self.dicts = dictionaries
        self.version = dictionaries.version
        self.special = self.version == "V2"
        self.input_size = int(input_size or INPUT_SIZE[self.version])
        if self.input_size < (3 if self.special else 1):
            raise InputError(f"Geneformer input size {self.input_size} is too small.", field="input_size")
        self.cls_id = dictionaries.token.get("<cls>")
        self.eos_id = dictionaries.token.get("<eos>")
        self.pad_id = dictionaries.token.get("<pad>", 0)
        self.vocab_genes = [g for g in dictionaries.token if g not in SPECIAL_TOKENS]
        self._gene_cache: dict[tuple, np.ndarray] = {}  # gene list -> tokens (queries come in chunks)
        self._median = np.full(max(dictionaries.token.values()) + 1, np.nan)
        for gene, tok in dictionaries.token.items():
            if gene in dictionaries.median:
                self._median[tok] = dictionaries.median[gene]

    # ------------------------------------------------------------ gene mapping
    def ensembl_id(self, gene: str | None) -> str | None:
        """The collapsed Ensembl id of a symbol or Ensembl id, or ``None`` if unknown."""
        if gene is None:
            return None
        key = str(gene).strip()
        if not key:
            return None
        upper = key.upper()
        if upper.startswith("ENS"):
            ens = upper.split(".")[0]
        else:
            ens = self.dicts.name_id.get(key) or self.dicts.name_id.get(upper) or self.dicts.ensembl.get(upper)
            if ens is None:
                return None
        collapsed = self.dicts.ensembl.get(str(ens).upper())
        if collapsed in self.dicts.token and collapsed in self.dicts.median:
            return collapsed
        return None

    def gene_tokens(self, genes: Sequence[str | None]) -> np.ndarray:
        """Token id per input gene (``-1`` where the gene is not in the model's vocabulary)."""
        key = tuple(genes)
        if key not in self._gene_cache:
            out = np.full(len(genes), -1, dtype=np.int64)
            for i, g in enumerate(genes):
                ens = self.ensembl_id(g)
                if ens is not None:
                    out[i] = self.dicts.token[ens]
            if len(self._gene_cache) >= 8:
                self._gene_cache.pop(next(iter(self._gene_cache)))
            self._gene_cache[key] = out
        return self._gene_cache[key].copy()

    def gene_coverage(self, genes: Sequence[str | None]) -> float:
        """Fraction of the model's gene tokens that ``genes`` provide."""
        found = {t for t in self.gene_tokens(genes).tolist() if t >= 0}
        return len(found) / max(len(self.vocab_genes), 1)

    # ------------------------------------------------------------ tokenising
    def tokenize(self, counts: sp.spmatrix, genes: Sequence[str | None]) -> list[np.ndarray]:
        """Rank-value token ids per cell (with ``<cls>``/``<eos>`` for V2), truncated to the input size.

        Parameters
        ----------
        counts
            Raw counts ``[n_cells, n_genes]`` (CSR/CSC or dense).
        genes
            One symbol (or Ensembl id) per column.

        Raises
        ------
        GeneMismatchError
            If no column maps to the model's vocabulary.
        """
        x = checked_counts(counts, genes)
        tokens = self.gene_tokens(genes)
        keep = np.flatnonzero(tokens >= 0)
        if keep.size == 0:
            raise GeneMismatchError(
                f"None of the {len(genes)} genes maps to the Geneformer vocabulary "
                f"(e.g. {', '.join(map(str, list(genes)[:5]))}).",
                fix="Pass human gene symbols (HGNC) or Ensembl ids, one per column.", field="genes",
            )
        n_counts = np.asarray(x.sum(axis=1)).ravel()
        uniq, inverse = np.unique(tokens[keep], return_inverse=True)
        # Sum columns that collapse to the same token (upstream sum_ensembl_ids).
        collapse = sp.csr_matrix((np.ones(keep.size), (keep, inverse)), shape=(x.shape[1], uniq.size))
        xt = (x @ collapse).tocsr()
        xt.eliminate_zeros()
        medians = self._median[uniq]
        scale = np.divide(TARGET_SUM, n_counts, out=np.zeros_like(n_counts), where=n_counts > 0)
        values = xt.data * np.repeat(scale, np.diff(xt.indptr)) / medians[xt.indices]
        col_tokens = uniq[xt.indices]
        out = []
        for start, stop in zip(xt.indptr[:-1], xt.indptr[1:]):
            toks, vals = col_tokens[start:stop], values[start:stop]
            out.append(self._frame(toks[np.lexsort((toks, -vals))]))
        return out

    def _frame(self, ranked: np.ndarray) -> np.ndarray:
        if not self.special:
            return ranked[: self.input_size].astype(np.int64)
        body = ranked[: self.input_size - 2]
        return np.concatenate([[self.cls_id], body, [self.eos_id]]).astype(np.int64)

    def n_gene_tokens(self, ids: np.ndarray) -> int:
        """How many of ``ids`` are genes (not ``<cls>``/``<eos>``)."""
        return len(ids) - (2 if self.special else 0)
