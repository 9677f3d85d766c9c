"""The browser workspace: upload, annotate, look, review, download.

``router`` (a FastAPI ``APIRouter``) serves the page at ``/`` and ``/workspace``,
its assets under ``/static/`` and its JSON endpoints under ``/workspace/api/``;
:func:`cellatlas.service.create_app` includes it next to the ``/v1`` API.
"""

from cellatlas.web.routes import router

__all__ = ["router"]
