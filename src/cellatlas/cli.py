"""The ``cellatlas`` command line: a thin door onto the engine.

Every command turns a :class:`~cellatlas.errors.CellAtlasError` into one readable
line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from cellatlas.errors import CellAtlasError

app = typer.Typer(help="Zero-shot cell-type annotation of single-cell RNA-seq data.", no_args_is_help=True, add_completion=False)
atlas_app = typer.Typer(help="Build, list, inspect and download reference atlases.", no_args_is_help=True)
app.add_typer(atlas_app, name="atlas")
out = Console()
err = Console(stderr=True)


def friendly(fn):
    """Print CellAtlasError (and unreadable files) as one line and exit 2."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except CellAtlasError as e:
            err.print(f"[bold red]error:[/] {e.one_line()}", soft_wrap=True, highlight=False)
            raise typer.Exit(2)
        except FileNotFoundError as e:
            err.print(f"[bold red]error:[/] file not found: {e.filename or e}", highlight=False)
            raise typer.Exit(2)

    return wrapper


def _summary_table(res, title: str) -> Table:
    t = Table(title=title)
    for col in ("label", "cells", "mean conf.", "confident", "review", "low", "novel"):
        t.add_column(col, justify="left" if col == "label" else "right")
    for lab, row in res.summary().iterrows():
        t.add_row(str(lab), str(int(row["cells"])), f"{row['mean_confidence']:.2f}", f"{row['confident']:.0%}", f"{row['review']:.0%}", f"{row['low']:.0%}", f"{row['novel']:.0%}")
    return t


def _print_input_notes(res) -> None:
    """The gene-list check's verdict when not plainly ok, and how many cells were left Unassigned and why."""
    check = res.gene_report.get("gene_check") or {}
    if check.get("verdict") in ("warning", "skipped", "unchecked"):
        err.print(f"[yellow]gene list {check['verdict']}:[/] {check.get('message', '')}", soft_wrap=True, highlight=False)
    un = res.provenance.get("unassigned") or {}
    if un.get("n_cells"):
        why = ", ".join(f"{n} {r}" for r, n in un["reasons"].items())
        out.print(f"Unassigned: {un['n_cells']} of {len(res)} cells too empty to call ({why})", highlight=False)


def _progress_runner(total_hint: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    return Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True)


@app.command()
@friendly
def annotate(
    input: Path = typer.Argument(..., help=".h5ad, AnnData .zarr, 10x .h5 (read in chunks), .mtx(.gz) directory or .zip, or .csv (cells x genes)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the annotated .h5ad here (X and other matrices of an .h5ad input are linked, not rewritten)."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Write the per-cell calls as CSV (.csv, .csv.gz) here."),
    parquet: Optional[Path] = typer.Option(None, "--parquet", help="Write the per-cell calls as Parquet here."),
    in_place: bool = typer.Option(False, "--in-place", help="Write the annotations into the input .h5ad itself."),
    copy_x: bool = typer.Option(False, "--copy-x", help="Make the output .h5ad self-contained: copy X and the other matrices."),
    model: str = typer.Option("default", help="default, geneformer or scgpt."),
    atlas: str = typer.Option("human-core", help="Atlas name or path."),
    model_path: Optional[Path] = typer.Option(None, help="Checkpoint directory for a foundation model."),
    layer: Optional[str] = typer.Option(None, help="AnnData layer holding counts."),
    use_raw: Optional[bool] = typer.Option(None, "--use-raw/--no-use-raw", help="Read adata.raw (default: decide from the data)."),
    species: Optional[str] = typer.Option(None, help="Force human or mouse (default: detected)."),
    cluster_vote: bool = typer.Option(False, help="Smooth calls by majority vote within over-clusters (reads the whole dataset into memory)."),
    skip_gene_check: bool = typer.Option(
        False, "--skip-gene-check",
        help="Do not check that the gene names belong to the matrix columns (targeted panels, sorted populations "
        "without housekeeping genes); nothing then catches a shifted, reversed or foreign gene list.",
    ),
    doublets: bool = typer.Option(False, "--doublets", help="Add scrublet doublet scores (slow: 3-6 ms a cell; reads the whole dataset into memory)."),
    key_added: str = typer.Option(
        "cell_type", "--key-added",
        help="obs column for the calls and prefix of the others (_confidence, _band, ...). An existing column "
        "cellatlas did not write (e.g. the authors' cell_type) is kept as <name>_uploaded.",
    ),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Score on a Dask cluster: scheduler address, e.g. tcp://host:8786 (the input must be on storage the workers share)."),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", min=1, help="Cells per engine chunk (default CELLATLAS_CHUNK_SIZE, 8192)."),
):
    """Annotate a dataset chunk by chunk, write the outputs as it goes, and print a summary table."""
    from cellatlas.stream import annotate_file

    if cluster_vote or doublets:
        res, n, moved = _annotate_in_memory(input, output, in_place, copy_x, csv, parquet, key_added, layer=layer, use_raw=use_raw,
                                            model=model, atlas=atlas, model_path=model_path, species=species,
                                            cluster_vote=cluster_vote, doublets=doublets, skip_gene_check=skip_gene_check)
    else:
        with _progress_runner("cells") as prog:
            task = prog.add_task("annotating", total=None)
            res = annotate_file(
                input, output=output, calls=[p for p in (csv, parquet) if p is not None], in_place=in_place, copy_x=copy_x,
                key_added=key_added, layer=layer, use_raw=use_raw, model=model, atlas=atlas, model_path=model_path,
                species=species, skip_gene_check=skip_gene_check, scheduler=scheduler, chunk_size=chunk_size,
                progress=lambda done, total: prog.update(task, completed=done, total=total),
            )
        n, moved = len(res), res.moved_columns
    out.print(_summary_table(res, f"{input.name}: {n} cells, {res.provenance['seconds']:.2f} s"))
    gr = res.gene_report
    out.print(f"genes: {gr.get('id_type')} ({gr.get('species')}), {gr.get('n_genes_used')}/{gr.get('n_genes_input')} used, "
              f"atlas panel coverage {gr.get('panel_coverage', float('nan')):.0%}")
    _print_input_notes(res)
    for old, new in moved.items():
        out.print(f"kept the file's obs['{old}'] as obs['{new}'] (the calls are in obs['{key_added}'])", highlight=False)
    for path in (output if output else (input if in_place else None), csv, parquet):
        if path:
            out.print(f"wrote {path}")


def _annotate_in_memory(input, output, in_place, copy_x, csv, parquet, key_added, **kw):
    """--cluster-vote / --doublets: the whole dataset in memory (both look at every cell at once)."""
    import cellatlas
    from cellatlas.errors import InputError
    from cellatlas.io import read

    if in_place or copy_x:
        raise InputError("--cluster-vote and --doublets write a new file only", field="cluster_vote",
                         fix="Use -o OUT.h5ad without --in-place/--copy-x.")
    adata = read(input)
    res = cellatlas.annotate(adata, **kw)
    moved = res.write_adata(adata, key_added=key_added)  # the same rule as cellatlas.annotate_adata
    if output:
        adata.write_h5ad(output)
    if csv:
        res.to_dataframe().to_csv(csv)
    if parquet:
        res.to_dataframe().to_parquet(parquet)
    return res, adata.n_obs, moved


@app.command()
@friendly
def demo():
    """Annotate scanpy's bundled pbmc68k_reduced with the built-in atlas (no files needed)."""
    import scanpy as sc

    import cellatlas

    adata = sc.datasets.pbmc68k_reduced()
    res = cellatlas.annotate_adata(adata)
    out.print(_summary_table(res, f"pbmc68k_reduced ({adata.n_obs} cells, {adata.raw.n_vars} genes, log-normalised): "
                                  f"{res.provenance['seconds']:.2f} s on atlas {res.provenance['atlas']}"))
    _demo_comparison(adata)


def _demo_comparison(adata) -> None:
    """The calls against the file's own labels and clusters, with what a reader needs to judge them."""
    from cellatlas import tl
    from cellatlas.atlas import load_atlas

    share = tl.compare(adata, "bulk_labels")
    counts = tl.compare(adata, "bulk_labels", normalize=False)
    expr, groups = tl.marker_expression(adata, n_genes=2)
    calls = adata.obs["cell_type"].astype(str).to_numpy()
    bulk = adata.obs["bulk_labels"].astype(str).to_numpy()
    t = Table(title="the file's bulk_labels (rows) vs cellatlas calls")
    for col, just in (("bulk label", "left"), ("cells", "right"), ("top call", "left"), ("share", "right"),
                      ("mean conf.", "right"), ("the call's markers, % of those cells expressing", "left")):
        t.add_column(col, justify=just)
    for lab, row in share.iterrows():
        top = str(row.idxmax())
        cells = (bulk == lab) & (calls == top)
        conf = adata.obs["cell_type_confidence"].to_numpy()[cells].mean()
        genes = groups.get(top, [])
        ev = ", ".join(f"{g} {(expr[cells, g].X > 0).mean():.0%}" for g in genes) or "-"
        t.add_row(str(lab), str(int(counts.loc[lab].sum())), top, f"{row.max():.0%}", f"{conf:.2f}", ev)
    out.print(t)
    present = set(map(str, adata.raw.var_names))
    mono = load_atlas("human-core").marker_sets["CD14 monocyte"]
    missing = [g for g in tl.own_markers(mono) if g not in present]
    out.print(
        "How to read this table:\n"
        "- bulk_labels are not expert annotations: Zheng et al. (2017) gave each cell the FACS-sorted bulk population "
        "its profile correlated with best, so they disagree with marker-based calls where populations are close.\n"
        f"- the file keeps {len(present)} highly variable genes, not the transcriptome: "
        f"{len(missing)} of the {len(tl.own_markers(mono))} CD14-monocyte markers are not among them "
        f"({', '.join(missing)}). Monocytes are told apart "
        "by FCGR3A (CD16) and the myeloid genes that remain; most cells labelled 'CD14+ Monocyte' express FCGR3A "
        "(last column).\n"
        "- small groups (8 'Naive T' cells) can follow a few cells' markers; check them in the workspace or with "
        "cellatlas.pl.markers(adata).",
        highlight=False,
    )
    summ = tl.cluster_summary(adata, "louvain")
    t = Table(title="the file's louvain clusters: majority cellatlas call")
    for col in ("louvain", "cells", "majority call", "share", "mean conf."):
        t.add_column(col, justify="left" if col == "majority call" else "right")
    for g, r in summ.iterrows():
        t.add_row(str(g), str(r.n_cells), r.majority_label, f"{r.majority_share:.0%}", f"{r.mean_confidence:.2f}")
    out.print(t)
    out.print("Plots of the same: cellatlas.pl.embedding(adata), pl.compare(adata, 'bulk_labels'), "
              "pl.cluster_summary(adata, 'louvain'), pl.markers(adata).", highlight=False)


@atlas_app.command("build")
@friendly
def atlas_build(
    reference: Path = typer.Argument(..., help="Labelled .h5ad with counts."),
    label_key: str = typer.Option("cell_type", "--label-key", help="obs column with the labels."),
    name: Optional[str] = typer.Option(None, help="Atlas name (default: file stem)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write (default: CELLATLAS_HOME/atlases/NAME.atlas.npz)."),
    version: str = typer.Option("1", help="Version string recorded in the atlas."),
    model: str = typer.Option("default", help="Encoder to embed the reference with."),
    model_path: Optional[Path] = typer.Option(None, help="Checkpoint directory for a foundation model."),
    marker_labels: str = typer.Option("reference", help="'reference' or 'all' (add every curated marker-defined label)."),
    ontology_key: Optional[str] = typer.Option(None, help="obs column with Cell Ontology ids."),
    layer: Optional[str] = typer.Option(None, help="AnnData layer holding counts."),
    fit_folds: int = typer.Option(5, help="Folds of held-out reference cells the fusion model and its calibration are fitted on (0 = unfitted defaults)."),
    layout: str = typer.Option("umap", help="2-D layout of the reference: umap or pca (fast)."),
    reference_kind: str = typer.Option(
        "cells", "--reference-kind", help="'cells', or 'profiles' for pseudo-cells sampled from averaged per-type profiles."
    ),
):
    """Build an atlas file from a labelled reference."""
    from cellatlas.atlas_build import build_atlas
    from cellatlas.config import get_settings

    name = name or reference.name.split(".")[0]
    atlas = build_atlas(
        reference, label_key, name=name, version=version, model=model, model_path=model_path, marker_labels=marker_labels,
        ontology_key=ontology_key, layer=layer, fit_folds=fit_folds, layout=layout,
        reference_kind=reference_kind, log=lambda m: err.print(f"[dim]{m}[/]"),
    )
    dest = output or get_settings().resolved_atlas_dir / name
    path = atlas.save(dest)
    held = atlas.meta["models"][model].get("fusion", {}).get("summary", {}).get("by_variant", {}).get("as sent", {})
    out.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {len(atlas.reference_labels)} reference labels, "
              f"{len(atlas.meta['candidates'])} candidates, {len(atlas.panel)} panel genes; held-out calls: accuracy "
              f"{held.get('accuracy', float('nan')):.3f}, mean confidence {held.get('mean_confidence', float('nan')):.3f}, "
              f"ECE {held.get('ece', float('nan')):.3f}")


@atlas_app.command("list")
@friendly
def atlas_list():
    """List installed atlases."""
    from cellatlas.atlas import list_atlases

    t = Table(title="installed atlases")
    for c in ("name", "version", "models", "labels", "ref. cells", "builtin", "path"):
        t.add_column(c)
    for a in list_atlases():
        t.add_row(a["name"], str(a.get("version", "")), ",".join(a.get("models", [])), str(a.get("n_labels", "")),
                  str(a.get("n_reference_cells", "")), str(a.get("builtin", "")), str(a.get("path", "")))
    out.print(t)


@atlas_app.command("info")
@friendly
def atlas_info(name: str = typer.Argument("human-core")):
    """Show an atlas's labels, models, fitted fusion model and provenance."""
    from cellatlas.atlas import load_atlas

    info = load_atlas(name).info()
    out.print(f"[bold]{info['name']}[/] v{info['version']}  sha256 {info['sha256'][:16]}…  models: {', '.join(info['models'])}")
    out.print(f"{info['n_reference_cells']} reference cells, {info['n_panel_genes']} panel genes, {info['n_labels']} labels")
    t = Table()
    for c in ("label", "ontology_id", "parent", "n_cells", "source"):
        t.add_column(c)
    for lab in info["labels"]:
        t.add_row(lab["label"], str(lab.get("ontology_id") or ""), str(lab.get("parent") or ""), str(lab.get("n_cells", 0)), str(lab.get("source", "")))
    out.print(t)
    out.print(f"fusion model, held-out calls: {info['fusion']}")
    for model, ix in info["index"].items():
        if ix.get("kind") == "ivf":
            out.print(f"{model} neighbour index: IVF-{ix['codec']}, {ix['nlist']} lists, nprobe {ix['nprobe']}: "
                      f"recall@15 {ix['recall_at_15']:.4f} against exact search ({ix['n_queries']} queries: {ix['queries']})")
        else:
            out.print(f"{model} neighbour index: exact (flat)")


@atlas_app.command("download")
@friendly
def atlas_download(
    name: str,
    registry: Optional[str] = typer.Option(None, help="Registry JSON path or URL (default: CELLATLAS_ATLAS_REGISTRY or the bundled one)."),
    force: bool = typer.Option(False, help="Download even if a verified copy is cached."),
):
    """Download a published atlas (sha256-verified) into CELLATLAS_HOME/atlases."""
    from cellatlas.atlas import download_atlas

    path = download_atlas(name, registry=registry, force=force)
    out.print(f"downloaded {name} -> {path}")


def _wire_optional_commands() -> None:
    """Attach commands that live with their subsystem (service, models)."""
    try:
        from cellatlas.service.commands import keys_app, serve

        app.command("serve")(friendly(serve))
        app.add_typer(keys_app, name="keys")
    except ImportError as e:  # pragma: no cover - only while a subsystem is missing
        print(f"cellatlas: service commands unavailable ({e})", file=sys.stderr)
    try:
        from cellatlas.encoders.commands import models_app

        app.add_typer(models_app, name="models")
    except ImportError as e:  # pragma: no cover
        print(f"cellatlas: models commands unavailable ({e})", file=sys.stderr)


_wire_optional_commands()

if __name__ == "__main__":  # pragma: no cover
    app()
