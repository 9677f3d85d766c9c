"""File readers behind :func:`cellatlas.io.read` (call that, not these).

Every reader returns a cells x genes :class:`anndata.AnnData` held in memory and
records what it did in ``uns['cellatlas_io']``: ``format``, ``source`` (file
name), ``transposed`` and ``notes`` (one line per change made while reading, also
emitted as a :class:`UserWarning` by :func:`cellatlas.io.read`). Renamed duplicate gene names are listed in
``renamed_genes_from`` / ``renamed_genes_to``.
"""

from __future__ import annotations

import csv
import gzip
import os
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas.config import get_settings
from cellatlas.errors import InputError

SUPPORTED = (
    ".h5ad; 10x .h5 (Cell Ranger v2/v3); a 10x directory with matrix.mtx[.gz] + features.tsv[.gz] "
    "(or genes.tsv[.gz]) + barcodes.tsv[.gz]; a .zip of such a directory or of one supported file; "
    ".csv / .tsv / .txt tables (optionally .gz) with genes in the header row and cell ids in the first column"
)
_FORMATS = ("h5ad", "10x_h5", "h5", "mtx", "zip", "csv", "tsv", "txt")
_MTX_RE = re.compile(r"^(.*?)matrix\.mtx(\.gz)?$")
_TABLE_RE = re.compile(r"\.(csv|tsv|txt)(\.gz)?$")
_BARCODE_RE = re.compile(r"[ACGTN]{8,}")
_CELLISH_RE = re.compile(r"^(cell|barcode|bc|sample|s)[\W_]*\d+$", re.IGNORECASE)
_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}", re.IGNORECASE)
_COMMON_GENES = frozenset(
    "ACTB ACTG1 GAPDH B2M MALAT1 NEAT1 TMSB4X TMSB10 EEF1A1 EEF2 FTL FTH1 TPT1 RPLP0 RPLP1 RPL13 RPL13A "
    "RPS27A RPS18 RPS12 RPL10 RPS2 UBC UBB PTMA MYL6 HSP90AB1 PPIA CFL1 PFN1 VIM CD74 HLA-A HLA-B HLA-C "
    "MT-CO1 MT-ND1 MT-CYB SRGN LYZ CD3E CD19 PTPRC ALB INS NPM1 HNRNPA1 ACTB1 MT-CO2 MT-ATP6".split()
)
_MAX_DEPTH = 4
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def read_any(path: Path, fmt: str | None = None, untrusted: bool = False) -> Any:
    """Read ``path`` in format ``fmt`` (detected when ``None``); see :func:`cellatlas.io.read`."""
    if not path.exists():
        raise InputError(f"no such file or directory: {path}", field="file",
                         fix="Check the path; supported inputs: " + SUPPORTED + ".")
    fmt = _normalise_fmt(fmt) if fmt else _detect_format(path)
    if fmt == "mtx":
        return _read_mtx_dir(path)
    if fmt == "zip":
        return _read_zip(path, untrusted)
    if fmt in ("csv", "tsv", "txt"):
        return _read_table(path, fmt)
    if untrusted:
        _check_untrusted_hdf5(path)
    return _read_hdf5(path, fmt)


def _check_untrusted_hdf5(path: Path) -> None:
    """Refuse links to other files, external storage and bombs before any reader opens an upload."""
    import h5py

    from cellatlas.io_h5ad import check_hdf5

    s = get_settings()
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise _fail(path, "an HDF5 file", exc) from exc
    with f:
        check_hdf5(f, file_size=path.stat().st_size, max_bytes=s.max_body_bytes, ratio=s.max_hdf5_ratio)


def _normalise_fmt(fmt: str) -> str:
    f = fmt.lower().lstrip(".")
    f = {"10x": "10x_h5", "hdf5": "h5", "10x_mtx": "mtx", "mex": "mtx"}.get(f, f)
    if f not in _FORMATS:
        raise InputError(f"unknown input format {fmt!r}", field="format",
                         fix=f"Use one of {', '.join(_FORMATS)}; supported inputs: {SUPPORTED}.")
    return f


def _detect_format(path: Path) -> str:
    if path.is_dir():
        return "mtx"
    name = path.name.lower()
    if name.endswith(".h5ad"):
        return "h5ad"
    if name.endswith((".h5", ".hdf5")):
        return "h5"
    if name.endswith(".zip"):
        return "zip"
    table = _TABLE_RE.search(name)
    if table:
        return table.group(1)
    if _MTX_RE.match(name):
        raise InputError(f"{path.name} is a bare Matrix Market file; gene names and barcodes are missing",
                         field="file", fix="Pass the directory holding matrix.mtx(.gz), features.tsv(.gz) and "
                         "barcodes.tsv(.gz), or a .zip of it.")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(_HDF5_MAGIC):
        return "h5"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    raise InputError(f"unsupported input format: {path.name}", field="file",
                     fix=f"Supported inputs: {SUPPORTED}.")


# --------------------------------------------------------------------------- bookkeeping
def _make_unique(names: list[str], what: str, notes: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Suffix duplicated names (``X``, ``X-1``, ...) as scanpy does; note every rename."""
    import anndata.utils

    idx = pd.Index(names, dtype=object)
    if idx.is_unique:
        return names, [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = [str(n) for n in anndata.utils.make_index_unique(idx)]
    frm = [o for o, n in zip(names, new) if o != n]
    to = [n for o, n in zip(names, new) if o != n]
    notes.append(f"{len(frm)} duplicated {what} renamed to be unique (e.g. {frm[0]!r} -> {to[0]!r})")
    return new, frm, to


def _finish(adata: Any, fmt: str, path: Path, notes: list[str], transposed: bool = False,
            renamed: tuple[list[str], list[str]] = ([], [])) -> Any:
    info: dict[str, Any] = {"format": fmt, "source": path.name, "transposed": bool(transposed)}
    if notes:
        info["notes"] = list(notes)
    if renamed[0]:
        info["renamed_genes_from"], info["renamed_genes_to"] = list(renamed[0]), list(renamed[1])
    adata.uns["cellatlas_io"] = info
    return adata


def _build(
    X: sp.csr_matrix, cells: list[str], genes: list[str], var: dict[str, Any], notes: list[str]
) -> tuple[Any, tuple[list[str], list[str]]]:
    import anndata

    genes, frm, to = _make_unique(genes, "gene names", notes)
    cells, _, _ = _make_unique(cells, "cell ids", notes)
    var_df = pd.DataFrame({k: np.asarray(v) for k, v in var.items()}, index=pd.Index(genes, dtype=object))
    adata = anndata.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(cells, dtype=object)), var=var_df)
    return adata, (frm, to)


def _fail(path: Path, what: str, exc: Exception) -> InputError:
    return InputError(f"could not read {path.name} as {what}: {exc}", field="file",
                      fix=f"Check that {path.name} is complete and not corrupted (expected: {what}); supported inputs: {SUPPORTED}.")


# --------------------------------------------------------------------------- HDF5
def _read_hdf5(path: Path, fmt: str) -> Any:
    import h5py

    if fmt == "h5":
        try:
            with h5py.File(path, "r") as f:
                keys = set(f.keys())
        except OSError as exc:
            raise _fail(path, "an HDF5 file", exc) from exc
        fmt = "h5ad" if {"X", "obs", "var"} <= keys else "10x_h5"
    return _read_h5ad(path) if fmt == "h5ad" else _read_10x_h5(path)


def _read_h5ad(path: Path) -> Any:
    import anndata

    try:
        adata = anndata.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001 - reader raises many types; re-raised as InputError
        raise _fail(path, "an .h5ad file", exc) from exc
    return _finish(adata, "h5ad", path, [])


def _read_10x_h5(path: Path) -> Any:
    import scanpy

    try:
        with warnings.catch_warnings():  # duplicated symbols are renamed (and reported) below
            warnings.filterwarnings("ignore", message="Variable names are not unique")
            raw = scanpy.read_10x_h5(path, gex_only=False)
    except Exception as exc:  # noqa: BLE001
        raise _fail(path, "a 10x Genomics .h5 file", exc) from exc
    notes: list[str] = []
    types = raw.var["feature_types"].astype(str).to_numpy() if "feature_types" in raw.var else None
    keep = _gene_expression_mask(types, notes, path)
    mask = keep if keep is not None else slice(None)
    X = sp.csr_matrix(raw.X[:, mask], dtype=np.float32)
    genes = [str(g) for g in raw.var_names[mask]]
    var = {c: raw.var[c].to_numpy()[mask] for c in raw.var.columns}
    adata, renamed = _build(X, [str(c) for c in raw.obs_names], genes, var, notes)
    return _finish(adata, "10x_h5", path, notes, renamed=renamed)


def _gene_expression_mask(types: np.ndarray | None, notes: list[str], path: Path) -> np.ndarray | None:
    """Boolean mask of 'Gene Expression' features (``None``: keep all), noting what is dropped."""
    if types is None or (types == "Gene Expression").all():
        return None
    keep = types == "Gene Expression"
    if not keep.any():
        raise InputError(f"{path.name} has no 'Gene Expression' features (types: {sorted(set(types))})",
                         field="file", fix="Annotation needs RNA counts; export the Gene Expression matrix.")
    dropped = pd.Series(types[~keep]).value_counts()
    notes.append("kept only 'Gene Expression' features; dropped " +
                 ", ".join(f"{n} '{t}'" for t, n in dropped.items()))
    return keep


# --------------------------------------------------------------------------- 10x mtx
def _find_mtx_sets(root: Path) -> list[tuple[Path, str]]:
    """``(folder, prefix)`` of every ``<prefix>matrix.mtx(.gz)`` under ``root`` (depth-limited)."""
    found = []
    base_depth = len(root.parts)
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__MACOSX" and not d.startswith("."))
        if len(Path(folder).parts) - base_depth >= _MAX_DEPTH:
            dirs[:] = []
        for name in sorted(files):
            m = _MTX_RE.match(name)
            if m and not name.startswith("._"):
                found.append((Path(folder), m.group(1)))
    return sorted(set(found))


def _first_existing(folder: Path, names: list[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _read_mtx_dir(path: Path) -> Any:
    sets = _find_mtx_sets(path)
    if not sets:
        listing = sorted(p.name for p in path.iterdir())[:10]
        raise InputError(f"no matrix.mtx(.gz) found in directory {path.name} (contains: {listing})", field="file",
                         fix=f"Pass a 10x directory (matrix.mtx[.gz], features.tsv[.gz], barcodes.tsv[.gz]). "
                         f"Supported inputs: {SUPPORTED}.")
    if len(sets) > 1:
        shown = [str((f / (p + "matrix.mtx")).relative_to(path)) for f, p in sets[:5]]
        raise InputError(f"{len(sets)} matrices found under {path.name}: {shown}", field="file",
                         fix="Pass one sample at a time: the directory (or zip) holding exactly one matrix.")
    return _read_mtx_set(*sets[0], source=path)


def _read_mtx_set(folder: Path, prefix: str, source: Path) -> Any:
    import scipy.io

    mtx = _first_existing(folder, [f"{prefix}matrix.mtx.gz", f"{prefix}matrix.mtx"])
    feats = _first_existing(folder, [f"{prefix}{n}.tsv{z}" for n in ("features", "genes") for z in (".gz", "")])
    bcs = _first_existing(folder, [f"{prefix}barcodes.tsv.gz", f"{prefix}barcodes.tsv"])
    if feats is None or bcs is None:
        missing = [n for n, p in ((f"{prefix}features.tsv.gz or genes.tsv", feats),
                                  (f"{prefix}barcodes.tsv(.gz)", bcs)) if p is None]
        raise InputError(f"10x directory {folder.name} lacks {' and '.join(missing)}", field="file",
                         fix="Include matrix.mtx(.gz), features.tsv(.gz) (or genes.tsv) and barcodes.tsv(.gz) "
                         "from the same Cell Ranger output folder.")
    try:
        m = scipy.io.mmread(str(mtx))
        table = pd.read_csv(feats, sep="\t", header=None, dtype=str, keep_default_na=False)
        barcodes = pd.read_csv(bcs, sep="\t", header=None, dtype=str, keep_default_na=False)[0].tolist()
    except Exception as exc:  # noqa: BLE001
        raise _fail(source, "a 10x matrix directory", exc) from exc
    notes: list[str] = []
    names = table[1 if table.shape[1] > 1 else 0].tolist()
    n_f, n_b = len(names), len(barcodes)
    if m.shape == (n_f, n_b):
        X = sp.csr_matrix(m.T, dtype=np.float32)
    elif m.shape == (n_b, n_f):
        X = sp.csr_matrix(m, dtype=np.float32)
        notes.append("matrix.mtx is stored cells x genes (not the 10x genes x cells); read as is")
    else:
        raise InputError(f"matrix.mtx has shape {m.shape} but there are {n_f} features and {n_b} barcodes",
                         field="file", fix="Use matrix, features and barcodes files from the same output folder.")
    var: dict[str, Any] = {"gene_ids": table[0].to_numpy()} if table.shape[1] > 1 else {}
    types = table[2].to_numpy().astype(str) if table.shape[1] > 2 else None
    keep = _gene_expression_mask(types, notes, source)
    if types is not None:
        var["feature_types"] = types
    if keep is not None:
        X, names = X[:, keep], [n for n, k in zip(names, keep) if k]
        var = {k: v[keep] for k, v in var.items()}
    adata, renamed = _build(X.tocsr(), barcodes, names, var, notes)
    return _finish(adata, "10x_mtx", source, notes, renamed=renamed)


# --------------------------------------------------------------------------- zip
def _read_zip(path: Path, untrusted: bool = False) -> Any:
    limit = 4 * get_settings().max_body_bytes  # guards against zip bombs
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir() and "__MACOSX" not in m.filename
                       and not Path(m.filename).name.startswith(".")]
            if sum(m.file_size for m in members) > limit:
                raise InputError(f"{path.name} unpacks to more than {limit} bytes", field="file",
                                 fix="Upload a smaller dataset, or a compressed .h5ad.")
            with tempfile.TemporaryDirectory(prefix="cellatlas-zip-") as tmp:
                zf.extractall(tmp, members)  # ZipFile.extract sanitises absolute and '..' paths
                adata = _read_unpacked(Path(tmp), path, untrusted)
    except zipfile.BadZipFile as exc:
        raise _fail(path, "a .zip archive", exc) from exc
    adata.uns["cellatlas_io"]["format"] = "zip/" + adata.uns["cellatlas_io"]["format"]
    adata.uns["cellatlas_io"]["source"] = path.name
    return adata


def _read_unpacked(root: Path, source: Path, untrusted: bool = False) -> Any:
    if _find_mtx_sets(root):
        return _read_mtx_dir(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("._") and (
        _TABLE_RE.search(p.name.lower()) or p.suffix.lower() in (".h5ad", ".h5", ".hdf5")))
    if len(files) == 1:
        return read_any(files[0], untrusted=untrusted)
    listing = [str(p.relative_to(root)) for p in (files or sorted(root.rglob("*")))[:10]]
    raise InputError(f"{source.name} holds {'several' if files else 'no'} readable inputs: {listing}", field="file",
                     fix=f"Zip exactly one 10x matrix folder or one file. Supported inputs: {SUPPORTED}.")


# --------------------------------------------------------------------------- tables
def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", newline="", encoding="utf-8-sig")
    return open(path, "r", newline="", encoding="utf-8-sig")


def _table_header(path: Path, fmt: str) -> tuple[str, list[str]]:
    """Separator and column names (one per value column) from the first two lines."""
    with _open_text(path) as fh:
        first, second = fh.readline(), fh.readline()
    if not first.strip():
        raise InputError(f"{path.name} is empty", field="file", fix="Upload a table with a header row of genes.")
    sep = {"csv": ",", "tsv": "\t"}.get(fmt) or ("\t" if "\t" in first else ",")
    header = next(csv.reader([first], delimiter=sep))
    row = next(csv.reader([second], delimiter=sep)) if second.strip() else []
    if not row:
        raise InputError(f"{path.name} has a header but no data rows", field="file",
                         fix="Add one row per cell (or per gene) below the header.")
    if len(header) == len(row):
        return sep, header[1:]
    if len(header) == len(row) - 1:
        return sep, header
    raise InputError(f"{path.name}: the header has {len(header)} fields but the first data row has {len(row)}",
                     field="file", fix="Write the table with one header field per column (e.g. "
                     "DataFrame.to_csv(), with the cell/gene ids as the first column).")


def _table_values(path: Path, sep: str, n_cols: int) -> tuple[sp.csr_matrix, list[str]]:
    """Read the body in row chunks (bounded memory) into a CSR plus first-column ids."""
    rows = max(1, min(get_settings().chunk_size, (1 << 22) // max(n_cols, 1)))
    parts, ids = [], []
    try:
        reader = pd.read_csv(path, sep=sep, header=None, skiprows=1, chunksize=rows, dtype={0: str})
        for chunk in reader:
            if chunk.shape[1] != n_cols + 1:
                raise InputError(f"{path.name}: data rows have {chunk.shape[1]} fields, the header names "
                                 f"{n_cols} value columns", field="file", fix="Make every row as long as the header.")
            ids.extend(chunk.iloc[:, 0].tolist())
            parts.append(sp.csr_matrix(_numeric_block(chunk.iloc[:, 1:], path, len(ids) - len(chunk))))
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise _fail(path, "a delimited text table", exc) from exc
    missing = [i for i, c in enumerate(ids) if not isinstance(c, str)]
    if missing:
        raise InputError(f"{path.name}: {len(missing)} rows have no id in the first column (first: data row "
                         f"{missing[0] + 1})", field="file", fix="Give every row an id in the first column.")
    return sp.vstack(parts, format="csr"), ids


def _numeric_block(block: pd.DataFrame, path: Path, row0: int) -> np.ndarray:
    try:
        return block.to_numpy(dtype=np.float32)
    except (ValueError, TypeError):
        for j, col in enumerate(block.columns):
            bad = pd.to_numeric(block[col], errors="coerce").isna() & block[col].notna()
            if bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0])
                raise InputError(f"{path.name}: non-numeric value {block[col].iloc[i]!r} in data row "
                                 f"{row0 + i + 1}, value column {j + 1}", field="file",
                                 fix="Values must be numbers (counts); the only text allowed is the header row "
                                 "and the first (id) column.") from None
        raise


def _axis_scores(names: list[str]) -> tuple[float, float]:
    """(cell-likeness, gene-likeness) of a list of names."""
    sample = names[:500]
    cellish = np.mean([bool(_BARCODE_RE.search(n) or _CELLISH_RE.match(n)) for n in sample])
    ensembl = np.mean([bool(_ENSEMBL_RE.match(n)) for n in sample])
    common = len(_COMMON_GENES.intersection(n.upper() for n in names)) >= 2
    return float(cellish), float(ensembl) + float(common)


def _rows_are_genes(col_names: list[str], row_ids: list[str]) -> tuple[bool, str]:
    col_cell, col_gene = _axis_scores(col_names)
    row_cell, row_gene = _axis_scores(row_ids)
    score = (col_cell - row_cell) + (row_gene - col_gene)
    reason = (f"header cell-likeness {col_cell:.2f} / gene-likeness {col_gene:.2f}; first column "
              f"cell-likeness {row_cell:.2f} / gene-likeness {row_gene:.2f}")
    return score > 0.5, reason


def _read_table(path: Path, fmt: str) -> Any:
    sep, col_names = _table_header(path, fmt)
    X, row_ids = _table_values(path, sep, len(col_names))
    transposed, reason = _rows_are_genes(col_names, row_ids)
    notes: list[str] = []
    if transposed:
        X, cells, genes = X.T.tocsr(), col_names, row_ids
        notes.append(f"table read as genes x cells and transposed to cells x genes ({reason})")
    else:
        cells, genes = row_ids, col_names
    adata, renamed = _build(X, cells, genes, {}, notes)
    return _finish(adata, fmt, path, notes, transposed=transposed, renamed=renamed)
