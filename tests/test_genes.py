"""Gene identifier detection, mapping to approved human symbols, and coverage errors."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from cellatlas.errors import GeneMismatchError, InputError
from cellatlas.gene_tables import TABLE_DIR, human_tables, mouse_tables
from cellatlas.genes import (
    METHODS,
    check_coverage,
    coverage,
    detect_id_type,
    map_genes,
)

SHARED = Path(
    os.environ.get("CELLATLAS_SHARED_DATA")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)
HUMAN = ["CD3E", "MS4A1", "LYZ", "NKG7", "GNLY", "CD14", "FCGR3A", "PPBP"]
MOUSE = ["Cd3e", "Ms4a1", "Lyz2", "Nkg7", "Ins1", "Gcg", "Sst", "Ptprc"]


def _barcodes(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("ACGT"), 16)) + "-1" for _ in range(n)]


@pytest.fixture(scope="module")
def panel() -> list[str]:
    """A realistic 500-gene reference panel of approved HGNC symbols."""
    symbols = sorted(human_tables()["symbols"])
    return [s for s in symbols if s.isalnum() and s.isupper()][1000:1500]


# ----------------------------------------------------------------------- detection
@pytest.mark.parametrize(
    "genes, expected",
    [
        (HUMAN, "symbol_human"),
        (MOUSE, "symbol_mouse"),
        (["ENSG00000198851", "ENSG00000167286.9", "ENSG00000156738.18", "CD14"], "ensembl_human"),
        (["ENSMUSG00000032093", "ENSMUSG00000000215.11", "Gcg"], "ensembl_mouse"),
        # upper-cased mouse symbols: mouse-only names (Riken clones, Gm models, Olfr) decide
        (["1700028B04RIK", "GM7899", "OLFR1121", "ZFP790", "0610009B22RIK", "CD3E", "ACTB"],
         "symbol_mouse"),
        (["foo_1", "bar_2", "qux-3", "zzz"], "unknown"),
        (_barcodes(20), "unknown"),
        ([], "unknown"),
    ],
)
def test_detect_id_type(genes, expected):
    assert detect_id_type(genes) == expected


def test_detect_accepts_numpy_and_missing_values():
    arr = np.array(HUMAN + [None], dtype=object)
    assert detect_id_type(arr) == "symbol_human"
    with pytest.raises(InputError, match="single string"):
        detect_id_type("CD3E")


# ----------------------------------------------------------------------- mapping
def test_human_symbols_exact_order_and_unmapped_in_place():
    genes = ["LYZ", "not_a_gene", "CD3E", "MS4A1"]
    m = map_genes(genes)
    assert m.symbols == ["LYZ", None, "CD3E", "MS4A1"]
    assert m.method == ["exact", None, "exact", "exact"]
    assert (m.id_type, m.species, m.n_input, m.n_mapped) == ("symbol_human", "human", 4, 3)
    assert m.genes == genes


def test_ensembl_with_and_without_version():
    genes = ["ENSG00000198851", "ENSG00000198851.10", "ENSG00000167286.9", "ENSG00000156738",
             "ENSG99999999999"]
    m = map_genes(genes)
    assert m.id_type == "ensembl_human"
    assert m.symbols == ["CD3E", "CD3E", "CD3D", "MS4A1", None]
    assert m.method[:4] == ["ensembl"] * 4
    assert m.reasons[4] == "ensembl_unknown"
    assert m.duplicates == {"CD3E": ["ENSG00000198851", "ENSG00000198851.10"]}


def test_previous_symbols_and_aliases_map_to_approved():
    m = map_genes(["C1orf112", "SEPT7", "MARCH1", "KIAA0754", "CD3E"])
    assert m.symbols == ["FIRRM", "SEPTIN7", "MARCHF1", "MACF1", "CD3E"]
    assert m.method == ["alias"] * 4 + ["exact"]


def test_approved_symbol_is_never_remapped_through_an_alias():
    # SKI, AMN and CAD are approved symbols and also aliases of HHAT, ABCD1, ACOD1
    t = human_tables()
    assert {"SKI", "AMN", "CAD"} <= t["symbols"]
    assert not (set(t["alias"]) & t["symbols"])
    assert map_genes(["SKI", "AMN", "CAD"]).symbols == ["SKI", "AMN", "CAD"]


def test_case_whitespace_and_r_make_names_repairs():
    m = map_genes(["cd3e", "C2ORF15", " MS4A1 ", "HLA.DRA", "LYZ"])
    assert m.symbols == ["CD3E", "C2orf15", "MS4A1", "HLA-DRA", "LYZ"]
    assert m.method[:2] == ["case", "case"]
    assert m.genes[2] == " MS4A1 "  # the user's name is kept as sent
    assert m.n_repaired == 2  # whitespace and '.' -> '-'


def test_mouse_symbols_map_through_orthologs():
    m = map_genes(MOUSE + ["Gm7899"])
    assert m.species == "mouse" and m.id_type == "symbol_mouse"
    assert m.symbols == ["CD3E", "MS4A1", "LYZ", "NKG7", "INS", "GCG", "SST", "PTPRC", None]
    assert m.method == ["ortholog"] * 8 + [None]
    assert m.reasons[-1] == "no_ortholog"  # a known mouse gene model with no human partner


def test_ins1_and_ins2_both_map_to_ins_as_the_table_says():
    rows = gzip.decompress((TABLE_DIR / "mouse_to_human.tsv.gz").read_bytes()).decode().splitlines()
    table = {r.split("\t")[0]: r.split("\t")[1] for r in rows[1:]}
    assert table["Ins1"] == table["Ins2"] == "INS"
    m = map_genes(["Ins1", "Ins2", "Cd3e", "Gcg"])
    assert m.symbols == ["INS", "INS", "CD3E", "GCG"]
    assert m.duplicates == {"INS": ["Ins1", "Ins2"]}
    rep = m.report()
    assert rep["duplicates"]["n_symbols"] == 1 and rep["duplicates"]["n_columns"] == 2


def test_mouse_ensembl_and_forced_species_for_uppercased_mouse():
    m = map_genes(["ENSMUSG00000032093.5", "ENSMUSG00000000215", "ENSMUSG00000000001"])
    assert m.id_type == "ensembl_mouse"
    assert m.symbols[:2] == ["CD3E", "INS"]
    up = map_genes(["INS1", "INS2", "CD3E", "GCG"], species="mouse")
    assert up.species == "mouse" and up.id_type == "symbol_mouse"
    assert up.symbols == ["INS", "INS", "CD3E", "GCG"]
    assert map_genes(["X0610009B22Rik", "Cd3e"], species="mouse").n_repaired == 1


def test_species_errors():
    with pytest.raises(GeneMismatchError, match="mouse Ensembl"):
        map_genes(["ENSMUSG00000032093", "ENSMUSG00000000215"], species="human")
    with pytest.raises(InputError, match="Unknown species"):
        map_genes(HUMAN, species="dog")


def test_report_is_json_ready_and_counts_junk():
    genes = HUMAN + ["C1orf112", "123", "", None, _barcodes(1)[0], "nonsense_gene"]
    rep = map_genes(genes).report()
    json.dumps(rep)
    assert rep["n_input"] == len(genes) and rep["n_mapped"] == len(HUMAN) + 1
    assert rep["methods"] == {"exact": 8, "case": 0, "ensembl": 0, "alias": 1, "ortholog": 0}
    assert set(rep["methods"]) == set(METHODS)
    assert rep["junk"] == {"empty": 2, "numeric": 1, "barcode": 1}
    assert rep["unmapped_examples"] == ["123", "", "", genes[-2], "nonsense_gene"]
    assert rep["fraction_mapped"] == pytest.approx(9 / 14, abs=1e-4)


# ----------------------------------------------------------------------- coverage
def test_coverage_and_panel_indices(panel):
    m = map_genes(panel[:300] + ["CD3E"])
    cov = coverage(m.symbols, panel)
    assert cov["panel_size"] == 500 and cov["n_present"] == 300 and cov["fraction"] == 0.6
    assert cov["missing"] == panel[300:320] and cov["n_missing"] == 200
    cols, pos = m.panel_indices(panel)
    assert cols == list(range(300)) and pos == list(range(300))
    assert check_coverage(m, panel)["n_present"] == 300


def _mismatch(genes, panel, **kw) -> GeneMismatchError:
    with pytest.raises(GeneMismatchError) as err:
        check_coverage(map_genes(genes, **kw), panel)
    e = err.value
    assert e.fix and e.status_code == 422 and e.to_dict()["error"]["code"] == "gene_mismatch"
    assert e.details["coverage"]["n_present"] < 100
    return e


@pytest.mark.parametrize(
    "make, kw, cause, fix",
    [
        (lambda p: _barcodes(300), {}, "cell barcodes", "transpose"),
        (lambda p: [str(i) for i in range(300)], {}, "numbers", "Ensembl gene ids"),
        (lambda p: [f"ENSG{i:011d}" for i in range(1, 300)], {}, "Ensembl gene ids", "ENSG"),
        (lambda p: [f"gene_{i}" for i in range(300)], {}, "recognised", "HGNC symbols"),
        (lambda p: [s for s in sorted(mouse_tables()["symbols"] - set(mouse_tables()["to_human"]))
                    if s.startswith("Gm")][:300], {}, "human ortholog", "species='human'"),
        (lambda p: p[:40] * 8, {}, "misaligned", "same order"),
        (lambda p: p[:60], {}, "targeted", "all measured genes"),
    ],
    ids=["barcodes", "numeric", "ensembl", "unknown", "mouse_no_ortholog", "shifted", "targeted"],
)
def test_check_coverage_names_the_cause(panel, make, kw, cause, fix):
    e = _mismatch(make(panel), panel, **kw)
    assert cause in e.message and fix in e.fix


def test_check_coverage_thresholds(panel):
    m = map_genes(panel[:110])  # 110 genes but 22% of the panel: passes
    assert check_coverage(m, panel)["n_present"] == 110
    with pytest.raises(GeneMismatchError):
        check_coverage(m, panel, min_fraction=0.5)
    small = panel[:50]  # a 50-gene panel fully covered needs only 50 genes
    assert check_coverage(map_genes(small), small)["fraction"] == 1.0


# ----------------------------------------------------------------------- packaged tables
def test_tables_manifest_and_size():
    manifest = json.loads((TABLE_DIR / "manifest.json").read_text())
    for name, n_rows in manifest["rows"].items():
        text = gzip.decompress((TABLE_DIR / f"{name}.tsv.gz").read_bytes()).decode()
        assert text.count("\n") - 1 == n_rows, name
    assert sum(p.stat().st_size for p in TABLE_DIR.iterdir()) < 3_000_000


# ----------------------------------------------------------------------- shared data
def _var(name: str):
    path = SHARED / "datasets" / name
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    import anndata as ad

    return ad.read_h5ad(path, backed="r").var


@pytest.mark.shared
def test_pbmc3k_ensembl_ids_map_to_the_same_symbols():
    var = _var("human_pbmc3k_10xv1_seurat_labels.h5ad")
    ens = [e if isinstance(e, str) and e.startswith("ENSG") else None for e in var["ensembl_id"]]
    by_symbol = map_genes(list(var.index))
    by_ensembl = map_genes(ens)
    assert by_symbol.id_type == "symbol_human"
    has = [i for i, e in enumerate(ens) if e]
    same = sum(by_ensembl.symbols[i] is not None and by_ensembl.symbols[i] == by_symbol.symbols[i]
               for i in has)
    assert len(has) > 12000 and same / len(has) >= 0.95


@pytest.mark.shared
@pytest.mark.parametrize(
    "name, id_type, min_mapped",
    [
        ("mouse_pancreas_baron2016_mouse1_indrop.h5ad", "symbol_mouse", 0.70),
        ("mouse_lung_zilionis2019_cluey_subset.h5ad", "symbol_mouse", 0.70),  # upper-cased
        ("human_pbmc_kang2018_muscat_subset.h5ad", "symbol_human", 0.95),
        ("human_pancreas_xin2016_scclassify_subset.h5ad", "symbol_human", 0.95),
    ],
)
def test_datasets_detected_and_mapped(name, id_type, min_mapped):
    m = map_genes(list(_var(name).index))
    assert m.id_type == id_type
    assert m.fraction_mapped >= min_mapped
    if id_type == "symbol_mouse":
        assert {"INS", "GCG", "CD3E", "PTPRC"} & set(m.symbols)


def test_a_transcript_named_after_its_host_gene_is_not_merged_into_it():
    """HGNC merged HNRNPU-AS1 into HNRNPU; data counted on older annotations have both columns."""
    m = map_genes(["HNRNPU-AS1", "HNRNPU", "BRD2-IT1", "BRD2", "HNRPU"])
    assert m.symbols == ["HNRNPU-AS1", "HNRNPU", "BRD2-IT1", "BRD2", "HNRNPU"]
    assert "HNRNPU-AS1" not in m.duplicates.get("HNRNPU", [])  # a real previous symbol (HNRPU) still maps


def test_mouse_names_are_displayed_in_mgi_case():
    from cellatlas.genes import display_name

    assert [display_name(g, "mouse") for g in ("0610007P14RIK", "X0610007P14Rik", "PPBP", "Ins1")] == [
        "0610007P14Rik", "0610007P14Rik", "Ppbp", "Ins1"]
    assert display_name("CD3E", "human") == "CD3E" and display_name("NOTAGENE", "mouse") == "NOTAGENE"
