"""The articles' client code (../shared/seeds), run verbatim against a live server.

Python snippets are read from the seed texts at test time; only the
``API_URL = ...`` and ``API_KEY = ...`` assignments are replaced. The snippets
use ``requests`` and the JSON body, exactly as published.
"""

from __future__ import annotations

import ast
import builtins
import re

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


@pytest.fixture(scope="module")
def seed_texts(seeds_dir):
    return {p.name: p.read_text() for p in sorted(seeds_dir.glob("*.txt"))}


def test_snippet_extraction_finds_the_published_functions(seed_texts):
    defined = set()
    for text in seed_texts.values():
        for code in extract_snippets(text):
            defined |= {n.name for n in ast.walk(ast.parse(code)) if isinstance(n, ast.FunctionDef)}
    assert {"sparse_to_payload", "annotate", "annotate_adata", "annotate_large", "annotate_cells"} <= defined


def test_seed_snippets_run_unchanged_against_live_server(live_server, seed_texts, pbmc, tmp_path, monkeypatch, capsys):
    url, ledger = live_server
    secret, info = ledger.create_key("seeds")
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
    # every request was charged to the key: one credit per request of <= 1,000 cells
    used = ledger.usage_summary(info.id)["totals"]
    assert used == {"requests": 6, "cells": 4 * X.shape[0], "credits": 6}  # 3 whole + 3 chunks
    assert ledger.get_key(info.id).credits == 494


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
