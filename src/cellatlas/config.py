"""One settings object, read from ``CELLATLAS_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import SecretStr
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
    """Largest request body, as sent and again after decompression; also the cap on what one
    decoded array or HDF5 dataset may declare."""
    max_genes_per_request: int = 200_000
    """Largest gene (column) count a request may declare."""
    max_encoding_ratio: float = 20.0
    """``Content-Encoding`` output bytes allowed per input byte (plus 1 MiB); real bodies are 3-7x."""
    max_hdf5_ratio: float = 200.0
    """Declared bytes of an uploaded HDF5 dataset allowed per stored byte (plus 1 MiB)."""
    json_parser_keep_bytes: int = 128 * 1024**2
    """JSON bodies up to this size are parsed by one parser the server keeps, reusing its
    buffers (about 5x the largest such body stay allocated); larger bodies, and bodies that
    arrive while it is busy, get a parser of their own. 0: never keep one."""
    max_concurrent_decodes: int = 0
    """Request bodies read and decoded at once across the server (0: max(2, CPUs)); more wait, then 429."""
    decode_wait_seconds: float = 10.0
    """How long a request waits for a decode slot before it is answered 429."""
    upload_tmp_dir: Path | None = None
    """Where decoded bodies spill to disk (default: ``home/tmp``); swept when the server starts."""
    rate_limit_ip_per_s: float = 20.0
    """Requests per second per client IP (token bucket refill; 0 disables)."""
    rate_limit_ip_burst: int = 200
    rate_limit_key_per_s: float = 10.0
    """Authenticated requests per second per API key (0 disables)."""
    rate_limit_key_burst: int = 60
    rate_limit_auth_failures_per_s: float = 0.2
    """Failed authentications per second per client IP, after the burst (0 disables)."""
    rate_limit_auth_failures_burst: int = 20
    api_key_secret: SecretStr | None = None
    """Server-side secret for HMAC-SHA-256 key hashes (default: generated once in ``home/api_key_secret``)."""
    workspace_sweep_seconds: float = 300.0
    """How often expired workspace sessions are deleted in the background (0: only on upload)."""
    require_api_key: bool = True
    free_credits: int = 500
    cells_per_credit: int = 1000
    """Pricing: one credit per started block of this many cells."""
    fallback_model: str | None = "default"
    """A service request for a model that cannot run here (no weights installed, or the atlas
    has no embedding for it) runs on this model instead, and the response says so
    (``provenance.model_used`` / ``model_requested``, a ``warnings`` entry, ``X-Model-Used``).
    Empty: refuse with 409, as ``strict_models`` does."""
    workspace_warm_up: bool = True
    """Warm the engine (gene tables, atlas, UMAP compilation) in a background thread when the
    workspace page first loads; off in the test suite, where such a thread would outlive its test."""
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
    def resolved_upload_tmp_dir(self) -> Path:
        return self.upload_tmp_dir or self.home / "tmp"

    @property
    def resolved_decode_slots(self) -> int:
        import os

        return int(self.max_concurrent_decodes) or max(2, os.cpu_count() or 1)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'cellatlas.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; call ``get_settings.cache_clear()`` in tests)."""
    return Settings()
