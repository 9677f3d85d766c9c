"""Throughput of the Geneformer and scGPT encoders at full published size (random weights).

Random weights cost exactly what real ones do, so cells/s measured here is the
cost of real checkpoints. Configurations: Geneformer V1-10M, V2-104M and
V2-316M (``config.json`` from ../shared/data/foundation_models/geneformer_configs,
with the gc30M / gc95M dictionaries) and scGPT whole-human (12 layers, 512 d,
8 heads, d_hid 512, the 60,697-token census vocabulary). Cells are PBMC3k raw
counts, tokenised by the real tokenisers (time included).

Each model/device pair runs for at most ``--budget-s`` seconds (in chunks of
cells) so the large models finish on a CPU; cells/s is over the chunks done.

Usage::

    python benchmarks/foundation.py                     # CPU (+ GPU if torch.cuda.is_available())
    python benchmarks/foundation.py --cells 200 --gpu-cells 4000 --budget-s 60
    python benchmarks/foundation.py --models geneformer-v1-10m scgpt-whole-human --devices cpu

Writes ``benchmarks/results/foundation.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLATLAS_SHARED_DATA") or ROOT.parent / "shared" / "data")
FM = SHARED / "foundation_models"
PBMC = SHARED / "datasets" / "human_pbmc3k_10xv1_seurat_labels.h5ad"
OUT = ROOT / "benchmarks" / "results" / "foundation.json"

GENEFORMER = {  # name -> (config file, dictionary set)
    "geneformer-v1-10m": ("Geneformer-V1-10M_config.json", "gc30M"),
    "geneformer-v2-104m": ("Geneformer-V2-104M_config.json", "gc95M"),
    "geneformer-v2-316m": ("Geneformer-V2-316M_config.json", "gc95M"),
}
SCGPT_WHOLE_HUMAN = {"embsize": 512, "nheads": 8, "d_hid": 512, "nlayers": 12, "n_layers_cls": 3, "dropout": 0.2,
                     "pad_token": "<pad>", "pad_value": -2, "n_bins": 51, "input_emb_style": "continuous"}
MODELS = [*GENEFORMER, "scgpt-whole-human"]


def build_encoder(name: str, device: str, precision: str):
    """A full-size encoder with random weights (the real tokeniser and dictionaries)."""
    import torch

    torch.manual_seed(0)
    if name in GENEFORMER:
        from transformers import BertConfig, BertForMaskedLM

        from cellatlas.encoders.geneformer import GeneformerEncoder
        from cellatlas.encoders.geneformer_tokenizer import GeneformerDictionaries, GeneformerTokenizer, find_dictionary_files

        cfg_file, dict_set = GENEFORMER[name]
        config = BertConfig.from_json_file(str(FM / "geneformer_configs" / cfg_file))
        dicts = GeneformerDictionaries.from_files(find_dictionary_files(FM / "geneformer_dictionaries" / dict_set))
        tokenizer = GeneformerTokenizer(dicts, input_size=config.max_position_embeddings)
        model = BertForMaskedLM(config)
        return GeneformerEncoder(model, tokenizer, device=device, precision=precision, weights_digest="random"), config.to_dict()
    from cellatlas.encoders.scgpt import ScGPTEncoder
    from cellatlas.encoders.scgpt_model import build_model
    from cellatlas.encoders.scgpt_tokenizer import ScGPTTokenizer, load_vocab

    vocab = load_vocab(FM / "scgpt" / "default_census_vocab.json")
    model = build_model(SCGPT_WHOLE_HUMAN, len(vocab), vocab["<pad>"])
    return ScGPTEncoder(model, ScGPTTokenizer(vocab), device=device, precision=precision, weights_digest="random"), SCGPT_WHOLE_HUMAN


def measure(encoder, x, genes, n_cells: int, budget_s: float, chunk: int) -> dict:
    """Embed up to ``n_cells`` cells in chunks until ``budget_s`` is spent; time tokenising separately."""
    import torch

    sync = torch.cuda.synchronize if encoder.device.type == "cuda" else (lambda: None)
    encoder.embed(x[:4], genes)  # warm-up (kernels, allocator)
    sync()
    done, seconds, tok_seconds, tokens = 0, 0.0, 0.0, 0
    while done < n_cells and seconds < budget_s:
        rows = x[done : min(done + chunk, n_cells)]
        t0 = time.perf_counter()
        toks = encoder.tokenizer.tokenize(rows, genes)
        tok_seconds += time.perf_counter() - t0
        tokens += sum(len(t) for t in (toks[0] if isinstance(toks, tuple) else toks))
        t0 = time.perf_counter()
        encoder.embed(rows, genes)
        sync()
        seconds += time.perf_counter() - t0
        done += rows.shape[0]
    return {"cells": done, "seconds": round(seconds, 3), "cells_per_s": round(done / seconds, 2),
            "tokenize_s": round(tok_seconds, 3), "mean_tokens": round(tokens / max(done, 1), 1)}


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda when available)")
    ap.add_argument("--cells", type=int, default=200, help="cells per model on CPU")
    ap.add_argument("--gpu-cells", type=int, default=2000, help="cells per model on GPU")
    ap.add_argument("--budget-s", type=float, default=30.0, help="max seconds of embedding per model and device")
    ap.add_argument("--precision", default="auto", help="auto (GPU bf16/fp16, CPU fp32), fp32, fp16, bf16")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    import anndata as ad
    import scipy.sparse as sp
    import torch

    if not PBMC.exists():
        print(f"PBMC3k not found at {PBMC} (set CELLATLAS_SHARED_DATA)", file=sys.stderr)
        return 2
    adata = ad.read_h5ad(PBMC)
    order = np.random.default_rng(0).permutation(adata.n_obs)
    x = sp.csr_matrix(adata.X)[order]
    genes = adata.var_names.tolist()
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    results = []
    for device in devices:
        n = args.gpu_cells if device.startswith("cuda") else args.cells
        chunk = 256 if device.startswith("cuda") else 4
        for name in args.models:
            encoder, config = build_encoder(name, device, args.precision)
            params = sum(p.numel() for p in (encoder.bert if hasattr(encoder, "bert") else encoder.model).parameters())
            row = {"model": name, "device": str(encoder.device), "precision": str(encoder.dtype).replace("torch.", ""),
                   "params_m": round(params / 1e6, 1), "layers": config.get("num_hidden_layers", config.get("nlayers")),
                   "hidden": config.get("hidden_size", config.get("embsize")),
                   "input_size": getattr(encoder.tokenizer, "input_size", getattr(encoder.tokenizer, "max_length", None)),
                   **measure(encoder, x, genes, min(n, x.shape[0]), args.budget_s, chunk)}
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            del encoder
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    report = {"benchmark": "foundation encoders, random weights, PBMC3k raw counts", "machine": machine(),
              "command": " ".join(["python benchmarks/foundation.py", *(argv if argv is not None else sys.argv[1:])]),
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs = [r for r in previous.get("runs", []) if r.get("machine", {}).get("gpu") != report["machine"].get("gpu")
            or r.get("machine", {}).get("platform") != report["machine"]["platform"]]
    args.out.write_text(json.dumps({"runs": runs + [report]}, indent=2) + "\n")
    print("| model | device | precision | params (M) | input | mean tokens | cells | cells/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['device']} | {r['precision']} | {r['params_m']} | {r['input_size']} | "
              f"{r['mean_tokens']} | {r['cells']} | {r['cells_per_s']} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
