"""FastAPI dependencies shared by the API routes and the web workspace.

``get_principal`` authenticates ``Authorization: Bearer sk-...`` against the
ledger; in local mode (``require_api_key=False``, ``cellatlas serve --local``)
it returns ``None`` and nothing is charged. It also applies the rate limits on
failed authentication (per IP) and on requests per key (429 beyond them).
"""

from __future__ import annotations

from fastapi import Request

from cellatlas.config import Settings
from cellatlas.errors import AuthError
from cellatlas.service.ledger import Ledger, Principal
from cellatlas.service.ratelimit import client_ip

__all__ = ["Principal", "get_ledger", "get_principal", "get_service_settings", "bearer_token"]


def get_service_settings(request: Request) -> Settings:
    """The :class:`~cellatlas.config.Settings` the app was created with."""
    return request.app.state.settings


def get_ledger(request: Request) -> Ledger:
    """The app's :class:`~cellatlas.service.ledger.Ledger`."""
    return request.app.state.ledger


def bearer_token(authorization: str | None) -> str | None:
    """The key in an ``Authorization: Bearer <key>`` header (``None`` if absent).

    Raises
    ------
    AuthError
        The header is present but not of the form ``Bearer <key>``.
    """
    if authorization is None or not authorization.strip():
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(
            "The Authorization header must be 'Bearer <api key>'.",
            fix="Send `Authorization: Bearer sk-...`.",
            field="Authorization",
        )
    return token.strip()


def get_principal(request: Request) -> Principal | None:
    """Authenticate the caller.

    Returns
    -------
    Principal or None
        The key's id, name and credits; ``None`` when the server runs without keys.

    Raises
    ------
    AuthError
        Keys are required and the Bearer key is missing, unknown or revoked (401).
    """
    settings: Settings = request.app.state.settings
    if not settings.require_api_key:
        return None
    limits = getattr(request.app.state, "rate_limits", None)
    ip = client_ip(request.scope)
    if limits is not None:
        limits.check_auth(ip)
    try:
        principal = request.app.state.ledger.authenticate(bearer_token(request.headers.get("authorization")))
    except AuthError:
        if limits is not None:
            limits.auth_failed(ip)
        raise
    if limits is not None:
        limits.key_request(principal.key_id)
    return principal
