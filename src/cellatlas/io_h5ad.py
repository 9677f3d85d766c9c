"""Reading HDF5 files that came from someone else (uploads), without trusting them.

:func:`check_hdf5` walks every link and dataset of an open file from its metadata
alone and refuses what could make the server read another file or allocate more
than the data justifies: external links, soft links that resolve nowhere,
user-defined links, external raw storage, virtual datasets (which map other files),
and datasets whose declared size exceeds the byte limit or ``ratio`` times what they
store (fill-value and compressed-chunk bombs). :func:`read_h5ad_untrusted` then reads
only what annotation uses — the counts matrix (``X``, one layer or ``raw``), cell ids
and gene names — after checking the declared shape against the cell and gene limits.

Errors are :class:`~cellatlas.errors.InputError` (422) or
:class:`~cellatlas.errors.PayloadTooLargeError` (413), ``field="body"`` or the element.
"""

from __future__ import annotations

from typing import IO, Any, Callable

import numpy as np

from cellatlas.errors import CellAtlasError, InputError, PayloadTooLargeError

MAX_OBJECTS = 100_000
"""Most groups, datasets and links a file may hold (metadata bombs)."""
RATIO_SLACK = 1 << 20
_FIX = "Upload the file written by AnnData.write_h5ad (no external links or external storage), or use the npz/JSON formats."


def _refuse(message: str, field: str = "body", fix: str = _FIX) -> InputError:
    return InputError(message, fix=fix, field=field)


def _too_big(message: str, field: str, details: dict[str, Any]) -> PayloadTooLargeError:
    return PayloadTooLargeError(message, fix="Split the cells into smaller requests, or write the file with its real values.",
                                field=field, details=details)


def check_hdf5(f: Any, *, file_size: int, max_bytes: int, ratio: float) -> dict[str, int]:
    """Check every link and dataset of the open ``h5py.File`` ``f``; returns declared bytes per dataset path.

    Parameters
    ----------
    f
        An open ``h5py.File``.
    file_size
        Size of the file in bytes (no dataset may store more).
    max_bytes
        Most bytes one dataset may declare.
    ratio
        Most declared bytes per stored byte (plus 1 MiB).
    """
    try:
        return _walk(f, file_size=file_size, max_bytes=max_bytes, ratio=ratio)
    except CellAtlasError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file can fail anywhere in h5py
        raise _refuse(f"The HDF5 file's metadata cannot be read ({type(e).__name__}: {str(e)[:200]}).") from None


def _walk(f: Any, *, file_size: int, max_bytes: int, ratio: float) -> dict[str, int]:
    import h5py

    declared: dict[str, int] = {}
    seen: set[int] = set()
    stack = [("/", f)]
    n_objects = 0
    while stack:
        path, group = stack.pop()
        for name in group:
            n_objects += 1
            if n_objects > MAX_OBJECTS:
                raise _refuse(f"The file holds more than {MAX_OBJECTS:,} HDF5 objects.")
            child = f"{path.rstrip('/')}/{name}".lstrip("/")
            try:
                link = group.get(name, getlink=True)
            except Exception as e:  # noqa: BLE001 - h5py raises several types for odd link classes
                raise _refuse(f"The HDF5 link '{child}' cannot be read ({type(e).__name__}).") from None
            if isinstance(link, h5py.ExternalLink):
                raise _refuse(f"The HDF5 file links to another file at '{child}' (an external link); uploads must be self-contained.")
            if isinstance(link, h5py.SoftLink):
                if group.get(name) is None:
                    raise _refuse(f"The HDF5 soft link '{child}' points to nothing inside the file.")
                continue  # its target is reached (and checked) through its hard link
            if not isinstance(link, h5py.HardLink):
                raise _refuse(f"The HDF5 link '{child}' is of an unsupported kind ({type(link).__name__}).")
            obj = group[name]
            key = hash(obj.id)
            if key in seen:
                continue
            seen.add(key)
            if isinstance(obj, h5py.Group):
                stack.append((child, obj))
            elif isinstance(obj, h5py.Dataset):
                declared[child] = _check_dataset(obj, child, file_size=file_size, max_bytes=max_bytes, ratio=ratio)
    return declared


def _check_dataset(ds: Any, path: str, *, file_size: int, max_bytes: int, ratio: float) -> int:
    if ds.is_virtual:
        raise _refuse(f"The HDF5 dataset '{path}' is virtual (it maps other files); uploads must be self-contained.")
    if ds.id.get_create_plist().get_external_count() > 0:
        raise _refuse(f"The HDF5 dataset '{path}' keeps its data in external files; uploads must be self-contained.")
    size = int(np.prod(ds.shape, dtype=object)) if ds.shape is not None else 0
    declared = size * int(ds.dtype.itemsize)
    stored = int(ds.id.get_storage_size())
    if stored > file_size:
        raise _refuse(f"The HDF5 dataset '{path}' claims {stored:,} stored bytes in a {file_size:,}-byte file (corrupt).")
    if declared > max_bytes:
        raise _too_big(f"The HDF5 dataset '{path}' declares {declared:,} bytes, more than this server's limit of {max_bytes:,}.",
                       path, {"declared_bytes": declared, "max_body_bytes": max_bytes})
    if declared > ratio * stored + RATIO_SLACK:
        raise _too_big(f"The HDF5 dataset '{path}' declares {declared:,} bytes but stores only {stored:,} "
                       f"(more than {ratio:g}x: a fill-value or compression bomb).",
                       path, {"declared_bytes": declared, "stored_bytes": stored, "max_ratio": ratio})
    return declared


def _matrix_shape(f: Any, key: str) -> tuple[int, int] | None:
    """Declared (rows, cols) of an AnnData matrix element from metadata, or ``None`` if absent."""
    import h5py

    if key not in f:
        return None
    el = f[key]
    if isinstance(el, h5py.Dataset):
        if len(el.shape or ()) != 2:
            raise _refuse(f"'{key}' must be a 2-D matrix, got shape {el.shape}.", field=key)
        return int(el.shape[0]), int(el.shape[1])
    shape = np.asarray(el.attrs.get("shape", []))
    enc = el.attrs.get("encoding-type")
    if enc not in ("csr_matrix", "csc_matrix") or shape.shape != (2,) or shape.dtype.kind not in "iu" or (shape < 0).any():
        raise _refuse(f"'{key}' is not a dense array or a csr/csc sparse matrix with a shape of two non-negative integers "
                      f"(encoding-type {enc!r}).", field=key)
    return int(shape[0]), int(shape[1])


def _index_name(f: Any, group: str) -> str:
    import h5py

    g = f.get(group)
    name = g.attrs.get("_index") if isinstance(g, h5py.Group) else None
    if not isinstance(name, str) or name not in g:
        raise _refuse(f"'{group}' has no index: the file was not written by anndata >= 0.7.",
                      fix="Re-save it with a current anndata (adata.write_h5ad), or send npz/JSON.")
    return f"{group}/{name}"


def read_h5ad_untrusted(
    fileobj: IO[bytes] | str,
    *,
    max_cells: int,
    max_genes: int,
    max_bytes: int,
    ratio: float,
    file_size: int,
    check_cells: Callable[[int], Any] | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
) -> Any:
    """An AnnData holding only what annotation reads, after :func:`check_hdf5` passed.

    Parameters
    ----------
    fileobj
        A seekable binary file (or path) holding the ``.h5ad``.
    max_cells, max_genes
        Limits on the declared shape of ``X`` (413 above them).
    max_bytes, ratio, file_size
        As for :func:`check_hdf5`; also the cap on all elements read together.
    check_cells
        Called with the declared cell count before anything is read (e.g. raises 402).
    layer, use_raw
        As for :func:`cellatlas.io.choose_matrix`; only the elements these can pick are read.

    Returns
    -------
    anndata.AnnData
        ``X``, the layers named ``layer`` (or ``counts``/``raw_counts``), ``raw`` (``X`` and
        gene names), ``obs_names`` and ``var_names``; nothing else.
    """
    import h5py

    try:
        f = h5py.File(fileobj, "r")
    except Exception as e:  # noqa: BLE001 - not HDF5 / truncated
        raise _refuse(f"The body is not a readable HDF5 file ({type(e).__name__}: {e}).") from None
    with f:
        try:
            return _read_checked(f, max_cells=max_cells, max_genes=max_genes, max_bytes=max_bytes, ratio=ratio,
                                 file_size=file_size, check_cells=check_cells, layer=layer, use_raw=use_raw)
        except CellAtlasError:
            raise
        except Exception as e:  # noqa: BLE001 - anndata/h5py raise many types on damaged elements
            raise _refuse(f"The .h5ad could not be read ({type(e).__name__}: {str(e)[:200]}).") from None


def _read_checked(f: Any, *, max_cells: int, max_genes: int, max_bytes: int, ratio: float, file_size: int,
                  check_cells: Callable[[int], Any] | None, layer: str | None, use_raw: bool | None) -> Any:
    import anndata as ad
    import pandas as pd
    from anndata.io import read_elem

    declared = check_hdf5(f, file_size=file_size, max_bytes=max_bytes, ratio=ratio)
    shape = _matrix_shape(f, "X")
    if shape is None:
        raise _refuse("The .h5ad has no 'X' matrix.", field="X")
    n_obs, n_vars = shape
    if n_vars > max_genes:
        raise _too_big(f"The .h5ad declares {n_vars:,} genes; this server accepts at most {max_genes:,}.", "X",
                       {"max_genes_per_request": max_genes, "n_genes": n_vars})
    if n_obs > max_cells:
        raise _too_big(f"The .h5ad holds {n_obs:,} cells; this server accepts at most {max_cells:,} per request.", "X",
                       {"max_cells_per_request": max_cells, "n_cells": n_obs})
    if check_cells is not None:
        check_cells(n_obs)
    wanted = ["X"]
    layers = [layer] if layer is not None else [] if use_raw else ["counts", "raw_counts"]
    layers = [name for name in layers if f"layers/{name}" in f]
    wanted += [f"layers/{name}" for name in layers]
    with_raw = use_raw is not False and "raw/X" in f
    raw_index = _index_name(f, "raw/var") if with_raw else None
    if with_raw:
        wanted += ["raw/X", raw_index]
    obs_index, var_index = _index_name(f, "obs"), _index_name(f, "var")
    wanted += [obs_index, var_index]
    for key in ["X", *(f"layers/{name}" for name in layers), *(["raw/X"] if with_raw else [])]:
        rows = _matrix_shape(f, key)[0]
        if rows != n_obs:
            raise _refuse(f"'{key}' has {rows:,} rows but X has {n_obs:,}.", field=key)
    total = sum(v for path, v in declared.items() if any(path == w or path.startswith(w + "/") for w in wanted))
    if total > max_bytes:
        raise _too_big(f"The elements annotation reads declare {total:,} bytes, more than this server's limit of {max_bytes:,}.",
                       "body", {"declared_bytes": total, "max_body_bytes": max_bytes})
    obs = pd.DataFrame(index=pd.Index(np.asarray(read_elem(f[obs_index])).astype(str), dtype=object))
    var = pd.DataFrame(index=pd.Index(np.asarray(read_elem(f[var_index])).astype(str), dtype=object))
    if len(obs) != n_obs or len(var) != n_vars:
        raise _refuse(f"obs/var hold {len(obs):,}/{len(var):,} names but X is {n_obs:,} x {n_vars:,}.")
    adata = ad.AnnData(X=read_elem(f["X"]), obs=obs, var=var, layers={name: read_elem(f[f"layers/{name}"]) for name in layers})
    if with_raw:
        raw_var = pd.Index(np.asarray(read_elem(f[raw_index])).astype(str), dtype=object)
        adata.raw = ad.AnnData(X=read_elem(f["raw/X"]), obs=pd.DataFrame(index=obs.index), var=pd.DataFrame(index=raw_var))
    return adata
