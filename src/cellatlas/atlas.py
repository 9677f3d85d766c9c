"""Atlas files: format, registry, loading and download.

An atlas is one ``.atlas.npz`` file (numpy zip, read with ``allow_pickle=False``)
holding the gene panel, per-model reference embeddings and encoder state, the
reference cells' panel counts and labels, the label table (Cell Ontology ids and
parents), marker sets, neighbour-distance and marker-score statistics for
out-of-distribution detection, the fitted fusion model, the 2-D reference layout and
provenance. JSON metadata is stored as a uint8 array named ``meta_json``.

Building lives in :mod:`cellatlas.atlas_build`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas.config import Settings, get_settings
from cellatlas.errors import AtlasFormatError, AtlasModelMismatchError, UnknownAtlasError

FORMAT = "cellatlas-atlas"
FORMAT_VERSION = 1
SUFFIX = ".atlas.npz"
BUILTIN_DIR = Path(__file__).parent / "data" / "atlases"
REGISTRY_FILE = Path(__file__).parent / "data" / "atlas_registry.json"
ALIASES = {"human-core-2026": "human-core", "human_core": "human-core"}
DEFAULT_ATLAS = "human-core"


@dataclass
class Atlas:
    """A labelled reference, loaded from (or about to be written to) an atlas file.

    Attributes
    ----------
    meta
        JSON metadata: name, version, labels table, marker sets, models,
        statistics, fusion model, provenance.
    arrays
        Named numpy arrays (reference counts, labels, embeddings, encoder state, layout).
    path, sha256
        Where it was loaded from and the file's checksum.
    """

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]
    path: Path | None = None
    sha256: str = ""
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------ identity
    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "1"))

    @property
    def models(self) -> list[str]:
        return sorted(self.meta.get("models", {}))

    @property
    def panel(self) -> list[str]:
        """Genes the default encoder reads."""
        return [str(g) for g in self.arrays["panel"]]

    @property
    def ref_genes(self) -> list[str]:
        """Genes stored for the reference cells: the panel plus every marker gene."""
        return [str(g) for g in self.arrays["ref_genes"]]

    # ------------------------------------------------------------ labels
    @property
    def labels(self) -> pd.DataFrame:
        """Label table indexed by label: ontology_id, parent, lineage, n_cells, source."""
        if "labels" not in self._cache:
            df = pd.DataFrame(self.meta["labels"]).set_index("label")
            self._cache["labels"] = df
        return self._cache["labels"]

    @property
    def reference_labels(self) -> list[str]:
        return [str(x) for x in self.arrays["ref_label_names"]]

    @property
    def ref_codes(self) -> np.ndarray:
        return self.arrays["ref_labels"]

    @property
    def marker_sets(self) -> dict[str, dict[str, Any]]:
        return self.meta["markers"]

    def reference_counts(self) -> sp.csr_matrix:
        """Raw counts of the reference cells on :attr:`ref_genes`."""
        a = self.arrays
        return sp.csr_matrix(
            (a["ref_data"], a["ref_indices"], a["ref_indptr"]), shape=tuple(int(v) for v in a["ref_shape"])
        )

    # ------------------------------------------------------------ models
    def _model_meta(self, model: str) -> dict[str, Any]:
        models = self.meta.get("models", {})
        if model not in models:
            raise AtlasModelMismatchError(
                f"Atlas '{self.name}' has no reference embeddings for model '{model}' (it has: {', '.join(models) or 'none'}).",
                fix=f"Annotate with model={next(iter(models), 'default')!r}, or build an atlas for this model: "
                f"`cellatlas atlas build REF.h5ad --label-key cell_type --model {model} --model-path DIR`.",
                field="model",
            )
        return models[model]

    def embedding(self, model: str) -> np.ndarray:
        self._model_meta(model)
        return np.asarray(self.arrays[f"model__{model}__embedding"], dtype=np.float32)

    def fingerprint(self, model: str) -> str:
        return self._model_meta(model)["fingerprint"]

    def encoder_state(self, model: str) -> dict[str, np.ndarray]:
        self._model_meta(model)
        prefix = f"model__{model}__state__"
        return {k[len(prefix):]: v for k, v in self.arrays.items() if k.startswith(prefix)}

    def index_info(self, model: str) -> dict[str, Any]:
        """How the reference embedding of ``model`` is indexed (:mod:`cellatlas.refindex`): kind,
        and for an approximate index its parameters and the recall@15 measured at build time.
        Atlases built before indexes were recorded search exactly (``{"kind": "flat"}``)."""
        return self._model_meta(model).get("index") or {"kind": "flat"}

    def reference_index(self, model: str):
        """The approximate faiss index stored for ``model``, or ``None`` (then an exact one is built)."""
        key = f"model__{model}__index"
        if key not in self.arrays:
            return None
        from cellatlas.refindex import deserialize

        return deserialize(self.arrays[key], self.index_info(model))

    def stats(self, model: str) -> dict[str, Any]:
        """Neighbour-distance statistics and the fitted fusion model for ``model``."""
        return self._model_meta(model)

    def layout_reference(self) -> pd.DataFrame:
        """2-D coordinates and labels of the reference cells (a backdrop for plots)."""
        lay = self.arrays["ref_layout"]
        names = np.asarray(self.reference_labels, dtype=object)
        return pd.DataFrame({"x": lay[:, 0], "y": lay[:, 1], "label": names[self.ref_codes]})

    # ------------------------------------------------------------ views
    def info(self) -> dict[str, Any]:
        """JSON-ready summary."""
        labels = self.labels
        return {
            "name": self.name,
            "version": self.version,
            "description": self.meta.get("description", ""),
            "species": self.meta.get("species", "human"),
            "sha256": self.sha256,
            "path": str(self.path) if self.path else None,
            "builtin": bool(self.path and BUILTIN_DIR in self.path.parents),
            "models": self.models,
            "n_reference_cells": int(self.ref_codes.shape[0]),
            "n_panel_genes": len(self.panel),
            "n_labels": int(labels.shape[0]),
            "labels": [
                {"label": lab, **{k: (v if not isinstance(v, float) or v == v else None) for k, v in row.items()}}
                for lab, row in labels.iterrows()
            ],
            "fusion": {m: self.meta["models"][m].get("fusion", {}).get("summary", {}).get("by_variant") for m in self.models},
            "index": {m: self.index_info(m) for m in self.models},
            "provenance": self.meta.get("provenance", {}),
        }

    def marker_table(self) -> pd.DataFrame:
        """Marker genes per label: label, ontology_id, gene, sign, source."""
        rows = []
        labels = self.labels
        for lab, ms in self.marker_sets.items():
            oid = labels.loc[lab, "ontology_id"] if lab in labels.index else ""
            src = ms.get("sources", {})
            for g in ms.get("positive", []):
                rows.append((lab, oid, g, "+", src.get(g, "curated")))
            for g in ms.get("negative", []):
                rows.append((lab, oid, g, "-", "curated"))
        return pd.DataFrame(rows, columns=["label", "ontology_id", "gene", "sign", "source"])

    # ------------------------------------------------------------ io
    def save(self, path: str | Path) -> Path:
        """Write atomically; returns the path (``.atlas.npz`` appended if missing)."""
        path = Path(path)
        if not path.name.endswith(SUFFIX):
            path = path.with_name(path.name + SUFFIX)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta, format=FORMAT, format_version=FORMAT_VERSION)
        payload = dict(self.arrays)
        payload["meta_json"] = np.frombuffer(json.dumps(meta, default=_json_default).encode(), dtype=np.uint8)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **payload)
        os.replace(tmp, path)
        return path


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_atlas(path: str | Path) -> Atlas:
    """Read an atlas file (no pickle); raises :class:`AtlasFormatError` if it is not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise AtlasFormatError(
            f"{path} is not a readable atlas file ({e}).",
            fix="Rebuild it with `cellatlas atlas build` or download it again.",
        ) from e
    if "meta_json" not in arrays:
        raise AtlasFormatError(f"{path} has no atlas metadata.", fix="Rebuild it with `cellatlas atlas build`.")
    meta = json.loads(arrays.pop("meta_json").tobytes().decode())
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise AtlasFormatError(
            f"{path} is format {meta.get('format')} v{meta.get('format_version')}; this cellatlas reads {FORMAT} v<={FORMAT_VERSION}.",
            fix="Upgrade cellatlas or rebuild the atlas.",
        )
    return Atlas(meta=meta, arrays=arrays, path=path.resolve(), sha256=_sha256(path))


# ---------------------------------------------------------------- registry
def _search_dirs(settings: Settings) -> list[Path]:
    return [BUILTIN_DIR, settings.resolved_atlas_dir]


def _installed(settings: Settings) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in _search_dirs(settings):
        if d.is_dir():
            for p in sorted(d.glob(f"*{SUFFIX}")):
                found.setdefault(p.name[: -len(SUFFIX)], p)
    return found


def resolve_atlas_path(name_or_path: str | Path, settings: Settings | None = None, *, allow_paths: bool = True) -> Path:
    """Path of an installed atlas by name/alias, or (``allow_paths``) an explicit file path.

    Installed names win over same-named files. With ``allow_paths=False`` (the HTTP doors) only
    installed names, aliases and the exact paths of installed files resolve, and the given string
    never touches the filesystem, so a missing file and a forbidden path read the same.
    """
    settings = settings or get_settings()
    key = ALIASES.get(str(name_or_path), str(name_or_path))
    installed = _installed(settings)
    if key in installed:
        return installed[key]
    exact = next((p for p in installed.values() if str(name_or_path) in (str(p), str(p.absolute()))), None)
    if exact is not None:
        return exact
    if allow_paths:
        p = Path(str(name_or_path)).expanduser()
        if p.suffix == ".npz" or _exists(p):
            if not _exists(p):
                raise UnknownAtlasError(f"Atlas file {p} does not exist.", fix="Check the path.", field="atlas")
            return p
    shown = str(name_or_path) if len(str(name_or_path)) <= 100 else str(name_or_path)[:100] + "..."
    raise UnknownAtlasError(
        f"Unknown atlas '{shown}'. Installed: {', '.join(sorted(installed)) or 'none'}.",
        fix="Pick one of the installed atlases (GET /v1/atlases or `cellatlas atlas list`), build one with "
        "`cellatlas atlas build`, or download one with `cellatlas atlas download NAME`.",
        field="reference_atlas",
    )


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError:  # e.g. a name too long for the filesystem
        return False


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime: float) -> Atlas:
    return read_atlas(path)


def load_atlas(
    name_or_path: str | Path | Atlas = DEFAULT_ATLAS, settings: Settings | None = None, *, allow_paths: bool = True
) -> Atlas:
    """Load an atlas by name (``human-core``; alias ``human-core-2026``) or path; cached per file.

    ``allow_paths=False`` accepts installed names only (see :func:`resolve_atlas_path`).
    """
    if isinstance(name_or_path, Atlas):
        return name_or_path
    p = resolve_atlas_path(name_or_path, settings, allow_paths=allow_paths)
    return _load_cached(str(p.resolve()), p.stat().st_mtime)


def list_atlases(settings: Settings | None = None) -> list[dict[str, Any]]:
    """Installed atlases with their summary (name, version, models, sizes, sha256, builtin)."""
    settings = settings or get_settings()
    out = []
    for name, p in _installed(settings).items():
        try:
            info = load_atlas(p, settings).info()
        except AtlasFormatError as e:
            out.append({"name": name, "path": str(p), "usable": False, "reason": e.message})
            continue
        info.pop("labels", None)
        info["aliases"] = sorted(a for a, t in ALIASES.items() if t == name)
        info["usable"] = True
        out.append(info)
    return out


# ---------------------------------------------------------------- download
def registry_entries(registry: str | Path | None = None) -> list[dict[str, Any]]:
    """Entries of a download registry: ``[{name, version, url, sha256, size, description}]``.

    ``registry`` is a JSON file path or URL; default: ``CELLATLAS_ATLAS_REGISTRY`` or the
    registry shipped with the package.
    """
    src = registry or os.environ.get("CELLATLAS_ATLAS_REGISTRY") or REGISTRY_FILE
    src = str(src)
    if src.startswith(("http://", "https://")):
        import httpx  # only for downloads: not loaded with `import cellatlas`

        r = httpx.get(src, timeout=30, follow_redirects=True)
        r.raise_for_status()
        data = r.json()
    else:
        data = json.loads(Path(src).read_text())
    return list(data.get("atlases", []))


def download_atlas(
    name: str, *, registry: str | Path | None = None, settings: Settings | None = None, force: bool = False
) -> Path:
    """Download a registered atlas into ``CELLATLAS_HOME/atlases`` and verify its sha256.

    A cached file with the right checksum is reused. A checksum mismatch removes the
    partial file and raises :class:`AtlasFormatError`.
    """
    settings = settings or get_settings()
    entries = {e["name"]: e for e in registry_entries(registry)}
    if name not in entries:
        raise UnknownAtlasError(
            f"Atlas '{name}' is not in the registry (it has: {', '.join(entries) or 'nothing'}).",
            fix="Check the name or point CELLATLAS_ATLAS_REGISTRY at the right registry.",
            field="atlas",
        )
    e = entries[name]
    dest_dir = settings.resolved_atlas_dir
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{name}{SUFFIX}"
    if dest.exists() and not force and _sha256(dest) == e["sha256"]:
        return dest
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=dest_dir, suffix=".part")
    try:
        import httpx

        with os.fdopen(fd, "wb") as fh, httpx.stream("GET", e["url"], timeout=60, follow_redirects=True) as r:
            r.raise_for_status()
            for chunk in r.iter_bytes(1 << 20):
                h.update(chunk)
                fh.write(chunk)
        if h.hexdigest() != e["sha256"]:
            raise AtlasFormatError(
                f"Checksum mismatch for atlas '{name}': expected {e['sha256'][:12]}…, got {h.hexdigest()[:12]}….",
                fix="Retry the download; if it persists the registry entry or the server file is wrong.",
            )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    read_atlas(dest)  # validate format
    return dest
