"""Background housekeeping of a running server.

* At start: leftovers in the upload temporary directory are removed (decoded bodies are
  unnamed temporary files, so only a crash of an older version leaves any).
* While running: expired workspace sessions are deleted every ``workspace_sweep_seconds``
  (the store also refuses an expired session when asked for it), so uploads do not outlive
  their time-to-live on a quiet server.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi.concurrency import run_in_threadpool

from cellatlas.config import Settings, get_settings
from cellatlas.service.body import sweep_tmp

log = logging.getLogger("cellatlas.service")


def sweep_at_start(settings: Settings) -> int:
    """Empty the upload temporary directory; returns the number of files removed."""
    n = sweep_tmp(settings.resolved_upload_tmp_dir)
    if n:
        log.warning("removed %d leftover upload file(s) from %s", n, settings.resolved_upload_tmp_dir)
    return n


def workspace_store(app: Any):
    """The app's workspace session store (created here if the web workspace is installed), or ``None``."""
    store = getattr(app.state, "workspace_store", None)
    if store is not None:
        return store
    try:
        from cellatlas.web.sessions import SessionStore
    except ImportError:
        return None
    s: Settings = getattr(app.state, "settings", None) or get_settings()
    store = SessionStore(s.home / "workspace", max_upload_bytes=s.workspace_max_upload_bytes, ttl_seconds=s.workspace_ttl_hours * 3600)
    app.state.workspace_store = store
    return store


async def sweep_workspace(app: Any) -> list[str]:
    """Delete expired workspace sessions now (in a worker thread); returns their ids."""
    store = workspace_store(app)
    return [] if store is None else await run_in_threadpool(store.cleanup)


@asynccontextmanager
async def running(app: Any) -> AsyncIterator[None]:
    """Run the periodic workspace sweep for the lifetime of the app (``lifespan``)."""
    interval = float(app.state.settings.workspace_sweep_seconds)
    workspace_store(app)  # created now, so the web routes and the sweep share it

    async def loop() -> None:
        while True:
            try:
                removed = await sweep_workspace(app)
                if removed:
                    log.info("deleted %d expired workspace session(s)", len(removed))
            except Exception:  # noqa: BLE001 - a failed sweep must not stop the server; the next one retries
                log.exception("workspace sweep failed")
            await asyncio.sleep(interval)

    task = asyncio.create_task(loop()) if interval > 0 else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
