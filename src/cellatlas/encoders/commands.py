"""``cellatlas models ...``: which models can run here, and why not.

The lead's CLI mounts :data:`models_app` as ``cellatlas models``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cellatlas.config import Settings
from cellatlas.encoders import MODEL_NAMES, available_models, model_status

models_app = typer.Typer(help="List the embedding models and whether they can run here.", no_args_is_help=True)


@models_app.command("list")
def list_models(
    models_dir: Optional[Path] = typer.Option(
        None, "--models-dir", help="Directory holding <model>/ checkpoint folders (default: $CELLATLAS_MODELS_DIR)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show every model: usable or not, the reason, and where its checkpoint is looked for."""
    settings = Settings(models_dir=models_dir) if models_dir else Settings()
    rows = available_models(settings)
    _print(rows, as_json)


@models_app.command("info")
def model_info(
    name: str = typer.Argument(..., help=f"One of: {', '.join(MODEL_NAMES)}."),
    model_path: Optional[Path] = typer.Option(None, "--model-path", help="Checkpoint directory to check instead of the default."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Check one model (optionally at an explicit checkpoint path); exits 1 when it is not usable."""
    from cellatlas.errors import CellAtlasError

    try:
        row = model_status(name, model_path=model_path)
    except CellAtlasError as err:
        typer.echo(f"error: {err.one_line()}", err=True)
        raise typer.Exit(2)
    _print([row], as_json)
    if not row["usable"]:
        raise typer.Exit(1)


def _print(rows: list[dict], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table("model", "kind", "usable", "path", "details", show_lines=True)
    for r in rows:  # escaped: "pip install 'cellatlas[foundation]'" is text, not rich markup
        cells = (r["name"], r["kind"], "yes" if r["usable"] else "no", r["path"] or "-", r["reason"])
        table.add_row(*(escape(str(c)) for c in cells))
    Console(width=160).print(table)
