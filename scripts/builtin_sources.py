"""The labelled data behind the built-in ``human-core`` atlas, and how its labels map onto the vocabulary.

Every table renames a dataset's author labels onto the curated vocabulary
(``src/cellatlas/data/labels_human_core.tsv``, with Cell Ontology ids and parents); ``None``
leaves a label out (no counterpart, or too mixed to be a reference). The benchmark scores
with the same tables (``benchmarks/harmonise.py``).

:func:`builtin_sources` lists the sources with their role (``cells``: reference cells,
``profiles``: averaged profiles drawn as pseudo-cells, ``heldout``: only used to fit the
fusion model) and their group: datasets sharing cells or a study are one group, left out
together (by the fusion fit, and by the benchmark when it scores one of them zero-shot).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

PBMC3K_TO_CORE = {
    "Naive CD4 T": "Naive CD4 T cell",
    "Memory CD4 T": "Memory CD4 T cell",
    "CD8 T": "CD8 T cell",
    "NK": "NK cell",
    "B": "B cell",
    "CD14+ Mono": "CD14 monocyte",
    "FCGR3A+ Mono": "CD16 monocyte",
    "DC": "Dendritic cell",
    "Platelet": "Platelet",
}
CD8_MIN_COUNTS = 2
"""PBMC3k's two CD4 T clusters hold naive and memory CD8 T cells (``../shared/research/findings.md``
#3: sorted naive CD8 T cells were called CD4 against it). A cell of those clusters with at least
this many CD8A + CD8B counts and no CD4 count is relabelled "CD8 T" before the atlas is built:
the markers decide the CD4/CD8 split the clustering missed. Chosen on PBMC3k alone: 2 counts are
seen in under 1% of its B cells and monocytes (background), in 39% of its "CD8 T" cluster and in
16% of "Naive CD4 T" (109 cells) and 9% of "Memory CD4 T" (40 cells) without any CD4 count."""


def split_cd8(adata, label_key: str = "cell_type", cd4_labels=("Naive CD4 T", "Memory CD4 T"), cd8_label: str = "CD8 T"):
    """``adata`` with its CD4-labelled cells that express CD8A/CD8B but not CD4 relabelled ``cd8_label``
    (counts in ``X``; see :data:`CD8_MIN_COUNTS`)."""
    import numpy as np

    genes = list(adata.var_names)
    col = lambda g: np.asarray(adata.X[:, genes.index(g)].sum(axis=1)).ravel()  # noqa: E731
    cd8, cd4 = col("CD8A") + col("CD8B"), col("CD4")
    labels = adata.obs[label_key].astype(str).to_numpy().copy()
    move = np.isin(labels, list(cd4_labels)) & (cd8 >= CD8_MIN_COUNTS) & (cd4 == 0)
    labels[move] = cd8_label
    adata.obs[label_key] = labels
    adata.uns["cd8_split"] = {"relabelled": int(move.sum()), "min_counts": CD8_MIN_COUNTS}
    return adata


KANG = {
    "CD4 T cells": "CD4 T cell",
    "CD8 T cells": "CD8 T cell",
    "CD14+ Monocytes": "CD14 monocyte",
    "FCGR3A+ Monocytes": "CD16 monocyte",
    "B cells": "B cell",
    "NK cells": "NK cell",
}
PANCREAS = {
    "alpha": "Pancreatic alpha cell",
    "beta": "Pancreatic beta cell",
    "delta": "Pancreatic delta cell",
    "gamma": "Pancreatic PP cell",
    "epsilon": "Pancreatic epsilon cell",
    "ductal": "Pancreatic ductal cell",
    "acinar": "Pancreatic acinar cell",
    "stellate": "Pancreatic stellate cell",
    "activated_stellate": "Pancreatic stellate cell",
    "quiescent_stellate": "Pancreatic stellate cell",
    "PSC": "Pancreatic stellate cell",
    "endothelial": "Endothelial cell",
    "macrophage": "Macrophage",
    "mast": "Mast cell",
    "schwann": "Schwann cell",
    "t_cell": "T cell",
    "T_cell": "T cell",
    "B_cell": "B cell",
    "immune_other": None,  # a mixed bag of immune cells: no single vocabulary label
}
CHETAH_HNSCC = {
    "B cell": "B cell",
    "CD4 T cell": "CD4 T cell",
    "CD8 T cell": "CD8 T cell",
    "Dendritic": "Dendritic cell",
    "Endothelial": "Endothelial cell",
    "Fibroblast": "Fibroblast",
    "Macrophage": "Macrophage",
    "Mast": "Mast cell",
    "reg. T cell": "Regulatory T cell",
}
MOUSE_LUNG = {"B cells": "B cell", "NK cells": "NK cell", "Neutrophils": "Neutrophil", "T cells": "T cell"}
CELL_LINES = {"H1975": "Epithelial cell", "HCC827": "Epithelial cell", "H2228": "Epithelial cell"}
"""CellBench lines are lung adenocarcinoma lines: epithelial is the only cell-type truth they carry."""
EMBRYO = {s: None for s in ("zygote", "2cell", "4cell", "8cell", "16cell", "blast")}
"""Pre-implantation stages have no counterpart in the vocabulary (scored as a novelty check)."""
NOVERSHTERN = {
    "Basophils": None, "Eosinophill": None, "NKT": None, "Early B-cell": None, "Pro B-cell": None,
    "CD4+ Central Memory": "Memory CD4 T cell", "CD4+ Effector Memory": "Memory CD4 T cell",
    "CD8+ Central Memory": "CD8 T cell", "CD8+ Effector Memory": "CD8 T cell", "CD8+ Effector Memory RA": "CD8 T cell",
    "Naive CD4+ T-cell": "Naive CD4 T cell", "Naive CD8+ T-cell": "CD8 T cell",
    "Colony Forming Unit-Granulocyte ": "Hematopoietic progenitor", "Colony Forming Unit-Megakaryocytic ": "Hematopoietic progenitor",
    "Colony Forming Unit-Monocyte ": "Hematopoietic progenitor", "Common myeloid progenitor": "Hematopoietic progenitor",
    "Granulocyte/monocyte progenitor": "Hematopoietic progenitor", "Megakaryocyte/ erythroid progenitor": "Hematopoietic progenitor",
    "Hematopoietic stem cell_CD133+ CD34dim": "Hematopoietic progenitor", "Hematopoietic stem cell_CD38- CD34+": "Hematopoietic progenitor",
    "Erythroid_CD34- CD71- GlyA+": "Erythrocyte", "Erythroid_CD34- CD71+ GlyA-": "Erythrocyte", "Erythroid_CD34- CD71+ GlyA+": "Erythrocyte",
    "Erythroid_CD34- CD71lo GlyA+": "Erythrocyte", "Erythroid_CD34+ CD71+ GlyA-": "Erythrocyte",
    "Granulocyte (Neutrophil)": "Neutrophil", "Granulocyte (Neutrophilic Metamyelocyte)": "Neutrophil",
    "Mature B-cell class able to switch": "B cell", "Mature B-cell class switched": "B cell", "Mature B-cells": "B cell",
    "Naïve B-cells": "B cell", "Mature NK cell_CD56- CD16- CD3-": "NK cell", "Mature NK cell_CD56- CD16+ CD3-": "NK cell",
    "Mature NK cell_CD56+ CD16+ CD3-": "NK cell", "Megakaryocyte": "Platelet", "Monocyte": "Monocyte",
    "Myeloid Dendritic Cell": "Dendritic cell", "Plasmacytoid Dendritic Cell": "Plasmacytoid dendritic cell",
}
"""Sorted haematopoietic populations (microarray). Precursors of B cells, basophils, eosinophils and
NKT cells have no vocabulary label; bulk monocytes are a mix (the grouping node "Monocyte")."""
MOUSE_BULK = {
    "Adipocytes": "Adipocyte", "aNSCs": None, "Astrocytes": "Astrocyte", "Astrocytes activated": "Astrocyte",
    "B cells": "B cell", "Cardiomyocytes": "Cardiomyocyte", "Dendritic cells": "Dendritic cell",
    "Endothelial cells": "Endothelial cell", "Ependymal": None, "Erythrocytes": "Erythrocyte", "Fibroblasts": "Fibroblast",
    "Fibroblasts activated": "Fibroblast", "Fibroblasts senescent": "Fibroblast", "Granulocytes": "Neutrophil",
    "Hepatocytes": "Hepatocyte", "Macrophages": "Macrophage", "Macrophages activated": "Macrophage", "Microglia": "Microglia",
    "Microglia activated": "Microglia", "Monocytes": "Monocyte", "Neurons": "Neuron", "Neurons activated": "Neuron",
    "NK cells": "NK cell", "NPCs": None, "Oligodendrocytes": "Oligodendrocyte", "OPCs": "Oligodendrocyte precursor cell",
    "qNSCs": None, "T cells": "T cell",
}
"""SingleR's mouse bulk RNA-seq types; neural stem/progenitor and ependymal cells have no vocabulary label."""
SEGERSTOLPE_MIN_PURITY = 0.8
"""Segerstolpe cluster means are used where most of the cluster's cells carry its majority label
(the MANIFEST lists clusters 2, 7 and 10 as mixed)."""

DATASETS = "datasets"
REFERENCES = "references"


def builtin_sources(shared: Path, exclude_groups: Iterable[str] = ()):
    """The :class:`cellatlas.sources.Source` list of the built-in atlas, minus ``exclude_groups``."""
    import anndata as ad
    import numpy as np

    from cellatlas.sources import NOVEL, Source

    skip = set(exclude_groups)
    d, r = Path(shared) / DATASETS, Path(shared) / REFERENCES
    out = []

    def add(group, make):
        if group not in skip:
            out.extend(make())

    add("pbmc3k", lambda: [Source("pbmc3k", split_cd8(ad.read_h5ad(d / "human_pbmc3k_10xv1_seurat_labels.h5ad")),
                                  label_map=PBMC3K_TO_CORE, group="pbmc3k")])
    add("hnscc", lambda: [Source("hnscc", ad.read_h5ad(d / "human_hnscc_tme_puram2017_chetah_ref_subset.h5ad"), label_map=CHETAH_HNSCC, group="hnscc")])
    add("mouse_lung", lambda: [Source("mouse_lung", ad.read_h5ad(d / "mouse_lung_zilionis2019_cluey_subset.h5ad"), label_map=MOUSE_LUNG, group="mouse_lung")])

    def baron():
        cider = ad.read_h5ad(d / "pancreas_baron2016_human_mouse_cider_subset.h5ad")
        return [
            Source("mouse_baron", ad.read_h5ad(d / "mouse_pancreas_baron2016_mouse1_indrop.h5ad"), label_map=PANCREAS, group="baron"),
            # CIDER's mouse cells are mouse Baron's own cells: only its human cells are new. They measure
            # only genes with a mouse counterpart (no S100A8, LYZ): held out, not reference cells.
            Source("cider_human", cider[cider.obs["species"].astype(str) == "human"].copy(), label_map=PANCREAS,
                   kind="heldout", group="baron"),
            Source("baron_profiles", ad.read_h5ad(r / "ref_human_pancreas_baron2016_inDrop_celltype_means.h5ad"),
                   label_map=PANCREAS, kind="profiles", group="baron"),
        ]

    add("baron", baron)

    def segerstolpe():
        a = ad.read_h5ad(r / "ref_human_pancreas_segerstolpe2016_smartseq2_cluster_means.h5ad")
        a.obs["label"] = np.where(a.obs["purity"].astype(float) >= SEGERSTOLPE_MIN_PURITY, a.obs["majority_author_label"].astype(str), "mixed")
        return [Source("segerstolpe_profiles", a, label_key="label", label_map={**PANCREAS, "mixed": None}, kind="profiles", group="segerstolpe")]

    add("segerstolpe", segerstolpe)
    add("novershtern", lambda: [Source("novershtern_profiles", ad.read_h5ad(r / "ref_human_haematopoiesis_novershtern2011_microarray.h5ad"),
                                       label_map=NOVERSHTERN, kind="profiles", group="novershtern")])
    add("mouse_bulk", lambda: [Source("mouse_bulk_profiles", ad.read_h5ad(r / "ref_mouse_bulk_rnaseq_singleR_mouse_rnaseq.h5ad"),
                                      label_map=MOUSE_BULK, kind="profiles", group="mouse_bulk")])
    add("kang", lambda: [
        Source("kang", ad.read_h5ad(d / "human_pbmc_kang2018_muscat_subset.h5ad"), label_map=KANG, kind="heldout", group="kang"),
        Source("kang_sce", ad.read_h5ad(d / "human_pbmc_kang2018_muscat_example_sce.h5ad"), label_map=KANG, kind="heldout", group="kang"),
    ])
    add("xin", lambda: [Source("xin", ad.read_h5ad(d / "human_pancreas_xin2016_scclassify_subset.h5ad"), label_map=PANCREAS, kind="heldout", group="xin")])
    add("wang", lambda: [Source("wang", ad.read_h5ad(d / "human_pancreas_wang2016_scclassify_subset.h5ad"), label_map=PANCREAS, kind="heldout", group="wang")])
    add("cellbench", lambda: [
        Source("cellbench_10x", ad.read_h5ad(d / "human_celllines_cellbench_tian2019_10x_cepo_subset.h5ad"), label_map=CELL_LINES,
               kind="heldout", group="cellbench"),
        Source("cellbench_celseq_dropseq", ad.read_h5ad(d / "human_celllines_cellbench_tian2019_celseq2_dropseq.h5ad"),
               label_map=CELL_LINES, kind="heldout", group="cellbench"),
    ])
    add("yan", lambda: [Source("yan_embryo", ad.read_h5ad(d / "human_preimplantation_embryo_yan2013_scmap_rpkm.h5ad"),
                               label_map={s: NOVEL for s in EMBRYO}, kind="heldout", group="yan")])
    return out
