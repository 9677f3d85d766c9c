"""Errors that only the HTTP service raises (all are :class:`CellAtlasError` subclasses)."""

from __future__ import annotations

from cellatlas.errors import CellAtlasError


class IdempotencyKeyReusedError(CellAtlasError):
    """The Idempotency-Key was already used for a different request."""

    status_code = 422
    code = "idempotency_key_reused"


class ServerBusyError(CellAtlasError):
    """Too many annotation jobs are queued; retry after ``Retry-After`` seconds."""

    status_code = 429
    code = "server_busy"


class NotReadyError(CellAtlasError):
    """The server cannot serve requests yet (database or atlases missing)."""

    status_code = 503
    code = "not_ready"


class ClientDisconnectedError(CellAtlasError):
    """The client left before the response was ready (nginx's 499); nothing is charged."""

    status_code = 499
    code = "client_disconnected"
