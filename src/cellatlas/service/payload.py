"""Turn a received request body into a validated query for the engine.

Three body formats on the same routes, chosen by ``Content-Type``:

* ``application/json`` — the articles' wire format (``genes``, ``matrix.{indptr,
  indices, data, shape}``, ``model``, ``reference_atlas``), parsed strictly
  (:mod:`cellatlas.service.payload_json`);
* ``application/x-npz`` — a numpy ``.npz`` holding the same arrays
  (``indptr``, ``indices``, ``data``, ``shape``, ``genes``, optional ``cell_ids``);
  every member is bounded by its zip entry and ``.npy`` header before it is read;
  options travel as query parameters;
* ``application/x-h5ad`` — an ``.h5ad`` file, checked from its metadata and read
  lazily (:func:`cellatlas.io_h5ad.read_h5ad_untrusted`).

Every declared size is checked against :class:`~cellatlas.service.limits.RequestLimits`
(cells, genes, bytes, the key's balance) before arrays are built; every error is 4xx
naming the field. ``Content-Encoding`` is undone before, by :mod:`cellatlas.service.body`.
"""

from __future__ import annotations

import zipfile
from typing import IO, Any, Mapping

import numpy as np

from cellatlas.errors import InputError, UnsupportedMediaTypeError
from cellatlas.io import validate_csr_arrays
from cellatlas.service.body import Body, decode_bytes
from cellatlas.service.limits import RequestLimits
from cellatlas.service.payload_fields import Parsed, as_bool, check_shape, opt_name, reject_unknown, str_array
from cellatlas.service.payload_json import parse_json

__all__ = ["Parsed", "parse_request", "body_format", "decode_body", "CONTENT_TYPES"]

JSON_TYPES = ("application/json", "text/json")
NPZ_TYPES = ("application/x-npz", "application/vnd.cellatlas.csr+npz", "application/zip")
H5AD_TYPES = ("application/x-h5ad", "application/x-hdf5", "application/x-hdf")
CONTENT_TYPES = JSON_TYPES[:1] + NPZ_TYPES[:1] + H5AD_TYPES[:1] + ("application/octet-stream",)
NPZ_ARRAYS = ("indptr", "indices", "data", "shape", "genes")
_NPZ_FIX = "Write it with numpy.savez(f, indptr=..., indices=..., data=..., shape=..., genes=np.array(genes, dtype=str))."


def decode_body(body: bytes, content_encoding: str | None, limit: int, ratio: float = float("inf")) -> bytes:
    """Undo ``Content-Encoding`` of a body held in memory (see :mod:`cellatlas.service.body`)."""
    return decode_bytes(body, content_encoding, limit, ratio)


def body_format(content_type: str | None, head: bytes) -> str:
    """``json``, ``npz`` or ``h5ad`` from the Content-Type (sniffed from ``head`` for octet-stream)."""
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct in JSON_TYPES or ct.endswith("+json"):
        return "json"
    if ct in NPZ_TYPES:
        return "npz"
    if ct in H5AD_TYPES:
        return "h5ad"
    if ct in ("", "application/octet-stream"):
        if head[:4] == b"PK\x03\x04":
            return "npz"
        if head[:8] == b"\x89HDF\r\n\x1a\n":
            return "h5ad"
        if ct == "" and head[:1] in (b"{", b" ", b"\n"):
            return "json"
    raise UnsupportedMediaTypeError(
        f"Content-Type '{(content_type or '')[:100]}' is not supported on this route.",
        fix=f"Send one of: {', '.join(CONTENT_TYPES)} (JSON is the compatible path, npz the fast one).",
        field="Content-Type",
    )


def parse_request(
    body: Body | bytes,
    *,
    content_type: str | None,
    params: Mapping[str, str],
    options: Mapping[str, Any],
    limits: RequestLimits | None = None,
    max_cells: int | None = None,
) -> Parsed:
    """Decode a (decompressed) body into a :class:`Parsed` query.

    Parameters
    ----------
    body
        The body from :func:`cellatlas.service.body.read_body` (or its bytes).
    content_type
        The request's Content-Type header.
    params
        Query-string parameters (``model``, ``reference_atlas``/``atlas``, options, and
        for h5ad ``layer``/``use_raw``). Unknown names are refused.
    options
        Route options and their defaults (e.g. ``{"return_embedding": False}``); bools only.
    limits
        Declared-size limits and the balance check; ``max_cells`` alone is a shortcut.
    """
    if isinstance(body, (bytes, bytearray)):
        body = Body(size=len(body), received=len(body), digest="", data=bytes(body))
    if limits is None:
        limits = RequestLimits(max_cells=int(max_cells if max_cells is not None else 100_000))
    fmt = body_format(content_type, body.head())
    allowed_params = {"model", "reference_atlas", "atlas", *options}
    if fmt == "h5ad":
        allowed_params |= {"layer", "use_raw"}
    reject_unknown(params, allowed_params, "query parameter")
    sel = {
        "model": opt_name(params.get("model"), "model"),
        "atlas": opt_name(params.get("reference_atlas", params.get("atlas")), "reference_atlas"),
        "options": {k: as_bool(params[k], k) if k in params else v for k, v in options.items()},
    }
    if fmt == "json":
        parsed = parse_json(body.bytes(), options, limits)
    elif fmt == "npz":
        parsed = _parse_npz(body.open(), limits, body.size)
    else:
        parsed = _parse_h5ad(body, limits, params)
    parsed.body_format = fmt
    parsed.model = parsed.model or sel["model"]
    parsed.atlas = parsed.atlas or sel["atlas"]
    parsed.options = {**sel["options"], **parsed.options}
    return parsed


# ------------------------------------------------------------------- npz
class _Member:
    """One ``.npy`` member of the archive, bounded by its zip entry and header before reading."""

    def __init__(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, limits: RequestLimits, archive_size: int) -> None:
        self.zf, self.info, self.name = zf, info, name
        if info.compress_size > archive_size:
            raise InputError(f"npz array '{name}' claims {info.compress_size:,} stored bytes in a {archive_size:,}-byte archive (corrupt).",
                             fix=_NPZ_FIX, field=name)
        limits.check_bytes(info.file_size, info.compress_size, limits.encoding_ratio if info.compress_type else 1.0, name)
        try:
            with zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
                else:
                    raise ValueError(f"unsupported .npy format version {version}")
                self.offset = fh.tell()
        except Exception as e:  # noqa: BLE001 - zipfile/zlib raise many types (BadZipFile, zlib.error, NotImplementedError, ...)
            raise InputError(f"npz array '{name}' has no readable .npy header ({type(e).__name__}: {e}).", fix=_NPZ_FIX, field=name) from None
        if dtype.hasobject:
            raise InputError(f"npz array '{name}' holds Python objects (pickles are never loaded).", fix=_NPZ_FIX, field=name)
        self.shape, self.fortran, self.dtype = tuple(shape), fortran, dtype
        self.nbytes = int(np.prod(self.shape, dtype=object)) * dtype.itemsize
        if self.nbytes > info.file_size - self.offset:
            raise InputError(
                f"npz array '{name}' declares shape {self.shape} ({self.nbytes:,} bytes) but holds {info.file_size - self.offset:,} bytes.",
                fix=_NPZ_FIX, field=name,
            )

    def expect_1d(self, max_len: int | None = None, exact: int | None = None) -> None:
        if len(self.shape) != 1:
            raise InputError(f"npz array '{self.name}' must be 1-D, got shape {self.shape}.", fix=_NPZ_FIX, field=self.name)
        n = self.shape[0]
        if exact is not None and n != exact:
            raise InputError(f"npz array '{self.name}' has length {n:,}, expected {exact:,} (n_cells + 1).", fix=_NPZ_FIX, field=self.name)
        if max_len is not None and n > max_len:
            raise InputError(f"npz array '{self.name}' has {n:,} entries, more than the declared shape allows ({max_len:,}).",
                             fix=_NPZ_FIX, field=self.name)

    def read(self) -> np.ndarray:
        """The array (numpy's reader: allocates the size checked above, reads in chunks)."""
        try:
            with self.zf.open(self.info) as fh:
                arr = np.lib.format.read_array(fh, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - CRC mismatch, truncated or invalid deflate, unsupported method
            raise InputError(f"npz array '{self.name}' cannot be read ({type(e).__name__}: {e}).", fix=_NPZ_FIX, field=self.name) from None
        if arr.shape != self.shape or arr.dtype != self.dtype:  # the header cannot change between two reads
            raise InputError(f"npz array '{self.name}' changed while it was read.", fix=_NPZ_FIX, field=self.name)
        return arr


def _parse_npz(fh: IO[bytes], limits: RequestLimits, archive_size: int) -> Parsed:
    try:
        zf = zipfile.ZipFile(fh)
    except Exception as e:  # noqa: BLE001 - BadZipFile, ValueError, OSError, NotImplementedError, ...
        raise InputError(f"The body is not a readable .npz archive ({type(e).__name__}: {e}).", fix=_NPZ_FIX, field="body") from None
    with zf:
        infos: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if name in infos:
                raise InputError(f"The npz archive holds '{name}' twice.", fix=_NPZ_FIX, field=name)
            infos[name] = info
        reject_unknown(infos, {*NPZ_ARRAYS, "cell_ids"}, "npz array")
        for k in NPZ_ARRAYS:
            if k not in infos:
                raise InputError(f"The npz archive has no array '{k}'.", fix=_NPZ_FIX, field=k)
        if sum(i.file_size for i in infos.values()) > limits.max_bytes:
            limits.check_bytes(sum(i.file_size for i in infos.values()), 0, 0.0, "body")
        members = {k: _Member(zf, info, k, limits, archive_size) for k, info in infos.items()}
        n_cells, n_genes = check_shape(members["shape"].read(), limits, field="shape")
        members["indptr"].expect_1d(exact=n_cells + 1)
        members["genes"].expect_1d(max_len=limits.max_genes)
        for k in ("indices", "data"):
            members[k].expect_1d(max_len=n_cells * n_genes)
        if "cell_ids" in members:
            members["cell_ids"].expect_1d(max_len=limits.max_cells)
        arrays = {k: m.read() for k, m in members.items() if k != "shape"}
    for k in ("indptr", "indices", "data"):
        if arrays[k].dtype.kind not in "iuf":
            raise InputError(f"npz array '{k}' must hold numbers, got dtype {arrays[k].dtype}.", fix=_NPZ_FIX, field=k)
    X = validate_csr_arrays(arrays["indptr"], arrays["indices"], arrays["data"], (n_cells, n_genes))
    parsed = Parsed(X=X, genes=str_array(arrays["genes"], "genes"), n_cells=n_cells)
    if "cell_ids" in arrays:
        parsed.cell_ids = str_array(arrays["cell_ids"], "cell_ids")
    return parsed


# ------------------------------------------------------------------- h5ad
def _parse_h5ad(body: Body, limits: RequestLimits, params: Mapping[str, str]) -> Parsed:
    from cellatlas.io_h5ad import read_h5ad_untrusted

    use_raw = as_bool(params["use_raw"], "use_raw") if "use_raw" in params else None
    layer = opt_name(params.get("layer"), "layer")
    adata = read_h5ad_untrusted(
        body.open(),
        max_cells=limits.max_cells,
        max_genes=limits.max_genes,
        max_bytes=limits.max_bytes,
        ratio=limits.hdf5_ratio,
        file_size=body.size,
        check_cells=limits.pay,
        layer=layer,
        use_raw=use_raw,
    )
    return Parsed(X=adata, genes=None, n_cells=int(adata.n_obs), layer=layer, use_raw=use_raw)

