"""The billed request cycle shared by annotate, embed and markers.

replay an earlier response for the same Idempotency-Key (the body hash runs
in the background and is waited for only when there is one to compare) -> decode body ->
parse -> refuse early (402) if the key cannot pay -> run the engine in a
worker thread (bounded queue, 429 when full) -> charge and store the response
in one transaction -> respond. Nothing is charged when any step fails. A
``Server-Timing`` header gives the milliseconds of each step (read, parse, engine,
hash wait, respond = render + ledger).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

import anyio
from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool

from cellatlas.encoders import model_status
from cellatlas.errors import InputError
from cellatlas.service.errors import ServerBusyError
from cellatlas.service.ledger import Charge, Principal
from cellatlas.service.payload import Parsed, decode_body, parse_request

_HASHER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cellatlas-hash")

MAX_QUEUED_JOBS = 32
"""Jobs allowed to wait for a worker thread before the server answers 429."""


def default_job_slots() -> int:
    """Engine jobs run at once per process: half the cores (the engine itself uses threads)."""
    return max(1, (os.cpu_count() or 2) // 2)


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
    raw = await request.body()
    marks.append(("read", time.perf_counter()))
    # The body hash (needed to store the response, or to check a replay) runs beside
    # decoding, parsing and the engine instead of before them.
    hashing = _HASHER.submit(request_hash, request, raw) if idem else None
    if idem:
        stored = await run_in_threadpool(ledger.replay, key_id, idem, hashing.result)
        if stored is not None:
            state.metrics.observe_work(endpoint, stored.cells, stored.credits_charged, True)
            return charge_response(stored, request_id(request))
    body = await run_in_threadpool(decode_body, raw, request.headers.get("content-encoding"), settings.max_body_bytes)
    del raw
    params = {k: v for k, v in request.query_params.items() if k not in reserved_params}
    parsed = await run_in_threadpool(
        parse_request,
        body,
        content_type=request.headers.get("content-type"),
        params=params,
        options=options,
        max_cells=settings.max_cells_per_request,
    )
    del body
    if parsed.model is not None:
        await run_in_threadpool(lambda: model_status(parsed.model, settings=settings))  # unknown name -> 404 now
    await run_in_threadpool(ledger.check_balance, key_id, parsed.n_cells)
    marks.append(("parse", time.perf_counter()))
    output = await run_job(request, work, parsed)
    marks.append(("engine", time.perf_counter()))
    req_hash = await asyncio.wrap_future(hashing) if hashing is not None else ""
    marks.append(("hash", time.perf_counter()))
    rid = request_id(request)
    charge = await run_in_threadpool(
        lambda: ledger.charge(
            key_id,
            parsed.n_cells,
            idem,
            endpoint=endpoint,
            request_hash=req_hash,
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


def request_hash(request: Request, body: bytes) -> str:
    """Fingerprint of a request as sent: route, query, content type and encoding, body bytes.

    A retry must resend the same bytes (the client does); BLAKE2b keeps this cheap on
    100 MB bodies.
    """
    h = hashlib.blake2b(digest_size=32)
    h.update(request.method.encode())
    h.update(request.url.path.encode())
    h.update(repr(sorted(request.query_params.multi_items())).encode())
    for name in ("content-type", "content-encoding"):
        h.update(b"\0" + (request.headers.get(name) or "").split(";")[0].strip().lower().encode())
    h.update(b"\0")
    h.update(body)
    return h.hexdigest()


def request_id(request: Request) -> str:
    """A per-request id (kept on ``request.state``)."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.state.request_id = uuid.uuid4().hex[:16]
    return rid
