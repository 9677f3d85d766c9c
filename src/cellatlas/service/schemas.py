"""Pydantic models describing the wire format, for the OpenAPI document at ``/docs``.

Request bodies are parsed by :mod:`cellatlas.service.payload` (orjson + numpy,
fast on 100k-cell bodies); these models document them and the responses.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class CSRMatrix(BaseModel):
    indptr: list[int] = Field(description="n_cells + 1 row pointers")
    indices: list[int] = Field(description="column index of each stored value")
    data: list[float] = Field(description="raw counts (log-normalised input is detected)")
    shape: list[int] = Field(description="[n_cells, n_genes]", min_length=2, max_length=2)


class AnnotateRequest(BaseModel):
    genes: list[str] = Field(description="HGNC symbols or Ensembl ids (human or mouse), one per matrix column")
    matrix: CSRMatrix
    model: str | None = Field(None, description="default | geneformer | scgpt (GET /v1/models)")
    reference_atlas: str | None = Field(None, description="atlas name or alias, e.g. human-core-2026 (GET /v1/atlases)")
    cell_ids: list[str] | None = Field(None, description="row identifiers echoed back in the response")
    return_embedding: bool = Field(False, description="also return embedding and layout")
    skip_gene_check: bool = Field(
        False, description="skip the check that genes belong to the matrix columns (targeted panels); see gene_report.gene_check"
    )


class EmbedRequest(AnnotateRequest):
    return_embedding: bool = Field(False, exclude=True)
    layout: bool = Field(True, description="also return 2-D atlas-layout coordinates")


class Alternate(BaseModel):
    label: str
    score: float


class Evidence(BaseModel):
    knn_label: str
    knn_prob: float
    marker_label: str
    marker_score: float
    agreement: bool
    atlas_distance: float


class CellQC(BaseModel):
    total_counts: float | None = Field(description="counts over all input genes (count-like values for log-normalised input)")
    n_genes: int | None = Field(description="genes detected")
    pct_mito: float | None = Field(description="percent of counts in MT- genes (null: no MT- genes in the data)")
    doublet_score: float | None = Field(None, description="scrublet score (null unless computed)")


class Call(BaseModel):
    label: str
    confidence: float = Field(description="calibrated probability that label is right")
    alternates: list[Alternate] = Field(description="up to 3 runner-up labels")
    markers: list[str] = Field(description="the label's marker genes this cell expresses, strongest first")
    band: str = Field(description="confident (>= 0.7) | review (0.4-0.7) | low (< 0.4)")
    ontology_id: str = Field(description="Cell Ontology id of label")
    level: str = Field(description="fine | coarse")
    novel: bool
    parent_label: str = Field("", description="the label one level above label (empty at a top-level label)")
    parent_confidence: float | None = Field(None, description="calibrated probability that parent_label is right (null: no parent)")
    reason: str = Field("", description='why label is "Unassigned" (too few counts or genes); empty for called cells')
    qc: CellQC
    evidence: Evidence


class Usage(BaseModel):
    cells: int
    credits_charged: int
    credits_left: int | None = Field(description="null when the server runs without API keys")
    cells_per_credit: int
    pricing: str


class AnnotateResponse(BaseModel):
    calls: list[Call]
    n_cells: int
    model: str
    reference_atlas: str
    gene_report: dict[str, Any]
    provenance: dict[str, Any] = Field(description="code version, model, atlas name/version/sha256, timings")
    usage: Usage
    cell_ids: list[str] | None = None
    embedding: list[list[float]] | None = None
    layout: list[list[float]] | None = None


class EmbedResponse(BaseModel):
    n_cells: int
    dim: int
    model: str
    reference_atlas: str
    embedding: list[list[float]]
    layout: list[list[float]] | None = None
    gene_report: dict[str, Any]
    usage: Usage


class MarkerGene(BaseModel):
    gene: str
    sign: str = Field(description="+ (expressed) or - (absent in this type)")
    source: str


class LabelMarkers(BaseModel):
    label: str
    ontology_id: str
    markers: list[MarkerGene]


class MarkersResponse(BaseModel):
    reference_atlas: str
    n_labels: int
    labels: list[LabelMarkers]


class ErrorDetail(BaseModel):
    code: str
    message: str
    fix: str | None
    field: str | None
    details: dict[str, Any]


class ErrorBody(BaseModel):
    error: ErrorDetail


_ERROR_DESCRIPTIONS = {
    400: "not possible in this state (e.g. no finished run yet)",
    401: "missing, invalid or revoked API key",
    402: "not enough credits (details.balance)",
    404: "unknown model, atlas or session",
    409: "model unavailable here / atlas lacks this model",
    413: "body, cells or genes over the server's limits (details has the limit)",
    415: "unsupported Content-Type, Content-Encoding or file type",
    422: "malformed input or parameter (field names it; code gene_list_mismatch: genes do not belong to the matrix columns)",
    429: "rate limit, decode budget or job queue full; retry after Retry-After seconds",
    503: "not ready (details.checks)",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries with the shared error body for ``codes``."""
    return {code: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[code]} for code in codes}


ERROR_RESPONSES = error_responses(401, 402, 404, 409, 413, 415, 422, 429)
"""What the billed routes answer besides 200."""
PUBLIC_RESPONSES = error_responses(413, 422, 429)
"""What any route answers: body limit, parameter validation, rate limit."""


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_PARAMS = [
    {"name": "model", "in": "query", "required": False, "schema": {"type": "string"}, "description": "for binary bodies"},
    {"name": "reference_atlas", "in": "query", "required": False, "schema": {"type": "string"}, "description": "for binary bodies"},
    {"name": "layer", "in": "query", "required": False, "schema": {"type": "string"}, "description": "h5ad only: counts layer"},
    {"name": "use_raw", "in": "query", "required": False, "schema": {"type": "boolean"}, "description": "h5ad only: read .raw"},
    {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}, "description": "retry safely"},
    {"name": "Content-Encoding", "in": "header", "required": False, "schema": {"enum": ["identity", "gzip", "zstd"]}},
]


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """Resolve local ``$defs`` references so the schema can sit inside the OpenAPI document."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node and node["$ref"].startswith("#/$defs/"):
                return walk(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


_SKIP_GENE_CHECK = {"name": "skip_gene_check", "in": "query", "required": False, "schema": {"type": "boolean"},
                    "description": "skip the gene-list check (targeted panels, sorted populations)"}


def _body(model: type[BaseModel], option: str, option_doc: str) -> dict[str, Any]:
    return {
        "parameters": _PARAMS + [_SKIP_GENE_CHECK,
                                 {"name": option, "in": "query", "required": False, "schema": {"type": "boolean"}, "description": option_doc}],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _inline(model.model_json_schema())},
                "application/x-npz": {**_BINARY, "description": "numpy .npz: indptr, indices, data, shape, genes[, cell_ids]"},
                "application/x-h5ad": {**_BINARY, "description": "an .h5ad file (counts in X, a layer, or raw)"},
            },
        },
    }


ANNOTATE_BODY = _body(AnnotateRequest, "return_embedding", "also return embedding and layout")
EMBED_BODY = _body(EmbedRequest, "layout", "return 2-D layout coordinates (default true)")
