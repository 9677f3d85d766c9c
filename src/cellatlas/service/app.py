"""The Cell Atlas HTTP API: a FastAPI app over the in-process engine.

``create_app(settings)`` wires the routes, the ledger (``app.state.ledger``), the
body-size limit, the decode budget, rate limits, security headers, offline API docs,
metrics, housekeeping (:mod:`cellatlas.service.housekeeping`) and one error handler
that turns every :class:`~cellatlas.errors.CellAtlasError` into its status code and
JSON body. Run it with ``cellatlas serve`` or
``uvicorn --factory cellatlas.service.app:create_app``.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cellatlas.annotate import code_version
from cellatlas.config import Settings, get_settings
from cellatlas.errors import CellAtlasError, InputError
from cellatlas.service import docs, housekeeping, routes_meta, routes_singlecell
from cellatlas.service.body import DecodeBudget
from cellatlas.service.jobs import default_job_slots, request_id
from cellatlas.service.ledger import Ledger
from cellatlas.service.limits import BodyLimitMiddleware
from cellatlas.service.metrics import Metrics, MetricsMiddleware
from cellatlas.service.ratelimit import RateLimitMiddleware, RateLimits
from cellatlas.service.render import dumps
from cellatlas.service.security import SecurityHeadersMiddleware

log = logging.getLogger("cellatlas.service")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden"}


def create_app(settings: Settings | None = None, *, ledger: Ledger | None = None) -> FastAPI:
    """Build the API app.

    Parameters
    ----------
    settings
        Runtime settings (default: :func:`cellatlas.config.get_settings`).
    ledger
        An existing ledger (default: one on ``settings.resolved_database_url``).

    Returns
    -------
    fastapi.FastAPI
        With ``app.state.settings``, ``app.state.ledger`` and ``app.state.metrics``.
    """
    settings = settings or get_settings()
    ledger = ledger or Ledger.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with housekeeping.running(app):
            yield
        app.state.ledger.close()
        app.state.decode_budget.close()

    app = FastAPI(
        title="Cell Atlas API",
        version=code_version(),
        description=(
            "Zero-shot cell-type annotation of single-cell RNA-seq. Send a sparse cells x genes count "
            "matrix and gene symbols; get a calibrated call per cell. JSON is the compatible path, "
            "npz/h5ad with zstd or gzip the fast one. Authenticate with `Authorization: Bearer sk-...`."
        ),
        docs_url=None,  # served offline by cellatlas.service.docs
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.ledger = ledger
    app.state.metrics = Metrics()
    app.state.job_limiter = anyio.CapacityLimiter(default_job_slots())
    app.state.decode_budget = DecodeBudget(settings.resolved_decode_slots, settings.home / "run", settings.decode_wait_seconds)
    app.state.rate_limits = RateLimits(settings)
    housekeeping.sweep_at_start(settings)

    app.include_router(routes_singlecell.router)
    app.include_router(routes_meta.router)
    app.include_router(docs.router)
    _include_web(app)
    _install_error_handlers(app)
    # Outermost last: security headers on everything, metrics count 429s and 413s too.
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(RateLimitMiddleware, limits=app.state.rate_limits)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(SecurityHeadersMiddleware)
    return app


def _include_web(app: FastAPI) -> None:
    try:
        from cellatlas.web import router as web_router
    except ImportError:
        return
    from cellatlas.service.schemas import error_responses

    # What the workspace's session and run steps answer besides their own outcomes.
    app.include_router(web_router, responses=error_responses(400, 401, 402, 404, 409, 413, 415, 422, 429))


def error_response(err: CellAtlasError, request: Request | None = None) -> Response:
    """JSON error response for ``err`` (status from ``err.status_code``)."""
    headers = {}
    if request is not None:
        headers["X-Request-ID"] = request_id(request)
    if err.status_code == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="cellatlas"'
    if err.status_code in (429, 503) and "retry_after" in (err.details or {}):
        headers["Retry-After"] = str(err.details["retry_after"])
    return Response(dumps(err.to_dict()), status_code=err.status_code, media_type="application/json", headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CellAtlasError)
    async def _cellatlas_error(request: Request, exc: CellAtlasError) -> Response:
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ())]
        field = ".".join(loc[1:] if len(loc) > 1 else loc) or None
        err = InputError(
            f"Invalid {loc[0] if loc else 'request'} parameter '{field}': {first.get('msg', 'invalid value')}.",
            fix="See the route's parameters at /docs.",
            field=field,
            details={"errors": [{"loc": list(map(str, e.get("loc", ()))), "msg": e.get("msg", "")} for e in errors]},
        )
        return error_response(err, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        err = CellAtlasError(str(exc.detail), fix="See the API routes at /docs.")
        err.status_code = exc.status_code
        err.code = _HTTP_CODES.get(exc.status_code, "http_error")
        resp = error_response(err, request)
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        err = CellAtlasError(
            f"Internal server error ({type(exc).__name__}); this is a bug in cellatlas, not in your request.",
            fix=f"Report it with the request id {request_id(request)}.",
        )
        err.status_code = 500
        err.code = "internal_error"
        return error_response(err, request)
