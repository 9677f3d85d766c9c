"""Request-size limit (enforced before any parsing) and limit advertisement.

:class:`BodyLimitMiddleware` is a plain ASGI middleware: it refuses a request
whose ``Content-Length`` exceeds the limit without reading the body, and stops
a chunked upload as soon as the bytes received pass the limit. Every response
carries ``X-CellAtlas-Max-Cells`` and ``X-CellAtlas-Max-Body-Bytes``.
"""

from __future__ import annotations

from typing import Any

import orjson

from cellatlas.config import Settings
from cellatlas.errors import InputError, PayloadTooLargeError


def limits_info(settings: Settings) -> dict[str, Any]:
    """What the server accepts: sizes, pricing, formats (served at ``GET /v1/limits``)."""
    from cellatlas.service.payload import CONTENT_ENCODINGS, CONTENT_TYPES

    return {
        "max_cells_per_request": int(settings.max_cells_per_request),
        "max_body_bytes": int(settings.max_body_bytes),
        "content_types": list(CONTENT_TYPES),
        "content_encodings": list(CONTENT_ENCODINGS),
        "require_api_key": bool(settings.require_api_key),
        "free_credits": int(settings.free_credits),
        "pricing": {
            "cells_per_credit": int(settings.cells_per_credit),
            "rule": f"1 credit per started block of {settings.cells_per_credit:,} cells",
        },
    }


def too_large_error(limit: int, size: int | None = None) -> PayloadTooLargeError:
    """The 413 error for a body over ``limit`` bytes."""
    got = f" ({size:,} bytes)" if size is not None else ""
    return PayloadTooLargeError(
        f"The request body{got} is larger than this server's limit of {limit:,} bytes.",
        fix="Split the cells into smaller requests (cellatlas.client.Client.annotate_large chunks to the server's "
        "limits), or use the compressed binary format (Content-Type: application/x-npz, Content-Encoding: zstd).",
        field="body",
        details={"max_body_bytes": limit, "body_bytes": size},
    )


class BodyLimitMiddleware:
    """Refuse bodies over ``max_body_bytes`` with 413 before the app parses them.

    Parameters
    ----------
    app
        The wrapped ASGI app.
    settings
        Supplies ``max_body_bytes`` and ``max_cells_per_request`` (advertised in headers).
    """

    def __init__(self, app, settings: Settings) -> None:
        self.app = app
        self.limit = int(settings.max_body_bytes)
        self.headers = [
            (b"x-cellatlas-max-cells", str(int(settings.max_cells_per_request)).encode()),
            (b"x-cellatlas-max-body-bytes", str(self.limit).encode()),
        ]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        async def send_with_limits(message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) + self.headers)
            await send(message)

        length = _content_length(scope)
        if isinstance(length, InputError):
            await _send_error(send_with_limits, length)
            return
        if length is not None and length > self.limit:
            await _send_error(send_with_limits, too_large_error(self.limit, length), close=True)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # Raised inside the route, so the app's CellAtlasError handler answers 413.
                    raise too_large_error(self.limit)
            return message

        await self.app(scope, limited_receive, send_with_limits)


def _content_length(scope) -> int | None | InputError:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                n = int(value)
                if n < 0:
                    raise ValueError
                return n
            except ValueError:
                return InputError(
                    f"Invalid Content-Length header {value.decode(errors='replace')!r}.",
                    fix="Send the body size in bytes as a non-negative integer.",
                    field="Content-Length",
                )
    return None


async def _send_error(send, err, close: bool = False) -> None:
    body = orjson.dumps(err.to_dict())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
