#!/usr/bin/env python
"""Derive the compact gene-identifier tables shipped in ``src/cellatlas/data/genes/``.

Run once by a developer (re-runnable; the output is deterministic)::

    python scripts/build_gene_tables.py            # reads ../shared/data/gene_ids
    python scripts/build_gene_tables.py --shared-data /path/to/shared/data

Inputs (see ``shared/data/MANIFEST.md`` section D and ``DATA.md`` "Gene tables"):

* HGNChelper 0.8.15 human alias table (HGNC, updated 2024-11-16): the approved symbols
  and their previous symbols / aliases.
* org.Hs.eg.db 3.16.0 genes (Entrez symbol + Ensembl ids) and aliases.
* GENCODE v44 gene id -> name, from the ``celltypist`` PyPI package (optional; used when
  importable).
* babelgene 22.9 human<->mouse orthologs (HCOP, with ``support_n``), babelgene MGI pairs,
  besca MGI->HGNC, and the HGNChelper mouse alias table.

Every human target is normalised to the current HGNC approved symbol. The rules are
written into ``manifest.json`` next to the tables.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "src" / "cellatlas" / "data" / "genes"
_ENSG = re.compile(r"^ENSG\d{11}$")
_ENSMUSG = re.compile(r"^ENSMUSG\d{11}$")
# MGI features that are never expression features: regulatory regions, TSS clusters,
# CpG islands, and names with spaces/brackets (transgenes, deletions, "allele of ...").
_MOUSE_NOT_GENE = re.compile(r"^(Rr|Tssr|Cpgi)\d+$|[^A-Za-z0-9\-._]")
_KEY_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-._]*$")
# HGNC names of transcripts that are separate loci from the gene they are named after:
# antisense (-AS1), divergent (-DT), intronic (-IT1) and overlapping (-OT1) transcripts.
_OWN_LOCUS = re.compile(r"^(?P<base>.+)-(?:AS|DT|IT|OT)\d*$")

RULES = {
    "human_symbols": "HGNC approved symbols, plus org.Hs.eg.db and GENCODE v44 gene names "
    "that are neither approved nor an HGNC previous symbol/alias of another gene, plus "
    "withdrawn antisense/divergent/intronic/overlapping transcript names (X-AS1, X-DT, X-IT1, "
    "X-OT1) that HGNC merged into their own host gene X (source 'hgnc_merged_transcript').",
    "human_alias_to_symbol": "HGNC previous symbols/aliases first (only those pointing to one "
    "approved symbol and not themselves approved); then org.Hs.eg.db aliases not already "
    "known, kept only when all their genes normalise to one approved symbol. Aliases "
    "with several targets go to human_alias_ambiguous. A transcript named after its target "
    "(X-AS1, X-DT, X-IT1, X-OT1 -> X) is a separate locus in the annotations data are counted "
    "with: it is kept as its own name, never summed into X.",
    "human_ensembl_to_symbol": "GENCODE v44 name if it normalises to an HGNC approved "
    "symbol; else the single approved symbol that org.Hs.eg.db (then babelgene) gives; "
    "else the non-HGNC GENCODE/Entrez name.",
    "mouse_to_human": "babelgene HCOP orthologs (all have support_n >= 2). Per mouse gene: "
    "the single human partner, or the best-supported one (highest support_n; a tie is "
    "broken only by an identical upper-cased name, otherwise dropped). Mouse genes "
    "absent from babelgene HCOP: unique babelgene MGI pair, then unique besca MGI->HGNC. "
    "Keys: mouse symbol, ENSMUSG id, and unambiguous MGI mouse aliases/previous symbols.",
}


def _read(path: Path, **kw) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, **kw)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _gencode_path() -> Path | None:
    try:
        import celltypist
    except Exception:  # noqa: BLE001 - optional source
        return None
    path = Path(celltypist.__file__).parent / "data" / "samples" / "GENCODEv44_Gene_id2name.csv"
    return path if path.exists() else None


class HumanNames:
    """HGNC approved symbols and the unambiguous previous-symbol/alias map."""

    def __init__(self, hgnc: pd.DataFrame) -> None:
        self.approved = set(hgnc["Approved.Symbol"])
        rows = hgnc[(hgnc.Symbol != hgnc["Approved.Symbol"]) & ~hgnc.Symbol.isin(self.approved)]
        targets = rows.groupby("Symbol")["Approved.Symbol"].agg(lambda s: sorted(set(s)))
        self.alias = {k: v[0] for k, v in targets.items() if len(v) == 1}
        self.ambiguous = {k: v for k, v in targets.items() if len(v) > 1}

    def norm(self, name: str) -> str | None:
        """Approved symbol for ``name``; None for unknown or ambiguous names."""
        if name in self.approved:
            return name
        return self.alias.get(name)


def build_human(src: Path, names: HumanNames, gencode: Path | None) -> dict[str, pd.DataFrame]:
    """Human symbol set, alias map, ambiguous aliases and Ensembl -> symbol map."""
    genes = _read(src / "orgHsEgDb_3.16.0_genes.tsv.gz")
    hs_alias = _read(src / "orgHsEgDb_3.16.0_aliases.tsv.gz")
    gc = (
        pd.read_csv(gencode, header=None, names=["ensembl", "name"], dtype=str, keep_default_na=False)
        if gencode
        else pd.DataFrame(columns=["ensembl", "name"])
    )
    hgnc_keys = names.approved | set(names.alias) | set(names.ambiguous)

    extra: dict[str, str] = {}
    for source, values in (("gencode", gc["name"]), ("entrez", genes["SYMBOL"])):
        for v in values:
            if v and v not in hgnc_keys and v not in extra and not _ENSG.match(v):
                extra[v] = source
    symbols = pd.DataFrame(
        [(s, "hgnc") for s in sorted(names.approved)] + sorted(extra.items()),
        columns=["symbol", "source"],
    )
    known = names.approved | set(extra)

    def norm_any(sym: str) -> str | None:
        return names.norm(sym) or (sym if sym in extra else None)

    alias_rows = [(a, s, "hgnc") for a, s in sorted(names.alias.items())]
    ambiguous = {a: list(v) for a, v in names.ambiguous.items()}
    cand: dict[str, set[str]] = defaultdict(set)
    for a, s in zip(hs_alias["ALIAS"], hs_alias["SYMBOL"]):
        if a and a not in hgnc_keys and a not in known:
            t = norm_any(s)
            if t:
                cand[a].add(t)
    for a in sorted(cand):
        if len(cand[a]) == 1:
            alias_rows.append((a, next(iter(cand[a])), "entrez"))
        else:
            ambiguous[a] = sorted(cand[a])
    # X-AS1 -> X would add an antisense transcript's counts to its host gene (HNRNPU-AS1 -> HNRNPU):
    # such names stay their own (unapproved) symbols instead.
    own_locus = {a for a, t, _ in alias_rows if (m := _OWN_LOCUS.match(a)) and names.norm(m.group("base")) == t}
    alias_rows = [r for r in alias_rows if r[0] not in own_locus]
    symbols = pd.concat(
        [symbols, pd.DataFrame([(a, "hgnc_merged_transcript") for a in sorted(own_locus)], columns=["symbol", "source"])],
        ignore_index=True,
    )
    alias = pd.DataFrame(alias_rows, columns=["alias", "symbol", "source"])
    amb = pd.DataFrame(
        sorted((a, "|".join(v)) for a, v in ambiguous.items()), columns=["alias", "candidates"]
    )
    return {
        "human_symbols": symbols,
        "human_alias_to_symbol": alias,
        "human_alias_ambiguous": amb,
        "human_ensembl_to_symbol": _human_ensembl(src, names, extra, genes, gc),
    }


def _human_ensembl(src, names, extra, genes, gc) -> pd.DataFrame:
    by_entrez: dict[str, set[str]] = defaultdict(set)
    for sym, ens in zip(genes["SYMBOL"], genes["ENSEMBL"]):
        for e in filter(None, ens.split("|")):
            by_entrez[e].add(sym)
    orth = _read(src / "babelgene_22.9_human_mouse_orthologs.tsv.gz")
    by_babel: dict[str, set[str]] = defaultdict(set)
    for sym, e in zip(orth["human_symbol"], orth["human_ensembl"]):
        if _ENSG.match(e):
            by_babel[e].add(sym)
    gc_name = {e: n for e, n in zip(gc["ensembl"], gc["name"]) if _ENSG.match(e)}

    def unique_approved(syms: set[str]) -> str | None:
        got = {names.norm(s) for s in syms} - {None}
        return next(iter(got)) if len(got) == 1 else None

    rows = []
    for e in sorted(set(gc_name) | set(by_entrez) | set(by_babel)):
        n = gc_name.get(e, "")
        for sym, source in (
            (names.norm(n), "gencode"),
            (unique_approved(by_entrez.get(e, set())), "entrez"),
            (unique_approved(by_babel.get(e, set())), "babelgene"),
            (n if n in extra else None, "gencode"),
            (next(iter(by_entrez[e])) if len(by_entrez.get(e, ())) == 1 else None, "entrez"),
        ):
            if sym and (sym in names.approved or sym in extra):
                rows.append((e, sym, source))
                break
    return pd.DataFrame(rows, columns=["ensembl", "symbol", "source"])


def _pick_human(cands: dict[str, int], mouse: str) -> tuple[str, str] | None:
    """Best human partner of one mouse gene: (symbol, rule) or None when tied."""
    if len(cands) == 1:
        return next(iter(cands)), "single"
    best = max(cands.values())
    top = sorted(h for h, n in cands.items() if n == best)
    if len(top) == 1:
        return top[0], "best_supported"
    if mouse.upper() in top:
        return mouse.upper(), "best_supported_name_tie"
    return None


def build_mouse(src: Path, human: HumanNames) -> dict[str, pd.DataFrame]:
    """Mouse symbol set and mouse symbol/ENSMUSG/alias -> human symbol map."""
    malias = _read(src / "HGNChelper_0.8.15_mouse_alias_to_approved.tsv.gz")
    mouse_approved = set(malias["Approved.Symbol"])
    orth = _read(src / "babelgene_22.9_human_mouse_orthologs.tsv.gz")
    orth = orth[orth["taxon_id"] == "10090"]
    cands: dict[str, dict[str, int]] = defaultdict(dict)
    ens_of: dict[str, set[str]] = defaultdict(set)
    for hs, ms, me, n in zip(orth.human_symbol, orth.symbol, orth.ensembl, orth.support_n):
        h = human.norm(hs)
        if h and ms:
            cands[ms][h] = max(cands[ms].get(h, 0), int(n))
            if _ENSMUSG.match(me):
                ens_of[ms].add(me)
    n_partners: dict[str, int] = defaultdict(int)
    for c in cands.values():
        for h in c:
            n_partners[h] += 1
    chosen: dict[str, tuple[str, str, int]] = {}
    dropped_ties = 0
    for ms, c in cands.items():
        pick = _pick_human(c, ms)
        if pick is None:
            dropped_ties += 1
            continue
        h, rule = pick
        if rule == "single":
            rule = "one2one" if n_partners[h] == 1 else "many2one"
        chosen[ms] = (h, rule, c[h])
    for fname, mcol, hcol, rule in (
        ("babelgene_22.9_mgi_human_mouse.tsv.gz", "mouse_symbol", "human_symbol", "mgi"),
        ("besca_MGItoHGNC.tsv", "MGI", "HGNC", "besca"),
    ):
        t = _read(src / fname)
        fb: dict[str, set[str]] = defaultdict(set)
        for ms, hs in zip(t[mcol], t[hcol]):
            h = human.norm(hs)
            if ms and h and ms not in cands:
                fb[ms].add(h)
        for ms, hs in fb.items():
            if ms not in chosen and len(hs) == 1:
                chosen[ms] = (next(iter(hs)), rule, 0)

    # current MGI symbols whose ortholog row still uses a previous symbol -> same partner
    renamed: dict[str, set[str]] = defaultdict(set)
    for a, s in zip(malias.Symbol, malias["Approved.Symbol"]):
        if a != s and a in chosen and s not in chosen and not _MOUSE_NOT_GENE.search(s):
            renamed[s].add(a)
    for s, olds in sorted(renamed.items()):
        if len({chosen[a][0] for a in olds}) == 1:
            chosen[s] = chosen[min(olds)]
    rows = [(ms, h, "symbol", rule, n) for ms, (h, rule, n) in chosen.items()]
    for ms in chosen:
        for me in sorted(ens_of.get(ms, ())):
            h, rule, n = chosen[ms]
            rows.append((me, h, "ensembl", rule, n))
    # previous symbols / aliases / MGI's ENSMUSG rows -> chosen gene
    alias_t: dict[str, set[str]] = defaultdict(set)
    for a, s in zip(malias.Symbol, malias["Approved.Symbol"]):
        if a != s and a not in chosen and _KEY_OK.match(a) and (a not in mouse_approved or _ENSMUSG.match(a)):
            alias_t[a].add(s)
    taken = {r[0] for r in rows}
    for a, ss in sorted(alias_t.items()):
        hs = {chosen[s][0] for s in ss if s in chosen}
        if len(ss) == 1 and len(hs) == 1 and a not in taken:
            s = next(iter(ss))
            kind = "ensembl" if _ENSMUSG.match(a) else "alias"
            rows.append((a, chosen[s][0], kind, chosen[s][1], chosen[s][2]))
    m2h = pd.DataFrame(rows, columns=["mouse_id", "human_symbol", "kind", "rule", "support_n"])
    # an id shared by two mouse genes is kept only when both give the same human gene
    n_targets = m2h.groupby("mouse_id")["human_symbol"].transform("nunique")
    m2h = m2h[n_targets == 1].drop_duplicates("mouse_id")
    m2h = m2h.sort_values(["kind", "mouse_id"], kind="stable").reset_index(drop=True)
    msyms = {s for s in mouse_approved if not _MOUSE_NOT_GENE.search(s) and not _ENSMUSG.match(s)}
    msyms |= set(chosen)
    mouse_symbols = pd.DataFrame(sorted(msyms), columns=["symbol"])
    return {"mouse_to_human": m2h, "mouse_symbols": mouse_symbols, "_dropped_ties": dropped_ties}


def _write(df: pd.DataFrame, path: Path) -> None:
    # mtime=0 keeps the gzip bytes reproducible across rebuilds
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as fh:
        fh.write(df.to_csv(sep="\t", index=False, lineterminator="\n").encode())


def main(argv: list[str] | None = None) -> int:
    """Build all tables into ``--out``; print a summary of row counts."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    src = args.shared_data / "gene_ids"
    if not src.is_dir():
        print(f"error: {src} not found; pass --shared-data", file=sys.stderr)
        return 2
    gencode = _gencode_path()
    human = HumanNames(_read(src / "HGNChelper_0.8.15_hgnc_alias_to_approved.tsv.gz"))
    tables = build_human(src, human, gencode)
    tables.update(build_mouse(src, human))
    dropped = tables.pop("_dropped_ties")
    m2h = tables["mouse_to_human"]
    args.out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, df in tables.items():
        _write(df, args.out / f"{name}.tsv.gz")
        counts[name] = len(df)
    sources = {p.name: _sha256(p) for p in sorted(src.iterdir()) if p.is_file()}
    if gencode:
        sources["celltypist:" + gencode.name] = _sha256(gencode)
    manifest = {
        "format": 1,
        "rules": RULES,
        "rows": counts,
        "mouse_genes_dropped_for_tied_support": dropped,
        "mouse_to_human_symbol_rules": (
            m2h.loc[m2h["kind"] == "symbol", "rule"].value_counts().sort_index().to_dict()
        ),
        "sources_sha256": sources,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in args.out.iterdir())
    for name, n in counts.items():
        print(f"{name:28s} {n:>8d} rows")
    print(f"total size {total / 1e6:.2f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
