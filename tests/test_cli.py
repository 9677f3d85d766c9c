import anndata as ad
import pandas as pd
import pytest
from typer.testing import CliRunner

from cellatlas.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def small_h5ad(tmp_path_factory, pbmc68k):
    p = tmp_path_factory.mktemp("cli") / "pbmc68k.h5ad"
    pbmc68k.write_h5ad(p)
    return p


def test_annotate_writes_h5ad_and_csv(small_h5ad, tmp_path):
    out, csv = tmp_path / "out.h5ad", tmp_path / "calls.csv"
    r = runner.invoke(app, ["annotate", str(small_h5ad), "-o", str(out), "--csv", str(csv)])
    assert r.exit_code == 0, r.output
    assert "B cell" in r.output and "panel coverage" in r.output
    a = ad.read_h5ad(out)
    assert {"cell_type", "cell_type_confidence", "cell_type_band"} <= set(a.obs.columns)
    df = pd.read_csv(csv, index_col=0)
    assert list(df.index.astype(str)) == list(a.obs_names) and len(df) == 700
    assert "alternate_1" in df.columns


def test_errors_are_one_line_exit_2(small_h5ad, tmp_path):
    r = runner.invoke(app, ["annotate", str(tmp_path / "missing.h5ad")])
    assert r.exit_code == 2
    r = runner.invoke(app, ["annotate", str(small_h5ad), "--atlas", "no-such-atlas"])
    assert r.exit_code == 2
    assert "Unknown atlas" in r.output and "Fix:" in r.output
    assert r.output.strip().count("\n") <= 2  # one readable line (wrapped at most once by the terminal)


def test_python_dash_m_runs_the_same_command_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "cellatlas", "annotate", str(tmp_path / "missing.h5ad")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "missing.h5ad" in r.stdout + r.stderr


def test_atlas_list_and_info():
    r = runner.invoke(app, ["atlas", "list"])
    assert r.exit_code == 0 and "human-core" in r.output
    r = runner.invoke(app, ["atlas", "info", "human-core-2026"])
    assert r.exit_code == 0 and "CL:0000236" in r.output  # B cell


def test_atlas_build(small_h5ad, tmp_path, isolated_home):
    dest = tmp_path / "mini"
    r = runner.invoke(app, ["atlas", "build", str(small_h5ad), "--label-key", "bulk_labels", "--name", "mini",
                            "-o", str(dest), "--fit-folds", "2", "--layout", "pca"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "mini.atlas.npz").exists() and "held-out calls: accuracy" in " ".join(r.output.split())
    r = runner.invoke(app, ["atlas", "build", str(small_h5ad), "--label-key", "nope"])
    assert r.exit_code == 2 and "bulk_labels" in r.output


def test_shifted_gene_list_refused_then_skippable_and_empty_cells_counted(pbmc68k, tmp_path):
    import numpy as np
    import scipy.sparse as sp

    raw = pbmc68k.raw.to_adata()
    a = ad.concat([raw, ad.AnnData(sp.csr_matrix((4, raw.n_vars), dtype=np.float32), var=raw.var)], index_unique=None)
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    a.var_names = list(np.roll(np.asarray(raw.var_names), -1))
    path = tmp_path / "shifted.h5ad"
    a.write_h5ad(path)
    r = runner.invoke(app, ["annotate", str(path)])
    assert r.exit_code == 2 and "shifted by 1 column" in r.output and "--skip-gene-check" in r.output
    r = runner.invoke(app, ["annotate", str(path), "--skip-gene-check", "--csv", str(tmp_path / "c.csv")])
    assert r.exit_code == 0, r.output
    assert "gene list skipped" in r.output and "Unassigned: 4 of 704 cells" in r.output
    df = pd.read_csv(tmp_path / "c.csv", index_col=0)
    assert (df["cell_type"].iloc[-4:] == "Unassigned").all() and df["reason"].iloc[-4:].notna().all()
