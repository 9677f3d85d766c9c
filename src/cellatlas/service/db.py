"""Database tables and engine factory for the key/credit ledger.

SQLite (a file, WAL journal) by default; PostgreSQL through
``CELLATLAS_DATABASE_URL=postgresql+psycopg://...``. Tables are created on
first use (``create_all`` is idempotent).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

metadata = MetaData()

LOCAL_SCOPE = "local"
"""Idempotency scope used when the server runs without API keys."""

api_keys = Table(
    "cellatlas_api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("prefix", String(16), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("credits", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
    CheckConstraint("credits >= 0", name="ck_cellatlas_credits_nonnegative"),
)

usage = Table(
    "cellatlas_usage",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_id", String(32), ForeignKey("cellatlas_api_keys.id"), nullable=True, index=True),
    Column("endpoint", String(64), nullable=False),
    Column("cells", BigInteger, nullable=False),
    Column("credits", BigInteger, nullable=False),
    Column("credits_left", BigInteger, nullable=True),
    Column("idempotency_key", String(255), nullable=True),
    Column("request_id", String(64), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

idempotency = Table(
    "cellatlas_idempotency",
    metadata,
    Column("scope", String(32), primary_key=True),
    Column("idem_key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("media_type", String(100), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("cells", BigInteger, nullable=False),
    Column("credits", BigInteger, nullable=False),
    Column("credits_left", BigInteger, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
Index("ix_cellatlas_idempotency_created", idempotency.c.created_at)

meta = Table(
    "cellatlas_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)
"""Ledger facts: the key-hash scheme and a check value of the server secret it uses."""


def utcnow() -> datetime:
    """Timezone-aware current time (UTC)."""
    return datetime.now(timezone.utc)


def normalise_url(url: str) -> str:
    """Pick the installed PostgreSQL driver (psycopg 3) for bare ``postgresql://`` URLs."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str) -> Engine:
    """Create a SQLAlchemy engine for ``url`` and make sure the tables exist.

    Parameters
    ----------
    url
        SQLAlchemy URL. SQLite files get WAL journaling, a 30 s busy timeout
        and a parent directory created on demand.

    Returns
    -------
    sqlalchemy.engine.Engine
    """
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(url, parsed.database)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, future=True)
    create_tables(engine)
    return engine


_INIT_LOCK = 0x63656C6C61746C  # PostgreSQL advisory lock id for table creation ("cellatl")


def create_tables(engine: Engine, attempts: int = 5) -> None:
    """Create the ledger tables if missing, safely when several processes start at once.

    ``uvicorn --workers N`` and replicas behind a load balancer all start against one
    database: on PostgreSQL the creation runs under a transaction-scoped advisory lock;
    on SQLite (and for any other race) a failed attempt is retried, and the retry sees
    the tables the other process made.
    """
    for attempt in range(attempts):
        try:
            with engine.begin() as conn:
                if engine.dialect.name == "postgresql":
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_INIT_LOCK})")
                metadata.create_all(conn, checkfirst=True)
            return
        except (OperationalError, ProgrammingError, IntegrityError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


def _sqlite_engine(url: str, database: str | None) -> Engine:
    if database and database != ":memory:":
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, future=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # let SQLAlchemy emit BEGIN itself
        cur = dbapi_connection.cursor()
        if database and database != ":memory:":
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN")

    return engine
