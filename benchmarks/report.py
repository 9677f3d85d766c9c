"""Reporting for the accuracy benchmark: done-criteria, markdown tables, reliability plots, JSON."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import harmonise as hm

PBMC_SPLITS = ("PBMC3k -> Kang", "Kang -> PBMC3k")
F1_TARGET, MARGIN, ECE_TARGET, FLAG_TARGET = 0.90, 0.01, 0.05, 0.80


def _f(x, fmt="{:.3f}") -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else fmt.format(x)


def _pct(x) -> str:
    return _f(x, "{:.1%}")


def _engine_rows(out: dict) -> list[dict]:
    return [r for r in out.get("cross", []) if r.get("method") == "cellatlas"]


def criteria(out: dict) -> list[dict]:
    """The issue's done-when checks that this run can evaluate."""
    res = []
    eng = _engine_rows(out)
    for r in eng:
        if r["split"] in PBMC_SPLITS:
            v = r.get("macro_f1")
            res.append({"criterion": f"PBMC macro-F1 >= {F1_TARGET} ({r['split']})", "value": v,
                        "pass": v is not None and v >= F1_TARGET})
    for r in eng:
        base = [b.get("macro_f1") for b in out["cross"] if b["split"] == r["split"] and b.get("method") != "cellatlas"]
        base = [b for b in base if b is not None]
        if base and r.get("macro_f1") is not None:
            gap = r["macro_f1"] - max(base)
            res.append({"criterion": f"macro-F1 minus best baseline >= -{MARGIN} ({r['split']})", "value": gap,
                        "pass": gap >= -MARGIN})
        elif r.get("refused"):
            res.append({"criterion": f"engine answers ({r['split']})", "value": None, "pass": False})
    for r in eng:
        if r.get("ece") is not None:
            res.append({"criterion": f"top-label ECE <= {ECE_TARGET} at the shared labels ({r['split']})", "value": r["ece"], "pass": r["ece"] <= ECE_TARGET})
    pooled = _pooled(eng)
    if pooled is not None:
        v = hm.ece(*pooled)
        res.append({"criterion": f"top-label ECE <= {ECE_TARGET} (cross-dataset splits pooled)", "value": v, "pass": v <= ECE_TARGET})
    for r in out.get("novel", []):
        if r.get("marker_labels") != "reference":
            continue
        name = f">= {FLAG_TARGET:.0%} of dropped cells flagged ({r['test']} -> {r['query']})"
        if "flagged" in r:
            res.append({"criterion": name, "value": r["flagged"], "pass": r["flagged"] >= FLAG_TARGET})
        else:
            res.append({"criterion": name + ": engine did not answer", "value": None, "pass": False})
    return res


def _pooled(rows: list[dict]):
    pools = [r["_pool"] for r in rows if r.get("_pool") is not None]
    if not pools:
        return None
    return np.concatenate([p[0] for p in pools]), np.concatenate([p[1] for p in pools])


# ---------------------------------------------------------------------- markdown
def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _cross_table(rows: list[dict]) -> str:
    head = ["split", "method", "shared cells", "macro-F1", "acc shared", "acc fine", "acc hier", "ECE", "Brier",
            "coarse", "flagged", "cells/s"]
    body = []
    for r in rows:
        if r.get("error") or r.get("refused"):
            body.append([r["split"], r["method"], "—", "**" + (r.get("error") or "refused: " + r["refused"])[:120] + "**"] + ["—"] * 8)
            continue
        n = f"{r['n_shared']}/{r['n_cells']}"
        body.append([r["split"], r["method"], n, _f(r.get("macro_f1")), _f(r.get("accuracy_shared")), _f(r.get("accuracy_fine")),
                     _f(r.get("accuracy_hierarchical")), _f(r.get("ece")), _f(r.get("brier")), _pct(r.get("coarse_fraction")),
                     _pct(r.get("flagged_fraction")), _f(r.get("cells_per_s"), "{:,.0f}")])
    return _table(head, body)


def _builtin_table(rows: list[dict]) -> str:
    head = ["dataset", "atlas", "shared cells", "macro-F1", "acc shared", "acc hier", "ECE", "Brier", "coarse", "novel",
            "confident / review / low", "cells/s"]
    body = []
    for r in rows:
        if r.get("error") or r.get("refused"):
            body.append([r["dataset"], r.get("atlas", "—"), str(r.get("n_cells", "—")),
                         "**" + (r.get("error") or "refused: " + r["refused"])[:140] + "**"] + ["—"] * 8)
            continue
        b = r.get("bands", {})
        bands = " / ".join(_pct(b.get(k)) for k in ("confident", "review", "low"))
        body.append([r["dataset"], r["atlas"], f"{r['n_shared']}/{r['n_cells']}", _f(r.get("macro_f1")), _f(r.get("accuracy_shared")),
                     _f(r.get("accuracy_hierarchical")), _f(r.get("ece")), _f(r.get("brier")), _pct(r.get("coarse_fraction")),
                     _pct(r.get("novel_fraction")), bands, _f(r.get("cells_per_s"), "{:,.0f}")])
    return _table(head, body)


def _novel_table(rows: list[dict]) -> str:
    head = ["atlas", "query", "dropped label a candidate?", "cells", "flagged", "novel", "low", "called right",
            "top calls", "false flags (known types)"]
    body = []
    for r in rows:
        if r.get("refused"):
            body.append([r["test"], r["query"], r["marker_labels"], "**" + r["refused"][:110] + "**"] + ["—"] * 6)
            continue
        calls = ", ".join(f"{k} {v}" for k, v in list(r["calls"].items())[:3])
        body.append([r["test"], r["query"], "yes (marker-defined)" if r["dropped_is_candidate"] else "no", str(r["n_cells"]),
                     _pct(r["flagged"]), _pct(r["novel"]), _pct(r["low"]), _pct(r["called_dropped_label"]), calls,
                     _pct(r["false_flag_known"])])
    return _table(head, body)


def markdown(out: dict) -> str:
    parts = ["# cellatlas accuracy benchmark", ""]
    m = out["machine"]
    parts.append(f"Python {m['python']}, {m['cpus']} CPUs; atlases built in memory with {out['settings']['build']}; "
                 f"total {out.get('seconds', 0):.0f} s.")
    if out.get("cross"):
        parts += ["", "## Cross-dataset splits (engine vs baselines on the same reference)", "", _cross_table(out["cross"]), "",
                  "shared cells = query cells whose label the reference also resolves / all query cells. "
                  "acc hier = call is the truth, a correct coarser label or a finer one. ECE/Brier: confidence in the "
                  "top label at the shared level (the label macro-F1 scores) vs hierarchical correctness on shared cells; "
                  "for a cellatlas call finer than that label, its calibrated parent confidence (baselines report "
                  "no parent confidence). cells/s: prediction only (engine: excluding runtime setup)."]
        own = [f"{r['split']} {r['ece_call']:.3f} ({r['n_scored_at_parent']}/{r['n_shared']} cells scored at the parent)"
               for r in _engine_rows(out) if r.get("n_scored_at_parent")]
        if own:
            parts += ["", "cellatlas ECE of the call's own confidence where calls are finer than the truth (e.g. "
                      "\"Naive CD4 T cell\" for Kang's \"CD4 T cell\", which the truth cannot judge): " + "; ".join(own)]
        unshared = {r["split"]: r.get("unshared_labels") for r in _engine_rows(out) if r.get("unshared_labels")}
        if unshared:
            parts += ["", "Query labels the reference lacks (left out of the shared metrics): "
                      + "; ".join(f"{k}: {', '.join(v)}" for k, v in unshared.items())]
    if out.get("builtin"):
        parts += ["", "## Built-in atlas alone (zero-shot) on every labelled dataset", "", _builtin_table(out["builtin"])]
        notes = [f"{r['dataset']}: {r['note']}" for r in out["builtin"] if r.get("note")]
        if notes:
            parts += ["", "Notes: " + "; ".join(notes)]
    if out.get("novel"):
        parts += ["", "## Novel-type test (one label removed from the atlas)", "", _novel_table(out["novel"]), "",
                  "flagged = novel OR band == low. called right = called the removed label anyway (possible only when it "
                  "stays a marker-defined candidate)."]
    if out.get("criteria"):
        rows = [[c["criterion"], _f(c["value"]), "PASS" if c["pass"] else "**FAIL**"] for c in out["criteria"]]
        parts += ["", "## Done-when criteria", "", _table(["criterion", "value", "result"], rows)]
        own = [f"{r['split']} {r['ece_call']:.3f}" for r in _engine_rows(out) if r.get("n_scored_at_parent")]
        if own:
            parts += ["", "ECE is judged at the shared labels, like macro-F1. The ECE of the call's own confidence, "
                      "where the truth is coarser than the call and counts both fine labels right: " + "; ".join(own) + "."]
    oc = out.get("ontology_check", {})
    if oc.get("unsupported"):
        parts += ["", f"Ontology check: {len(oc['unsupported'])} of {oc['checked']} vocabulary parent links are not CL is_a "
                  "ancestry: " + ", ".join(f"{u['label']} -> {u['parent']}" for u in oc["unsupported"])]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------- plots
def _panel(ax, bins: list[dict], title: str) -> None:
    xs = [b["conf"] for b in bins if b["n"]]
    ys = [b["acc"] for b in bins if b["n"]]
    ns = np.array([b["n"] for b in bins if b["n"]], dtype=float)
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
    ax.plot(xs, ys, marker="o", color="C0")
    ax.scatter(xs, ys, s=20 + 200 * ns / max(ns.sum(), 1), color="C0", alpha=0.3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("confidence", fontsize=7)
    ax.set_ylabel("accuracy", fontsize=7)
    ax.tick_params(labelsize=6)


def reliability_plots(out: dict, folder: Path) -> None:
    """One panel per scored engine run (``reliability.png``) and the pooled curves (``reliability_overall.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(f"{r['split']}\nECE {r['ece']:.3f}", r) for r in _engine_rows(out) if r.get("reliability")]
    runs += [(f"built-in on {r['dataset']}\nECE {r['ece']:.3f}", r) for r in out.get("builtin", []) if r.get("reliability")]
    if runs:
        n = len(runs)
        cols = min(4, n)
        rows = int(np.ceil(n / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
        for ax, (title, r) in zip(axes.ravel(), runs):
            _panel(ax, r["reliability"], title)
        for ax in axes.ravel()[n:]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(folder / "reliability.png", dpi=110)
        plt.close(fig)
    groups = [("cross-dataset splits", _pooled(_engine_rows(out))), ("built-in atlas", _pooled(out.get("builtin", [])))]
    groups = [(g, p) for g, p in groups if p is not None]
    if groups:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
        for i, (g, (c, ok)) in enumerate(groups):
            bins = [b for b in hm.reliability_bins(c, ok) if b["n"]]
            ax.plot([b["conf"] for b in bins], [b["acc"] for b in bins], marker="o", color=f"C{i}",
                    label=f"{g} (n={len(c)}, ECE {hm.ece(c, ok):.3f})")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy (hierarchical, shared labels)")
        ax.legend(fontsize=7, loc="upper left")
        ax.set_title("cellatlas reliability, pooled", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / "reliability_overall.png", dpi=110)
        plt.close(fig)


def jsonable(obj):
    """Drop private keys (``_...``) and turn numpy scalars into plain Python values."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and np.isnan(obj):
        return None
    return obj
