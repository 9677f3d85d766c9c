"""Cross-check the curated marker table against public marker databases.

For every label of ``src/cellatlas/data/labels_human_core.tsv`` the human rows of
``markers/markers_normalized.tsv.gz`` (shared data; CellMarkerAccordion, CellMarker 2.0,
PanglaoDB, ScType, besca, pegasus) are matched to the label by Cell Ontology id and by
cell-type name (the label, its CL term name and a few synonyms below, compared after
normalisation). Each curated marker is then supported by the databases that list the
same gene with the same sign for a matching cell type. Prints, per label, how many
positive markers are supported and which are not; ``--write`` fills the ``source`` and
``evidence`` columns of ``markers_human_core.tsv`` from that (nothing else is copied).

    python scripts/check_markers.py [--shared ../shared/data] [--write] [--label "NK cell"]
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parents[1]
DATA = HERE / "src" / "cellatlas" / "data"

SOURCES = {
    "CellMarkerAccordion": "Accordion",
    "CellMarker_2.0": "CellMarker2",
    "PanglaoDB": "PanglaoDB",
    "ScTypeDB": "ScType",
    "besca": "besca",
    "pegasus": "pegasus",
}
SYNONYMS = {
    "Leukocyte": ["immune system", "immune", "white blood"],
    "Lymphocyte": ["lymphoid"],
    "Myeloid cell": ["myeloid"],
    "T cell": ["t lymphocyte", "tcell"],
    "CD4 T cell": ["cd4 t", "cd4 alpha beta t", "t helper", "cd4tcell"],
    "Naive CD4 T cell": ["naive cd4 t", "cd4 naive t", "naive thymus derived cd4 positive alpha beta t"],
    "Memory CD4 T cell": ["memory cd4 t", "cd4 tcm", "cd4 tem", "central memory cd4 t", "effector memory cd4 t", "cmcd4tcell"],
    "Regulatory T cell": ["treg", "regulatory t treg", "t regulatory", "reg t"],
    "CD8 T cell": ["cd8 t", "cytotoxic t", "cd8 naive t", "cd8 tem", "cd8 tcm", "naive cd8 t", "memory cd8 t", "effector cd8 t"],
    "NK cell": ["natural killer", "nk", "cd56 dim nk", "cd56 bright nk", "cd56dimnk", "nkcells"],
    "B cell": ["b", "naive b", "memory b", "blymphocyte", "b lymphocyte"],
    "Plasma cell": ["plasma", "plasmablast"],
    "CD14 monocyte": ["cd14 monocyte", "classical monocyte"],
    "CD16 monocyte": ["cd16 monocyte", "non classical monocyte", "nonclassical monocyte", "fcgr3a monocyte"],
    "Microglia": ["microglial"],
    "Dendritic cell": ["dendritic", "conventional dendritic", "cdc", "myeloid dendritic", "cd1c dendritic", "clec9a dendritic"],
    "Plasmacytoid dendritic cell": ["pdc"],
    "Platelet": ["platelet"],
    "Erythrocyte": ["red blood", "erythroid"],
    "Hematopoietic progenitor": ["hematopoietic stem", "hsc mpp", "hematopoietic precursor", "hematopoietic"],
    "Stromal cell": ["stromal"],
    "Pancreatic stellate cell": ["stellate", "panc stellate", "quiescent stellate", "activated stellate"],
    "Smooth muscle cell": ["smooth muscle", "vascular smooth muscle"],
    "Pericyte": ["mural"],
    "Adipocyte": ["fat"],
    "Endothelial cell": ["endothelial"],
    "Vascular endothelial cell": ["vascular endothelial", "blood vessel endothelial"],
    "Lymphatic endothelial cell": ["lymphatic endothelial", "endothelial of lymphatic vessel"],
    "Epithelial cell": ["epithelial"],
    "Basal epithelial cell": ["basal", "basal epithelial", "respiratory basal"],
    "Ciliated cell": ["ciliated", "ciliated epithelial", "multi ciliated epithelial"],
    "Club cell": ["club", "clara"],
    "Alveolar type 1 cell": ["alveolar type i", "pulmonary alveolar type i", "type i pneumocyte", "at1", "pulmonary alveolar type 1"],
    "Alveolar type 2 cell": ["alveolar type ii", "pulmonary alveolar type ii", "type ii pneumocyte", "at2", "pulmonary alveolar type 2"],
    "Pancreatic ductal cell": ["ductal", "pancreatic ductal"],
    "Pancreatic acinar cell": ["acinar", "pancreatic acinar"],
    "Proximal tubule cell": ["proximal tubule", "proximal tubular", "epithelial of proximal tubule"],
    "Glial cell": ["glial", "glia"],
    "Oligodendrocyte precursor cell": ["opc", "oligodendrocyte progenitor"],
    "Pancreatic endocrine cell": ["pancreatic endocrine", "endocrine", "islet"],
    "Pancreatic alpha cell": ["alpha", "pancreatic a", "pancreatic alpha"],
    "Pancreatic beta cell": ["beta", "type b pancreatic", "pancreatic beta"],
    "Pancreatic delta cell": ["delta", "pancreatic d", "pancreatic delta"],
    "Pancreatic PP cell": ["pp", "gamma", "pancreatic pp", "pancreatic polypeptide"],
    "Pancreatic epsilon cell": ["epsilon", "pancreatic epsilon"],
    "Cardiomyocyte": ["cardiac muscle", "cardiac myocyte"],
    "Skeletal muscle cell": ["skeletal muscle", "myocyte", "skeletal muscle fiber", "myofiber"],
}
_DROP = {"cell", "cells", "human"}


def normalise(name: str) -> str:
    """Lower-case cell-type name without punctuation, plurals, 'cell(s)' or source prefixes."""
    name = re.sub(r"^HumanCD45p_scseqCMs6_", "", str(name))
    name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).lower().replace("+", "")
    words = [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in re.split(r"[^\w]+", name)]
    return " ".join(w for w in words if w and w not in _DROP)


def short_source(source: str) -> str:
    return next((v for k, v in SOURCES.items() if source.startswith(k)), source)


def approved_symbols(shared: Path) -> dict[str, str]:
    """Alias -> approved HGNC symbol, for aliases that map to a single approved symbol."""
    t = pd.read_csv(shared / "gene_ids" / "HGNChelper_0.8.15_hgnc_alias_to_approved.tsv.gz", sep="\t", dtype=str)
    t = t.dropna().drop_duplicates(["Symbol", "Approved.Symbol"])
    unique = t[~t["Symbol"].duplicated(keep=False)]
    return dict(zip(unique["Symbol"], unique["Approved.Symbol"]))


def load_database(shared: Path) -> pd.DataFrame:
    """Human rows of the shared marker database, gene symbols brought to approved HGNC symbols."""
    db = pd.read_csv(shared / "markers" / "markers_normalized.tsv.gz", sep="\t", dtype=str, keep_default_na=False)
    db = db[db["species"] == "human"].copy()
    approved = approved_symbols(shared)
    db["gene"] = [approved.get(g, g) for g in db["gene"]]
    db["norm"] = db["cell_type"].map(normalise)
    db["src"] = db["source"].map(short_source)
    db["sign"] = db["marker_sign"].map({"positive": "+", "negative": "-"})
    return db


def matching_rows(db: pd.DataFrame, label: str, cl_id: str, cl_name: str) -> pd.DataFrame:
    """Database rows describing ``label``: same CL id, or a matching normalised name."""
    names = {normalise(label), normalise(cl_name)} | {normalise(s) for s in SYNONYMS.get(label, [])}
    names.discard("")
    return db[(db["cell_ontology_id"] == cl_id) | db["norm"].isin(names)]


def support(db: pd.DataFrame, labels: pd.DataFrame, onto: pd.Series, markers: pd.DataFrame) -> pd.DataFrame:
    """One row per curated marker with the supporting databases and their row count."""
    out = []
    for label, rows in markers.groupby("label", sort=False):
        cl = labels.at[label, "ontology_id"]
        hits = matching_rows(db, label, cl, onto.get(cl, ""))
        by_gene = defaultdict(list)
        for g, s, src in zip(hits["gene"], hits["sign"], hits["src"]):
            by_gene[(g, s)].append(src)
        for gene, sign in zip(rows["gene"], rows["sign"]):
            srcs = by_gene.get((gene, sign), [])
            out.append({"label": label, "gene": gene, "sign": sign, "databases": sorted(set(srcs)), "n": len(srcs), "n_rows_label": len(hits)})
    return pd.DataFrame(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=HERE.parent / "shared" / "data")
    ap.add_argument("--write", action="store_true", help="fill the source/evidence columns of the marker table")
    ap.add_argument("--label", help="only this label")
    args = ap.parse_args()
    labels = pd.read_csv(DATA / "labels_human_core.tsv", sep="\t", dtype=str, keep_default_na=False).set_index("label")
    markers = pd.read_csv(DATA / "markers_human_core.tsv", sep="\t", dtype=str, keep_default_na=False)
    onto = pd.read_csv(args.shared / "ontology" / "cell_ontology_CL_from_cellmarkeraccordion.tsv.gz", sep="\t", dtype=str)
    onto = onto.set_index("id")["name"]
    sup = support(load_database(args.shared), labels, onto, markers)
    total_pos = total_sup = 0
    for label, s in sup.groupby("label", sort=False):
        if args.label and label != args.label:
            continue
        pos = s[s["sign"] == "+"]
        ok = pos["n"] > 0
        neg_ok = int((s[s["sign"] == "-"]["n"] > 0).sum())
        total_pos, total_sup = total_pos + len(pos), total_sup + int(ok.sum())
        missing = ", ".join(pos.loc[~ok, "gene"]) or "-"
        print(f"{label:32s} {int(ok.sum()):2d}/{len(pos):2d} positive supported ({s['n_rows_label'].iloc[0]:5d} db rows); "
              f"negatives with db support {neg_ok}; unsupported: {missing}")
    print(f"total: {total_sup}/{total_pos} curated positive markers supported by at least one database")
    if args.write:
        markers["source"] = ["curated" + "".join(f";{d}" for d in dbs) for dbs in sup["databases"]]
        markers["evidence"] = [
            f"{';'.join(dbs)} (n={n})" if n else "literature; no database row" for dbs, n in zip(sup["databases"], sup["n"])
        ]
        markers.to_csv(DATA / "markers_human_core.tsv", sep="\t", index=False)
        print(f"wrote source/evidence for {len(markers)} rows to {DATA / 'markers_human_core.tsv'}")


if __name__ == "__main__":
    main()
