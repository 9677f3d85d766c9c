"""The workspace's map of the user's own cells.

The upload's ``obsm["X_umap"]`` when it has one (drawn as the user made it); otherwise a
UMAP computed with scanpy on the cellatlas embedding (:func:`cellatlas.tl.embedding_umap`)
in the background once the calls are shown, so a large upload does not wait for it. The
state lives in the session's ``meta["user_map"]`` (``computing`` / ``done`` / ``error`` /
``unavailable``) and the coordinates in ``user_map.npy``.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor
from typing import Any

import numpy as np

from cellatlas.web.sessions import Session

FILE = "user_map.npy"
UPLOADED_KEY = "X_umap"
TITLES = {
    "uploaded": "Your cells on your UMAP (obsm['X_umap'] of the upload)",
    "computed": "Your cells on a UMAP of the cellatlas embedding (scanpy)",
}


def uploaded(adata: Any, n_cells: int) -> dict[str, Any] | None:
    """The upload's own 2-D map, if it carries one for every cell."""
    obsm = getattr(adata, "obsm", {})
    if UPLOADED_KEY not in obsm:
        return None
    xy = np.asarray(obsm[UPLOADED_KEY], dtype=np.float32)
    if xy.ndim != 2 or xy.shape[0] != n_cells or xy.shape[1] < 2 or not np.isfinite(xy[:, :2]).all():
        return None
    return {"state": "done", "source": "uploaded", "xy": xy[:, :2]}


def reset(session: Session) -> None:
    """Forget the map of an earlier run (a new run starts)."""
    (session.dir / FILE).unlink(missing_ok=True)
    session.update(user_map=None)


def start(session: Session, run: dict[str, Any], executor: Executor) -> None:
    """Compute the map in the background unless the upload brought one."""
    if run.get("user_map") is not None:
        return
    if run["result"].embedding is None:
        session.update(user_map={"state": "unavailable", "message": "This model returns no embedding to lay the cells out with."})
        return
    started = session.meta.get("status", {}).get("started")
    session.update(user_map={"state": "computing"})
    executor.submit(_compute, session, run["result"].embedding, started)


def _compute(session: Session, embedding: np.ndarray, started: Any) -> None:
    from cellatlas import tl

    t = time.perf_counter()
    try:
        xy = tl.embedding_umap(embedding)
    except Exception as e:  # the calls stand without a map; say why there is none
        state = {"state": "error", "message": f"The UMAP could not be computed ({type(e).__name__}: {e})."}
    else:
        state = {"state": "done", "source": "computed", "seconds": round(time.perf_counter() - t, 2)}
    with session.lock:
        if not (session.dir / "meta.json").exists():
            return  # the session was deleted meanwhile
        session.reload_meta()
        if session.meta.get("status", {}).get("started") != started:
            return  # a newer run replaced the one this map was for
        if state["state"] == "done":
            np.save(session.dir / FILE, xy)
        session.update(user_map=state)


def payload(session: Session, run: dict[str, Any]) -> dict[str, Any]:
    """What the page draws: ``state``, ``source``, ``title`` and, when done, ``x``/``y``."""
    own = run.get("user_map")
    if own is not None:
        xy, meta = own["xy"], own
    else:
        meta = session.meta.get("user_map") or {"state": "computing"}
        path = session.dir / FILE
        if meta.get("state") != "done" or not path.exists():
            return {k: v for k, v in meta.items() if k != "xy"}
        xy = np.load(path)
    return {
        "state": "done",
        "source": meta["source"],
        "title": TITLES[meta["source"]],
        "x": np.round(xy[:, 0].astype(float), 3),
        "y": np.round(xy[:, 1].astype(float), 3),
    }
