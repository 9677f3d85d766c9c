"""``/docs`` (Swagger UI) and ``/redoc`` served offline, from the installed ``fastapi-offline`` package.

The pages load ``swagger-ui-bundle.js``, ``swagger-ui.css`` and ``redoc.standalone.js``
from ``/docs/assets/`` (the package's own copies, never a CDN), and Swagger UI is
started by a small script file rather than an inline one, so the pages work under the
Content-Security-Policy of :mod:`cellatlas.service.security`.
"""

from __future__ import annotations

import html
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse

router = APIRouter(include_in_schema=False)

_OWN = Path(__file__).parent / "static"
_MEDIA = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
ASSETS = {
    "swagger-ui-bundle.js": "fastapi_offline",
    "swagger-ui.css": "fastapi_offline",
    "redoc.standalone.js": "fastapi_offline",
    "favicon.png": "fastapi_offline",
    "swagger-init.js": None,
}


def asset_path(name: str) -> Path:
    """Where an asset lives: the ``fastapi_offline`` package's ``static/`` or this package's."""
    package = ASSETS[name]
    return _OWN / name if package is None else Path(str(files(package) / "static" / name))


_PAGES = {
    "Swagger UI": ('<link rel="stylesheet" href="/docs/assets/swagger-ui.css">',
                   '<body data-openapi="{spec}"><div id="swagger-ui"></div><script src="/docs/assets/swagger-ui-bundle.js"></script>'
                   '<script src="/docs/assets/swagger-init.js"></script></body>'),
    "ReDoc": ("<style>body{{margin:0;padding:0}}</style>",
              '<body><redoc spec-url="{spec}"></redoc><script src="/docs/assets/redoc.standalone.js"></script></body>'),
}


def _page(request: Request, kind: str) -> HTMLResponse:
    head, body = _PAGES[kind]
    spec = html.escape(request.app.openapi_url or "/openapi.json")
    return HTMLResponse(
        f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(request.app.title)} - {kind}</title>"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<link rel=\"icon\" href=\"/docs/assets/favicon.png\">{head.format()}</head>{body.format(spec=spec)}</html>"
    )


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI for ``/openapi.json``."""
    return _page(request, "Swagger UI")


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    """ReDoc for ``/openapi.json``."""
    return _page(request, "ReDoc")


@router.get("/docs/assets/{name}")
def docs_asset(name: str) -> FileResponse:
    """One of :data:`ASSETS` (cached for a day)."""
    if name not in ASSETS:
        raise HTTPException(status_code=404, detail=f"No docs asset '{name}'.")
    path = asset_path(name)
    return FileResponse(path, media_type=_MEDIA[path.suffix], headers={"Cache-Control": "public, max-age=86400"})
