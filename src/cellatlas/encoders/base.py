"""The one small interface every encoder implements.

An encoder turns raw counts into a float32 embedding, one row per cell.
``genes`` are approved human HGNC symbols (``cellatlas.genes`` has already
mapped Ensembl ids, aliases and mouse orthologs), one per column of ``counts``.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import scipy.sparse as sp


@runtime_checkable
class Encoder(Protocol):
    """Embed cells.

    Attributes
    ----------
    name
        Registry name (``"default"``, ``"geneformer"``, ``"scgpt"``).
    dim
        Width of the embedding.
    """

    name: str
    dim: int

    def embed(self, counts: sp.csr_matrix, genes: Sequence[str]) -> np.ndarray:
        """Return a float32 array ``[n_cells, dim]``; rows in the order of ``counts``."""
        ...

    def fingerprint(self) -> str:
        """A short hash identifying the exact parameters/weights.

        An atlas stores the fingerprint of the encoder that embedded its
        reference cells; annotation refuses a query encoder whose fingerprint
        differs (embeddings from different weights are not comparable).
        """
        ...

    def gene_coverage(self, genes: Sequence[str]) -> float:
        """Fraction of the encoder's own gene vocabulary/panel present in ``genes``."""
        ...
