"""Hostile requests from issue #14, as regression tests: bombs, file access, the six 500s, strict types.

Bomb sizes here are small enough for CI; ``benchmarks/reliability.py`` sends the full-size
ones to a real server and measures its RSS.
"""

from __future__ import annotations

import io
import tracemalloc
import zipfile

import numpy as np
import orjson
import pytest
import scipy.sparse as sp

from benchmarks import bombs
from cellatlas.errors import CellAtlasError
from cellatlas.service.body import decode_bytes
from cellatlas.service.limits import RequestLimits
from cellatlas.service.payload import parse_request

ANNOTATE = "/v1/singlecell/annotate"


def _tiny(n=3, g=5, **extra):
    X = sp.csr_matrix(np.arange(1, n * g + 1, dtype=np.float32).reshape(n, g))
    body = {"genes": [f"G{i}" for i in range(g)],
            "matrix": {"indptr": X.indptr.tolist(), "indices": X.indices.tolist(), "data": X.data.tolist(), "shape": [n, g]}}
    body.update(extra)
    return body


def _error(r, status, code=None, field=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["fix"]
    if code:
        assert err["code"] == code, err
    if field:
        assert err["field"] == field, err
    return err


def _decode_and_parse(body: bytes, headers: dict, **limits):
    raw = decode_bytes(body, headers.get("Content-Encoding"), limits.pop("max_bytes", 2 << 30), 20.0)
    return parse_request(raw, content_type=headers["Content-Type"], params={}, options={},
                         limits=RequestLimits(max_cells=100_000, **limits))


# ----------------------------------------------------------------------- bombs
@pytest.mark.parametrize(
    "make,status,field",
    [
        (lambda: bombs.gzip_bomb(1 << 30), 413, "Content-Encoding"),
        (lambda: bombs.zstd_bomb(1 << 30), 413, "Content-Encoding"),
        (lambda: bombs.npz_zip_bomb(256 << 20), 413, "data"),
        (lambda: bombs.npz_header_bomb(), 422, "data"),
        (lambda: bombs.h5ad_fill_bomb(), 413, "X"),
    ],
    ids=["gzip", "zstd", "npz-zip", "npz-header-1e12", "h5ad-fill-value"],
)
def test_bombs_are_refused_in_bounded_memory(make, status, field):
    body, headers = make()
    tracemalloc.start()
    try:
        with pytest.raises(CellAtlasError) as e:
            _decode_and_parse(body, headers)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.status_code == status and e.value.field == field, e.value.message
    assert peak < 64 << 20, f"{peak / 1e6:.0f} MB allocated to refuse it"


def test_a_key_that_cannot_pay_is_refused_before_the_body_is_read(make_client, monkeypatch):
    tc, app = make_client(require_api_key=True)
    secret, _ = app.state.ledger.create_key("broke", credits=0)

    def must_not_read(*a, **k):
        raise AssertionError("the body was read for a key with no credits")

    monkeypatch.setattr("cellatlas.service.jobs.read_body", must_not_read)
    body, headers = bombs.gzip_bomb(1 << 30)
    r = tc.post(ANNOTATE, content=body, headers={**headers, "Authorization": f"Bearer {secret}"})
    err = _error(r, 402, "insufficient_credits")
    assert err["details"]["balance"] == 0


def test_declared_cells_beyond_the_balance_are_402_before_arrays(make_client, monkeypatch):
    tc, app = make_client(require_api_key=True, cells_per_credit=1)
    secret, _ = app.state.ledger.create_key("poor", credits=2)
    monkeypatch.setattr("cellatlas.service.payload_json.validate_csr_arrays", lambda *a: (_ for _ in ()).throw(AssertionError("built")))
    r = tc.post(ANNOTATE, json=_tiny(n=3), headers={"Authorization": f"Bearer {secret}"})
    err = _error(r, 402, "insufficient_credits")
    assert err["details"]["price"] == 3 and err["details"]["balance"] == 2


@pytest.mark.parametrize("kind", ["external_link", "external_storage", "virtual", "dangling_soft_link"])
def test_h5ad_that_reaches_outside_the_upload_is_422(make_client, kind, tmp_path):
    target = tmp_path / "secret.h5"
    import h5py

    with h5py.File(target, "w") as f:
        f.create_dataset("X", data=np.full((2, 3), 7, dtype="f4"))
    tc, _ = make_client(require_api_key=False)
    body, headers = bombs.h5ad_reaching_out(kind, str(target))
    err = _error(tc.post(ANNOTATE, content=body, headers=headers), 422, "invalid_input")
    assert "self-contained" in err["message"] or "points to nothing" in err["message"]


def test_workspace_upload_refuses_external_links(make_client, tmp_path):
    tc, _ = make_client(require_api_key=False)
    body, _ = bombs.h5ad_reaching_out("external_link", str(tmp_path / "other.h5"))
    r = tc.post("/workspace/api/sessions", params={"filename": "x.h5ad"}, content=body)
    assert r.status_code == 422 and "external link" in r.json()["error"]["message"]


# ----------------------------------------------------------------- file access
@pytest.mark.parametrize("name", ["/etc/passwd", "/nonexistent/dir/x.atlas.npz", "../../etc/hosts", "human-core/../../x"])
def test_atlas_paths_over_http_are_unknown_names(make_client, name):
    tc, _ = make_client(require_api_key=False)
    r = tc.post(ANNOTATE, json=_tiny(reference_atlas=name))
    err = _error(r, 404, "unknown_atlas", "reference_atlas")
    assert "Installed:" in err["message"]
    _error(tc.get("/v1/singlecell/markers", params={"reference_atlas": name}), 404, "unknown_atlas")


def test_an_npz_file_on_the_server_is_not_loaded_as_an_atlas(make_client, tmp_path):
    import shutil

    from cellatlas.atlas import BUILTIN_DIR

    elsewhere = tmp_path / "elsewhere" / "copy.atlas.npz"  # a valid atlas file outside the atlas directories
    elsewhere.parent.mkdir()
    shutil.copy(next(BUILTIN_DIR.glob("human-core.atlas.npz")), elsewhere)
    tc, _ = make_client(require_api_key=False)
    _error(tc.post(ANNOTATE, json=_tiny(reference_atlas=str(elsewhere))), 404, "unknown_atlas")
    _error(tc.get("/v1/singlecell/markers", params={"reference_atlas": str(elsewhere)}), 404, "unknown_atlas")
    installed = str(next(BUILTIN_DIR.glob("human-core.atlas.npz")))  # the exact path of an installed file is its name
    assert tc.get("/v1/singlecell/markers", params={"reference_atlas": installed}).status_code == 200


def test_atlas_files_in_the_servers_own_directory_are_names(make_client, tmp_path):
    import shutil

    from cellatlas.atlas import BUILTIN_DIR

    atlas_dir = tmp_path / "atlases"
    atlas_dir.mkdir()
    shutil.copy(next(BUILTIN_DIR.glob("human-core.atlas.npz")), atlas_dir / "my-atlas.atlas.npz")
    tc, _ = make_client(require_api_key=False, atlas_dir=atlas_dir)
    assert tc.get("/v1/singlecell/markers", params={"reference_atlas": "my-atlas"}).status_code == 200


def test_in_process_paths_still_load(tmp_path):
    from cellatlas.atlas import BUILTIN_DIR, load_atlas

    real = next(BUILTIN_DIR.glob("human-core.atlas.npz"))
    assert load_atlas(str(real)).name == load_atlas("human-core").name


# ----------------------------------------------------------- the six 500s (#14)
def test_shape_as_an_object_is_422(make_client):
    tc, _ = make_client(require_api_key=False)
    body = _tiny()
    body["matrix"]["shape"] = {"0": 3, "1": 5}
    _error(tc.post(ANNOTATE, json=body), 422, "invalid_input", "matrix.shape")


def test_cell_count_above_2_64_is_4xx_with_a_serialisable_body(make_client):
    tc, _ = make_client(require_api_key=False)
    raw = orjson.dumps(_tiny()).replace(b'"shape":[3,5]', b'"shape":[' + str(2**70).encode() + b",5]")
    r = tc.post(ANNOTATE, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "64 bits" in r.json()["error"]["message"]
    buf = io.BytesIO()
    np.savez(buf, indptr=np.zeros(4, np.int64), indices=np.zeros(0, np.int64), data=np.zeros(0), shape=np.array([2**64 - 1, 5], dtype=np.uint64),
             genes=np.array(["a", "b", "c", "d", "e"]))
    _error(tc.post(ANNOTATE, content=buf.getvalue(), headers={"Content-Type": "application/x-npz"}), 413, "payload_too_large", "shape")


def test_column_count_is_bounded(make_client):
    tc, _ = make_client(require_api_key=False)
    body = _tiny()
    body["matrix"]["shape"] = [3, 2**63 + 5]  # fits uint64: parsed, then over the limit
    _error(tc.post(ANNOTATE, content=orjson.dumps(body), headers={"Content-Type": "application/json"}), 413, "payload_too_large", "matrix.shape")
    body["matrix"]["shape"] = [3, 10**9]
    err = _error(tc.post(ANNOTATE, json=body), 413, "payload_too_large", "matrix.shape")
    assert err["details"]["max_genes_per_request"] == 200_000


def test_npz_header_declaring_1e12_elements_is_422(make_client):
    tc, _ = make_client(require_api_key=False)
    body, headers = bombs.npz_header_bomb()
    _error(tc.post(ANNOTATE, content=body, headers=headers), 422, "invalid_input", "data")


@pytest.mark.parametrize("genes,message", [
    (np.array([b"\xff\xfe", b"G1", b"G2", b"G3", b"G4"], dtype="S"), "not UTF-8"),
    (np.array(["\ud800", "G1", "G2", "G3", "G4"]), "surrogate"),
])
def test_undecodable_gene_names_are_422(make_client, genes, message):
    tc, _ = make_client(require_api_key=False)
    X = sp.csr_matrix(np.ones((2, 5), dtype=np.float32))
    buf = io.BytesIO()
    np.savez(buf, indptr=X.indptr, indices=X.indices, data=X.data, shape=np.array(X.shape), genes=genes)
    err = _error(tc.post(ANNOTATE, content=buf.getvalue(), headers={"Content-Type": "application/x-npz"}), 422, "invalid_input", "genes")
    assert message in err["message"]


def test_a_100kb_atlas_name_is_422(make_client):
    tc, _ = make_client(require_api_key=False)
    _error(tc.post(ANNOTATE, json=_tiny(reference_atlas="a" * 100_000)), 422, "invalid_input", "reference_atlas")
    assert tc.get("/v1/singlecell/markers", params={"reference_atlas": "a" * 50_000}).status_code == 422


@pytest.mark.parametrize("mutate,field", [
    (lambda b: b["matrix"]["data"].__setitem__(0, True), "matrix.data"),
    (lambda b: b["matrix"]["indices"].__setitem__(0, False), "matrix.indices"),
    (lambda b: b["matrix"].__setitem__("shape", ["3", "5"]), "matrix.shape"),
    (lambda b: b["matrix"].__setitem__("shape", [3, -5]), "matrix.shape"),
    (lambda b: b["matrix"].__setitem__("shape", [3]), "matrix.shape"),
    (lambda b: b.__setitem__("genes", ["G0", 1, "G2", "G3", "G4"]), "genes"),
])
def test_strict_json_types(make_client, mutate, field):
    tc, _ = make_client(require_api_key=False)
    body = _tiny()
    mutate(body)
    _error(tc.post(ANNOTATE, json=body), 422, "invalid_input", field)


def test_duplicate_json_keys_are_refused_not_overwritten(make_client):
    tc, _ = make_client(require_api_key=False)
    raw = orjson.dumps(_tiny())[:-1] + b',"genes":["A","B","C","D","E"]}'
    _error(tc.post(ANNOTATE, content=raw, headers={"Content-Type": "application/json"}), 422, "invalid_input", "genes")


def test_npz_member_lying_about_its_size_is_refused_before_allocation():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("shape.npy", b"")
    raw = bytearray(buf.getvalue())
    with pytest.raises(CellAtlasError) as e:
        parse_request(bytes(raw), content_type="application/x-npz", params={}, options={}, max_cells=10)
    assert e.value.status_code == 422
