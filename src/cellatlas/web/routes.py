"""HTTP routes of the browser workspace: the page, its static files and ``/workspace/api/``.

Mounted by :func:`cellatlas.service.create_app` on the same app (and engine) as the
API. Every ``/workspace/api/`` route except ``config`` takes the same API-key
principal as the API; in local mode (no keys required) the principal is ``None``.
"""

from __future__ import annotations

import mimetypes
import re
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, Response
from pydantic import BaseModel, Field

from cellatlas.config import Settings, get_settings
from cellatlas.errors import CellAtlasError, InputError, ModelUnavailableError, PayloadTooLargeError
from cellatlas.result import CONFIDENT, REVIEW
from cellatlas.service.deps import get_principal
from cellatlas.web import engine, jobs, usermap, views
from cellatlas.web.export import write_annotated_h5ad, write_calls_csv
from cellatlas.web.sessions import ACCEPTED_SUFFIXES, Session, SessionStore

STATIC_DIR = Path(__file__).parent / "static"
API = "/workspace/api"


class ORJSONNumpy(Response):
    """JSON response that serialises numpy arrays directly (fast for 100k-point plots)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def _json(content: Any, status_code: int = 200) -> ORJSONNumpy:
    return ORJSONNumpy(content, status_code=status_code)


router = APIRouter(tags=["workspace"], default_response_class=ORJSONNumpy)


class RunOptions(BaseModel):
    """What the user chose before pressing Run."""

    model: str | None = Field(None, description="Model name; the server's default when omitted.")
    atlas: str | None = Field(None, description="Atlas name; the server's default when omitted.")
    min_counts: float | None = Field(None, ge=0, description="Flag cells with fewer total counts.")
    max_mito_fraction: float | None = Field(None, ge=0, le=1, description="Flag cells with a higher MT- fraction.")
    skip_gene_check: bool = Field(False, description="Skip the check that the gene names belong to the matrix columns.")


class RelabelRequest(BaseModel):
    """Relabel some cells (``cells``) or every cell of a label (``group``); ``label=null`` reverts."""

    label: str | None = None
    cells: list[int] | None = None
    group: str | None = None


# ---------------------------------------------------------------- helpers
def _settings(request: Request) -> Settings:
    return getattr(request.app.state, "settings", None) or get_settings()


def _store(request: Request) -> SessionStore:
    from cellatlas.service.housekeeping import workspace_store  # one store per app, also swept in the background

    return workspace_store(request.app)


def _owner(principal: Any) -> str | None:
    """The key id that owns sessions (``None`` in local mode)."""
    return None if principal is None else str(principal.key_id)


def _session(request: Request, sid: str, principal: Any) -> Session:
    return _store(request).get(sid, _owner(principal))


def _finished_run(session: Session) -> dict[str, Any]:
    state = session.meta.get("status", {}).get("state")
    run = session.load_result() if state == "done" else None
    if run is None:
        raise CellAtlasError(
            f"This session has no finished annotation yet (state: {state}).",
            fix="Press Annotate cells and wait for it to finish, then ask again.",
        )
    return run


def _charger(request: Request, principal: Any, n_cells: int):
    """Check the key can pay for ``n_cells`` now; return the function that charges after the run."""
    ledger = getattr(request.app.state, "ledger", None)
    if ledger is None:
        return None
    key_id = _owner(principal)
    ledger.check_balance(key_id, n_cells)
    per_credit = _settings(request).cells_per_credit
    return lambda n: ledger.charge(key_id, n, endpoint="workspace").usage_dict(per_credit)


# ---------------------------------------------------------------- page + static
def _page() -> HTMLResponse:
    return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})


@router.get("/", include_in_schema=False)
def page_root() -> HTMLResponse:
    """The workspace page (the product's front door)."""
    return _page()


@router.get("/workspace", include_in_schema=False)
def page_workspace() -> HTMLResponse:
    """The workspace page."""
    return _page()


def plotly_js_path() -> Path:
    """``plotly.min.js`` from the installed ``plotly`` Python package (served, never copied)."""
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def _plotly_version() -> str:
    import plotly

    return str(plotly.__version__)


@router.get("/static/{path:path}", include_in_schema=False)
def static_file(path: str) -> FileResponse:
    """Static assets of the page; ``vendor/plotly.min.js`` comes from the plotly package.

    plotly.js is versioned by the URL (``?v=``) and cached for a day; the page's own
    files are revalidated on every load.
    """
    if path == "vendor/plotly.min.js":
        return FileResponse(plotly_js_path(), media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"})
    target = (STATIC_DIR / path).resolve()
    if STATIC_DIR.resolve() not in target.parents or not target.is_file():
        raise HTTPException(status_code=404, detail=f"No static file '{path}'.")
    media = "text/javascript" if target.suffix == ".js" else mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    return FileResponse(target, media_type=media, headers={"Cache-Control": "no-cache"})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cellatlas")
    except PackageNotFoundError:
        return "dev"


# ---------------------------------------------------------------- api: config
@router.get(f"{API}/config")
def config(request: Request) -> Response:
    """Whether keys are required, the models and atlases on offer, limits and bands."""
    s = _settings(request)
    choices = engine.choices(s)
    if s.workspace_warm_up:
        engine.warm_up(s, choices["default_atlas"])
    return _json(
        {
            "require_api_key": bool(s.require_api_key),
            "version": _version(),
            **choices,
            "accepted": ACCEPTED_SUFFIXES,
            "plotly_url": f"/static/vendor/plotly.min.js?v={_plotly_version()}",
            "max_upload_bytes": _store(request).max_upload_bytes,
            "bands": {"confident": CONFIDENT, "review": REVIEW},
        }
    )


@router.get(f"{API}/whoami")
def whoami(request: Request, principal: Any = Depends(get_principal)) -> Response:
    """The signed-in key's id, name and credits (``{"local": true}`` in local mode)."""
    if principal is None:
        return _json({"local": True})
    return _json({"local": False, "key_id": principal.key_id, "name": principal.name, "credits": principal.credits})


# ---------------------------------------------------------------- api: sessions
@router.post(f"{API}/sessions", status_code=201)
async def upload(
    request: Request,
    filename: str = Query(..., min_length=1, max_length=255, description="Original file name (its suffix picks the reader)."),
    principal: Any = Depends(get_principal),
) -> Response:
    """Upload a dataset as the raw request body; returns the session id and the dataset facts."""
    store = _store(request)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > store.max_upload_bytes:
        raise PayloadTooLargeError(
            f"The upload ({int(declared) / 1024**2:.0f} MiB) is larger than this server's workspace limit "
            f"({store.max_upload_bytes / 1024**2:.0f} MiB).",
            fix="Upload a smaller file, or use the Python client (annotate_large) for big datasets.",
            field="file",
        )
    name = re.sub(r"[\\/]+", "_", filename)
    session = await store.create_from_stream(name, request.stream(), _owner(principal))
    try:
        ds = await run_in_threadpool(jobs.dataset_of, session)
        facts = await run_in_threadpool(engine.dataset_facts, ds, engine.choices(_settings(request))["atlases"], _settings(request))
    except BaseException:
        store.delete(session.id, _owner(principal))
        raise
    session.update(facts=facts)
    meta = session.meta
    return _json(
        {"session": session.id, "filename": name, "format": meta["format"], "size_bytes": meta["size_bytes"], "facts": facts},
        status_code=201,
    )


@router.get(f"{API}/sessions/{{sid}}")
def session_info(sid: str, request: Request, principal: Any = Depends(get_principal)) -> Response:
    """The session's file, facts, options and status."""
    s = _session(request, sid, principal)
    return _json({k: s.meta.get(k) for k in ("id", "filename", "format", "size_bytes", "facts", "options", "status")})


@router.delete(f"{API}/sessions/{{sid}}", status_code=204)
def delete_session(sid: str, request: Request, principal: Any = Depends(get_principal)) -> Response:
    """Delete the session and its files now."""
    _store(request).delete(sid, _owner(principal))
    return Response(status_code=204)


@router.post(f"{API}/sessions/{{sid}}/run", status_code=202)
def run(sid: str, opts: RunOptions, request: Request, principal: Any = Depends(get_principal)) -> Response:
    """Validate the choices, charge credits and start annotating in the background."""
    from cellatlas.atlas import load_atlas
    from cellatlas.encoders import model_status

    s = _session(request, sid, principal)
    settings = _settings(request)
    ch = engine.choices(settings)
    options = opts.model_dump()
    options["model"] = opts.model or ch["default_model"]
    options["atlas"] = opts.atlas or ch["default_atlas"]
    if not options["model"] or not options["atlas"]:
        raise InputError("This server has no usable model or atlas.", fix="Install an atlas (`cellatlas atlas list`).")
    status = model_status(options["model"], settings=settings)
    if not status.get("usable"):
        raise ModelUnavailableError(
            f"Model '{options['model']}' cannot run on this server: {status.get('reason', 'unavailable')}.",
            fix="Choose another model (the list shows which are available).",
            field="model",
        )
    load_atlas(options["atlas"], settings, allow_paths=False).stats(options["model"])  # installed names only; raises if it lacks this model
    n = int((s.meta.get("facts") or {}).get("n_cells") or jobs.dataset_of(s).X.shape[0])
    charge = _charger(request, principal, n)
    jobs.start_run(s, options, settings, charge)
    return _json({"session": sid, "status": s.meta["status"], "options": options}, status_code=202)


@router.get(f"{API}/sessions/{{sid}}/status")
def run_status(sid: str, request: Request, principal: Any = Depends(get_principal)) -> Response:
    """Progress of the run: ``state`` (uploaded/running/done/error), ``stage``, ``progress`` and any error."""
    return _json(jobs.current_status(_session(request, sid, principal)))


@router.get(f"{API}/sessions/{{sid}}/results")
def results(sid: str, request: Request, principal: Any = Depends(get_principal)) -> Response:
    """Points, label table, confidence histogram, marker dot plot, comparisons with the
    upload's labels/clusters, the map of the user's cells and the summary of the run."""
    s = _session(request, sid, principal)
    run_ = _finished_run(s)
    return _json({**views.results_payload(run_, s.relabels()), "user_map": usermap.payload(s, run_)})


@router.get(f"{API}/sessions/{{sid}}/user-map")
def user_map(sid: str, request: Request, principal: Any = Depends(get_principal)) -> Response:
    """The map of the user's own cells: ``state`` (computing/done/error/unavailable) and, once done, ``x``/``y``."""
    s = _session(request, sid, principal)
    return _json(usermap.payload(s, _finished_run(s)))


@router.get(f"{API}/sessions/{{sid}}/review")
def review(
    sid: str,
    request: Request,
    band: str = "uncertain",
    label: str | None = None,
    offset: int = Query(0, ge=0),
    limit: int = Query(25, ge=1, le=200),
    principal: Any = Depends(get_principal),
) -> Response:
    """A page of the review queue (least confident first)."""
    s = _session(request, sid, principal)
    return _json(views.review_page(_finished_run(s), s.relabels(), band=band, label=label or None, offset=offset, limit=limit))


@router.get(f"{API}/sessions/{{sid}}/cells/{{index}}")
def cell(sid: str, index: int, request: Request, principal: Any = Depends(get_principal)) -> Response:
    """One cell's call, alternates, markers, evidence and QC."""
    s = _session(request, sid, principal)
    return _json(views.cell_detail(_finished_run(s), s.relabels(), index))


@router.post(f"{API}/sessions/{{sid}}/relabel")
def relabel(sid: str, body: RelabelRequest, request: Request, principal: Any = Depends(get_principal)) -> Response:
    """Relabel cells or a whole label group (kept in the session and in every download)."""
    s = _session(request, sid, principal)
    run_ = _finished_run(s)
    with s.lock:
        new, n = views.apply_relabel(run_, s.relabels(), label=body.label, cells=body.cells, group=body.group)
        s.set_relabels(new)
    return _json({"changed": n, "n_relabelled": len(new)})


@router.get(f"{API}/sessions/{{sid}}/download/{{kind}}")
async def download(sid: str, kind: str, request: Request, principal: Any = Depends(get_principal)) -> FileResponse:
    """``h5ad``: the uploaded data with the calls in ``obs``; ``csv``: one row of calls per cell."""
    s = _session(request, sid, principal)
    run_ = _finished_run(s)
    stem = re.sub(r"(\.(h5ad|h5|zip|csv|tsv))?(\.gz)?$", "", s.meta["filename"], flags=re.I) or "dataset"
    if kind == "h5ad":
        ds = await run_in_threadpool(jobs.dataset_of, s)
        path = await run_in_threadpool(write_annotated_h5ad, ds.adata, run_, dict(s.relabels()), s.dir / "annotated.h5ad")
        media = "application/x-hdf5"
    elif kind == "csv":
        path = await run_in_threadpool(write_calls_csv, run_, dict(s.relabels()), s.dir / "calls.csv")
        media = "text/csv"
    else:
        raise InputError(f"Unknown download '{kind}'.", fix="Use download/h5ad or download/csv.")
    return FileResponse(path, media_type=media, filename=f"{stem}.cellatlas.{kind}")
