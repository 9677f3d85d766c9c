"""cellatlas: zero-shot cell-type annotation of single-cell RNA-seq data.

>>> import cellatlas
>>> res = cellatlas.annotate(X, genes)            # in-process, built-in human-core atlas
>>> res.to_dataframe()
>>> cellatlas.annotate_adata(adata)              # writes obs["cell_type"], ... (an existing one is kept as cell_type_uploaded)
>>> cellatlas.pl.embedding(adata)                # the user's own cells coloured by call, band, confidence
>>> cellatlas.annotate_file("big.h5ad", output="annotated.h5ad")  # read and written in blocks of cells
"""

from cellatlas import pl, tl
from cellatlas.annotate import annotate, annotate_adata, embed
from cellatlas.atlas import Atlas, list_atlases, load_atlas
from cellatlas.errors import CellAtlasError
from cellatlas.result import AnnotationResult
from cellatlas.stream import annotate_file

__all__ = ["Atlas", "AnnotationResult", "CellAtlasError", "annotate", "annotate_adata", "annotate_file", "embed", "list_atlases", "load_atlas", "pl", "tl"]
