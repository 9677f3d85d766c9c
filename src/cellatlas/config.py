"""One settings object, read from ``CELLATLAS_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Runtime configuration. Every field can be set as ``CELLATLAS_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="CELLATLAS_", extra="ignore")

    home: Path = Path.home() / ".cellatlas"
    """Where caches, downloaded atlases and the default SQLite database live."""
    atlas_dir: Path | None = None
    """Extra directory searched for ``*.atlas.npz`` files (default: ``home/atlases``)."""
    models_dir: Path | None = None
    """Directory holding foundation-model checkpoints (default: ``home/models``)."""
    database_url: str | None = None
    """SQLAlchemy URL of the key/credit ledger (default: SQLite file in ``home``)."""
    chunk_size: int = 8192
    """Cells processed at once; the only place densification is bounded."""
    threads: int = 0
    """Chunks of one request scored in parallel threads (0: one per CPU, at most 8; 1: serial)."""
    max_cells_per_request: int = 100_000
    max_body_bytes: int = 2 * 1024**3
    require_api_key: bool = True
    free_credits: int = 500
    cells_per_credit: int = 1000
    """Pricing: one credit per started block of this many cells."""
    fallback_model: str | None = "default"
    """A service request for a model that cannot run here (no weights installed, or the atlas
    has no embedding for it) runs on this model instead, and the response says so
    (``provenance.model_used`` / ``model_requested``, a ``warnings`` entry, ``X-Model-Used``).
    Empty: refuse with 409, as ``strict_models`` does."""
    strict_models: bool = False
    """Refuse (409 ``model_unavailable``) a request for a model that cannot run here instead of
    answering with ``fallback_model``."""
    workspace_max_upload_bytes: int = 1024**3
    """Largest file the browser workspace accepts (bigger datasets: the Python client's ``annotate_large``)."""
    workspace_ttl_hours: float = 24.0
    """Workspace sessions (uploads, results) idle for longer are deleted."""

    @property
    def resolved_threads(self) -> int:
        import os

        return max(1, self.threads or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))

    @property
    def resolved_atlas_dir(self) -> Path:
        return self.atlas_dir or self.home / "atlases"

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir or self.home / "models"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'cellatlas.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; call ``get_settings.cache_clear()`` in tests)."""
    return Settings()
