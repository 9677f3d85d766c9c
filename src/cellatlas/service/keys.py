"""API key secrets: format, the keyed hash the database stores, the server secret, migration.

Keys look like ``sk-ca-<8 hex>_<43 url-safe characters>``: the first part is a public
prefix (stored, shown by ``keys list``), the rest the secret. The database stores only
``HMAC-SHA-256(server secret, SHA-256(key))`` (:func:`hash_key`); the server secret is
``CELLATLAS_API_KEY_SECRET`` or a random value created once in ``CELLATLAS_HOME/api_key_secret``
(:func:`key_secret`). :func:`migrate_key_hashes` upgrades a database written before (plain
SHA-256, prefixes showing secret characters) once, in one transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from cellatlas.config import Settings, get_settings
from cellatlas.errors import CellAtlasError
from cellatlas.service.db import api_keys, meta

KEY_PREFIX = "sk-ca-"
HASH_SCHEME = "hmac-sha256(sha256)-v1"
LEGACY_PREFIX = KEY_PREFIX + "(legacy)"
"""Stored prefix of keys created before prefixes were public (the old one showed secret characters)."""


def new_key() -> tuple[str, str]:
    """``(public prefix, full key)`` of a fresh key."""
    public = KEY_PREFIX + secrets.token_hex(4)
    return public, f"{public}_{secrets.token_urlsafe(32)}"


def hash_key(api_key: str, secret: bytes) -> str:
    """What the database stores for a key: ``HMAC-SHA-256(secret, SHA-256 hex of the key)``.

    The inner SHA-256 is what older databases stored, so they migrate without the keys.
    """
    return _wrap(hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest(), secret)


def _wrap(sha256_hex: str, secret: bytes) -> str:
    return hmac.new(secret, sha256_hex.encode("ascii"), hashlib.sha256).hexdigest()


def _secret_check(secret: bytes) -> str:
    return hmac.new(secret, b"cellatlas key secret check", hashlib.sha256).hexdigest()


def key_secret(settings: Settings | None = None) -> bytes:
    """The server secret for key hashes: ``CELLATLAS_API_KEY_SECRET``, else ``home/api_key_secret``
    (created once, mode 0600, by whichever process needs it first)."""
    settings = settings or get_settings()
    if settings.api_key_secret is not None and settings.api_key_secret.get_secret_value():
        return settings.api_key_secret.get_secret_value().encode("utf-8")
    path = Path(settings.home) / "api_key_secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32))
    for _ in range(50):  # another process may be writing it right now
        value = path.read_text().strip()
        if value:
            return value.encode("utf-8")
        time.sleep(0.01)
    raise CellAtlasError(f"The key secret file {path} is empty.", fix="Delete it (keys hashed with it stop working) or set CELLATLAS_API_KEY_SECRET.")


def migrate_key_hashes(engine: Engine, secret: bytes) -> None:
    """Record the hash scheme once; wrap plain SHA-256 rows of an older database in the HMAC.

    The scheme row is inserted first in the same transaction, so of two processes
    opening an old database at once exactly one rewrites the rows. A different
    secret than the one the rows were hashed with is refused (every key would fail).
    """
    check = _secret_check(secret)
    for attempt in range(20):
        try:
            with engine.begin() as conn:
                rows = dict(conn.execute(select(meta.c.key, meta.c.value)).all())
                if rows.get("key_hash_scheme") == HASH_SCHEME:
                    if rows.get("key_secret_check") != check:
                        raise CellAtlasError(
                            "The API key secret differs from the one this database's keys were hashed with.",
                            fix="Set CELLATLAS_API_KEY_SECRET (or CELLATLAS_HOME/api_key_secret) to the original secret; "
                            "every server and `cellatlas keys` command on this database needs the same one.",
                        )
                    return
                conn.execute(insert(meta).values(key="key_hash_scheme", value=HASH_SCHEME))
                conn.execute(insert(meta).values(key="key_secret_check", value=check))
                for key_id, old in conn.execute(select(api_keys.c.id, api_keys.c.key_hash)).all():
                    conn.execute(
                        update(api_keys).where(api_keys.c.id == key_id).values(key_hash=_wrap(old, secret), prefix=LEGACY_PREFIX)
                    )
            return
        except (IntegrityError, OperationalError):
            time.sleep(0.05 * (attempt + 1))  # another process migrates or holds the lock: look again
    raise CellAtlasError("Could not record the key-hash scheme in the ledger database.", fix="Check the database is writable.")
