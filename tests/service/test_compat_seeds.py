"""The articles' client code (../shared/seeds), run verbatim against a live server.

Python snippets are read from the seed texts at test time; only the
``API_URL = ...`` and ``API_KEY = ...`` assignments are replaced. The snippets
use ``requests`` and the JSON body, exactly as published. The server is a plain
``cellatlas serve`` started the way a new user starts it (a fresh home, no
``CELLATLAS_*`` variables): the articles ask for Geneformer, whose weights are not
installed, and the default model answers, saying so in every response.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import re
import subprocess
import sys
import time
import pytest

pytestmark = pytest.mark.shared  # reads ../shared/data (skipped only when it is absent)


def _paragraphs(lines: list[str]) -> list[str]:
    paras, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line)
        elif cur:
            paras.append("\n".join(cur))
            cur = []
    if cur:
        paras.append("\n".join(cur))
    return paras


def extract_snippets(text: str) -> list[str]:
    """Code blocks of a seed: after each line ``python``, the longest run of
    blank-separated paragraphs that still parses as Python (prose does not)."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.strip() != "python":
            continue
        code = ""
        for para in _paragraphs(lines[i + 1 :]):
            candidate = f"{code}\n\n{para}" if code else para
            try:
                ast.parse(candidate)
            except SyntaxError:
                break
            code = candidate
        if code:
            out.append(code)
    return out


def with_endpoint(code: str, url: str, key: str) -> str:
    """Replace only the API_URL / API_KEY assignments."""
    code = re.sub(r"^API_URL = .*$", f"API_URL = {url!r}", code, flags=re.M)
    return re.sub(r"^API_KEY = .*$", f"API_KEY = {key!r}", code, flags=re.M)


def _free_names(code: str) -> set[str]:
    """Names a snippet reads at module level (not inside its functions) without defining them."""
    loaded, bound = set(), set()
    for stmt in ast.parse(code).body:
        if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
            bound.add(stmt.name)
            continue
        for n in ast.walk(stmt):
            if isinstance(n, ast.Name):
                (loaded if isinstance(n.ctx, ast.Load) else bound).add(n.id)
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                bound |= {(a.asname or a.name).split(".")[0] for a in n.names}
    return loaded - bound - set(dir(builtins))


@pytest.fixture
def plain_server(tmp_path):
    """``cellatlas serve`` in a subprocess, as shipped: ``(url, api_key, run_cli)``.

    The environment has no ``CELLATLAS_*`` variable; ``HOME`` is a fresh folder, so the
    ledger is the default SQLite file under ``~/.cellatlas``. The key comes from
    ``cellatlas keys create``, as the README says.
    """
    import socket

    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLATLAS_")}
    env["HOME"] = str(tmp_path / "home")
    cli = [sys.executable, "-m", "cellatlas.cli"]

    def run_cli(*args: str) -> str:
        return subprocess.run([*cli, *args], env=env, capture_output=True, text=True, check=True, timeout=120).stdout

    key = run_cli("keys", "create", "--name", "seeds").strip()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([*cli, "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import requests

    deadline = time.time() + 90
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"cellatlas serve did not start:\n{(tmp_path / 'serve.log').read_text()}")
        time.sleep(0.2)
    yield url, key, run_cli
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def seed_texts(seeds_dir):
    return {p.name: p.read_text() for p in sorted(seeds_dir.glob("*.txt"))}


def test_snippet_extraction_finds_the_published_functions(seed_texts):
    defined = set()
    for text in seed_texts.values():
        for code in extract_snippets(text):
            defined |= {n.name for n in ast.walk(ast.parse(code)) if isinstance(n, ast.FunctionDef)}
    assert {"sparse_to_payload", "annotate", "annotate_adata", "annotate_large", "annotate_cells"} <= defined


def test_seed_snippets_run_unchanged_against_a_plain_server(plain_server, seed_texts, pbmc, tmp_path, monkeypatch, capsys):
    import requests

    url, secret, run_cli = plain_server
    endpoint = f"{url}/v1/singlecell/annotate"
    query = pbmc[:150].copy()
    X = query.X.tocsr()
    genes = list(map(str, query.var_names))
    query.write_h5ad(tmp_path / "pbmc_10k.h5ad")  # the file name the tutorial reads
    monkeypatch.chdir(tmp_path)

    namespaces = {}
    for name, text in seed_texts.items():
        ns: dict = {"__name__": f"seed_{name}"}
        harness = {"X": lambda: X, "genes": lambda: genes, "gene_ids": lambda: genes, "result": lambda: ns["annotate"](X, genes)}
        for code in extract_snippets(text):
            code = with_endpoint(code, endpoint, secret)
            missing = _free_names(code) - set(ns)
            for var in sorted(missing):
                assert var in harness, f"snippet needs {var!r}, which the harness does not provide:\n{code}"
                ns[var] = harness[var]()
            exec(compile(code, f"<{name}>", "exec"), ns)
        namespaces[name] = ns
    printed = capsys.readouterr().out

    ns1 = next(ns for ns in namespaces.values() if "annotate_large" in ns)
    ns2 = next(ns for ns in namespaces.values() if "annotate_cells" in ns)
    # sparse_to_payload -> the wire body our server parses
    payload = ns1["sparse_to_payload"](X, genes)
    assert payload["matrix"]["shape"] == [X.shape[0], len(genes)]
    # annotate_adata wrote the labels the server returned, for every cell
    whole = ns2["result"]  # annotate_cells (second article) on the same cells
    assert len(whole["calls"]) == X.shape[0]
    assert all(0 <= c["confidence"] <= 1 and len(c["alternates"]) <= 3 for c in whole["calls"])
    adata = ns1["adata"]
    assert adata.n_obs == X.shape[0] and list(adata.obs["cell_type"]) == [c["label"] for c in whole["calls"]]
    assert printed.count("(confidence ") == 5 and printed.count("top markers:") == 5
    # annotate_large: chunked calls come back complete and in input order
    chunked = ns1["annotate_large"](X, genes, chunk_size=60)
    assert [c["label"] for c in chunked] == [c["label"] for c in whole["calls"]]
    # the articles ask for geneformer (no weights here): the default model answered, and said so
    for response in (whole, ns1["annotate"](X[:20], genes)):
        prov = response["provenance"]
        assert prov["model_requested"] == "geneformer" and prov["model_used"] == "default"
        assert response["model"] == "default" and prov["fallback"]["requested_model"] == "geneformer"
        assert [w["code"] for w in response["warnings"]] == ["model_fallback"]
    r = requests.post(endpoint, json={**payload, "model": "geneformer"}, headers={"Authorization": f"Bearer {secret}"}, timeout=60)
    assert r.headers["X-Model-Used"] == "default" and r.headers["X-Model-Requested"] == "geneformer"
    # every request was charged to the key: one credit per request of <= 1,000 cells
    # (3 whole + 3 chunks + the 20-cell call + the direct one)
    keys = json.loads(run_cli("keys", "list", "--json"))
    assert [k["credits"] for k in keys] == [492]


def test_seed_snippets_fail_clearly_on_gene_mismatch(live_server, pbmc):
    """The articles' most common failure: wrong gene identifiers -> 4xx naming genes, not 'all one type'."""
    import requests

    url, ledger = live_server
    secret, _ = ledger.create_key("mismatch")
    X = pbmc.X[:20].tocsr()
    body = {
        "model": "geneformer",
        "reference_atlas": "human-core-2026",
        "genes": [f"gene_{i}" for i in range(X.shape[1])],
        "matrix": {"indptr": X.indptr.tolist(), "indices": X.indices.tolist(), "data": X.data.tolist(), "shape": list(X.shape)},
    }
    r = requests.post(f"{url}/v1/singlecell/annotate", json=body, headers={"Authorization": f"Bearer {secret}"}, timeout=60)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "gene_mismatch" and r.json()["error"]["field"] == "genes"
