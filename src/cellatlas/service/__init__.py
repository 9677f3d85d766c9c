"""The Cell Atlas HTTP service: FastAPI app, API keys and credit ledger.

``create_app(settings=None) -> FastAPI`` (see :mod:`cellatlas.service.app`);
``Ledger`` (see :mod:`cellatlas.service.ledger`); CLI commands ``serve`` and
``keys_app`` in :mod:`cellatlas.service.commands`.
"""

from __future__ import annotations

__all__ = ["Ledger", "create_app"]


def __getattr__(name: str):
    # Lazy, so that ``import cellatlas.service.deps`` does not pull in every route.
    if name == "create_app":
        from cellatlas.service.app import create_app

        return create_app
    if name == "Ledger":
        from cellatlas.service.ledger import Ledger

        return Ledger
    raise AttributeError(name)
