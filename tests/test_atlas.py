import hashlib
import http.server
import json
import threading
from functools import partial

import numpy as np
import pytest

from cellatlas import calls, fusion
from cellatlas.atlas import ALIASES, download_atlas, list_atlases, load_atlas, read_atlas
from cellatlas.atlas_build import build_atlas
from cellatlas.errors import AtlasFormatError, AtlasModelMismatchError, InputError, UnknownAtlasError


def test_builtin_atlas_contents():
    at = load_atlas("human-core")
    assert load_atlas("human-core-2026") is at  # the seed's name is an alias, same cached object
    assert ALIASES["human-core-2026"] == "human-core"
    assert at.models == ["default"]
    labels = at.labels
    # every parent is itself a label; reference labels carry Cell Ontology ids
    parents = {p for p in labels["parent"] if isinstance(p, str) and p}
    assert parents <= set(labels.index)
    for lab in at.reference_labels:
        assert labels.loc[lab, "ontology_id"].startswith("CL:")
        assert labels.loc[lab, "n_cells"] > 0
    # marker-defined labels beyond blood are candidates
    for lab in ("Neuron", "Hepatocyte", "Pancreatic beta cell", "Fibroblast", "Vascular endothelial cell"):
        assert lab in at.meta["candidates"]
        assert len(at.marker_sets[lab]["positive"]) >= 3
    assert np.isfinite(at.arrays["ref_layout"]).all()
    # The fusion model and its calibration were fitted on held-out cells of every source group.
    fus = at.stats("default")["fusion"]
    assert set(fus["coef"]) == set(fusion.FEATURES) and fus["summary"]["fitted"]
    assert set(fus["calibration"]["coef"]) == set(calls.NODE_FEATURES) and fus["calibration"]["summary"]["fitted"]
    groups = {s["group"] for s in at.meta["provenance"]["sources"]}
    assert len(groups) >= 5 and {"pbmc3k", "hnscc", "mouse_lung", "baron", "kang"} <= groups
    assert set(fus["summary"]["by_variant"]) >= {"as sent", "thinned", "fewer genes", "markers only", "shuffled genes"}
    # reference cells of more than blood
    assert {"Pancreatic beta cell", "Fibroblast", "Endothelial cell", "Neutrophil", "Macrophage"} <= set(at.reference_labels)
    assert at.reference_counts().shape == (at.ref_codes.shape[0], len(at.ref_genes))
    table = at.marker_table()
    assert {"label", "ontology_id", "gene", "sign", "source"} <= set(table.columns)
    assert (table["sign"] == "-").any()


def test_unknown_atlas_and_model():
    with pytest.raises(UnknownAtlasError) as e:
        load_atlas("no-such-atlas")
    assert "human-core" in e.value.message and e.value.status_code == 404
    with pytest.raises(AtlasModelMismatchError):
        load_atlas("human-core").embedding("geneformer")


def test_corrupt_file_is_a_format_error(tmp_path):
    p = tmp_path / "broken.atlas.npz"
    p.write_bytes(b"not a zip")
    with pytest.raises(AtlasFormatError):
        read_atlas(p)


@pytest.fixture(scope="module")
def small_atlas(pbmc68k):
    a = pbmc68k.copy()
    return build_atlas(a, "bulk_labels", name="pbmc68k-test", use_raw=True, fit_folds=2, layout="pca", n_hvg=300)


def test_build_roundtrip(small_atlas, isolated_home):
    at = small_atlas
    assert set(at.reference_labels) >= {"CD14+ Monocyte", "CD19+ B", "CD56+ NK"}
    assert at.meta["provenance"]["label_key"] == "bulk_labels"
    assert at.meta["provenance"]["sources"][0]["values"] == "lognorm"
    path = at.save(isolated_home / "atlases" / "pbmc68k-test")
    again = read_atlas(path)
    assert again.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert np.array_equal(again.embedding("default"), at.embedding("default"))
    assert again.meta["candidates"] == at.meta["candidates"]
    names = [a["name"] for a in list_atlases()]
    assert "pbmc68k-test" in names and "human-core" in names


def test_build_rejects_bad_label_key(pbmc68k):
    with pytest.raises(InputError) as e:
        build_atlas(pbmc68k, "no_such_column", name="x", use_raw=True)
    assert "bulk_labels" in e.value.message  # lists the columns it has


@pytest.fixture()
def file_server(tmp_path):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield tmp_path, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_download_verifies_checksum_and_caches(small_atlas, file_server, isolated_home):
    root, url = file_server
    src = small_atlas.save(root / "pbmc68k-test")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    reg = root / "registry.json"
    reg.write_text(json.dumps({"atlases": [
        {"name": "pbmc68k-test", "version": "1", "url": f"{url}/{src.name}", "sha256": digest},
        {"name": "tampered", "version": "1", "url": f"{url}/{src.name}", "sha256": "0" * 64},
    ]}))
    dest = download_atlas("pbmc68k-test", registry=f"{url}/registry.json")
    assert dest.exists() and hashlib.sha256(dest.read_bytes()).hexdigest() == digest
    mtime = dest.stat().st_mtime_ns
    assert download_atlas("pbmc68k-test", registry=reg) == dest  # cached, not fetched again
    assert dest.stat().st_mtime_ns == mtime
    with pytest.raises(AtlasFormatError) as e:
        download_atlas("tampered", registry=reg)
    assert "Checksum mismatch" in e.value.message
    assert not list((isolated_home / "atlases").glob("*.part"))
    assert not (isolated_home / "atlases" / "tampered.atlas.npz").exists()
    with pytest.raises(UnknownAtlasError):
        download_atlas("absent", registry=reg)


def test_grouping_nodes_are_not_candidates():
    from cellatlas.markers import load_labels

    at = load_atlas("human-core")
    kind = load_labels()["kind"]
    cands = set(at.meta["candidates"])
    parents = {p for p in at.labels["parent"] if isinstance(p, str) and p}
    assert parents & cands == {"Fibroblast"}  # a type of its own, with pancreatic stellate cells below it
    assert "Pancreatic stellate cell" in cands
    assert not {lab for lab in cands if kind.get(lab) == "group"}
    assert {"T cell", "CD4 T cell", "Monocyte", "Endothelial cell"} <= set(at.reference_labels) - cands


def test_a_type_above_another_candidate_stays_a_candidate_and_votes_for_itself_alone():
    from cellatlas.atlas_build import _candidates
    from cellatlas.markers import load_curated_markers
    from cellatlas.runtime import AtlasRuntime

    base = load_curated_markers()
    parents = {"Pancreatic stellate cell": "Fibroblast", "Fibroblast": "Stromal cell", "CD8 T cell": "T cell"}
    cands = _candidates(["Fibroblast", "T cell"], ["Pancreatic stellate cell", "CD8 T cell"], base, parents)
    assert cands == ["Fibroblast", "Pancreatic stellate cell", "CD8 T cell"]  # "T cell" is a group
    rt = AtlasRuntime(load_atlas("human-core"), "default", list(load_atlas("human-core").ref_genes))
    ref = list(rt.atlas.reference_labels)
    col = {c: j for j, c in enumerate(rt.candidates)}
    fib, tc = rt.knn_map[ref.index("Fibroblast")], rt.knn_map[ref.index("T cell")]
    assert fib[col["Fibroblast"]] == 1 and fib.sum() == 1  # not a vote for stellate cells
    assert tc[col["CD8 T cell"]] == 1 and tc[col["Naive CD4 T cell"]] == 1  # a group's cells vote for all below


def test_foils_are_absent_leaf_types_outside_the_candidates():
    from cellatlas.atlas_build import _foil_sets
    from cellatlas.markers import load_curated_markers

    curated = load_curated_markers()
    foils = _foil_sets(["CD4 T cell", "B cell"], {"T cell", "Lymphocyte", "Leukocyte"}, curated)
    assert "NK cell" in foils and "B cell" not in foils
    assert "Naive CD4 T cell" not in foils  # a finer type of a candidate is not novel
    assert "T cell" not in foils            # grouping nodes never
    nk = foils["NK cell"]
    assert set(curated["NK cell"]["positive"]) <= set(nk["positive"])  # its own markers, and its parent's
