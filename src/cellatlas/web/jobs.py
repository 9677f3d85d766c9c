"""Background runs: QC flags, annotation with progress, and the data the plots need.

The HTTP handler validates and charges, then :func:`start_run` hands the work to a
small thread pool; the page polls the session's ``status`` until it is ``done`` or
``error`` (an error keeps the engine's message and fix).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from cellatlas.config import Settings
from cellatlas.errors import CellAtlasError
from cellatlas.web import engine
from cellatlas.tl import defining_markers, expression_for_genes
from cellatlas.web import usermap
from cellatlas.web.analysis import qc_flags
from cellatlas.web.sessions import Session

MAX_REFERENCE_POINTS = 20_000
MARKERS_PER_LABEL = 4

_PROCESS = secrets.token_hex(8)
"""Identifies this server process in run statuses (pids can be reused after a restart)."""
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cellatlas-workspace")
        return _pool


def dataset_of(session: Session) -> engine.Dataset:
    """The session's parsed upload (read again from disk if this process has not cached it)."""
    with session.lock:
        ds = session.cache.get("dataset")
        if ds is None:
            ds = engine.load_dataset(session.upload_path, session.meta["filename"])
            session.cache["dataset"] = ds
        return ds


ChargeFn = Callable[[int], "dict[str, Any] | None"]


def start_run(session: Session, options: dict[str, Any], settings: Settings, charge: ChargeFn | None = None) -> None:
    """Mark the session running and annotate it in the background.

    ``charge(n_cells)`` is called once the cells are annotated (credits are for finished
    work); its usage dict is kept in the status.
    """
    with session.lock:
        if current_status(session).get("state") == "running":
            return
        session.cache.pop("result", None)
        (session.dir / "result.pkl").unlink(missing_ok=True)
        session.set_relabels({})
        usermap.reset(session)
        session.update(
            options=options,
            status={
                "state": "running",
                "stage": "Queued",
                "progress": 0.0,
                "started": time.time(),
                "pid": os.getpid(),
                "process": _PROCESS,
            },
        )
    _executor().submit(_run_safely, session, options, settings, charge)


def current_status(session: Session) -> dict[str, Any]:
    """The run status; a run whose worker process is gone (server restarted) becomes an error."""
    st = session.meta.get("status", {})
    if st.get("state") == "running" and not _alive(st.get("pid"), st.get("process")):
        session.update(
            status={
                "state": "error",
                "stage": "Failed",
                "progress": 1.0,
                "error": {
                    "code": "run_interrupted",
                    "message": "The server stopped while this dataset was being annotated.",
                    "fix": "Press Annotate cells again; the uploaded file is still here.",
                },
            }
        )
    return session.meta.get("status", {})


def _alive(pid: Any, process: Any) -> bool:
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():  # this process (or a restarted one that got the same pid)
        return process == _PROCESS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run_safely(session: Session, options: dict[str, Any], settings: Settings, charge: ChargeFn | None) -> None:
    try:
        run = build_run(session, options, settings, lambda stage, frac: _progress(session, stage, frac))
        usage = charge(len(run["result"])) if charge else None
        session.save_result(run)
        total = round(time.time() - session.meta["status"].get("started", time.time()), 3)
        session.update(status={"state": "done", "stage": "Done", "progress": 1.0, "seconds": total, "usage": usage})
        usermap.start(session, run, _executor())  # a UMAP of the user's cells, when the upload has none
    except CellAtlasError as e:
        session.update(status={"state": "error", "stage": "Failed", "progress": 1.0, **e.to_dict()})
    except Exception as e:  # an engine bug must still end the progress bar with a message
        engine.log.exception("workspace run of session %s failed", session.id)
        session.update(
            status={
                "state": "error",
                "stage": "Failed",
                "progress": 1.0,
                "error": {
                    "code": "internal_error",
                    "message": f"The annotation failed unexpectedly ({type(e).__name__}: {e}).",
                    "fix": "Try again; if it keeps failing, report it with the file's format and size.",
                },
            }
        )


def _progress(session: Session, stage: str, frac: float) -> None:
    st = dict(session.meta.get("status", {}))
    st.update(stage=stage, progress=round(float(frac), 3))
    session.update(status=st)


def build_run(session: Session, options: dict[str, Any], settings: Settings, progress) -> dict[str, Any]:
    """Annotate the session's dataset and gather what the results page needs."""
    from cellatlas.atlas import load_atlas

    timings: dict[str, float] = {}
    t = time.perf_counter()
    progress("Reading the file", 0.02)
    ds = dataset_of(session)
    timings["read"] = time.perf_counter() - t

    t = time.perf_counter()
    progress("Quality control", 0.05)
    qc = qc_flags(
        ds.X, ds.genes, ds.symbols, min_counts=options.get("min_counts"), max_mito_fraction=options.get("max_mito_fraction")
    )
    timings["qc"] = time.perf_counter() - t

    t = time.perf_counter()
    res = engine.annotate_dataset(
        ds,
        model=options["model"],
        atlas=options["atlas"],
        settings=settings,
        progress=lambda stage, frac: progress(stage, 0.08 + 0.8 * frac),
        skip_gene_check=bool(options.get("skip_gene_check")),
    )
    timings["annotate"] = time.perf_counter() - t

    t = time.perf_counter()
    progress("Preparing plots", 0.9)
    atlas = load_atlas(options["atlas"], settings)
    marker_sets = {k: dict(v) for k, v in atlas.marker_sets.items()}
    col_of: dict[str, int] = {}
    for j, s in enumerate(ds.symbols):
        if s and s not in col_of:
            col_of[s] = j
    # each label's own markers (no gene claimed away by another label: the view picks per shown label)
    expr_genes = list(dict.fromkeys(g for lab in marker_sets for _, g in defining_markers([lab], marker_sets, col_of, MARKERS_PER_LABEL)))
    expr_scale = "log1p(CP10k)" if ds.value_type == "counts" else f"uploaded values ({ds.value_type})"
    expr = expression_for_genes(ds.X, [col_of[g] for g in expr_genes], values=ds.value_type) if expr_genes else None
    labels_df = atlas.labels
    ontology = {str(k): str(v or "") for k, v in labels_df["ontology_id"].items()} if "ontology_id" in labels_df else {}
    timings["plots"] = time.perf_counter() - t
    return {
        "result": res,
        "qc": qc,
        "options": dict(options),
        "expr": expr,
        "expr_genes": expr_genes,
        "gene_names": engine.marker_display_names(ds, marker_sets, col_of),
        "expr_scale": expr_scale,
        "groupings": engine.upload_groupings(ds),
        "user_map": usermap.uploaded(ds.adata, len(res)),
        "marker_sets": marker_sets,
        "ontology": ontology,
        "reference": reference_backdrop(atlas),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def reference_backdrop(atlas, max_points: int = MAX_REFERENCE_POINTS) -> dict[str, Any] | None:
    """Reference cells' 2-D layout (a grey backdrop), evenly subsampled to ``max_points``."""
    try:
        df = atlas.layout_reference()
    except (KeyError, AttributeError):
        return None
    n_total = len(df)
    if n_total > max_points:
        df = df.iloc[np.linspace(0, n_total - 1, max_points).astype(int)]
    return {"x": np.round(df["x"].to_numpy(float), 3), "y": np.round(df["y"].to_numpy(float), 3), "n_total": int(n_total)}
