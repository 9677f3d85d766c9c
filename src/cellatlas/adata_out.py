"""Writing calls into an AnnData the scanpy way, without losing what the user brought.

One rule for every door (in-process :func:`cellatlas.annotate_adata`, the HTTP client's
``annotate_adata``, ``cellatlas annotate -o`` and the workspace download):

- the calls go to ``obs[key_added]``, ``obs[key_added + "_confidence"]``, ... (default
  ``key_added="cell_type"``, the names the SPEC and the articles' client code use);
- an ``obs`` column of the same name that cellatlas did not write (the authors' own
  ``cell_type``, say) is never overwritten: it is moved to ``<name>_uploaded`` (then
  ``_uploaded2``, ...), with a warning, and the move is recorded in
  ``uns["cellatlas"]["moved_columns"]``;
- columns a previous cellatlas run wrote (listed in ``uns["cellatlas"]["obs_columns"]``)
  are replaced, as ``sc.tl.leiden`` replaces its own ``obs["leiden"]``;
- ``copy=True`` annotates a copy and returns it, as in scanpy.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import pandas as pd

SUFFIX = "_uploaded"
UNS_KEY = "cellatlas"


def written_before(adata) -> set[str]:
    """``obs`` columns an earlier cellatlas run recorded as its own."""
    rec = adata.uns.get(UNS_KEY, {}) if hasattr(adata, "uns") else {}
    cols = rec.get("obs_columns", []) if isinstance(rec, dict) else []
    return {str(c) for c in cols}


def move_aside(adata, names: Iterable[str], *, ours: Iterable[str] = ()) -> dict[str, str]:
    """Rename existing ``obs`` columns among ``names`` to ``<name>_uploaded`` unless in ``ours``.

    Returns the renames ``{old: new}``; nothing is dropped.
    """
    names, ours = list(dict.fromkeys(names)), set(ours)
    taken = set(adata.obs.columns) | set(names)
    renamed: dict[str, str] = {}
    for col in names:
        if col not in adata.obs.columns or col in ours:
            continue
        new, k = f"{col}{SUFFIX}", 2
        while new in taken:
            new, k = f"{col}{SUFFIX}{k}", k + 1
        taken.add(new)
        renamed[col] = new
    if renamed:
        adata.obs.rename(columns=renamed, inplace=True)
    return renamed


def put_obs(adata, columns: pd.DataFrame, *, reserve: Iterable[str] = ()) -> dict[str, str]:
    """Write ``columns`` (indexed like ``adata.obs``) into ``adata.obs`` under the rule above.

    ``reserve`` names further columns the caller is about to write itself (the workspace's
    ``cell_type_original``, ``qc_*``, ...): uploaded columns with those names are moved aside too.
    """
    names = [*map(str, columns.columns), *reserve]
    renamed = move_aside(adata, names, ours=written_before(adata))
    for col in columns.columns:
        adata.obs[col] = columns[col].values  # positional: obs_names may repeat
    return renamed


def record(uns: dict[str, Any], columns: Iterable[str], key_added: str, renamed: dict[str, str]) -> dict[str, Any]:
    """``uns["cellatlas"]`` entries that let the next run (and ``cellatlas.pl``) find the calls."""
    moved = {**{str(k): str(v) for k, v in dict(uns.get("moved_columns", {}) or {}).items()}, **renamed}
    return {**uns, "key_added": key_added, "obs_columns": list(columns), "moved_columns": moved}


def warn_moved(renamed: dict[str, str], stacklevel: int = 3) -> None:
    """Say which of the user's columns were moved aside (a ``UserWarning``)."""
    if renamed:
        pairs = ", ".join(f"obs['{a}'] -> obs['{b}']" for a, b in renamed.items())
        warnings.warn(
            f"cellatlas kept your existing columns under new names: {pairs}. "
            "Pass key_added='...' to write the calls under other names instead.",
            UserWarning,
            stacklevel=stacklevel,
        )


def annotate_into(adata, run: Callable[[Any], Any], *, key_added: str, copy: bool):
    """Shared body of the ``annotate_adata`` functions: ``run(adata) -> AnnotationResult``.

    Returns the result (in place) or the annotated copy (``copy=True``).
    """
    target = adata.copy() if copy else adata
    res = run(target)
    warn_moved(res.write_adata(target, key_added=key_added), stacklevel=4)
    return target if copy else res


__all__ = ["SUFFIX", "annotate_into", "move_aside", "put_obs", "record", "warn_moved", "written_before"]
