"""Token-bucket rate limits per client IP, per API key and on failed authentication.

Three buckets (rates and bursts from :class:`~cellatlas.config.Settings`, 0 disables one):

* every request from one IP (:class:`RateLimitMiddleware`, before routing; the health,
  readiness and metrics routes are exempt);
* every authenticated request of one key (:meth:`RateLimits.key_request`);
* failed authentications from one IP (:meth:`RateLimits.check_auth` refuses before the key
  is even looked up once the bucket is empty, so guessing keys is slow).

Beyond a bucket the answer is 429 ``rate_limited`` with ``Retry-After`` (seconds until a
token is back). Buckets live in the worker process (``--workers N`` multiplies them) and
at most ``MAX_TRACKED`` of each are kept, least recently used dropped first.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict

import orjson

from cellatlas.config import Settings
from cellatlas.errors import CellAtlasError

MAX_TRACKED = 100_000
EXEMPT_PATHS = ("/healthz", "/readyz", "/metrics")


class RateLimitedError(CellAtlasError):
    """Too many requests from this IP or key (429, ``Retry-After``)."""

    status_code = 429
    code = "rate_limited"


class TokenBucket:
    """``rate`` tokens per second up to ``burst``, per key; thread-safe."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = float(rate)
        self.burst = max(1, int(burst))
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def _level(self, key: str, now: float) -> float:
        tokens, last = self._state.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - last) * self.rate)

    def take(self, key: str, n: float = 1.0) -> float:
        """Take ``n`` tokens; returns 0 on success, else the seconds until they are available."""
        if not self.enabled:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens = self._level(key, now)
            if tokens >= n:
                self._state[key] = (tokens - n, now)
                wait = 0.0
            else:
                self._state[key] = (tokens, now)
                wait = (n - tokens) / self.rate
            self._state.move_to_end(key)
            while len(self._state) > MAX_TRACKED:
                self._state.popitem(last=False)
        return wait

    def peek(self, key: str) -> float:
        """Seconds until one token is available (0: one is available now); takes nothing."""
        if not self.enabled:
            return 0.0
        with self._lock:
            tokens = self._level(key, time.monotonic())
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate


def limited(limit: str, what: str, wait: float, rate: float, burst: int) -> RateLimitedError:
    """The 429 error of bucket ``limit`` (``ip``, ``key``, ``auth_failures``), ``Retry-After`` rounded up."""
    retry = max(1, math.ceil(wait))
    return RateLimitedError(
        f"Too many {what}: at most {rate:g} per second (bursts of {burst}).",
        fix=f"Retry after {retry} s (the Python client waits for Retry-After by itself) or slow down.",
        details={"retry_after": retry, "limit": limit, "per_second": rate, "burst": burst},
    )


class RateLimits:
    """The three buckets of one app, configured from ``settings``."""

    def __init__(self, settings: Settings) -> None:
        self.ip = TokenBucket(settings.rate_limit_ip_per_s, settings.rate_limit_ip_burst)
        self.key = TokenBucket(settings.rate_limit_key_per_s, settings.rate_limit_key_burst)
        self.auth = TokenBucket(settings.rate_limit_auth_failures_per_s, settings.rate_limit_auth_failures_burst)

    def check_auth(self, ip: str) -> None:
        """429 if this IP has used up its failed authentications."""
        wait = self.auth.peek(ip)
        if wait > 0:
            raise limited("auth_failures", "failed authentications from your address", wait, self.auth.rate, self.auth.burst)

    def auth_failed(self, ip: str) -> None:
        """Count one failed authentication of this IP."""
        self.auth.take(ip)

    def key_request(self, key_id: str) -> None:
        """Count one request of this key; 429 beyond its rate."""
        wait = self.key.take(key_id)
        if wait > 0:
            raise limited("key", "requests with this API key", wait, self.key.rate, self.key.burst)


def client_ip(scope) -> str:
    """The peer address of an ASGI scope (uvicorn's ``--proxy-headers`` rewrites it behind a proxy)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class RateLimitMiddleware:
    """ASGI middleware: the per-IP bucket, before any route runs."""

    def __init__(self, app, limits: RateLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") in EXEMPT_PATHS or not self.limits.ip.enabled:
            await self.app(scope, receive, send)
            return
        wait = self.limits.ip.take(client_ip(scope))
        if wait <= 0:
            await self.app(scope, receive, send)
            return
        err = limited("ip", "requests from your address", wait, self.limits.ip.rate, self.limits.ip.burst)
        body = orjson.dumps(err.to_dict())
        await send({
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(err.details["retry_after"]).encode()),
            ],
        })
        await send({"type": "http.response.body", "body": body})
