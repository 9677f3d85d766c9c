"""One coarse vocabulary for comparing every method zero-shot (issue #11).

Every call and every truth is mapped to the deepest class of :data:`COARSE` on its
lineage in the curated vocabulary (``src/cellatlas/data/labels_human_core.tsv``); a label
with no coarse class on its lineage (e.g. "Myeloid cell", "Leukocyte") maps to
:data:`OTHER`, which is never right. The same mapping serves cellatlas, its
``marker_label`` and ``knn_label`` columns and the baselines. PanglaoDB cell types (the
marker baseline's vocabulary) are first renamed onto the curated vocabulary by
:data:`PANGLAO_TO_VOCAB`; types with no counterpart map to ``None`` (-> OTHER).

Blood types are the haematopoietic classes (lineage ``immune`` in the vocabulary, plus
platelets, erythrocytes and progenitors); ``blood_call_fraction`` is the share of cells
whose truth is not a blood type that were called one.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

OTHER = "(other)"

COARSE: tuple[str, ...] = (
    "T cell", "NK cell", "B cell", "Plasma cell", "Monocyte", "Macrophage", "Microglia", "Dendritic cell",
    "Plasmacytoid dendritic cell", "Neutrophil", "Mast cell", "Platelet", "Erythrocyte", "Hematopoietic progenitor",
    "Stromal cell", "Endothelial cell", "Epithelial cell", "Pancreatic ductal cell", "Pancreatic acinar cell",
    "Pancreatic alpha cell", "Pancreatic beta cell", "Pancreatic delta cell", "Pancreatic PP cell",
    "Pancreatic epsilon cell", "Neuron", "Glial cell", "Hepatocyte", "Cardiomyocyte", "Skeletal muscle cell",
    "Melanocyte",
)
"""Coarse classes: lineages a biologist tells apart first, with pancreatic islet and exocrine
types kept apart (the pancreas datasets are labelled at that level)."""

BLOOD: frozenset[str] = frozenset({
    "T cell", "NK cell", "B cell", "Plasma cell", "Monocyte", "Macrophage", "Microglia", "Dendritic cell",
    "Plasmacytoid dendritic cell", "Neutrophil", "Mast cell", "Platelet", "Erythrocyte", "Hematopoietic progenitor",
})

PANGLAO_TO_VOCAB: dict[str, str | None] = {
    "Acinar cells": "Pancreatic acinar cell", "Adipocyte progenitor cells": "Stromal cell", "Adipocytes": "Adipocyte",
    "Airway epithelial cells": "Epithelial cell", "Airway goblet cells": "Goblet cell", "Airway smooth muscle cells": "Smooth muscle cell",
    "Alpha cells": "Pancreatic alpha cell", "Alveolar macrophages": "Macrophage", "Astrocytes": "Astrocyte",
    "B cells": "B cell", "B cells memory": "B cell", "B cells naive": "B cell", "Basal cells": "Basal epithelial cell",
    "Basophils": None, "Bergmann glia": "Glial cell", "Beta cells": "Pancreatic beta cell",
    "Cardiomyocytes": "Cardiomyocyte", "Cholangiocytes": "Cholangiocyte", "Ciliated cells": "Ciliated cell",
    "Clara cells": "Club cell", "Delta cells": "Pancreatic delta cell", "Dendritic cells": "Dendritic cell",
    "Ductal cells": "Pancreatic ductal cell", "Endothelial cells": "Endothelial cell", "Endothelial cells (aorta)": "Endothelial cell",
    "Endothelial cells (blood brain barrier)": "Endothelial cell", "Enteric glia cells": "Glial cell", "Enteric neurons": "Neuron",
    "Enterocytes": "Enterocyte", "Eosinophils": None, "Ependymal cells": "Glial cell", "Epithelial cells": "Epithelial cell",
    "Epsilon cells": "Pancreatic epsilon cell", "Erythroblasts": "Erythrocyte",
    "Erythroid-like and erythroid precursor cells": "Erythrocyte", "Fibroblasts": "Fibroblast",
    "Gamma (PP) cells": "Pancreatic PP cell", "Gamma delta T cells": "T cell", "Goblet cells": "Goblet cell",
    "Hematopoietic stem cells": "Hematopoietic progenitor", "Hepatic stellate cells": "Stromal cell", "Hepatocytes": "Hepatocyte",
    "Interneurons": "Neuron", "Keratinocytes": "Keratinocyte", "Kupffer cells": "Macrophage", "Langerhans cells": "Dendritic cell",
    "Luminal epithelial cells": "Epithelial cell", "Macrophages": "Macrophage", "Mammary epithelial cells": "Epithelial cell",
    "Mast cells": "Mast cell", "Megakaryocytes": "Platelet", "Melanocytes": "Melanocyte", "Mesangial cells": "Stromal cell",
    "Microglia": "Microglia", "Monocytes": "Monocyte", "Myocytes": "Skeletal muscle cell", "Myoblasts": "Skeletal muscle cell",
    "Myofibroblasts": "Fibroblast", "NK cells": "NK cell", "Natural killer T cells": "T cell", "Neurons": "Neuron",
    "Neutrophils": "Neutrophil", "Oligodendrocyte progenitor cells": "Oligodendrocyte precursor cell",
    "Oligodendrocytes": "Oligodendrocyte", "Pancreatic stellate cells": "Pancreatic stellate cell", "Pericytes": "Pericyte",
    "Plasma cells": "Plasma cell", "Plasmacytoid dendritic cells": "Plasmacytoid dendritic cell", "Platelets": "Platelet",
    "Podocytes": "Podocyte", "Proximal tubule cells": "Proximal tubule cell", "Pulmonary alveolar type I cells": "Alveolar type 1 cell",
    "Pulmonary alveolar type II cells": "Alveolar type 2 cell", "Reticulocytes": "Erythrocyte", "Schwann cells": "Schwann cell",
    "Smooth muscle cells": "Smooth muscle cell", "Stromal cells": "Stromal cell", "T cells": "T cell", "T cells naive": "T cell",
    "T cytotoxic cells": "CD8 T cell", "T follicular helper cells": "CD4 T cell", "T helper cells": "CD4 T cell",
    "T memory cells": "T cell", "T regulatory cells": "Regulatory T cell", "Thymocytes": "T cell",
    "Vascular smooth muscle cells": "Smooth muscle cell", "Pulmonary vascular smooth muscle cells": "Smooth muscle cell",
    "Purkinje neurons": "Neuron", "Pyramidal cells": "Neuron", "Motor neurons": "Neuron", "GABAergic neurons": "Neuron",
    "Glutaminergic neurons": "Neuron", "Dopaminergic neurons": "Neuron", "Cholinergic neurons": "Neuron",
    "Adrenergic neurons": "Neuron", "Noradrenergic neurons": "Neuron", "Serotonergic neurons": "Neuron",
    "Glycinergic neurons": "Neuron", "Trigeminal neurons": "Neuron", "Retinal ganglion cells": "Neuron",
    "Immature neurons": "Neuron", "Satellite glial cells": "Glial cell", "Red pulp macrophages": "Macrophage",
}
"""PanglaoDB cell types onto the curated vocabulary; every other PanglaoDB type maps to ``None`` (never right)."""


def coarse_of(labels: Iterable[str | None], parents: Mapping[str, str]) -> np.ndarray:
    """The deepest :data:`COARSE` class on each label's lineage (:data:`OTHER` when none; ``None`` stays ``None``)."""
    cache: dict[str, str] = {}
    out = []
    classes = set(COARSE)
    for lab in labels:
        if lab is None:
            out.append(None)
            continue
        lab = str(lab)
        if lab not in cache:
            p, hit = lab, OTHER
            seen = set()
            while p and p not in seen:
                if p in classes:
                    hit = p
                    break
                seen.add(p)
                p = parents.get(p, "")
            cache[lab] = hit
        out.append(cache[lab])
    return np.array(out, dtype=object)


def score_coarse(truth: Sequence[str | None], pred: Sequence[str], parents: Mapping[str, str]) -> dict:
    """Accuracy, macro-F1 over the truth's coarse classes, and the blood-call fraction.

    ``truth`` and ``pred`` are vocabulary labels (``None`` truth: not harmonised, left out).
    """
    from sklearn.metrics import f1_score

    t = coarse_of(truth, parents)
    keep = np.array([x is not None for x in t], dtype=bool)
    t, p = t[keep], coarse_of([OTHER if x is None else x for x in np.asarray(pred, dtype=object)[keep]], parents)
    classes = sorted(set(t.tolist()))
    nonblood = np.array([x not in BLOOD for x in t], dtype=bool)
    blood_call = np.array([x in BLOOD for x in p], dtype=bool)
    return {
        "n": int(keep.sum()),
        "accuracy": float(np.mean(t == p)) if len(t) else float("nan"),
        "macro_f1": float(f1_score(t, p, labels=classes, average="macro", zero_division=0)) if len(t) else float("nan"),
        "blood_call_fraction": float(blood_call[nonblood].mean()) if nonblood.any() else None,
        "n_nonblood": int(nonblood.sum()),
        "classes": classes,
    }
