"""Encoder registry: one module per model behind :class:`~cellatlas.encoders.base.Encoder`.

``default`` is fitted per atlas (its state lives in the atlas file);
foundation models (``geneformer``, ``scgpt``) load checkpoints from
``CELLATLAS_MODELS_DIR/<name>`` or an explicit path.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from cellatlas.config import Settings, get_settings
from cellatlas.encoders.base import Encoder
from cellatlas.errors import UnknownModelError

# name -> module implementing ``status(settings, model_path) -> dict`` and ``load(...) -> Encoder``
_MODULES: dict[str, str] = {
    "default": "cellatlas.encoders.default",
    "geneformer": "cellatlas.encoders.geneformer",
    "scgpt": "cellatlas.encoders.scgpt",
}

MODEL_NAMES = tuple(_MODULES)


def _module(name: str):
    key = (name or "default").lower()
    if key not in _MODULES:
        raise UnknownModelError(
            f"Unknown model '{name}'.",
            fix=f"Use one of: {', '.join(_MODULES)} (GET /v1/models or `cellatlas models list` shows which are usable).",
            field="model",
        )
    return key, importlib.import_module(_MODULES[key])


def model_status(name: str, *, model_path: str | Path | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """Whether ``name`` can run here: ``{"name", "usable", "reason", "path", "kind"}``."""
    key, mod = _module(name)
    return mod.status(settings or get_settings(), model_path)


def available_models(settings: Settings | None = None) -> list[dict[str, Any]]:
    """Status of every registered model."""
    s = settings or get_settings()
    return [model_status(n, settings=s) for n in _MODULES]


def get_encoder(
    name: str,
    *,
    atlas=None,
    model_path: str | Path | None = None,
    settings: Settings | None = None,
    **kwargs: Any,
) -> Encoder:
    """Load the encoder ``name``.

    Parameters
    ----------
    name
        ``default``, ``geneformer`` or ``scgpt``.
    atlas
        For ``default``: the :class:`~cellatlas.atlas.Atlas` whose fitted state to use.
    model_path
        For foundation models: checkpoint directory (default ``CELLATLAS_MODELS_DIR/<name>``).
    """
    key, mod = _module(name)
    return mod.load(atlas=atlas, model_path=model_path, settings=settings or get_settings(), **kwargs)


__all__ = ["Encoder", "MODEL_NAMES", "available_models", "get_encoder", "model_status"]
