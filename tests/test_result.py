import numpy as np
import pandas as pd

from cellatlas.result import Alternates, AnnotationResult, band_of


def _result(n=5):
    rng = np.random.default_rng(0)
    labels = np.array(["B cell", "NK cell", "CD4 T cell", "B cell", "Platelet"][:n], dtype=object)
    return AnnotationResult(
        cell_ids=np.array([f"c{i}" for i in range(n)], dtype=object),
        label=labels,
        ontology_id=np.array(["CL:0000236", "CL:0000623", "CL:0000624", "CL:0000236", "CL:0000233"][:n], dtype=object),
        confidence=rng.random(n).astype(np.float32),
        level=np.array(["fine", "fine", "coarse", "fine", "fine"][:n], dtype=object),
        alternates=[[("T cell", 0.2), ("NK cell", 0.1)], [], [("B cell", 0.3)], [("NK cell", 0.05)], [("B cell", 0.4)]][:n],
        markers=[["MS4A1", "CD79A"], ["NKG7"], ["CD4"], [], ["PPBP"]][:n],
        knn_label=labels.copy(),
        knn_prob=rng.random(n).astype(np.float32),
        marker_label=labels.copy(),
        marker_score=rng.random(n).astype(np.float32),
        agreement=np.array([True, True, False, True, False][:n]),
        distance=rng.normal(size=n).astype(np.float32),
        novel=np.array([False, False, False, False, True][:n]),
        parent_label=np.array(["Lymphocyte", "Lymphocyte", "T cell", "Lymphocyte", ""][:n], dtype=object),
        parent_confidence=np.array([0.99, 0.95, 0.9, 0.97, np.nan][:n], dtype=np.float32),
    )


def test_wire_roundtrip_keeps_every_field():
    res = _result()
    calls = res.to_calls()
    assert [c["label"] for c in calls] == list(res.label)
    assert calls[1]["alternates"] == [] and calls[0]["alternates"][0] == {"label": "T cell", "score": 0.2}
    assert {"label", "confidence", "alternates", "markers", "band", "ontology_id", "level", "novel", "evidence"} <= set(calls[0])
    back = AnnotationResult.from_calls(calls, cell_ids=res.cell_ids)
    for name in ("label", "ontology_id", "level", "knn_label", "marker_label", "agreement", "novel", "parent_label"):
        assert list(getattr(back, name)) == list(getattr(res, name)), name
    np.testing.assert_allclose(back.confidence, res.confidence, atol=1e-4)
    # A top-level label has no parent: null on the wire (JSON has no NaN), NaN again after the round trip.
    assert calls[4]["parent_label"] == "" and calls[4]["parent_confidence"] is None
    assert calls[2]["parent_confidence"] == 0.9
    np.testing.assert_allclose(back.parent_confidence, res.parent_confidence, atol=1e-4)
    np.testing.assert_allclose(back.distance, res.distance, atol=1e-4)
    assert (back.alternates.labels == res.alternates.labels).all()
    np.testing.assert_allclose(back.alternates.scores, res.alternates.scores, atol=1e-4)
    assert back.markers == res.markers


def test_views_and_concat():
    res = _result()
    df = res.to_dataframe()
    assert list(df.index) == list(res.cell_ids)
    assert df.loc["c0", "alternate_1"] == "T cell" and df.loc["c1", "alternate_1"] == ""
    assert df.loc["c0", "markers"] == "MS4A1,CD79A"
    assert df.loc["c2", "cell_type_parent"] == "T cell" and np.isnan(df.loc["c4", "cell_type_parent_confidence"])
    both = AnnotationResult.concat([res, res])
    assert len(both) == 10 and list(both.alternates)[5] == list(res.alternates)[0]
    assert list(both.parent_label[5:]) == list(res.parent_label)
    assert list(band_of(np.array([0.1, 0.5, 0.7]))) == ["low", "review", "confident"]


def test_alternates_assignment():
    alts = Alternates.from_lists([[("a", 0.5)], []])
    alts[1] = [("b", 0.25), ("c", 0.125)]
    assert alts[1] == [("b", 0.25), ("c", 0.125)] and alts[0] == [("a", 0.5)]


def test_write_adata(pbmc68k):
    a = pbmc68k[:5].copy()
    res = _result()
    res.cell_ids = np.array(a.obs_names, dtype=object)
    res.write_adata(a)
    assert isinstance(a.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert a.obs["cell_type_alternates"].iloc[0] == "T cell:0.200; NK cell:0.100"


def test_columnar_roundtrip_and_format_2_archives():
    import io

    import orjson

    from cellatlas.service.columnar import decode_result, encode_result

    res = _result()
    blob = encode_result(res, {"provenance": {"atlas": "x"}}, with_embedding=False, dumps=orjson.dumps)
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    back, meta = decode_result(arrays)
    assert list(back.parent_label) == list(res.parent_label) and meta["provenance"] == {"atlas": "x"}
    np.testing.assert_allclose(back.parent_confidence, res.parent_confidence)  # NaN stays NaN
    # A format-2 archive (before the parent columns) still decodes, with no parents.
    old = {k: v for k, v in arrays.items() if not k.startswith("parent_")}
    back, _ = decode_result(old)
    assert list(back.label) == list(res.label) and list(back.parent_label) == [""] * len(res)
    assert np.isnan(back.parent_confidence).all()


def test_alternates_text_reads_as_each_cell_formatted_one_by_one():
    from cellatlas.result import Alternates

    rng = np.random.default_rng(0)
    labels = np.array(["CD14 monocyte", "B cell", "NK cell", ""], dtype=object)[rng.integers(0, 4, (2000, 3))]
    scores = (rng.random((2000, 3)) * 3 - 1).astype(np.float32)
    edge = [np.nan, -0.0004, 0.0625, 5e6, 0.9995, -3.25, -0.0, np.inf, 1e-7]
    labels[: len(edge)] = "B cell"
    scores[: len(edge), 0] = edge
    alt = Alternates(labels, scores)
    want = ["; ".join(f"{lab}:{s:.3f}" for lab, s in cell) for cell in alt]
    assert alt.text().tolist() == want
    assert want[1].startswith("B cell:-0.000") and want[0].startswith("B cell:nan")


def test_to_calls_leaves_garbage_collection_as_it_found_it():
    import gc

    r = _result()
    assert gc.isenabled()
    first = r.to_calls()
    assert gc.isenabled()
    gc.disable()
    try:
        assert r.to_calls() == first and not gc.isenabled()
    finally:
        gc.enable()
