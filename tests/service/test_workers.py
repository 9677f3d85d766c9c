"""Several uvicorn workers on one ledger database: `cellatlas serve --workers 2` as deployed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

SECRET = "workers-test-secret"
"""The key secret both the server and this test's ledger hash with (the test process's own
settings may point at another test's home)."""


@pytest.fixture
def two_workers(db_url, tmp_path):
    """`cellatlas serve --workers 2` on a fresh, empty database: ``(base_url, db_url, log_path)``.

    Both workers create the ledger tables at the same moment on start-up.
    """
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, CELLATLAS_HOME=str(tmp_path / "home"), CELLATLAS_DATABASE_URL=db_url, CELLATLAS_THREADS="1",
               CELLATLAS_API_KEY_SECRET=SECRET)
    log = tmp_path / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cellatlas.cli", "serve", "--workers", "2", "--port", str(port), "--log-level", "info"],
            env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200 and len(_worker_pids(log)) >= 2:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail(f"server with 2 workers did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url, db_url, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: the group this fixture started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _worker_pids(log) -> set[str]:
    return set(re.findall(r"Started server process \[(\d+)\]", log.read_text()))


def test_two_workers_share_one_ledger(two_workers, pbmc, csr_payload):
    from cellatlas.service.ledger import Ledger

    url, db_url, log = two_workers
    led = Ledger(db_url, free_credits=0, cells_per_credit=1000, secret=SECRET)
    try:
        secret, info = led.create_key("workers", credits=100)
        body = csr_payload(pbmc.X, pbmc.var_names, model="default", reference_atlas="human-core-2026")
        headers = {"Authorization": f"Bearer {secret}"}

        def post(_):
            return httpx.post(f"{url}/v1/singlecell/annotate", json=body, headers=headers, timeout=300)

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(post, range(6)))
        assert [r.status_code for r in responses] == [200] * 6, [r.text[:300] for r in responses]
        labels = [[c["label"] for c in r.json()["calls"]] for r in responses]
        assert all(lab == labels[0] for lab in labels) and len(labels[0]) == pbmc.n_obs
        # 300 cells cost one credit each time: every charge landed once, none lost to a race
        left = sorted(int(r.headers["X-Credits-Remaining"]) for r in responses)
        assert left == list(range(94, 100))
        assert next(k for k in led.list_keys() if k.id == info.id).credits == 94
        assert len(_worker_pids(log)) == 2 and "Traceback" not in log.read_text()
    finally:
        led.close()
