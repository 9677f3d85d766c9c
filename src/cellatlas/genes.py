"""Gene identifier detection and mapping to approved human (HGNC) symbols.

Every gene list that enters the engine goes through :func:`map_genes`, which gives one
approved human symbol (or ``None``) per input column, in input order, and a JSON-ready
gene report. Identifiers may be human HGNC symbols (current, previous or alias), human
Ensembl gene ids (``ENSG...``, with or without ``.version``), mouse symbols (any letter
case) or mouse Ensembl ids (``ENSMUSG...``); mouse genes map through human orthologs.

The mapping tables are compact files derived into ``cellatlas/data/genes/`` by
``scripts/build_gene_tables.py`` (sources, licences and rules: ``DATA.md``); nothing is
read from outside the package at run time.

Coverage thresholds (:func:`check_coverage`): a query must share at least
``MIN_OVERLAP_GENES`` (100) genes *and* ``MIN_PANEL_FRACTION`` (20%) of a reference
panel's genes (for panels under 100 genes: all of them). Below that the kNN vote and the
marker scores rest on too few genes to mean anything, so a
:class:`~cellatlas.errors.GeneMismatchError` is raised that names the likely cause.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from cellatlas.errors import GeneMismatchError, InputError
from cellatlas.gene_tables import _variants as _variants_of
from cellatlas.gene_tables import (
    ENSG,
    ENSMUSG,
    human_tables,
    junk_reason,
    load_tables,
    lookup_human,
    lookup_mouse,
    mouse_tables,
)

__all__ = [
    "GeneMapping", "check_coverage", "coverage", "detect_id_type", "display_name", "load_tables", "map_genes",
    "ID_TYPES", "METHODS", "MIN_OVERLAP_GENES", "MIN_PANEL_FRACTION",
]

ID_TYPES = ("symbol_human", "ensembl_human", "ensembl_mouse", "symbol_mouse", "unknown")
METHODS = ("exact", "case", "ensembl", "alias", "ortholog")
MIN_OVERLAP_GENES = 100
MIN_PANEL_FRACTION = 0.2
_JUNK_FRACTION = 0.3  # share of barcode-like / numeric names that explains a mismatch


# --------------------------------------------------------------------------- detection
def _clean(genes: Iterable[Any]) -> list[str]:
    """Input names as strings; ``None``/NaN become ``''`` (kept in place)."""
    if isinstance(genes, (str, bytes)):
        raise InputError(
            "genes must be a list of gene identifiers, got a single string.",
            fix="Pass a list such as ['CD3E', 'MS4A1'], one identifier per matrix column.",
            field="genes",
        )
    try:
        genes = list(genes)
    except TypeError as exc:
        raise InputError(
            f"genes must be a list of gene identifiers, got {type(genes).__name__}.",
            fix="Pass a list of strings, one identifier per matrix column.",
            field="genes",
        ) from exc
    if all(type(g) is str for g in genes):
        return genes
    out = []
    for g in genes:
        if g is None or (isinstance(g, float) and math.isnan(g)):
            out.append("")
        elif isinstance(g, bytes):
            out.append(g.decode("utf-8", "replace"))
        else:
            out.append(str(g))
    return out


def _id_type(names: Sequence[str]) -> str:
    valid = [n for n in names if not junk_reason(n)]
    if not valid:
        return "unknown"
    n_hs = sum(1 for n in valid if ENSG.match(n))
    n_mm = sum(1 for n in valid if ENSMUSG.match(n))
    if max(n_hs, n_mm) >= 0.5 * len(valid):
        return "ensembl_human" if n_hs >= n_mm else "ensembl_mouse"
    h, m = human_tables(), mouse_tables()
    h_exact = h_ci = m_exact = m_ci = excl_h = excl_m = 0
    for n in valid:
        he = n in h["symbols"] or n in h["alias"]
        hc = he or n.upper() in h["upper"] or n.upper() in h["alias_upper"]
        me = n in m["symbols"] or n in m["to_human"]
        mc = me or n.lower() in m["symbols_lower"] or n.lower() in m["lower"]
        h_exact, m_exact, h_ci, m_ci = h_exact + he, m_exact + me, h_ci + hc, m_ci + mc
        excl_h += hc and not mc
        excl_m += mc and not hc
    if max(h_ci, m_ci) < max(1, 0.1 * len(valid)):
        return "unknown"
    if m_exact > h_exact:
        return "symbol_mouse"
    # upper-cased mouse symbols (e.g. '1700028B04RIK', 'GM7899') match human symbols only
    # case-insensitively where the two species share a name; mouse-only names decide.
    if excl_m > 2 * excl_h and excl_m >= 0.05 * len(valid):
        return "symbol_mouse"
    return "symbol_human"


def detect_id_type(genes: Iterable[Any]) -> str:
    """Detect the kind of gene identifiers in a list.

    Parameters
    ----------
    genes
        Gene identifiers, one per matrix column (list, array, ``pandas.Index``...).

    Returns
    -------
    str
        One of ``"symbol_human"``, ``"ensembl_human"``, ``"ensembl_mouse"``,
        ``"symbol_mouse"`` or ``"unknown"``. Ensembl ids win when at least half of the
        names match ``ENSG``/``ENSMUSG`` (optional ``.version``); otherwise symbols are
        compared with the packaged human and mouse symbol sets (exact case first, then
        names known to only one species, which catches upper-cased mouse symbols).
    """
    return _id_type([n.strip() for n in _clean(genes)])


# --------------------------------------------------------------------------- mapping
@dataclass
class GeneMapping:
    """Result of :func:`map_genes`: one entry per input column, in input order."""

    genes: list[str]
    symbols: list[str | None]
    method: list[str | None]
    reasons: list[str | None]
    id_type: str
    species: str
    n_repaired: int = 0
    duplicates: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n_input(self) -> int:
        """Number of input columns."""
        return len(self.genes)

    @property
    def n_mapped(self) -> int:
        """Number of input columns mapped to a human symbol."""
        return sum(s is not None for s in self.symbols)

    @property
    def fraction_mapped(self) -> float:
        """``n_mapped / n_input`` (0.0 for an empty list)."""
        return self.n_mapped / self.n_input if self.n_input else 0.0

    def panel_indices(self, panel: Sequence[str]) -> tuple[list[int], list[int]]:
        """Pairs (input column, panel position) for every column whose symbol is in ``panel``.

        Several columns may point at one panel gene (see ``duplicates``); callers sum them.
        """
        pos = {g: i for i, g in enumerate(panel)}
        pairs = [(j, pos[s]) for j, s in enumerate(self.symbols) if s is not None and s in pos]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def report(self) -> dict[str, Any]:
        """JSON-ready gene report (id type, species, counts by method, unmapped examples...)."""
        methods = Counter(m for m in self.method if m)
        unmapped = [g for g, s in zip(self.genes, self.symbols) if s is None]
        reasons = Counter(r for r in self.reasons if r)
        dup_cols = sum(len(v) for v in self.duplicates.values())
        return {
            "id_type": self.id_type,
            "species": self.species,
            "n_input": self.n_input,
            "n_mapped": self.n_mapped,
            "fraction_mapped": round(self.fraction_mapped, 4),
            "methods": {m: methods.get(m, 0) for m in METHODS},
            "n_unmapped": len(unmapped),
            "unmapped_reasons": dict(sorted(reasons.items())),
            "unmapped_examples": unmapped[:10],
            "n_repaired": self.n_repaired,
            "junk": {k: reasons.get(k, 0) for k in ("empty", "numeric", "barcode")},
            "duplicates": {
                "n_symbols": len(self.duplicates),
                "n_columns": dup_cols,
                "examples": dict(list(self.duplicates.items())[:10]),
            },
        }


_SPECIES = {"human": "human", "hs": "human", "homo sapiens": "human", "mouse": "mouse",
            "mm": "mouse", "mus musculus": "mouse"}


def _resolve_species(species: str | None, id_type: str) -> tuple[str, str]:
    detected = "mouse" if id_type.endswith("_mouse") else "human"
    if species is None:
        return detected, id_type
    sp = _SPECIES.get(str(species).strip().lower())
    if sp is None:
        raise InputError(
            f"Unknown species {species!r}.",
            fix="Use species='human' or species='mouse', or leave it out to detect it.",
            field="species",
        )
    if id_type.startswith("ensembl") and sp != detected:
        raise GeneMismatchError(
            f"species={species!r} was given, but the genes are {detected} Ensembl ids "
            f"({'ENSMUSG' if detected == 'mouse' else 'ENSG'}...).",
            fix=f"Pass species='{detected}' or leave species out.",
            field="species",
        )
    if id_type.startswith("symbol"):
        id_type = f"symbol_{sp}"
    return sp, id_type


def map_genes(genes: Iterable[Any], species: str | None = None) -> GeneMapping:
    """Map gene identifiers to approved human HGNC symbols, one per input column.

    Parameters
    ----------
    genes
        Identifiers, one per matrix column: human symbols, ``ENSG`` ids (with or without
        version), mouse symbols (any case) or ``ENSMUSG`` ids. Order is kept; nothing is
        dropped (unmapped columns get ``None``).
    species
        ``"human"`` or ``"mouse"``; ``None`` detects it from the identifiers. Forcing
        ``"mouse"`` lets upper-cased mouse symbols (``'INS1'``) map through orthologs.

    Returns
    -------
    GeneMapping
        ``.symbols`` (approved human symbol or ``None``), ``.method`` per column
        (``exact``/``case``/``ensembl``/``alias``/``ortholog``/``None``), ``.id_type``,
        ``.species``, ``.duplicates`` and ``.report()``.
    """
    raw = _clean(genes)
    names = [n.strip() for n in raw]
    species, id_type = _resolve_species(species, _id_type(names))
    lookup = lookup_mouse if species == "mouse" else lookup_human
    hits = [lookup(n) for n in names]
    by_symbol: dict[str, list[str]] = defaultdict(list)
    for n, h in zip(raw, hits):
        if h.symbol is not None:
            by_symbol[h.symbol].append(n)
    return GeneMapping(
        genes=raw,
        symbols=[h.symbol for h in hits],
        method=[h.method for h in hits],
        reasons=[h.reason for h in hits],
        id_type=id_type,
        species=species,
        n_repaired=sum(h.repaired or r != n for h, r, n in zip(hits, raw, names)),
        duplicates={s: v for s, v in by_symbol.items() if len(v) > 1},
    )


def display_name(name: str, species: str) -> str:
    """A gene name as a biologist writes it: mouse symbols in MGI case.

    Files that upper-case mouse symbols ('0610007P14RIK', 'PPBP') are shown as MGI writes
    them ('0610007P14Rik', 'Ppbp'); R's 'X' prefix is dropped. Human names are returned as given.
    """
    if species != "mouse":
        return name
    case = mouse_tables()["symbol_case"]
    for cand, _ in _variants_of(name):
        if cand.lower() in case:
            return case[cand.lower()]
    return name


# --------------------------------------------------------------------------- coverage
def coverage(symbols: Iterable[str | None], panel: Sequence[str]) -> dict[str, Any]:
    """How much of a reference gene panel the query's symbols cover.

    Parameters
    ----------
    symbols
        Mapped symbols (``GeneMapping.symbols``; ``None`` entries are ignored).
    panel
        The reference panel (atlas or model genes), approved human symbols.

    Returns
    -------
    dict
        ``panel_size``, ``n_present``, ``fraction`` (of the panel present), ``n_missing``
        and ``missing`` (the first 20 missing panel genes, in panel order).
    """
    have = {s for s in symbols if s is not None}
    uniq = list(dict.fromkeys(panel))
    missing = [g for g in uniq if g not in have]
    n_present = len(uniq) - len(missing)
    return {
        "panel_size": len(uniq),
        "n_present": n_present,
        "fraction": round(n_present / len(uniq), 4) if uniq else 0.0,
        "n_missing": len(missing),
        "missing": missing[:20],
    }


def _examples(names: Sequence[str], k: int = 3) -> str:
    return ", ".join(repr(n) for n in names[:k])


def _diagnose(mapping: GeneMapping) -> tuple[str, str]:
    """Most likely cause of poor coverage, and its fix."""
    rep = mapping.report()
    n = max(mapping.n_input, 1)
    junk, ex = rep["junk"], rep["unmapped_examples"]
    if mapping.n_input == 0:
        return "the gene list is empty.", "Send one gene identifier per matrix column."
    if junk["barcode"] >= _JUNK_FRACTION * n:
        bad = [g for g, r in zip(mapping.genes, mapping.reasons) if r == "barcode"]
        return (
            f"the gene names look like cell barcodes ({_examples(bad)}): cells and genes are "
            "probably swapped.",
            "Pass the gene identifiers of the matrix columns (adata.var_names, not obs_names), "
            "and transpose the matrix if it is genes x cells.",
        )
    if junk["numeric"] + junk["empty"] >= _JUNK_FRACTION * n:
        bad = [g for g, r in zip(mapping.genes, mapping.reasons) if r in ("numeric", "empty")]
        return (
            f"the gene names are numbers or empty ({_examples(bad)}): the list looks like row "
            "indices or Entrez ids, not gene identifiers.",
            "Send HGNC symbols or Ensembl gene ids, e.g. the 'gene_symbols' or 'gene_ids' "
            "column of adata.var instead of its index.",
        )
    if mapping.id_type.startswith("ensembl") and mapping.fraction_mapped < 0.5:
        sp = mapping.species
        return (
            f"the ids look like {sp} Ensembl gene ids, but only {mapping.fraction_mapped:.0%} "
            f"are known{' to have a human ortholog' if sp == 'mouse' else ''} ({_examples(ex)}).",
            "Send Ensembl *gene* ids (ENSG... for human, ENSMUSG... for mouse; not transcript "
            "or protein ids) or gene symbols.",
        )
    if mapping.species == "mouse" and mapping.fraction_mapped < 0.5:
        return (
            f"the genes were read as mouse genes, but only {mapping.fraction_mapped:.0%} have a "
            f"human ortholog in the packaged table ({_examples(ex)}).",
            "If the data are human, pass species='human'; otherwise send MGI mouse symbols or "
            "ENSMUSG ids.",
        )
    if mapping.id_type == "unknown" or mapping.fraction_mapped < 0.5:
        return (
            f"only {mapping.fraction_mapped:.0%} of the identifiers were recognised as HGNC "
            f"symbols, Ensembl ids or mouse symbols ({_examples(ex)}).",
            "Send HGNC symbols or Ensembl gene ids for human data, MGI symbols or ENSMUSG ids "
            "for mouse data (other species are not supported).",
        )
    if rep["duplicates"]["n_columns"] >= 0.1 * n:
        return (
            f"{rep['duplicates']['n_columns']} columns share {rep['duplicates']['n_symbols']} "
            "symbols: the gene list may be shifted or misaligned with the matrix columns.",
            "Check that genes[i] names column i of the matrix (same order and length).",
        )
    return (
        f"your {mapping.n_input} genes map well ({mapping.fraction_mapped:.0%}), but few "
        "belong to the reference panel: the data look like a targeted or pre-filtered gene set "
        "(e.g. only highly variable genes).",
        "Send all measured genes (raw counts, not a highly-variable subset), or use an atlas "
        "whose gene panel matches your assay.",
    )


def check_coverage(
    mapping: GeneMapping,
    panel: Sequence[str],
    *,
    min_fraction: float = MIN_PANEL_FRACTION,
    min_genes: int = MIN_OVERLAP_GENES,
) -> dict[str, Any]:
    """Raise unless the mapped genes cover enough of a reference panel.

    Parameters
    ----------
    mapping
        Result of :func:`map_genes`.
    panel
        Reference panel genes (approved human symbols).
    min_fraction
        Least fraction of the panel that must be present (default 20%).
    min_genes
        Least number of panel genes that must be present (default 100; capped at the
        panel size for smaller panels).

    Returns
    -------
    dict
        :func:`coverage` of the panel, when it is sufficient.

    Raises
    ------
    GeneMismatchError
        Too few genes overlap; the message names the likely cause (cells/genes swapped,
        numeric names, unmapped Ensembl ids, mouse genes without orthologs, unknown ids,
        misaligned list, or a targeted gene set) and the fix.
    """
    cov = coverage(mapping.symbols, panel)
    if cov["panel_size"] == 0:
        raise InputError("The reference gene panel is empty.", fix="Use an atlas or model with genes.")
    need = min(min_genes, cov["panel_size"])
    if cov["n_present"] >= need and cov["fraction"] >= min_fraction:
        return cov
    cause, fix = _diagnose(mapping)
    raise GeneMismatchError(
        f"Only {cov['n_present']} of the {cov['panel_size']} reference panel genes "
        f"({cov['fraction']:.0%}) are among your {mapping.n_input} genes (need at least "
        f"{need} and {min_fraction:.0%}); a call on so few genes would be meaningless. "
        f"Likely cause: {cause}",
        fix=fix,
        field="genes",
        details={"coverage": cov, "gene_report": mapping.report()},
    )
