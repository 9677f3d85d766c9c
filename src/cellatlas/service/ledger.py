"""API keys, credits, usage records and idempotent replays, in one SQL database.

Keys look like ``sk-ca-<8 hex>_<43 url-safe characters>``: the first part is a public
prefix (stored, shown by ``keys list``), the rest the secret. The database stores only
``HMAC-SHA-256(server secret, SHA-256(key))`` (:func:`hash_key`), so a copy of the
database alone cannot check guesses; the stored and presented hashes are compared with
:func:`hmac.compare_digest`. The server secret is ``CELLATLAS_API_KEY_SECRET`` or a
random value created once in ``CELLATLAS_HOME/api_key_secret`` (:func:`key_secret`).
Databases from before (plain SHA-256, prefixes showing 4 secret characters) are
migrated once, in one transaction, when a ledger opens them: the stored SHA-256 is
wrapped in the HMAC and the prefix replaced (old keys keep working).

Pricing: one credit per started block of ``cells_per_credit`` cells
(default 1,000), so 1 cell costs 1 credit and 10,000 cells cost 10.
Charging is one conditional ``UPDATE ... WHERE credits >= price`` inside the
same transaction that records usage and stores the idempotent response, so
concurrent requests can never overdraw a key or be charged twice.
"""

from __future__ import annotations

import hmac
import math
import secrets
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import zstandard
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError

from cellatlas.config import Settings
from cellatlas.errors import AuthError, InputError, PaymentRequiredError
from cellatlas.service.db import LOCAL_SCOPE, api_keys, idempotency, make_engine, normalise_url, usage, utcnow
from cellatlas.service.errors import IdempotencyKeyReusedError
from cellatlas.service.keys import KEY_PREFIX, LEGACY_PREFIX, hash_key, key_secret, migrate_key_hashes, new_key

__all__ = ["Charge", "KeyInfo", "Ledger", "Principal", "KEY_PREFIX", "LEGACY_PREFIX", "hash_key", "key_secret"]

IDEMPOTENCY_TTL = timedelta(hours=24)
_ZSTD_LEVEL = 3


@dataclass(frozen=True)
class Principal:
    """The caller behind a valid API key."""

    key_id: str
    name: str
    credits: int


@dataclass(frozen=True)
class KeyInfo:
    """A stored key, without its secret."""

    id: str
    name: str
    prefix: str
    credits: int
    created_at: Any
    revoked_at: Any = None
    last_used_at: Any = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (timestamps as ISO strings)."""
        iso = lambda t: t.isoformat() if t is not None else None  # noqa: E731
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "credits": int(self.credits),
            "created_at": iso(self.created_at),
            "revoked_at": iso(self.revoked_at),
            "last_used_at": iso(self.last_used_at),
            "revoked": self.revoked,
        }


@dataclass
class Charge:
    """Outcome of :meth:`Ledger.charge` (or of a replayed idempotent request)."""

    cells: int
    credits_charged: int
    credits_left: int | None
    endpoint: str
    replayed: bool = False
    body: bytes = b""
    media_type: str = "application/json"
    status_code: int = 200
    extra: dict[str, Any] = field(default_factory=dict)

    def usage_dict(self, cells_per_credit: int) -> dict[str, Any]:
        """The ``usage`` block of a response."""
        return {
            "cells": int(self.cells),
            "credits_charged": int(self.credits_charged),
            "credits_left": None if self.credits_left is None else int(self.credits_left),
            "cells_per_credit": int(cells_per_credit),
            "pricing": f"1 credit per started block of {cells_per_credit:,} cells",
        }


class Ledger:
    """Keys, credits and usage in a SQL database.

    Parameters
    ----------
    database_url
        SQLAlchemy URL (``sqlite:///path.db`` or ``postgresql+psycopg://...``).
    engine
        An existing engine instead of a URL.
    free_credits
        Credits granted to a new key.
    cells_per_credit
        Pricing: one credit per started block of this many cells.
    secret
        Server secret for key hashes (default: :func:`key_secret` of the process settings).
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        engine: Engine | None = None,
        free_credits: int = 500,
        cells_per_credit: int = 1000,
        secret: bytes | str | None = None,
    ) -> None:
        if engine is None and database_url is None:
            raise ValueError("Ledger needs a database_url or an engine")
        self.engine = engine if engine is not None else make_engine(database_url)
        self.free_credits = int(free_credits)
        self.cells_per_credit = int(cells_per_credit)
        secret = key_secret() if secret is None else secret
        self._secret = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        self._zc = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
        migrate_key_hashes(self.engine, self._secret)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Ledger":
        """Ledger on ``settings.resolved_database_url`` with the configured pricing and key secret."""
        return cls(
            settings.resolved_database_url,
            free_credits=settings.free_credits,
            cells_per_credit=settings.cells_per_credit,
            secret=key_secret(settings),
        )

    @staticmethod
    def describe_url(url: str) -> str:
        """``url`` with any password masked, for logs."""
        return make_url(normalise_url(url)).render_as_string(hide_password=True)

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # ----------------------------------------------------------------- pricing
    def price(self, n_cells: int) -> int:
        """Credits for ``n_cells`` cells: one per started block of ``cells_per_credit``."""
        if n_cells < 0:
            raise ValueError("n_cells must be >= 0")
        return math.ceil(n_cells / self.cells_per_credit)

    def hash_key(self, api_key: str) -> str:
        """The stored form of ``api_key`` under this ledger's secret (:func:`hash_key`)."""
        return hash_key(api_key, self._secret)

    # -------------------------------------------------------------------- keys
    def create_key(self, name: str, credits: int | None = None) -> tuple[str, KeyInfo]:
        """Create a key; returns ``(secret, info)``. The secret is shown only here."""
        credits = self.free_credits if credits is None else int(credits)
        if credits < 0:
            raise InputError("Credits must be >= 0.", fix="Pass a non-negative number.", field="credits")
        public, secret = new_key()
        row = {
            "id": "key_" + secrets.token_hex(6),
            "name": name,
            "prefix": public,
            "key_hash": self.hash_key(secret),
            "credits": credits,
            "created_at": utcnow(),
        }
        with self.engine.begin() as conn:
            conn.execute(insert(api_keys).values(**row))
        return secret, self.get_key(row["id"])

    def get_key(self, key_id: str) -> KeyInfo:
        """Look a key up by id (raises :class:`InputError` if unknown)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).mappings().first()
        if row is None:
            raise InputError(
                f"No API key with id '{key_id}'.",
                fix="List the ids with `cellatlas keys list`.",
                field="key_id",
            )
        return _key_info(row)

    def list_keys(self, include_revoked: bool = True) -> list[KeyInfo]:
        """All keys, oldest first (never the secrets)."""
        stmt = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
        if not include_revoked:
            stmt = stmt.where(api_keys.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            return [_key_info(r) for r in conn.execute(stmt).mappings()]

    def revoke(self, key_id: str) -> KeyInfo:
        """Revoke a key; it stops authenticating at once. Revoking twice is a no-op."""
        self.get_key(key_id)
        with self.engine.begin() as conn:
            conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
        return self.get_key(key_id)

    def topup(self, key_id: str, credits: int) -> KeyInfo:
        """Add ``credits`` (> 0) to a key, atomically."""
        if int(credits) <= 0:
            raise InputError("Top-up credits must be > 0.", fix="Pass a positive number of credits.", field="credits")
        self.get_key(key_id)
        with self.engine.begin() as conn:
            conn.execute(
                update(api_keys).where(api_keys.c.id == key_id).values(credits=api_keys.c.credits + int(credits))
            )
        return self.get_key(key_id)

    def authenticate(self, api_key: str | None) -> Principal:
        """Resolve a presented key to a :class:`Principal` or raise :class:`AuthError`."""
        fix = "Send `Authorization: Bearer sk-...` with a key from `cellatlas keys create`."
        if not api_key:
            raise AuthError("An API key is required.", fix=fix, field="Authorization")
        presented = self.hash_key(api_key)
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_hash == presented)).mappings().first()
        stored = row["key_hash"] if row is not None else "0" * 64
        if row is None or not hmac.compare_digest(stored, presented):
            raise AuthError("The API key is not valid.", fix=fix, field="Authorization")
        if row["revoked_at"] is not None:
            raise AuthError("The API key has been revoked.", fix="Create a new key with `cellatlas keys create`.", field="Authorization")
        return Principal(key_id=row["id"], name=row["name"], credits=int(row["credits"]))

    # ---------------------------------------------------------------- charging
    def empty_error(self, balance: int) -> PaymentRequiredError:
        """402 for a key that cannot pay for a single cell (raised before the body is read)."""
        return PaymentRequiredError(
            f"Not enough credits: the key has {balance} and every request costs at least {self.price(1)}.",
            fix="Top the key up (`cellatlas keys topup KEY_ID CREDITS`).",
            field="Authorization",
            details={"balance": balance, "price": self.price(1), "cells_per_credit": self.cells_per_credit},
        )

    def has_stored(self, key_id: str | None, idempotency_key: str) -> bool:
        """Whether a response is stored for ``(key, Idempotency-Key)``."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(idempotency.c.idem_key).where(idempotency.c.scope == (key_id or LOCAL_SCOPE), idempotency.c.idem_key == idempotency_key)
            ).first() is not None

    def check_balance(self, key_id: str | None, n_cells: int) -> int:
        """Raise :class:`PaymentRequiredError` now if the key cannot pay for ``n_cells``.

        Returns the price. ``key_id=None`` (local mode) is always free.
        """
        price = self.price(n_cells)
        if key_id is None:
            return price
        info = self.get_key(key_id)
        if info.credits < price:
            raise self._payment_error(info.credits, price, n_cells)
        return price

    def charge(
        self,
        key_id: str | None,
        n_cells: int,
        idempotency_key: str | None = None,
        *,
        endpoint: str = "annotate",
        request_hash: str = "",
        request_id: str | None = None,
        render: Callable[[Charge], bytes] | None = None,
        media_type: str = "application/json",
    ) -> Charge:
        """Charge for ``n_cells`` of finished work, atomically.

        Parameters
        ----------
        key_id
            Paying key, or ``None`` in local mode (usage recorded, nothing charged).
        n_cells
            Cells processed.
        idempotency_key
            If given, the response body is stored; a second call with the same
            key returns the stored :class:`Charge` (``replayed=True``) without
            charging again.
        endpoint, request_hash, request_id
            Recorded with the usage row; ``request_hash`` guards key reuse.
        render
            Builds the response body from the :class:`Charge` inside the
            transaction, so the stored body carries the real balance.

        Raises
        ------
        PaymentRequiredError
            The key's balance is below the price (HTTP 402, ``details.balance``).
        AuthError
            The key was revoked meanwhile.
        """
        if idempotency_key:
            stored = self.replay(key_id, idempotency_key, request_hash)
            if stored is not None:
                return stored
        price = self.price(n_cells) if key_id is not None else 0
        now = utcnow()
        try:
            with self.engine.begin() as conn:
                left = None
                if key_id is not None:
                    row = conn.execute(
                        update(api_keys)
                        .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None), api_keys.c.credits >= price)
                        .values(credits=api_keys.c.credits - price, last_used_at=now)
                        .returning(api_keys.c.credits)
                    ).first()
                    if row is None:
                        self._raise_unchargeable(conn, key_id, price, n_cells)
                    left = int(row[0])
                result = Charge(cells=n_cells, credits_charged=price, credits_left=left, endpoint=endpoint, media_type=media_type)
                if render is not None:
                    result.body = render(result)
                conn.execute(
                    insert(usage).values(
                        key_id=key_id, endpoint=endpoint, cells=n_cells, credits=price, credits_left=left,
                        idempotency_key=idempotency_key, request_id=request_id, created_at=now,
                    )
                )
                if idempotency_key:
                    self._store(conn, key_id, idempotency_key, request_hash, result, now)
        except IntegrityError:
            # A concurrent request with the same Idempotency-Key committed first.
            stored = self.replay(key_id, idempotency_key, request_hash) if idempotency_key else None
            if stored is None:
                raise
            return stored
        return result

    def replay(self, key_id: str | None, idempotency_key: str, request_hash: str | Callable[[], str] = "") -> Charge | None:
        """The stored response for ``(key, Idempotency-Key)``, or ``None``.

        ``request_hash`` may be a callable, called only when there is a stored
        response to compare with. Raises :class:`IdempotencyKeyReusedError` when the
        key was used for a different request body.
        """
        scope = key_id or LOCAL_SCOPE
        with self.engine.connect() as conn:
            row = conn.execute(
                select(idempotency).where(idempotency.c.scope == scope, idempotency.c.idem_key == idempotency_key)
            ).mappings().first()
        if row is None:
            return None
        if callable(request_hash):
            request_hash = request_hash()
        if request_hash and row["request_hash"] and not hmac.compare_digest(row["request_hash"], request_hash):
            raise IdempotencyKeyReusedError(
                "This Idempotency-Key was already used for a different request.",
                fix="Use a new Idempotency-Key (e.g. a UUID) for every distinct request; reuse it only to retry the same one.",
                field="Idempotency-Key",
            )
        return Charge(
            cells=int(row["cells"]),
            credits_charged=int(row["credits"]),
            credits_left=None if row["credits_left"] is None else int(row["credits_left"]),
            endpoint=row["endpoint"],
            replayed=True,
            body=zstandard.ZstdDecompressor().decompress(row["body"]),
            media_type=row["media_type"],
            status_code=int(row["status_code"]),
        )

    # ------------------------------------------------------------------- usage
    def usage_summary(self, key_id: str | None, limit: int = 50) -> dict[str, Any]:
        """Totals and the most recent ``limit`` usage rows for a key (``None``: local mode)."""
        cond = usage.c.key_id == key_id if key_id is not None else usage.c.key_id.is_(None)
        with self.engine.connect() as conn:
            tot = conn.execute(
                select(func.count(), func.coalesce(func.sum(usage.c.cells), 0), func.coalesce(func.sum(usage.c.credits), 0)).where(cond)
            ).first()
            rows = conn.execute(
                select(usage).where(cond).order_by(usage.c.id.desc()).limit(max(0, int(limit)))
            ).mappings().all()
        recent = [
            {
                "endpoint": r["endpoint"],
                "cells": int(r["cells"]),
                "credits": int(r["credits"]),
                "credits_left": None if r["credits_left"] is None else int(r["credits_left"]),
                "idempotency_key": r["idempotency_key"],
                "request_id": r["request_id"],
                "created_at": r["created_at"].isoformat() if r["created_at"] is not None else None,
            }
            for r in rows
        ]
        return {
            "totals": {"requests": int(tot[0]), "cells": int(tot[1]), "credits": int(tot[2])},
            "recent": recent,
        }

    # ----------------------------------------------------------------- helpers
    def _store(self, conn, key_id, idempotency_key, request_hash, result: Charge, now) -> None:
        conn.execute(delete(idempotency).where(idempotency.c.created_at < now - IDEMPOTENCY_TTL))
        conn.execute(
            insert(idempotency).values(
                scope=key_id or LOCAL_SCOPE, idem_key=idempotency_key, request_hash=request_hash or "",
                endpoint=result.endpoint, status_code=result.status_code, media_type=result.media_type,
                body=self._zc.compress(result.body), cells=result.cells, credits=result.credits_charged,
                credits_left=result.credits_left, created_at=now,
            )
        )

    def _raise_unchargeable(self, conn, key_id: str, price: int, n_cells: int):
        row = conn.execute(select(api_keys.c.credits, api_keys.c.revoked_at).where(api_keys.c.id == key_id)).first()
        if row is None or row[1] is not None:
            raise AuthError("The API key has been revoked.", fix="Create a new key with `cellatlas keys create`.", field="Authorization")
        raise self._payment_error(int(row[0]), price, n_cells)

    def _payment_error(self, balance: int, price: int, n_cells: int) -> PaymentRequiredError:
        return PaymentRequiredError(
            f"Not enough credits: this request of {n_cells:,} cells costs {price} credits but the key has {balance}.",
            fix=(
                f"Top the key up (`cellatlas keys topup KEY_ID CREDITS`) or send at most "
                f"{balance * self.cells_per_credit:,} cells."
            ),
            field="Authorization",
            details={"balance": balance, "price": price, "cells": n_cells, "cells_per_credit": self.cells_per_credit},
        )


def _key_info(row) -> KeyInfo:
    return KeyInfo(
        id=row["id"], name=row["name"], prefix=row["prefix"], credits=int(row["credits"]),
        created_at=row["created_at"], revoked_at=row["revoked_at"], last_used_at=row["last_used_at"],
    )
