"""Typed errors with a user-facing message and a fix.

Every error the engine raises for bad input or a missing resource is a
:class:`CellAtlasError`. The HTTP service maps ``status_code`` to the response
status and :meth:`CellAtlasError.to_dict` to the JSON body; the CLI prints
``message`` and ``fix`` on one line and exits non-zero.
"""

from __future__ import annotations

from typing import Any


class CellAtlasError(Exception):
    """Base class: a problem the user can fix, with the fix spelled out."""

    status_code: int = 400
    code: str = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        fix: str | None = None,
        field: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.field = field
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready body: ``{"error": {"code", "message", "fix", "field", "details"}}``."""
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "fix": self.fix,
                "field": self.field,
                "details": self.details,
            }
        }

    def one_line(self) -> str:
        """Message and fix on one line, for the CLI."""
        return f"{self.message}" + (f" Fix: {self.fix}" if self.fix else "")

    def __str__(self) -> str:  # tracebacks (and the HTTP client's errors) show the fix too
        return self.one_line()


class InputError(CellAtlasError):
    """The matrix, gene list or options are malformed."""

    status_code = 422
    code = "invalid_input"


class GeneMismatchError(InputError):
    """Too few of the user's genes are known to the atlas/model (wrong id type, species, order)."""

    code = "gene_mismatch"


class GeneListMismatchError(GeneMismatchError):
    """The gene names do not belong to the matrix columns (shifted, reversed, shuffled or from another dataset)."""

    code = "gene_list_mismatch"


class UnknownAtlasError(CellAtlasError):
    status_code = 404
    code = "unknown_atlas"


class UnknownModelError(CellAtlasError):
    status_code = 404
    code = "unknown_model"


class ModelUnavailableError(CellAtlasError):
    """The model is known but cannot run here (weights or optional packages missing)."""

    status_code = 409
    code = "model_unavailable"


class AtlasModelMismatchError(CellAtlasError):
    """The atlas holds no reference embeddings for the requested model (or other weights)."""

    status_code = 409
    code = "atlas_model_mismatch"


class AtlasFormatError(CellAtlasError):
    """An atlas file is corrupt, of an unknown version, or fails its checksum."""

    status_code = 422
    code = "atlas_format"


class AuthError(CellAtlasError):
    status_code = 401
    code = "unauthorized"


class PaymentRequiredError(CellAtlasError):
    status_code = 402
    code = "insufficient_credits"


class PayloadTooLargeError(CellAtlasError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(CellAtlasError):
    status_code = 415
    code = "unsupported_media_type"
