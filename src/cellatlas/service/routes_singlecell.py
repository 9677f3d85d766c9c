"""``/v1/singlecell/*``: annotate, embed and marker export over the in-process engine."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

import cellatlas
from cellatlas.annotate import DEFAULT_MODEL
from cellatlas.atlas import DEFAULT_ATLAS, load_atlas
from cellatlas.errors import AtlasModelMismatchError, InputError, ModelUnavailableError
from cellatlas.service import render
from cellatlas.service.deps import get_principal
from cellatlas.service.jobs import run_billed
from cellatlas.service.ledger import Principal
from cellatlas.service.payload import Parsed
from cellatlas.service.schemas import (
    ANNOTATE_BODY,
    EMBED_BODY,
    ERROR_RESPONSES,
    AnnotateResponse,
    EmbedResponse,
    MarkersResponse,
)

router = APIRouter(prefix="/v1/singlecell", tags=["single-cell"])

TSV = "text/tab-separated-values; charset=utf-8"
NPZ = "application/x-npz"


def _with_fallback(fn, parsed: Parsed, settings) -> tuple:
    """Run ``fn(X, genes, **kw)``; if the requested model cannot run here, run the server's
    ``fallback_model`` instead (unless ``strict_models``). Returns ``(output, fallback_note)``."""
    kw = parsed.engine_kwargs()
    try:
        return fn(parsed.X, parsed.genes, **kw), None
    except (ModelUnavailableError, AtlasModelMismatchError) as e:
        fb = None if settings.strict_models else settings.fallback_model
        if not fb or parsed.model is None or parsed.model.lower() == fb.lower():
            raise
        note = {
            "requested_model": parsed.model,
            "model": fb,
            "reason": e.message,
            "message": f"Model '{parsed.model}' cannot run on this server ({e.message.rstrip('.')}); "
            f"these results come from model '{fb}'. Install the model's weights, or start the server "
            "with --strict-models to refuse such requests.",
        }
        return fn(parsed.X, parsed.genes, **{**kw, "model": fb}), note


def _record_model(request: Request, parsed: Parsed, used: str, note: dict | None) -> dict:
    """What the response says about the model: requested vs used (also kept for the headers)."""
    info = {"model_requested": (parsed.model or DEFAULT_MODEL).lower(), "model_used": used}
    request.state.model_info = {**info, "fallback": bool(note)}
    return info


def _annotate_work(request: Request, parsed: Parsed):
    res, note = _with_fallback(cellatlas.annotate, parsed, request.app.state.settings)
    res.provenance.update(_record_model(request, parsed, res.provenance.get("model", DEFAULT_MODEL), note))
    if note:
        res.provenance["fallback"] = note
    return res


def _embed_work(request: Request, parsed: Parsed):
    (emb, layout, report), note = _with_fallback(cellatlas.embed, parsed, request.app.state.settings)
    used = note["model"] if note else (parsed.model or DEFAULT_MODEL).lower()
    return emb, layout, report, {**_record_model(request, parsed, used, note), "fallback": note}


def _markers_work(request: Request, parsed: Parsed):
    res = _annotate_work(request, parsed)
    table = load_atlas(res.provenance.get("atlas") or parsed.atlas or DEFAULT_ATLAS).marker_table()
    return res, table


def _with_model_headers(request: Request, response: Response) -> Response:
    """``X-Model-Used`` on every engine response; ``X-Model-Requested`` too when they differ."""
    info = getattr(request.state, "model_info", None)
    if info:  # absent on an idempotent replay (its body still says it)
        response.headers["X-Model-Used"] = info["model_used"]
        if info["fallback"]:
            response.headers["X-Model-Requested"] = info["model_requested"]
    return response


def _format(request: Request, given: str | None, choices: dict[str, str], default: str) -> str:
    """Response format from ``?format=`` or, failing that, the Accept header."""
    if given is not None:
        if given not in choices:
            raise InputError(f"Unknown format '{given}'.", fix=f"Use format={' or format='.join(choices)}.", field="format")
        return given
    accept = request.headers.get("accept", "")
    for fmt, mt in choices.items():
        if mt.split(";")[0] in accept:
            return fmt
    return default


@router.post(
    "/annotate",
    summary="Annotate cells (one call per cell, input order)",
    response_model=AnnotateResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=ANNOTATE_BODY,
)
async def annotate(
    request: Request,
    principal: Principal | None = Depends(get_principal),
    format: Literal["json", "npz"] | None = Query(None, description="json (default) or npz: one array per field (also by Accept)"),
) -> Response:
    """Zero-shot cell-type calls. Body: the articles' JSON, or npz/h5ad (see the request schemas).

    Optional ``return_embedding=true`` (body field or query) adds ``embedding`` and ``layout``;
    ``skip_gene_check=true`` skips the gene-list check (a list that does not belong to the
    matrix columns is otherwise a 422 ``gene_list_mismatch`` naming the likely cause).
    Send ``Idempotency-Key`` to make retries safe (same response, charged once).
    """
    fmt = _format(request, format, {"json": "application/json", "npz": NPZ}, "json")
    cpc = request.app.state.settings.cells_per_credit
    response = await run_billed(
        request,
        principal,
        endpoint="annotate",
        options={"return_embedding": False, "skip_gene_check": False},
        work=lambda parsed: _annotate_work(request, parsed),
        render=lambda res, parsed, ch: render.annotate_body(res, parsed, ch, cpc, fmt),
        media_type=NPZ if fmt == "npz" else "application/json",
        reserved_params=("format",),
    )
    return _with_model_headers(request, response)


@router.post(
    "/embed",
    summary="Embed cells (and place them on the atlas's 2-D layout)",
    response_model=EmbedResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=EMBED_BODY,
)
async def embed(
    request: Request,
    principal: Principal | None = Depends(get_principal),
    format: Literal["json", "npz"] | None = Query(None, description="json (default) or npz (also chosen by Accept: application/x-npz)"),
) -> Response:
    """Model embeddings ``[n_cells, dim]`` and, unless ``layout=false``, 2-D layout coordinates."""
    fmt = _format(request, format, {"json": "application/json", "npz": NPZ}, "json")
    cpc = request.app.state.settings.cells_per_credit
    response = await run_billed(
        request,
        principal,
        endpoint="embed",
        options={"layout": True, "skip_gene_check": False},
        work=lambda parsed: _embed_work(request, parsed),
        render=lambda out, parsed, ch: render.embed_body(out, parsed, ch, cpc, fmt),
        media_type=NPZ if fmt == "npz" else "application/json",
        reserved_params=("format",),
    )
    return _with_model_headers(request, response)


@router.get(
    "/markers",
    summary="Marker genes per label of an atlas, with sources",
    response_model=MarkersResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/tab-separated-values": {}}}},
)
async def atlas_markers(
    request: Request,
    principal: Principal | None = Depends(get_principal),
    reference_atlas: str = Query(DEFAULT_ATLAS, min_length=1, max_length=200, description="Atlas name or alias (GET /v1/atlases)"),
    label: list[str] | None = Query(None, description="Only these labels (repeatable)"),
    format: Literal["json", "tsv"] | None = Query(None, description="json (default) or tsv (also by Accept)"),
) -> Response:
    """The atlas's marker table: label, Cell Ontology id, gene, sign (+/-), source. Free of charge."""
    fmt = _format(request, format, {"json": "application/json", "tsv": TSV}, "json")
    at = await run_in_threadpool(lambda: load_atlas(reference_atlas, request.app.state.settings, allow_paths=False))
    table = at.marker_table()
    if label:
        known = set(table["label"].astype(str))
        missing = [lab for lab in label if lab not in known]
        if missing:
            raise InputError(
                f"Atlas '{at.name}' has no marker set for label '{missing[0]}'.",
                fix=f"Pick from: {', '.join(sorted(known))}.",
                field="label",
            )
        table = table[table["label"].isin(label)]
    body = render.atlas_markers(table, at.name, fmt)
    return Response(body, media_type=TSV if fmt == "tsv" else "application/json")


@router.post(
    "/markers",
    summary="Markers behind the calls of a query",
    responses=ERROR_RESPONSES,
    openapi_extra=ANNOTATE_BODY,
)
async def query_markers(
    request: Request,
    principal: Principal | None = Depends(get_principal),
    format: Literal["json", "tsv"] | None = Query(None, description="json (default) or tsv (also by Accept)"),
) -> Response:
    """Annotate the query (same body and price as annotate) and export, per cell, the
    expressed markers behind its call and, per called label, its marker signature."""
    fmt = _format(request, format, {"json": "application/json", "tsv": TSV}, "json")
    cpc = request.app.state.settings.cells_per_credit
    response = await run_billed(
        request,
        principal,
        endpoint="markers",
        options={"skip_gene_check": False},
        work=lambda parsed: _markers_work(request, parsed),
        render=lambda out, parsed, ch: render.query_markers(out[0], out[1], parsed, ch, cpc, fmt),
        media_type=TSV if fmt == "tsv" else "application/json",
        reserved_params=("format",),
    )
    return _with_model_headers(request, response)
