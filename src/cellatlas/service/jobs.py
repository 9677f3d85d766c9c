"""The billed request cycle shared by annotate, embed and markers.

authenticate (a dependency) -> refuse with 402 a key that cannot pay for one cell, before
the body is read -> take a decode slot (429 when none frees in time) -> receive and decode
the body under its caps, hashing it for Idempotency-Key -> replay a stored response ->
parse, checking every declared size and the price of the declared cells (402) before
arrays are built -> release the slot -> resolve the atlas name (installed atlases only) ->
run the engine in a worker thread (bounded queue, 429 when full) -> charge and store the
response in one transaction -> respond. Nothing is charged when any step fails, nor when
a client without Idempotency-Key has gone before the charge. A ``Server-Timing`` header
gives the milliseconds of each step (read, parse, engine, respond = render + ledger).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any, Callable, Mapping

import anyio
from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool

from cellatlas.atlas import SUFFIX, resolve_atlas_path
from cellatlas.encoders import model_status
from cellatlas.errors import InputError
from cellatlas.service.body import read_body
from cellatlas.service.errors import ClientDisconnectedError, ServerBusyError
from cellatlas.service.ledger import Charge, Principal
from cellatlas.service.limits import RequestLimits
from cellatlas.service.payload import Parsed, parse_request

MAX_QUEUED_JOBS = 32
"""Jobs allowed to wait for a worker thread before the server answers 429."""


def default_job_slots() -> int:
    """Engine jobs run at once per process: half the cores (the engine itself uses threads)."""
    return max(1, (os.cpu_count() or 2) // 2)


def http_atlas(name: str | None, settings) -> str | None:
    """The installed atlas a name or alias sent over HTTP refers to (404 otherwise; never a path)."""
    if name is None:
        return None
    return resolve_atlas_path(name, settings, allow_paths=False).name[: -len(SUFFIX)]


async def run_billed(
    request: Request,
    principal: Principal | None,
    *,
    endpoint: str,
    options: Mapping[str, Any],
    work: Callable[[Parsed], Any],
    render: Callable[[Any, Parsed, Charge], bytes],
    media_type: str,
    reserved_params: tuple[str, ...] = (),
) -> Response:
    """Run one billed engine request and return its HTTP response.

    Parameters
    ----------
    request, principal
        The request and its authenticated caller (``None`` in local mode).
    endpoint
        Name recorded in usage rows and metrics (``annotate``, ``embed``, ``markers``).
    options
        Boolean route options with defaults, accepted in the JSON body or query string.
    work
        Engine call, run in a worker thread: ``work(parsed) -> output``.
    render
        ``render(output, parsed, charge) -> bytes``; runs inside the charging transaction.
    media_type
        Content type of the rendered body.
    reserved_params
        Query parameters consumed by the route itself (e.g. ``format``).
    """
    state = request.app.state
    settings, ledger = state.settings, state.ledger
    key_id = principal.key_id if principal is not None else None
    idem = idempotency_key(request)
    marks = [("start", time.perf_counter())]
    if principal is not None and principal.credits < ledger.price(1):
        stored = idem is not None and await run_in_threadpool(ledger.has_stored, key_id, idem)
        if not stored:  # a retry of a paid request may still fetch its stored response
            raise ledger.empty_error(principal.credits)
    async with state.decode_budget.slot():
        body = await read_body(request, settings, hashed=idem is not None)
        try:
            marks.append(("read", time.perf_counter()))
            if idem:
                stored = await run_in_threadpool(ledger.replay, key_id, idem, body.digest)
                if stored is not None:
                    state.metrics.observe_work(endpoint, stored.cells, stored.credits_charged, True)
                    return charge_response(stored, request_id(request))
            pay = (lambda n: ledger.check_balance(key_id, n)) if key_id is not None else None
            params = {k: v for k, v in request.query_params.items() if k not in reserved_params}
            parsed = await run_in_threadpool(
                parse_request,
                body,
                content_type=request.headers.get("content-type"),
                params=params,
                options=options,
                limits=RequestLimits.from_settings(settings, pay=pay),
            )
        finally:
            body.close()
    if parsed.model is not None:
        await run_in_threadpool(lambda: model_status(parsed.model, settings=settings))  # unknown name -> 404 now
    parsed.atlas = await run_in_threadpool(http_atlas, parsed.atlas, settings)
    marks.append(("parse", time.perf_counter()))
    output = await run_job(request, work, parsed)
    marks.append(("engine", time.perf_counter()))
    if idem is None and await request.is_disconnected():
        raise ClientDisconnectedError(
            "The client closed the connection before the response; nothing was charged.",
            fix="Send an Idempotency-Key so a retry gets the stored response instead of a new run.",
        )
    rid = request_id(request)
    charge = await run_in_threadpool(
        lambda: ledger.charge(
            key_id,
            parsed.n_cells,
            idem,
            endpoint=endpoint,
            request_hash=body.digest,
            request_id=rid,
            render=lambda ch: render(output, parsed, ch),
            media_type=media_type,
        )
    )
    marks.append(("respond", time.perf_counter()))
    state.metrics.observe_work(endpoint, charge.cells, charge.credits_charged, charge.replayed)
    timing = ", ".join(f"{name};dur={1000 * (t - marks[i][1]):.1f}" for i, (name, t) in enumerate(marks[1:]))
    return charge_response(charge, rid, {"Server-Timing": timing})


async def run_job(request: Request, work: Callable[[Parsed], Any], parsed: Parsed) -> Any:
    """Run CPU-bound engine work on the app's bounded worker pool (429 when the queue is full)."""
    state = request.app.state
    limiter: anyio.CapacityLimiter = state.job_limiter
    if limiter.available_tokens == 0 and limiter.statistics().tasks_waiting >= MAX_QUEUED_JOBS:
        raise ServerBusyError(
            f"The server is busy ({MAX_QUEUED_JOBS} jobs queued).",
            fix="Retry after a few seconds (the Python client does this automatically).",
            details={"retry_after": 5},
        )
    state.metrics.job_started()
    try:
        return await anyio.to_thread.run_sync(work, parsed, limiter=limiter)
    finally:
        state.metrics.job_finished()


def charge_response(charge: Charge, rid: str, extra_headers: Mapping[str, str] | None = None) -> Response:
    """HTTP response for a (possibly replayed) charge, with usage headers."""
    headers = {"X-Request-ID": rid, "X-Credits-Charged": str(charge.credits_charged), **(extra_headers or {})}
    if charge.credits_left is not None:
        headers["X-Credits-Remaining"] = str(charge.credits_left)
    if charge.replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(content=charge.body, status_code=charge.status_code, media_type=charge.media_type, headers=headers)


def idempotency_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key`` header, validated (1-255 visible ASCII characters)."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not (0 < len(key) <= 255) or not all(33 <= ord(c) < 127 for c in key):
        raise InputError(
            "The Idempotency-Key header must be 1-255 visible ASCII characters.",
            fix="Use a UUID, e.g. Idempotency-Key: 6f1c0a7e-...",
            field="Idempotency-Key",
        )
    return key


def request_id(request: Request) -> str:
    """A per-request id (kept on ``request.state``)."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.state.request_id = uuid.uuid4().hex[:16]
    return rid
