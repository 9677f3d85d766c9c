"""Request limits: the body-size middleware, the per-request decode limits, advertisement.

:class:`BodyLimitMiddleware` is a plain ASGI middleware: it refuses a request
whose ``Content-Length`` exceeds the limit without reading the body, and stops
a chunked upload as soon as the bytes received pass the limit. Every response
carries ``X-CellAtlas-Max-Cells`` and ``X-CellAtlas-Max-Body-Bytes``.
:class:`RequestLimits` is what the body decoders check declared sizes against
(cells, genes, bytes, compression ratios, and the caller's balance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import orjson

from cellatlas.config import Settings
from cellatlas.errors import InputError, PayloadTooLargeError
from cellatlas.service.body import RATIO_SLACK, too_large_error


@dataclass
class RequestLimits:
    """What one decoded request may declare, checked before any array is built.

    Attributes
    ----------
    max_cells, max_genes
        Cells (rows) and genes (columns) per request.
    max_bytes
        Bytes one decoded array or HDF5 dataset may declare, and all of them together.
    encoding_ratio
        Declared bytes per stored byte inside a compressed npz member.
    hdf5_ratio
        Declared bytes per stored byte of an HDF5 dataset (fill-value and chunk bombs).
    pay
        ``pay(n_cells)`` raises :class:`~cellatlas.errors.PaymentRequiredError` when the
        caller cannot pay for ``n_cells`` (``None``: free).
    """

    max_cells: int
    max_genes: int = 200_000
    max_bytes: int = 2 * 1024**3
    encoding_ratio: float = 20.0
    hdf5_ratio: float = 200.0
    pay: Callable[[int], Any] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, pay: Callable[[int], Any] | None = None) -> "RequestLimits":
        return cls(
            max_cells=int(settings.max_cells_per_request),
            max_genes=int(settings.max_genes_per_request),
            max_bytes=int(settings.max_body_bytes),
            encoding_ratio=float(settings.max_encoding_ratio),
            hdf5_ratio=float(settings.max_hdf5_ratio),
            pay=pay,
        )

    def check_cells(self, n_cells: int, field: str = "matrix.shape") -> None:
        """413 above the cell limit, then 402 if the caller cannot pay for ``n_cells``."""
        if n_cells > self.max_cells:
            raise PayloadTooLargeError(
                f"The request holds {n_cells:,} cells; this server accepts at most {self.max_cells:,} per request.",
                fix=f"Send the cells in chunks of at most {self.max_cells:,} (cellatlas.client.Client.annotate_large does this, order preserved).",
                field=field,
                details={"max_cells_per_request": self.max_cells, "n_cells": n_cells},
            )
        if self.pay is not None:
            self.pay(n_cells)

    def check_genes(self, n_genes: int, field: str = "matrix.shape") -> None:
        """413 above the gene (column) limit."""
        if n_genes > self.max_genes:
            raise PayloadTooLargeError(
                f"The request declares {n_genes:,} genes (columns); this server accepts at most {self.max_genes:,}.",
                fix="Send gene expression columns only (drop peaks, antibody tags and other features), or raise "
                "CELLATLAS_MAX_GENES_PER_REQUEST on your own server.",
                field=field,
                details={"max_genes_per_request": self.max_genes, "n_genes": n_genes},
            )

    def check_bytes(self, declared: int, stored: int, ratio: float, field: str) -> None:
        """413 when ``declared`` bytes exceed ``max_bytes`` or ``ratio * stored`` + 1 MiB."""
        if declared > self.max_bytes:
            raise PayloadTooLargeError(
                f"'{field}' declares {declared:,} bytes, more than this server's limit of {self.max_bytes:,}.",
                fix="Split the cells into smaller requests (cellatlas.client.Client.annotate_large does this).",
                field=field,
                details={"max_body_bytes": self.max_bytes, "declared_bytes": declared},
            )
        if declared > ratio * stored + RATIO_SLACK:
            raise PayloadTooLargeError(
                f"'{field}' declares {declared:,} bytes but stores only {stored:,}: more than {ratio:g}x, "
                "which real data never needs (a fill-value or compression bomb).",
                fix="Write the data with its real values (AnnData.write_h5ad / numpy.savez), not a declared size.",
                field=field,
                details={"declared_bytes": declared, "stored_bytes": stored, "max_ratio": ratio},
            )


def limits_info(settings: Settings) -> dict[str, Any]:
    """What the server accepts: sizes, pricing, formats (served at ``GET /v1/limits``)."""
    from cellatlas.service.body import CONTENT_ENCODINGS
    from cellatlas.service.payload import CONTENT_TYPES

    return {
        "max_cells_per_request": int(settings.max_cells_per_request),
        "max_genes_per_request": int(settings.max_genes_per_request),
        "max_body_bytes": int(settings.max_body_bytes),
        "max_encoding_ratio": float(settings.max_encoding_ratio),
        "max_concurrent_decodes": int(settings.resolved_decode_slots),
        "rate_limits": {
            "per_ip": {"per_second": settings.rate_limit_ip_per_s, "burst": settings.rate_limit_ip_burst},
            "per_key": {"per_second": settings.rate_limit_key_per_s, "burst": settings.rate_limit_key_burst},
            "failed_auth_per_ip": {"per_second": settings.rate_limit_auth_failures_per_s, "burst": settings.rate_limit_auth_failures_burst},
        },
        "content_types": list(CONTENT_TYPES),
        "content_encodings": list(CONTENT_ENCODINGS),
        "require_api_key": bool(settings.require_api_key),
        "free_credits": int(settings.free_credits),
        "pricing": {
            "cells_per_credit": int(settings.cells_per_credit),
            "rule": f"1 credit per started block of {settings.cells_per_credit:,} cells",
        },
    }


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
