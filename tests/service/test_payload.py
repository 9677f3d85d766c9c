"""Request-body decoding and parsing (JSON, npz, h5ad; gzip/zstd), without the engine."""

from __future__ import annotations

import gzip
import io

import numpy as np
import orjson
import pytest
import scipy.sparse as sp
import zstandard

from cellatlas.errors import InputError, PayloadTooLargeError, UnsupportedMediaTypeError
from cellatlas.service.payload import body_format, decode_body, parse_request


def _matrix(n=4, g=6, seed=0):
    rng = np.random.default_rng(seed)
    X = sp.random(n, g, density=0.5, random_state=rng, format="csr", dtype=np.float32)
    X.data = np.ceil(X.data * 10)
    return X, [f"G{i}" for i in range(g)]


def _parse(body, ct="application/json", params=None, options=None, max_cells=100):
    return parse_request(body, content_type=ct, params=params or {}, options=options or {}, max_cells=max_cells)


def test_json_body_round_trips_the_csr_exactly(csr_payload):
    X, genes = _matrix()
    p = _parse(orjson.dumps(csr_payload(X, genes, model="geneformer", reference_atlas="human-core-2026")))
    assert p.body_format == "json" and p.n_cells == 4 and p.genes == genes
    assert (p.X != X).nnz == 0 and p.X.shape == X.shape
    assert p.engine_kwargs() == {"model": "geneformer", "atlas": "human-core-2026"}


def test_npz_body_with_query_options_and_cell_ids(npz_body):
    X, genes = _matrix()
    body = npz_body(X, genes, cell_ids=np.array(["a", "b", "c", "d"]))
    p = _parse(body, "application/x-npz", params={"model": "default", "return_embedding": "true"}, options={"return_embedding": False})
    assert p.body_format == "npz" and p.cell_ids == ["a", "b", "c", "d"]
    assert p.options == {"return_embedding": True} and p.model == "default"
    assert (p.X != X).nnz == 0
    assert body_format("application/octet-stream", body) == "npz"


@pytest.mark.parametrize("enc", ["gzip", "zstd"])
def test_content_encodings_decode(enc):
    raw = b'{"x": 1}' * 100
    comp = gzip.compress(raw) if enc == "gzip" else zstandard.ZstdCompressor().compress(raw)
    assert decode_body(comp, enc, limit=10_000) == raw
    with pytest.raises(PayloadTooLargeError) as e:
        decode_body(comp, enc, limit=100)
    assert e.value.details["max_body_bytes"] == 100 and "chunk" in e.value.fix.lower() or "split" in e.value.fix.lower()


def test_bad_encodings_are_4xx():
    with pytest.raises(UnsupportedMediaTypeError) as e:
        decode_body(b"abc", "br", limit=100)
    assert e.value.status_code == 415 and e.value.field == "Content-Encoding"
    with pytest.raises(InputError, match="gzip"):
        decode_body(b"not gzip at all", "gzip", limit=100)
    with pytest.raises(InputError):
        decode_body(b"not zstd", "zstd", limit=100)


def test_unsupported_content_type():
    with pytest.raises(UnsupportedMediaTypeError) as e:
        _parse(b"a,b\n1,2", "text/csv")
    assert e.value.status_code == 415 and "application/x-npz" in e.value.fix


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda b: b.pop("genes"), "genes"),
        (lambda b: b.pop("matrix"), "matrix"),
        (lambda b: b["matrix"].pop("indptr"), "matrix.indptr"),
        (lambda b: b.update(matrix=[1, 2]), "matrix"),
        (lambda b: b.update(genes="CD3E"), "genes"),
        (lambda b: b.update(genes=[1, 2, 3, 4, 5, 6]), "genes"),
        (lambda b: b.update(extra_field=1), "extra_field"),
        (lambda b: b["matrix"].update(format="csc"), "matrix.format"),
        (lambda b: b.update(model=7), "model"),
        (lambda b: b["matrix"].update(data=["a"] * len(b["matrix"]["data"])), "matrix.data"),
        (lambda b: b["matrix"].update(indices=[[0]] * len(b["matrix"]["indices"])), "matrix.indices"),
        (lambda b: b["matrix"].update(indptr=b["matrix"]["indptr"][:-1]), "matrix.indptr"),
        (lambda b: b["matrix"].update(indices=[99] * len(b["matrix"]["indices"])), "matrix.indices"),
        (lambda b: b["matrix"].update(shape=[4]), "matrix.shape"),
        (lambda b: b["matrix"].update(shape="4x6"), "matrix.shape"),
    ],
)
def test_malformed_json_names_the_field(mutate, field, csr_payload):
    X, genes = _matrix()
    body = csr_payload(X, genes)
    mutate(body)
    with pytest.raises(InputError) as e:
        _parse(orjson.dumps(body))
    assert e.value.field == field and e.value.fix and e.value.status_code == 422


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_invalid_json_is_422(raw):
    with pytest.raises(InputError) as e:
        _parse(raw)
    assert e.value.field == "body"


def test_cell_limit_checked_on_declared_shape(csr_payload, npz_body):
    X, genes = _matrix(n=5)
    with pytest.raises(PayloadTooLargeError) as e:
        _parse(orjson.dumps(csr_payload(X, genes)), max_cells=4)
    assert e.value.status_code == 413 and e.value.details == {"max_cells_per_request": 4, "n_cells": 5}
    assert "4" in e.value.fix
    with pytest.raises(PayloadTooLargeError):
        _parse(npz_body(X, genes), "application/x-npz", max_cells=4)


def test_unknown_query_parameter_and_bad_bool(csr_payload):
    X, genes = _matrix()
    with pytest.raises(InputError) as e:
        _parse(orjson.dumps(csr_payload(X, genes)), params={"modle": "default"})
    assert e.value.field == "modle"
    with pytest.raises(InputError) as e:
        _parse(orjson.dumps(csr_payload(X, genes)), params={"return_embedding": "maybe"}, options={"return_embedding": False})
    assert e.value.field == "return_embedding"


def test_npz_errors(npz_body):
    X, genes = _matrix()
    with pytest.raises(InputError, match="npz"):
        _parse(b"PK\x03\x04garbage", "application/x-npz")
    buf = io.BytesIO()
    np.savez(buf, indptr=X.indptr, indices=X.indices, data=X.data, shape=np.array(X.shape))
    with pytest.raises(InputError) as e:
        _parse(buf.getvalue(), "application/x-npz")
    assert e.value.field == "genes"
    buf = io.BytesIO()
    np.save(buf, np.arange(3))
    with pytest.raises(InputError, match="npz"):
        _parse(buf.getvalue(), "application/x-npz")
    obj = io.BytesIO()
    np.savez(obj, indptr=X.indptr, indices=X.indices, data=X.data, shape=np.array(X.shape), genes=np.array(genes, dtype=object))
    with pytest.raises(InputError):
        _parse(obj.getvalue(), "application/x-npz")
    with pytest.raises(InputError) as e:
        _parse(npz_body(X, genes, extra=np.arange(2)), "application/x-npz")
    assert e.value.field == "extra"


def test_h5ad_body(tmp_path):
    import anndata as ad

    X, genes = _matrix()
    a = ad.AnnData(X=X)
    a.var_names = genes
    a.obs_names = [f"c{i}" for i in range(4)]
    a.layers["counts"] = X.copy()
    path = tmp_path / "x.h5ad"
    a.write_h5ad(path)
    body = path.read_bytes()
    p = _parse(body, "application/x-h5ad", params={"layer": "counts"})
    assert p.body_format == "h5ad" and p.n_cells == 4 and p.engine_kwargs()["layer"] == "counts"
    assert list(p.X.obs_names) == ["c0", "c1", "c2", "c3"]
    assert body_format("application/octet-stream", body) == "h5ad"
    with pytest.raises(InputError) as e:
        _parse(b"\x89HDF\r\n\x1a\nbroken", "application/x-h5ad")
    assert e.value.field == "body"
    with pytest.raises(PayloadTooLargeError):
        _parse(body, "application/x-h5ad", max_cells=3)


def test_zstd_multi_frame_and_streamed_frames_decode_completely():
    c = zstandard.ZstdCompressor()
    two = c.compress(b"a" * 1000) + c.compress(b"b" * 500)
    assert decode_body(two, "zstd", limit=10_000) == b"a" * 1000 + b"b" * 500
    obj = c.compressobj()  # streaming: no content size in the frame header
    streamed = obj.compress(b"c" * 5000) + obj.flush()
    assert zstandard.frame_content_size(streamed) == -1
    assert decode_body(streamed, "zstd", limit=10_000) == b"c" * 5000
    with pytest.raises(PayloadTooLargeError):
        decode_body(streamed, "zstd", limit=4000)


def test_json_arrays_go_straight_into_numpy(csr_payload):
    X, genes = _matrix(n=5, g=7, seed=3)
    p = _parse(orjson.dumps(csr_payload(X, genes, model="default")))
    assert (p.X != X).nnz == 0 and p.genes == genes and p.model == "default"


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda b: b.update(genes=[g + "[1]" for g in b["genes"]]), None),  # '[' inside strings: fine
        (lambda b: b["matrix"].update(indices=[float(i) for i in b["matrix"]["indices"]]), None),  # whole floats: fine
        (lambda b: b["matrix"].update(data=[[d] for d in b["matrix"]["data"]]), "matrix.data"),  # nested
        (lambda b: b["matrix"].update(indptr=[b["matrix"]["indptr"]]), "matrix.indptr"),  # nested, one level
        (lambda b: b.update(model={"name": "default"}), "model"),  # object where a string belongs
        (lambda b: b["matrix"].update(data=[True] + b["matrix"]["data"][1:]), "matrix.data"),  # true is not a number
        (lambda b: b["matrix"].update(shape=["4", "6"]), "matrix.shape"),  # strings are not integers
        (lambda b: b["matrix"].update(shape={"0": 4, "1": 6}), "matrix.shape"),  # object (was a KeyError 500)
        (lambda b: b["matrix"].update(shape=[4.0, 6.0]), "matrix.shape"),  # floats are not integers
        (lambda b: b["matrix"].update(shape=[True, 6]), "matrix.shape"),
    ],
)
def test_unusual_json_bodies_parse_or_name_the_field(csr_payload, mutate, field):
    X, genes = _matrix()
    body = csr_payload(X, genes)
    mutate(body)
    if field is None:
        assert (_parse(orjson.dumps(body)).X != X).nnz == 0
        return
    with pytest.raises(InputError) as e:
        _parse(orjson.dumps(body))
    assert e.value.field == field and e.value.status_code == 422, e.value.message


def test_kept_json_parser_is_reused_and_survives_errors_and_concurrency(csr_payload):
    """Bodies under the keep limit share one parser; a failed parse (whose traceback still
    holds that document) or a busy parser never blocks or corrupts the next request."""
    from cellatlas.service import payload_json as pj
    from cellatlas.service.limits import RequestLimits

    limits = RequestLimits(max_cells=100)
    X, genes = _matrix(n=6, g=5, seed=4)
    Y, genes_y = _matrix(n=3, g=8, seed=5)
    body_x, body_y = orjson.dumps(csr_payload(X, genes)), orjson.dumps(csr_payload(Y, genes_y))
    p = pj.parse_json(body_x, {}, limits, keep_bytes=1 << 20)
    kept = pj._kept
    assert kept is not None and (p.X != X).nnz == 0
    q = pj.parse_json(body_y, {}, limits, keep_bytes=1 << 20)
    assert pj._kept is kept and (q.X != Y).nnz == 0 and q.genes == genes_y and (p.X != X).nnz == 0

    bad = csr_payload(X, genes)
    bad["matrix"]["shape"] = [True, 5]
    with pytest.raises(InputError) as held:  # the exception, and its traceback, stay alive below
        pj.parse_json(orjson.dumps(bad), {}, limits, keep_bytes=1 << 20)
    assert held.value.field == "matrix.shape" and pj._kept is None
    assert (pj.parse_json(body_x, {}, limits, keep_bytes=1 << 20).X != X).nnz == 0

    with pj._kept_lock:  # another request holds the kept parser: this one gets its own
        assert (pj.parse_json(body_y, {}, limits, keep_bytes=1 << 20).X != Y).nnz == 0
    before = pj._kept
    assert (pj.parse_json(body_y, {}, limits, keep_bytes=10).X != Y).nnz == 0  # over the limit: not kept
    assert pj._kept is before
