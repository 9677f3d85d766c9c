"""Headless Chromium under the real Content-Security-Policy: the workspace, /docs and /redoc render
with no CSP violation and without any network beyond the server (offline docs)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(local_server):
    return local_server.url


@pytest.fixture
def page(browser, server):
    """A tab that records CSP violations, JS errors and every request leaving the server's origin."""
    ctx = browser.new_context()
    pg = ctx.new_page()
    pg.problems = []
    pg.on("console", lambda m: pg.problems.append(m.text) if "Content Security Policy" in m.text else None)
    pg.on("pageerror", lambda e: pg.problems.append(f"pageerror: {e}"))
    # an offsite request that got an answer (a CSP-blocked one fails before leaving the browser)
    pg.on("requestfinished", lambda r: pg.problems.append(f"offsite: {r.url}") if not r.url.startswith((server, "data:", "blob:")) else None)
    pg.add_init_script("document.addEventListener('securitypolicyviolation', e => console.error("
                       "'Content Security Policy violation: ' + e.violatedDirective + ' ' + e.blockedURI + ' at ' + e.sourceFile + ':' + e.lineNumber + ':' + e.columnNumber))")
    yield pg
    ctx.close()


def test_docs_render_offline_under_the_csp(page, server):
    page.goto(f"{server}/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=30_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert any("/v1/singlecell/annotate" in p for p in paths)
    assert page.problems == []


def test_redoc_renders_offline_under_the_csp(page, server):
    page.goto(f"{server}/redoc")
    page.wait_for_selector('text="/v1/singlecell/annotate"', timeout=30_000)
    # The ReDoc bundle hard-codes its footer logo on its CDN: the CSP blocks that image (no request
    # leaves the server; the bundle hides the logo on error). Nothing else may be reported.
    branding = "cdn.redoc.ly/redoc/logo-mini.svg"
    assert [p for p in page.problems if branding not in p] == []
    assert not any(p.startswith("offsite:") for p in page.problems)


def test_workspace_flow_runs_under_the_csp(page, server, tmp_path):
    """Upload -> run -> results with the WebGL map, polled from Python (Playwright's string
    predicates use eval, which this CSP forbids; the app itself needs none)."""
    import time

    from tests.web.conftest import atlas_cells

    path = tmp_path / "cells.h5ad"
    atlas_cells(300).write_h5ad(path)
    page.goto(f"{server}/workspace")
    page.wait_for_selector("body[data-ready='true']", state="attached", timeout=30_000)
    page.set_input_files("#file-input", str(path))
    page.wait_for_selector("#view-check:not([hidden])", timeout=60_000)
    page.click("#run-btn")
    page.wait_for_selector("#view-results:not([hidden])", timeout=120_000)
    traces = 0
    for _ in range(150):
        traces = page.evaluate("() => { const el = document.getElementById('plot-map'); return el && el.data ? el.data.length : 0; }")
        if traces:
            break
        time.sleep(0.2)
    assert traces > 0 and page.locator("#plot-map canvas").count() > 0
    assert page.problems == []


def test_webgl_plot_runs_under_the_csp(page, server):
    """regl (inside Plotly's scattergl) compiles with Function: the workspace page's CSP allows exactly that."""
    page.goto(f"{server}/workspace")
    page.wait_for_selector("body[data-ready='true']", state="attached", timeout=30_000)
    n = page.evaluate(
        """async () => {
            const url = (await (await fetch('/workspace/api/config')).json()).plotly_url;
            await new Promise((ok, bad) => { const s = document.createElement('script'); s.src = url; s.onload = ok; s.onerror = bad; document.head.appendChild(s); });
            const div = document.createElement('div'); div.style.width = '300px'; div.style.height = '200px'; document.body.appendChild(div);
            await Plotly.newPlot(div, [{type: 'scattergl', mode: 'markers', x: [1, 2, 3], y: [3, 1, 2]}]);
            return div.querySelectorAll('canvas').length;
        }"""
    )
    assert n > 0
    assert page.problems == []
