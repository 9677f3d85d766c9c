"""Security headers on every HTTP response.

HTML pages (the workspace, ``/docs``, ``/redoc``) get a Content-Security-Policy that
allows only this origin's scripts, styles, images and connections (plus inline styles,
which Plotly, Swagger UI and ReDoc set, ``blob:`` workers for ReDoc's search, and, on the
workspace only, ``'unsafe-eval'``: Plotly's WebGL scatter, through regl, builds its draw
calls with ``Function``); every other response gets ``default-src 'none'``. All responses carry
``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff`` and
``Referrer-Policy: no-referrer``. Headers a route set itself are kept.
"""

from __future__ import annotations

_PAGE = (
    "default-src 'self'; script-src 'self'{eval}; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)
PAGE_CSP = _PAGE.format(eval="")
WORKSPACE_CSP = _PAGE.format(eval=" 'unsafe-eval'")
API_CSP = "default-src 'none'; frame-ancestors 'none'"
WORKSPACE_PAGES = ("/", "/workspace")

_COMMON = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def content_security_policy(path: str, content_type: str) -> str:
    """The CSP for a response to ``path`` of ``content_type``."""
    if not content_type.startswith("text/html"):
        return API_CSP
    return WORKSPACE_CSP if path in WORKSPACE_PAGES else PAGE_CSP


class SecurityHeadersMiddleware:
    """ASGI middleware adding the headers above to every ``http.response.start``."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                ctype = next((v.decode("latin-1") for n, v in headers if n.lower() == b"content-type"), "")
                extra = [(n, v) for n, v in _COMMON if n not in present]
                if b"content-security-policy" not in present:
                    extra.append((b"content-security-policy", content_security_policy(path, ctype).encode()))
                message = dict(message, headers=headers + extra)
            await send(message)

        await self.app(scope, receive, send_with_headers)
