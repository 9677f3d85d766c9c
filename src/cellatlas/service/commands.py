"""CLI commands of the service: ``cellatlas serve`` and ``cellatlas keys ...``.

``serve`` is a plain function with typer-annotated parameters and
``keys_app`` a :class:`typer.Typer`; ``cellatlas.cli`` mounts both.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cellatlas.config import get_settings
from cellatlas.errors import CellAtlasError

if TYPE_CHECKING:  # SQLAlchemy loads with the first ledger command, not with every `cellatlas` call
    from cellatlas.service.ledger import Ledger

keys_app = typer.Typer(help="Manage API keys and credits (stored hashed in the ledger database).", no_args_is_help=True)

DatabaseOpt = Annotated[
    Optional[str],
    typer.Option("--database-url", help="SQLAlchemy URL of the ledger (default: CELLATLAS_DATABASE_URL or the SQLite file in CELLATLAS_HOME)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def serve(
    host: Annotated[str, typer.Option("--host", help="Interface to bind (127.0.0.1 = this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Worker processes (each runs engine jobs).")] = 1,
    local: Annotated[bool, typer.Option("--local", help="No API keys and no charging: for a laptop or a trusted network.")] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
    fallback_model: Annotated[
        Optional[str],
        typer.Option(
            "--fallback-model",
            help="Model that answers requests for a model that cannot run here (default: 'default', "
            "or CELLATLAS_FALLBACK_MODEL).",
        ),
    ] = None,
    strict_models: Annotated[
        bool,
        typer.Option(
            "--strict-models",
            help="Refuse (409 model_unavailable) requests for a model that cannot run here instead of falling back "
            "(or CELLATLAS_STRICT_MODELS=true).",
        ),
    ] = False,
) -> None:
    """Serve the Cell Atlas API (docs at http://HOST:PORT/docs).

    Model fallback: a request for a model whose weights are not installed here (the articles ask for "geneformer") is answered by the fallback model ("default"), and the response says so: provenance.model_requested and provenance.model_used, a "warnings" entry and the X-Model-Used / X-Model-Requested headers. --strict-models restores the 409 refusal.
    """
    import uvicorn

    from cellatlas.service.ledger import Ledger

    # the app factory runs in uvicorn's worker processes: settings travel as CELLATLAS_* variables
    if local:
        os.environ["CELLATLAS_REQUIRE_API_KEY"] = "false"
    if fallback_model is not None:
        os.environ["CELLATLAS_FALLBACK_MODEL"] = fallback_model
    if strict_models:
        os.environ["CELLATLAS_STRICT_MODELS"] = "true"
    get_settings.cache_clear()
    if local and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: --local on {host} lets anyone who can reach it annotate without a key", err=True)
    settings = get_settings()
    mode = "local (no API keys)" if not settings.require_api_key else "API keys required"
    models = "strict models" if settings.strict_models or not settings.fallback_model else f"fallback model '{settings.fallback_model}'"
    typer.echo(
        f"cellatlas API on http://{host}:{port} ({mode}; {models}; ledger {Ledger.describe_url(settings.resolved_database_url)})",
        err=True,
    )
    uvicorn.run(
        "cellatlas.service.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
    )


def _ledger(database_url: str | None) -> Ledger:
    from cellatlas.service.ledger import Ledger

    s = get_settings()
    return Ledger(database_url or s.resolved_database_url, free_credits=s.free_credits, cells_per_credit=s.cells_per_credit)


def _fail(err: CellAtlasError) -> None:
    typer.echo(f"error: {err.one_line()}", err=True)
    raise typer.Exit(code=2)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", "-n", help="Who or what the key is for.")],
    credits: Annotated[Optional[int], typer.Option("--credits", help="Starting credits (default: CELLATLAS_FREE_CREDITS, 500).")] = None,
    database_url: DatabaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key. The secret is printed once and never stored."""
    try:
        secret, info = _ledger(database_url).create_key(name, credits)
    except CellAtlasError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps({"api_key": secret, **info.to_dict()}))
        return
    typer.echo(secret)
    typer.echo(f"id {info.id}, {info.credits} credits. Store the key now: it cannot be shown again.", err=True)


@keys_app.command("list")
def keys_list(
    all_keys: Annotated[bool, typer.Option("--all/--active", help="Include revoked keys (default) or only active ones.")] = True,
    database_url: DatabaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List keys (ids, names, prefixes, credits; never the secrets)."""
    keys = _ledger(database_url).list_keys(include_revoked=all_keys)
    if as_json:
        typer.echo(json.dumps([k.to_dict() for k in keys]))
        return
    table = Table("id", "name", "prefix", "credits", "created", "status")
    for k in keys:
        table.add_row(k.id, k.name, k.prefix + "...", str(k.credits), str(k.created_at)[:19], "revoked" if k.revoked else "active")
    Console(width=120).print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="Key id (from `cellatlas keys list`).")],
    database_url: DatabaseOpt = None,
) -> None:
    """Revoke a key: it stops working immediately."""
    try:
        info = _ledger(database_url).revoke(key_id)
    except CellAtlasError as e:
        _fail(e)
    typer.echo(f"revoked {info.id} ({info.name})")


@keys_app.command("topup")
def keys_topup(
    key_id: Annotated[str, typer.Argument(help="Key id (from `cellatlas keys list`).")],
    credits: Annotated[int, typer.Argument(help="Credits to add (> 0).")],
    database_url: DatabaseOpt = None,
) -> None:
    """Add credits to a key."""
    try:
        info = _ledger(database_url).topup(key_id, credits)
    except CellAtlasError as e:
        _fail(e)
    typer.echo(f"{info.id} now has {info.credits} credits")


__all__ = ["keys_app", "serve"]
