"""Prometheus metrics (text exposition format 0.0.4), kept in-process.

With ``--workers N`` each worker process keeps its own counters; scrape them
through the same port and sum, or run one worker per port.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Thread-safe counters, one gauge and a latency histogram."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.latency_buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self.cells: dict[str, int] = defaultdict(int)
        self.credits: dict[str, int] = defaultdict(int)
        self.replays = 0
        self.jobs_in_progress = 0
        self.started = time.time()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished HTTP request and its latency."""
        with self._lock:
            self.requests[(method, route, str(status))] += 1
            self.latency_sum[route] += seconds
            self.latency_count[route] += 1
            b = self.latency_buckets[route]
            for i, edge in enumerate(BUCKETS):
                if seconds <= edge:
                    b[i] += 1

    def observe_work(self, endpoint: str, cells: int, credits: int, replayed: bool) -> None:
        """Count cells processed and credits charged by a billed request."""
        with self._lock:
            if replayed:
                self.replays += 1
                return
            self.cells[endpoint] += int(cells)
            self.credits[endpoint] += int(credits)

    def job_started(self) -> None:
        with self._lock:
            self.jobs_in_progress += 1

    def job_finished(self) -> None:
        with self._lock:
            self.jobs_in_progress -= 1

    def render(self) -> str:
        """The exposition text served at ``GET /metrics``."""
        out: list[str] = []
        with self._lock:
            _family(out, "cellatlas_http_requests_total", "counter", "HTTP requests by method, route and status.")
            for (m, r, s), v in sorted(self.requests.items()):
                out.append(f'cellatlas_http_requests_total{{method="{m}",route="{_esc(r)}",status="{s}"}} {v}')
            _family(out, "cellatlas_http_request_duration_seconds", "histogram", "Request latency by route.")
            for r in sorted(self.latency_count):
                for edge, v in zip(BUCKETS, self.latency_buckets[r]):
                    out.append(f'cellatlas_http_request_duration_seconds_bucket{{route="{_esc(r)}",le="{edge}"}} {v}')
                out.append(f'cellatlas_http_request_duration_seconds_bucket{{route="{_esc(r)}",le="+Inf"}} {self.latency_count[r]}')
                out.append(f'cellatlas_http_request_duration_seconds_sum{{route="{_esc(r)}"}} {self.latency_sum[r]:.6f}')
                out.append(f'cellatlas_http_request_duration_seconds_count{{route="{_esc(r)}"}} {self.latency_count[r]}')
            _family(out, "cellatlas_cells_processed_total", "counter", "Cells annotated or embedded, by endpoint.")
            for e, v in sorted(self.cells.items()):
                out.append(f'cellatlas_cells_processed_total{{endpoint="{e}"}} {v}')
            _family(out, "cellatlas_credits_charged_total", "counter", "Credits charged, by endpoint.")
            for e, v in sorted(self.credits.items()):
                out.append(f'cellatlas_credits_charged_total{{endpoint="{e}"}} {v}')
            _family(out, "cellatlas_idempotent_replays_total", "counter", "Responses replayed for a repeated Idempotency-Key.")
            out.append(f"cellatlas_idempotent_replays_total {self.replays}")
            _family(out, "cellatlas_jobs_in_progress", "gauge", "Engine jobs running or queued in this process.")
            out.append(f"cellatlas_jobs_in_progress {self.jobs_in_progress}")
            _family(out, "cellatlas_process_start_time_seconds", "gauge", "Start time of this process (unix seconds).")
            out.append(f"cellatlas_process_start_time_seconds {self.started:.3f}")
        return "\n".join(out) + "\n"


class MetricsMiddleware:
    """ASGI middleware: time every HTTP request and label it with its route template."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(scope.get("method", ""), name, status, time.perf_counter() - t0)


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')
