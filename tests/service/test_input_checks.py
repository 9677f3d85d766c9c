"""Over HTTP: a gene list that does not belong to the matrix is a 422 naming the cause, and empty
cells come back Unassigned with their QC facts (JSON and npz). Built-in atlas cells, no shared data."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.sparse as sp

from cellatlas.atlas import load_atlas


@pytest.fixture(scope="module")
def cells():
    """60 reference cells of the built-in atlas and 5 all-zero cells appended."""
    at = load_atlas("human-core")
    X = sp.csr_matrix(at.reference_counts(), dtype=np.float32)
    X = sp.vstack([X[np.linspace(0, X.shape[0] - 1, 60).astype(int)], sp.csr_matrix((5, X.shape[1]), dtype=np.float32)], format="csr")
    return X, list(at.ref_genes)


def test_shifted_gene_list_is_a_422_naming_the_shift_and_costs_nothing(keyed, cells, csr_payload):
    tc, app, _secret, key_id = keyed
    X, genes = cells
    before = app.state.ledger.get_key(key_id).credits
    r = tc.post("/v1/singlecell/annotate", json=csr_payload(X, list(np.roll(genes, 1))))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "gene_list_mismatch" and err["field"] == "genes"
    assert "shifted by 1 column" in err["message"] and "skip_gene_check" in err["fix"]
    assert err["details"]["gene_check"]["shift"] == 1
    assert app.state.ledger.get_key(key_id).credits == before


@pytest.mark.parametrize("where", ["body", "query"])
def test_skip_gene_check_as_body_field_or_query_parameter(keyed, cells, csr_payload, where):
    tc, *_ = keyed
    X, genes = cells
    shuffled = list(np.random.default_rng(0).permutation(genes))
    assert tc.post("/v1/singlecell/annotate", json=csr_payload(X, shuffled)).json()["error"]["code"] == "gene_list_mismatch"
    if where == "body":
        r = tc.post("/v1/singlecell/annotate", json=csr_payload(X, shuffled, skip_gene_check=True))
    else:
        r = tc.post("/v1/singlecell/annotate?skip_gene_check=true", json=csr_payload(X, shuffled))
    assert r.status_code == 200, r.text
    assert r.json()["gene_report"]["gene_check"]["verdict"] == "skipped"


def test_empty_cells_are_unassigned_with_reason_and_qc_in_json_and_npz(keyed, cells, csr_payload, npz_body):
    from cellatlas.service.columnar import decode_result

    tc, *_ = keyed
    X, genes = cells
    r = tc.post("/v1/singlecell/annotate", json=csr_payload(X, genes))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["gene_report"]["gene_check"]["verdict"] == "ok"
    calls = out["calls"]
    for c in calls[60:]:
        assert c["label"] == "Unassigned" and c["confidence"] == 0 and c["band"] == "low"
        assert c["reason"] == "no counts (all-zero cell)" and c["qc"]["total_counts"] == 0 and c["qc"]["n_genes"] == 0
    assert all(c["label"] != "Unassigned" and c["reason"] == "" and c["qc"]["n_genes"] > 0 for c in calls[:60])
    assert out["provenance"]["unassigned"]["n_cells"] == 5
    b = tc.post("/v1/singlecell/annotate?format=npz", content=npz_body(X, genes), headers={"Content-Type": "application/x-npz"})
    assert b.status_code == 200, b.text
    with np.load(io.BytesIO(b.content), allow_pickle=False) as z:
        res, _meta = decode_result(dict(z))
    assert list(res.label) == [c["label"] for c in calls] and list(res.reason) == [c["reason"] for c in calls]
    assert res.n_genes.tolist() == [c["qc"]["n_genes"] for c in calls]
