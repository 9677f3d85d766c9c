"""Hostile request bodies for the service's regression tests and ``benchmarks/reliability.py``.

Each builder returns ``(body, headers)`` ready to POST to ``/v1/singlecell/annotate``.
They are built in bounded memory (repeated compressed members or frames, chunked writes),
so a 10 GB bomb costs a few MB to make.
"""

from __future__ import annotations

import io
import zipfile
import zlib

import numpy as np

_MB = 1 << 20


def gzip_bomb(decoded_bytes: int, piece: int = 64 * _MB) -> tuple[bytes, dict[str, str]]:
    """A JSON-typed body of concatenated gzip members of zeros, ``decoded_bytes`` in all (~1030:1)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = c.compress(b"\0" * piece) + c.flush()
    n = max(1, decoded_bytes // piece)
    return member * n, {"Content-Type": "application/json", "Content-Encoding": "gzip"}


def zstd_bomb(decoded_bytes: int, piece: int = 64 * _MB) -> tuple[bytes, dict[str, str]]:
    """An npz-typed body of concatenated zstd frames of zeros (~30,000:1)."""
    import zstandard

    frame = zstandard.ZstdCompressor(level=19).compress(b"\0" * piece)
    n = max(1, decoded_bytes // piece)
    return frame * n, {"Content-Type": "application/x-npz", "Content-Encoding": "zstd"}


def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _small_members(zf: zipfile.ZipFile, n_cells: int, n_genes: int) -> None:
    for name, arr in {
        "shape": np.array([n_cells, n_genes]),
        "indptr": np.zeros(n_cells + 1, dtype=np.int64),
        "indices": np.zeros(0, dtype=np.int32),
        "genes": np.array([f"G{i}" for i in range(n_genes)]),
    }.items():
        with zf.open(name + ".npy", "w") as fh:
            np.lib.format.write_array(fh, arr)


def npz_zip_bomb(decoded_bytes: int, piece: int = 16 * _MB) -> tuple[bytes, dict[str, str]]:
    """An npz whose ``data`` member deflates ``decoded_bytes`` of zeros (a valid .npy of that size)."""
    n = decoded_bytes // 8
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        _small_members(zf, 10, 5)
        with zf.open("data.npy", "w", force_zip64=True) as fh:
            fh.write(_npy_header((n,), "<f8"))
            zeros = b"\0" * piece
            left = n * 8
            while left > 0:
                fh.write(zeros[: min(piece, left)])
                left -= piece
    return buf.getvalue(), {"Content-Type": "application/x-npz"}


def npz_header_bomb(n_elements: int = 10**12) -> tuple[bytes, dict[str, str]]:
    """An npz whose ``data`` header declares ``n_elements`` float64 but holds a few bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        _small_members(zf, 10, 5)
        zf.writestr("data.npy", _npy_header((n_elements,), "<f8") + b"\0" * 64)
    return buf.getvalue(), {"Content-Type": "application/x-npz"}


def _h5ad_skeleton(f, n_obs: int, n_vars: int) -> None:
    for group, n in (("obs", n_obs), ("var", n_vars)):
        g = f.create_group(group)
        g.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0", "_index": "_index", "column-order": np.array([], dtype="S")})
        g.create_dataset("_index", data=np.array([f"{group}{i}" for i in range(n)], dtype="S"))


def h5ad_fill_bomb(n_obs: int = 100_000, n_vars: int = 6_700) -> tuple[bytes, dict[str, str]]:
    """An .h5ad whose dense ``X`` (chunked, never written) declares ``n_obs * n_vars`` float32 of fill value."""
    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        _h5ad_skeleton(f, n_obs, n_vars)
        f.create_dataset("X", shape=(n_obs, n_vars), dtype="f4", chunks=(1000, min(n_vars, 1000)), fillvalue=1.0)
    return buf.getvalue(), {"Content-Type": "application/x-h5ad"}


def h5ad_reaching_out(kind: str, target: str = "/etc/passwd") -> tuple[bytes, dict[str, str]]:
    """An .h5ad that makes a naive reader open ``target``: ``external_link``, ``external_storage``,
    ``virtual`` (a virtual dataset mapping another file) or ``dangling_soft_link``."""
    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        _h5ad_skeleton(f, 2, 3)
        if kind == "external_link":
            f["X"] = h5py.ExternalLink(target, "/X")
        elif kind == "external_storage":
            f.create_dataset("X", shape=(2, 3), dtype="u1", external=[(target, 0, 6)])
        elif kind == "virtual":
            layout = h5py.VirtualLayout(shape=(2, 3), dtype="f4")
            layout[:] = h5py.VirtualSource(target, "X", shape=(2, 3))
            f.create_virtual_dataset("X", layout)
        elif kind == "dangling_soft_link":
            f.create_dataset("X", data=np.ones((2, 3), dtype="f4"))
            f["layers"] = h5py.SoftLink("/nowhere")
        else:
            raise ValueError(kind)
    return buf.getvalue(), {"Content-Type": "application/x-h5ad"}
