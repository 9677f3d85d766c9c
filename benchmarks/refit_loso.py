"""Leave-one-source-out refits of the fusion model and node calibration on the build's held-out cases.

    python benchmarks/refit_loso.py [--shared ../shared/data] [--cases /tmp/cellatlas-cases.pkl]
                                    [--out benchmarks/results/refit_loso]

A quick screen for model changes (about 2 minutes after a 2.5-minute build, against ~23
minutes for ``benchmarks/accuracy.py``). The built-in atlas is built once and every held-out
case its training generates (``training.fit_fusion``: other datasets, own-study folds, held-out
labels, thinned, fewer genes, markers only, shuffled genes) is kept. Then, for each source,
the fusion model and the node calibration are refitted on the cases of every *other* source
(its own-study cases left out too) and the source's "as sent" cases are called with them:
accuracy at the call (the truth is the call or below it), mean confidence, ECE, share of
calls at a grouping node, confident share (>= 0.7) and how many of those are right.

The cases of one source were scored against atlases that held the other sources' cells, so
this is a screen, not a zero-shot score: ``benchmarks/accuracy.py`` (atlases rebuilt without
the scored dataset) stays the measure. It reproduces the zero-shot report's direction: Kang
0.953 accuracy at the call, mean confidence 0.837, in both.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))


def collect_cases(shared: Path) -> list:
    """Build the built-in atlas and return every held-out case its fusion fit read."""
    from cellatlas import training
    from build_builtin_atlas import build

    kept: list = []
    score = training._score

    def keep(*args, **kwargs):
        out = score(*args, **kwargs)
        kept.extend(out)
        return out

    training._score = keep
    try:
        build(shared, layout="pca", log=lambda m: None)
    finally:
        training._score = score
    return kept


def refit_and_call(train: list, test: list) -> dict:
    """Fit on ``train`` cases, call ``test`` cases: their rightness, confidence and grouping-node share."""
    from cellatlas import training

    model, cal, _ = training.fit_cases(train)
    right, conf, grouping = [], [], []
    for c in test:
        call, cf, ok = training.call_cases(c, model.probabilities(c.evidence), cal)
        judged = c.truth.any(axis=1)
        right.append(ok[judged])
        conf.append(cf[judged])
        grouping.append((call >= c.hierarchy.n_cand)[judged])
    return {k: np.concatenate(v) for k, v in (("right", right), ("conf", conf), ("grouping", grouping))}


def stats(r: dict) -> dict:
    from cellatlas.fusion import expected_calibration_error

    sure = r["conf"] >= 0.7
    return {"n": int(len(r["right"])), "accuracy_at_call": round(float(r["right"].mean()), 3),
            "mean_confidence": round(float(r["conf"].mean()), 3),
            "ece": round(expected_calibration_error(r["conf"], r["right"]), 3),
            "grouping_share": round(float(r["grouping"].mean()), 3), "confident_share": round(float(sure.mean()), 3),
            "confident_right": round(float(r["right"][sure].mean()), 3) if sure.any() else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=HERE.parents[1] / "shared" / "data")
    ap.add_argument("--cases", type=Path, default=None, help="pickle of the cases: read if it exists, else written")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "refit_loso")
    args = ap.parse_args()
    t0 = time.time()
    if args.cases and args.cases.exists():
        cases = pickle.loads(args.cases.read_bytes())
    else:
        cases = collect_cases(args.shared)
        if args.cases:
            args.cases.write_bytes(pickle.dumps(cases))
    print(f"{len(cases)} case sets, {sum(len(c.truth) for c in cases)} cases ({time.time() - t0:.0f} s)", flush=True)
    base = lambda s: s.replace(" (own study)", "")  # noqa: E731
    sources = sorted({c.source for c in cases if c.variant == "as sent" and "(own study)" not in c.source})
    results, pooled = {}, []
    head = "| source | cases | accuracy at the call | mean confidence | ECE | grouping-node calls | confident | confident right |"
    lines = [head, "|" + "---|" * 8]
    print(head + "\n" + lines[1])
    for s in sources:
        r = refit_and_call([c for c in cases if base(c.source) != s], [c for c in cases if c.source == s and c.variant == "as sent"])
        pooled.append(r)
        st = results[s] = stats(r)
        cr = "-" if st["confident_right"] is None else f"{st['confident_right']:.3f}"
        lines.append(f"| {s} | {st['n']} | {st['accuracy_at_call']:.3f} | {st['mean_confidence']:.3f} | {st['ece']:.3f} | "
                     f"{st['grouping_share']:.2f} | {st['confident_share']:.2f} | {cr} |")
        print(lines[-1], flush=True)
    results["pooled"] = stats({k: np.concatenate([r[k] for r in pooled]) for k in ("right", "conf", "grouping")})
    lines.append(f"| pooled | {results['pooled']['n']} | {results['pooled']['accuracy_at_call']:.3f} | "
                 f"{results['pooled']['mean_confidence']:.3f} | {results['pooled']['ece']:.3f} | | | |")
    print(lines[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=1))
    Path(f"{args.out}.md").write_text(
        "# Leave-one-source-out refits on the built-in atlas's held-out cases\n\n"
        f"`python benchmarks/refit_loso.py`, {time.time() - t0:.0f} s. A screen, not a zero-shot score "
        "(see the script's docstring).\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
