"""Property fuzz of the JSON, npz and h5ad request decoders: every input is parsed or refused
with a 4xx naming the field; nothing else escapes and nothing hangs.

Example counts (CI): JSON 900, npz 600, h5ad 300, HTTP round trips 300 (2,100 in all).
``CELLATLAS_FUZZ_SCALE=10`` multiplies them (``benchmarks/reliability.py --fuzz-scale``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import zipfile

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cellatlas.errors import CellAtlasError
from cellatlas.service.limits import RequestLimits
from cellatlas.service.payload import parse_request

SCALE = float(os.environ.get("CELLATLAS_FUZZ_SCALE", "1"))
HANG_SECONDS = 10
OPTIONS = {"return_embedding": False}
LIMITS = RequestLimits(max_cells=50, max_genes=60, max_bytes=8 << 20)


def _settings(n: int):
    return settings(max_examples=int(n * SCALE), deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@contextlib.contextmanager
def no_hang(seconds: float = HANG_SECONDS):
    """Fail (TimeoutError) instead of hanging when one decode takes longer than ``seconds``."""
    def alarm(*_):
        raise TimeoutError(f"decoder ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check(body: bytes, content_type: str, params: dict | None = None) -> int:
    """Parse ``body``; return 200 or the 4xx status. Anything but a 4xx CellAtlasError fails the test."""
    try:
        with no_hang():
            parse_request(body, content_type=content_type, params=params or {}, options=OPTIONS, limits=LIMITS)
        return 200
    except CellAtlasError as e:
        assert 400 <= e.status_code < 500, (e.status_code, e.message)
        assert e.field and e.message and e.fix, e.to_dict()
        orjson.dumps(e.to_dict())  # the error body itself must serialise
        return e.status_code


# --------------------------------------------------------------------- inputs
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def csr(draw, max_cells=4, max_genes=6):
    n = draw(st.integers(1, max_cells))
    g = draw(st.integers(1, max_genes))
    dense = draw(hnp.arrays(np.int64, (n, g), elements=st.integers(0, 3)))
    indptr, indices, data = [0], [], []
    for row in dense:
        nz = np.flatnonzero(row)
        indices += nz.tolist()
        data += row[nz].astype(float).tolist()
        indptr.append(len(indices))
    return {"indptr": indptr, "indices": indices, "data": data, "shape": [n, g]}, [f"G{i}" for i in range(g)]


FIELDS = ["genes", "matrix", "matrix.indptr", "matrix.indices", "matrix.data", "matrix.shape", "model",
          "reference_atlas", "atlas", "cell_ids", "return_embedding", "extra"]


@st.composite
def json_bodies(draw):
    matrix, genes = draw(csr())
    body = {"genes": genes, "matrix": matrix}
    if draw(st.booleans()):
        body["cell_ids"] = [f"c{i}" for i in range(matrix["shape"][0])]
    for path in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        value = draw(json_values | st.integers(-(2**70), 2**70) | st.lists(st.integers(-(2**65), 2**65), max_size=4))
        parts = path.split(".")
        target = body["matrix"] if len(parts) == 2 and isinstance(body.get("matrix"), dict) else body
        target[parts[-1]] = value
    raw = json.dumps(body).encode()
    if draw(st.booleans()):  # byte-level damage too
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(raw)))
            raw = raw[:at] + draw(st.binary(max_size=3)) + raw[at + draw(st.integers(0, 3)):]
    return raw


@given(json_bodies())
@_settings(900)
def test_json_decoder_never_escapes(raw):
    check(raw, "application/json")


DTYPES = st.sampled_from(["i1", "i4", "i8", "u2", "u8", "f2", "f4", "f8", "?", "c8", "U3", "S3", "M8[s]"])


@st.composite
def random_arrays(draw):
    dtype = np.dtype(draw(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=5))
    return draw(hnp.arrays(dtype, shape))


@st.composite
def npz_bodies(draw):
    matrix, genes = draw(csr())
    arrays = {"indptr": np.array(matrix["indptr"]), "indices": np.array(matrix["indices"], dtype=np.int32),
              "data": np.array(matrix["data"]), "shape": np.array(matrix["shape"]), "genes": np.array(genes)}
    for name in draw(st.lists(st.sampled_from([*arrays, "cell_ids", "other"]), max_size=3, unique=True)):
        if draw(st.booleans()) and name in arrays:
            del arrays[name]
        else:
            arrays[name] = draw(random_arrays())
    buf = io.BytesIO()
    (np.savez_compressed if draw(st.booleans()) else np.savez)(buf, **arrays)
    raw = buf.getvalue()
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(raw) - 1))
            raw = raw[:at] + draw(st.binary(min_size=1, max_size=2)) + raw[at + 1:]
    return raw


@given(npz_bodies())
@_settings(600)
def test_npz_decoder_never_escapes(raw):
    check(raw, "application/x-npz")


@given(st.integers(0, 2**64 - 1), st.sampled_from(["<f8", "<i4", "|S2", "<U1"]), st.integers(0, 256))
@_settings(150)
def test_npz_headers_that_lie_are_refused(n, dtype, stored):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": dtype, "fortran_order": False, "shape": (n,)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in ("indptr", "indices", "data", "shape", "genes"):
            zf.writestr(name + ".npy", header.getvalue() + b"\0" * stored)
    check(buf.getvalue(), "application/x-npz")


@st.composite
def h5ad_bodies(draw):
    import h5py

    buf = io.BytesIO()
    n = draw(st.integers(0, 4))
    g = draw(st.integers(0, 5))
    with h5py.File(buf, "w") as f:
        for group, size in (("obs", n), ("var", g)):
            if draw(st.integers(0, 5)) == 0:
                continue
            grp = f.create_group(group)
            if draw(st.integers(0, 5)):
                grp.attrs["_index"] = "_index"
            k = size if draw(st.integers(0, 4)) else draw(st.integers(0, 6))
            grp.create_dataset("_index", data=np.array([f"n{i}" for i in range(k)], dtype="S"))
        kind = draw(st.sampled_from(["dense", "csr", "csc", "odd", "none", "link"]))
        if kind == "dense":
            f.create_dataset("X", data=draw(hnp.arrays(draw(st.sampled_from(["f4", "i8", "u1", "?", "S2"])), (n, g))))
        elif kind in ("csr", "csc", "odd"):
            x = f.create_group("X")
            x.attrs["encoding-type"] = {"csr": "csr_matrix", "csc": "csc_matrix", "odd": "awkward"}[kind]
            x.attrs["encoding-version"] = "0.1.0"
            x.attrs["shape"] = draw(st.lists(st.integers(-1, 6), min_size=0, max_size=3))
            for name in ("data", "indices", "indptr"):
                if draw(st.integers(0, 6)):
                    x.create_dataset(name, data=draw(random_arrays().filter(lambda a: a.ndim == 1 and a.dtype.kind not in "McU")))
        elif kind == "link":
            f["X"] = draw(st.sampled_from([h5py.SoftLink("/obs"), h5py.SoftLink("/nowhere"), h5py.ExternalLink("x.h5", "/X")]))
        if draw(st.booleans()):
            f.create_dataset("layers/counts", shape=(n, draw(st.integers(0, 6))), dtype="f4")
        if draw(st.booleans()):
            f.create_dataset("raw/X", data=np.ones((draw(st.integers(0, 5)), g)))
    raw = buf.getvalue()
    if draw(st.integers(0, 3)) == 0:  # damage a few bytes past the superblock
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(64, len(raw) - 1))
            raw = raw[:at] + draw(st.binary(min_size=1, max_size=2)) + raw[at + 1:]
    params = draw(st.fixed_dictionaries({}, optional={"layer": st.sampled_from(["counts", "nope", ""]), "use_raw": st.sampled_from(["true", "false", "maybe"])}))
    return raw, params


@given(h5ad_bodies())
@_settings(300)
def test_h5ad_decoder_never_escapes(case):
    raw, params = case
    check(raw, "application/x-h5ad", params)


# --------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def http(tmp_path_factory):
    from fastapi.testclient import TestClient

    from cellatlas.config import Settings
    from cellatlas.service.app import create_app

    home = tmp_path_factory.mktemp("fuzzhome")
    app = create_app(Settings(home=home, require_api_key=False, max_cells_per_request=50, max_genes_per_request=60,
                              max_body_bytes=8 << 20, rate_limit_ip_per_s=0, rate_limit_key_per_s=0))
    with TestClient(app, raise_server_exceptions=False) as tc:
        yield tc


@given(st.one_of(
    json_bodies().map(lambda b: (b, "application/json", {})),
    npz_bodies().map(lambda b: (b, "application/x-npz", {})),
    h5ad_bodies().map(lambda c: (c[0], "application/x-h5ad", c[1])),
), st.sampled_from(["/v1/singlecell/annotate", "/v1/singlecell/embed", "/v1/singlecell/markers"]))
@_settings(300)
def test_routes_never_answer_5xx(http, case, route):
    body, ctype, params = case
    with no_hang(60):
        r = http.post(route, content=body, params=params, headers={"Content-Type": ctype})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert r.json()["error"]["field"] or r.status_code in (404, 409), r.text
