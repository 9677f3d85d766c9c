"""Discovery and operations routes: models, atlases, limits, usage, health, metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from cellatlas.annotate import DEFAULT_MODEL, code_version
from cellatlas.atlas import DEFAULT_ATLAS, list_atlases
from cellatlas.encoders import available_models
from cellatlas.service.deps import get_principal
from cellatlas.service.errors import NotReadyError
from cellatlas.service.ledger import Principal
from cellatlas.service.limits import limits_info
from cellatlas.service.render import dumps
from cellatlas.service.schemas import PUBLIC_RESPONSES, error_responses

router = APIRouter()


def _json(obj: Any, status_code: int = 200) -> Response:
    return Response(dumps(obj), status_code=status_code, media_type="application/json")


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    """Listing entry without server filesystem paths."""
    return {k: v for k, v in entry.items() if k != "path"}


@router.get("/v1/models", tags=["discovery"], summary="Models installed here and whether they can run", responses=PUBLIC_RESPONSES)
async def models(request: Request) -> Response:
    """Each model's ``name``, ``usable``, ``reason`` (why not) and ``kind``."""
    settings = request.app.state.settings
    entries = await run_in_threadpool(available_models, settings)
    return _json({"models": [_public(m) for m in entries], "default": DEFAULT_MODEL, "fallback_model": None if settings.strict_models else settings.fallback_model or None})


@router.get("/v1/atlases", tags=["discovery"], summary="Reference atlases installed here", responses=PUBLIC_RESPONSES)
async def atlases(request: Request) -> Response:
    """Name, version, sha256, models, label and reference-cell counts, aliases, usability."""
    entries = await run_in_threadpool(list_atlases, request.app.state.settings)
    return _json({"atlases": [_public(a) for a in entries], "default": DEFAULT_ATLAS})


@router.get("/v1/limits", tags=["discovery"], summary="Request limits, pricing and accepted formats", responses=PUBLIC_RESPONSES)
async def limits(request: Request) -> Response:
    """Cells per request, body bytes, pricing, content types and encodings."""
    return _json(limits_info(request.app.state.settings))


@router.get("/v1/usage", tags=["account"], summary="Credits left and usage history of the calling key",
            responses=error_responses(401, 413, 422, 429))
async def usage(
    request: Request,
    principal: Principal | None = Depends(get_principal),
    limit: int = Query(50, ge=0, le=1000, description="how many recent requests to list"),
) -> Response:
    """Balance, pricing, totals and the most recent requests (local mode: the keyless usage)."""
    settings = request.app.state.settings
    ledger = request.app.state.ledger
    key_id = principal.key_id if principal is not None else None
    summary = await run_in_threadpool(ledger.usage_summary, key_id, limit)
    account: dict[str, Any] = {"local": True}
    if principal is not None:
        info = await run_in_threadpool(ledger.get_key, key_id)
        account = {"key_id": info.id, "name": info.name, "prefix": info.prefix, "credits": info.credits}
    return _json({**account, "pricing": limits_info(settings)["pricing"], **summary})


@router.get("/healthz", tags=["operations"], summary="Liveness", responses=error_responses(413, 422))
async def healthz() -> Response:
    """Always cheap: the process answers (engine work runs in worker threads)."""
    return _json({"status": "ok", "version": code_version()})


@router.get("/readyz", tags=["operations"], summary="Readiness: database reachable, an atlas and a model usable",
            responses=error_responses(413, 422, 503))
async def readyz(request: Request) -> Response:
    """503 with the failing checks, 200 when requests can be served."""
    settings = request.app.state.settings
    checks = await run_in_threadpool(_readiness, request.app.state.ledger, settings)
    if not all(c["ok"] for c in checks.values()):
        failing = [k for k, c in checks.items() if not c["ok"]]
        err = NotReadyError(
            f"Not ready: {', '.join(failing)} check failed.",
            fix="; ".join(checks[k]["detail"] for k in failing),
            details={"checks": checks},
        )
        return _json(err.to_dict(), status_code=err.status_code)
    return _json({"status": "ready", "checks": checks})


def _readiness(ledger, settings) -> dict[str, dict[str, Any]]:
    checks: dict[str, dict[str, Any]] = {}
    try:
        ledger.ping()
        checks["database"] = {"ok": True, "detail": ledger.engine.url.get_backend_name()}
    except Exception as e:  # any driver error means "not ready", reported, not raised
        checks["database"] = {"ok": False, "detail": f"cannot reach the database ({type(e).__name__}); check CELLATLAS_DATABASE_URL"}
    usable_atlases = [a["name"] for a in list_atlases(settings) if a.get("usable")]
    checks["atlas"] = {
        "ok": bool(usable_atlases),
        "detail": ", ".join(usable_atlases) if usable_atlases else "no usable atlas installed; run `cellatlas atlas build` or download one",
    }
    usable_models = [m["name"] for m in available_models(settings) if m.get("usable")]
    checks["model"] = {
        "ok": bool(usable_models),
        "detail": ", ".join(usable_models) if usable_models else "no usable model",
    }
    return checks


@router.get("/metrics", tags=["operations"], summary="Prometheus metrics (text format)", responses=error_responses(413, 422))
async def metrics(request: Request) -> Response:
    """Request counts and latency per route, cells and credits per endpoint, queue depth."""
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
