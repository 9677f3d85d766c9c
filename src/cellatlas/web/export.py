"""Downloads: the annotated ``.h5ad`` and the CSV of calls, with QC flags and relabels.

Columns follow the Python API (:meth:`AnnotationResult.to_dataframe` for the CSV,
:meth:`AnnotationResult.write_adata` for ``obs``), plus:

- ``cell_type`` holds the *current* label (the user's relabel where there is one),
- ``cell_type_original``: the engine's call,
- ``relabelled`` (CSV) / ``cell_type_relabelled`` (obs): whether the user changed it,
- ``qc_total_counts``, ``qc_mito_fraction``, ``qc_pass``, ``qc_flags``.

Uploaded ``obs`` columns with those names are kept as ``<name>_uploaded``
(:mod:`cellatlas.adata_out`, the rule every door follows).

``cell_type_confidence`` and ``cell_type_band`` always describe the engine's call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellatlas.web.views import current_labels


def _relabel_columns(run: dict[str, Any], relabels: dict[int, str]) -> dict[str, np.ndarray]:
    res = run["result"]
    cur = current_labels(run, relabels).astype(str)
    orig = np.asarray(res.label, dtype=object).astype(str)
    onto = run.get("ontology", {})
    onto_cur = np.asarray(res.ontology_id, dtype=object).astype(str).copy()
    for i, lab in relabels.items():
        onto_cur[i] = onto.get(lab, "")
    flag = np.zeros(len(res), dtype=bool)
    flag[list(relabels)] = True
    return {"current": cur, "original": orig, "ontology": onto_cur, "relabelled": flag}


def _qc_columns(run: dict[str, Any]) -> dict[str, np.ndarray]:
    qc = run["qc"]
    return {
        "qc_total_counts": np.asarray(qc.total_counts, dtype=float),
        "qc_mito_fraction": np.asarray(qc.mito_fraction, dtype=float),
        "qc_pass": np.asarray(qc.qc_pass, dtype=bool),
        "qc_flags": np.asarray(qc.reasons, dtype=object).astype(str),
    }


def calls_table(run: dict[str, Any], relabels: dict[int, str]) -> pd.DataFrame:
    """The CSV table: one row per cell, in upload order, indexed by ``cell_id``."""
    df = run["result"].to_dataframe()
    rc = _relabel_columns(run, relabels)
    df["cell_type"] = rc["current"]
    df["cell_type_ontology_id"] = rc["ontology"]
    df.insert(1, "cell_type_original", rc["original"])
    df.insert(2, "relabelled", rc["relabelled"])
    for k, v in _qc_columns(run).items():
        df[k] = v
    return df


def write_calls_csv(run: dict[str, Any], relabels: dict[int, str], path: Path) -> Path:
    """Write :func:`calls_table` as CSV to ``path``."""
    calls_table(run, relabels).to_csv(path)
    return path


WORKSPACE_OBS = ("cell_type_original", "cell_type_relabelled", "qc_total_counts", "qc_mito_fraction", "qc_pass", "qc_flags")


def write_annotated_h5ad(adata, run: dict[str, Any], relabels: dict[int, str], path: Path) -> Path:
    """Write a copy of the uploaded AnnData with the calls in ``obs``/``obsm``/``uns``.

    The uploaded data (X, layers, raw, var, other obs columns) are kept as they were.
    """
    out = adata.copy()
    res = run["result"]
    renamed = res.write_adata(out, reserve=WORKSPACE_OBS)  # the upload's own columns move to *_uploaded
    rc = _relabel_columns(run, relabels)
    obs = out.obs
    obs["cell_type"] = pd.Categorical(rc["current"])
    obs["cell_type_original"] = pd.Categorical(rc["original"])
    obs["cell_type_relabelled"] = rc["relabelled"]
    obs["cell_type_ontology_id"] = rc["ontology"]
    for k, v in _qc_columns(run).items():
        obs[k] = v
    uns = dict(out.uns.get("cellatlas", {}))
    uns["obs_columns"] = [*uns.get("obs_columns", []), *WORKSPACE_OBS]
    uns["workspace"] = {
        "options": {k: v for k, v in run["options"].items() if v is not None},
        "qc": {k: v for k, v in run["qc"].summary.items() if v is not None and k != "notes"},
        "qc_notes": " ".join(run["qc"].summary.get("notes", [])),
        "n_relabelled": len(relabels),
        "renamed_uploaded_columns": renamed,
    }
    out.uns["cellatlas"] = uns
    out.write_h5ad(path)
    return path
