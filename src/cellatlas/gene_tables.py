"""Packaged gene-identifier tables and per-name lookups (used by :mod:`cellatlas.genes`).

The tables in ``cellatlas/data/genes/`` are derived by ``scripts/build_gene_tables.py``
(see ``DATA.md``). They are read once per process (``functools.lru_cache``) into plain
dicts and sets.
"""

from __future__ import annotations

import gzip
import re
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from cellatlas.errors import CellAtlasError

TABLE_DIR = Path(__file__).resolve().parent / "data" / "genes"
ENSG = re.compile(r"^(ENSG\d{11})(?:\.\d+)?(?:_PAR_Y)?$")
ENSMUSG = re.compile(r"^(ENSMUSG\d{11})(?:\.\d+)?$")
_NUMERIC = re.compile(r"^[+-]?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?$")
_BARCODE = re.compile(r"^(?:[A-Za-z0-9]+[_:#])?[ACGTN]{10,}(?:[-_.]\d+)?$")
_R_X_PREFIX = re.compile(r"^X(?=\d)")


# --------------------------------------------------------------------------- tables
def _read_columns(name: str) -> list[list[str]]:
    """Columns of a packaged ``<name>.tsv.gz`` table (header dropped)."""
    path = TABLE_DIR / f"{name}.tsv.gz"
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    except OSError as exc:
        raise CellAtlasError(
            f"The packaged gene table {path.name} is missing or unreadable ({exc}).",
            fix="Reinstall cellatlas, or rebuild the tables with "
            "`python scripts/build_gene_tables.py`.",
        ) from exc
    header, _, body = text.partition("\n")
    k = header.count("\t") + 1
    flat = body.rstrip("\n").replace("\n", "\t").split("\t")
    return [flat[i::k] for i in range(k)]


def _unique_by(keys: list[str], values: list[str], fold) -> dict[str, str]:
    """Map ``fold(key) -> value``, dropping folded keys whose entries disagree."""
    folded = list(map(fold, keys))
    out = dict(zip(folded, values))
    if len(out) != len(folded):
        repeated = {k for k, n in Counter(folded).items() if n > 1}
        seen: dict[str, set[str]] = defaultdict(set)
        for k, v in zip(folded, values):
            if k in repeated:
                seen[k].add(v)
        for k, vs in seen.items():
            if len(vs) > 1:
                del out[k]
    return out


@lru_cache(maxsize=None)
def human_tables() -> dict[str, Any]:
    """Human lookups: approved ``symbols``, ``alias``, ``ambiguous``, ``ensembl`` and case-folded maps."""
    symbols = _read_columns("human_symbols")[0]
    alias_k, alias_v = _read_columns("human_alias_to_symbol")[:2]
    amb_k, amb_v = _read_columns("human_alias_ambiguous")
    return {
        "symbols": frozenset(symbols),
        "alias": dict(zip(alias_k, alias_v)),
        "ambiguous": dict(zip(amb_k, amb_v)),
        "ensembl": dict(zip(*_read_columns("human_ensembl_to_symbol")[:2])),
        "upper": _unique_by(symbols, symbols, str.upper),
        "alias_upper": _unique_by(alias_k, alias_v, str.upper),
        "ambiguous_upper": frozenset(map(str.upper, amb_k)),
    }


@lru_cache(maxsize=None)
def mouse_tables() -> dict[str, Any]:
    """Mouse lookups: ``to_human`` (symbol/alias/ENSMUSG -> human symbol), ``lower``, ``symbols``."""
    keys, human = _read_columns("mouse_to_human")[:2]
    symbols = _read_columns("mouse_symbols")[0]
    return {
        "to_human": dict(zip(keys, human)),
        "lower": _unique_by(keys, human, str.lower),
        "symbols": frozenset(symbols),
        "symbols_lower": frozenset(map(str.lower, symbols)),
        "symbol_case": _unique_by(symbols, symbols, str.lower),
    }


def load_tables() -> None:
    """Load and cache every packaged gene table (optional warm-up, e.g. at server start)."""
    human_tables()
    mouse_tables()


# --------------------------------------------------------------------------- lookup
class Hit(NamedTuple):
    """Outcome of looking up one name."""

    symbol: str | None
    method: str | None  # one of METHODS, or None
    reason: str | None  # why unmapped, or None
    repaired: bool = False


def _variants(name: str) -> list[tuple[str, bool]]:
    """``name`` and its repairs of R ``make.names`` mangling ('X' prefix, '.' for '-')."""
    out = [(name, False)]
    stripped = _R_X_PREFIX.sub("", name) if name[:1] == "X" else name
    if stripped is name and "." not in name:
        return out
    for v in (stripped, name.replace(".", "-"), stripped.replace(".", "-")):
        if v != name and (v, True) not in out:
            out.append((v, True))
    return out


def junk_reason(name: str) -> str | None:
    """``"empty"``, ``"numeric"`` or ``"barcode"`` (``ACGT...{10,}`` + ``-1``) for junk names, else None."""
    if not name:
        return "empty"
    if _NUMERIC.match(name):
        return "numeric"
    if _BARCODE.match(name):
        return "barcode"
    return None


def lookup_human(name: str) -> Hit:
    """Approved human symbol for one name: Ensembl id, exact, alias, then case/R-name repairs."""
    t = human_tables()
    if name in t["symbols"]:
        return Hit(name, "exact", None)
    m = ENSG.match(name) if name.startswith("ENSG") else None
    if m:
        sym = t["ensembl"].get(m.group(1))
        return Hit(sym, "ensembl", None) if sym else Hit(None, None, "ensembl_unknown")
    for cand, repaired in _variants(name):
        if cand in t["symbols"]:
            return Hit(cand, "case" if repaired else "exact", None, repaired)
        if cand in t["alias"]:
            return Hit(t["alias"][cand], "alias", None, repaired)
        up = cand.upper()
        if up in t["upper"]:
            return Hit(t["upper"][up], "case", None, repaired)
        if up in t["alias_upper"]:
            return Hit(t["alias_upper"][up], "alias", None, repaired)
    if name in t["ambiguous"] or name.upper() in t["ambiguous_upper"]:
        return Hit(None, None, "ambiguous_alias")
    return Hit(None, None, junk_reason(name) or "unknown")


def lookup_mouse(name: str) -> Hit:
    """Human ortholog symbol for one mouse symbol/alias/ENSMUSG id (any letter case)."""
    t = mouse_tables()
    if name in t["to_human"] and not name.startswith("ENSMUSG"):
        return Hit(t["to_human"][name], "ortholog", None)
    m = ENSMUSG.match(name) if name.startswith("ENSMUSG") else None
    if m:
        sym = t["to_human"].get(m.group(1))
        return Hit(sym, "ortholog", None) if sym else Hit(None, None, "ensembl_unknown")
    for cand, repaired in _variants(name):
        sym = t["to_human"].get(cand) or t["lower"].get(cand.lower())
        if sym:
            return Hit(sym, "ortholog", None, repaired)
    if any(v.lower() in t["symbols_lower"] for v, _ in _variants(name)):
        return Hit(None, None, "no_ortholog")
    return Hit(None, None, junk_reason(name) or "unknown")
