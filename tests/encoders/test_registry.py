"""Model registry and ``cellatlas models``: which models are usable here, and why not."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cellatlas.config import Settings
from cellatlas.encoders import _foundation, available_models, get_encoder, model_status
from cellatlas.encoders.base import Encoder
from cellatlas.encoders.commands import models_app
from cellatlas.errors import ModelUnavailableError, UnknownModelError


def _by_name(rows):
    return {r["name"]: r for r in rows}


def test_installed_checkpoints_are_usable_and_load(models_dir):
    settings = Settings(models_dir=models_dir)
    rows = _by_name(available_models(settings))
    assert set(rows) == {"default", "geneformer", "scgpt"}
    assert rows["geneformer"]["usable"] and rows["scgpt"]["usable"]
    assert rows["geneformer"]["path"] == str(models_dir / "geneformer")
    for name in ("geneformer", "scgpt"):
        enc = get_encoder(name, settings=settings)
        assert isinstance(enc, Encoder) and enc.name == name and enc.dim == 32


def test_missing_models_say_how_to_install_without_leaking_paths(tmp_path):
    settings = Settings(models_dir=tmp_path)
    for name, files in (("geneformer", "token_dictionary"), ("scgpt", "best_model.pt")):
        st = model_status(name, settings=settings)
        assert not st["usable"] and st["kind"] == "foundation"
        assert f"$CELLATLAS_MODELS_DIR/{name}" in st["reason"] and "pip install" in st["reason"] and files in st["reason"]
        assert str(tmp_path) not in st["reason"]
        with pytest.raises(ModelUnavailableError) as err:
            get_encoder(name, settings=settings)
        assert err.value.status_code == 409 and "cellatlas[foundation]" in err.value.fix


def test_missing_optional_packages_are_reported(models_dir, monkeypatch):
    monkeypatch.setattr(_foundation, "missing_packages", lambda pkgs: list(pkgs))
    settings = Settings(models_dir=models_dir)
    st = model_status("geneformer", settings=settings)
    assert not st["usable"] and "torch" in st["reason"] and "torch==2.13.0" in st["reason"]
    with pytest.raises(ModelUnavailableError, match="not installed"):
        get_encoder("scgpt", settings=settings)


def test_unknown_model():
    with pytest.raises(UnknownModelError) as err:
        get_encoder("scbert")
    assert err.value.status_code == 404


def test_models_list_cli(models_dir, tmp_path):
    runner = CliRunner()
    res = runner.invoke(models_app, ["list", "--json", "--models-dir", str(models_dir)])
    assert res.exit_code == 0, res.output
    assert {r["name"]: r["usable"] for r in json.loads(res.output)} == {"default": True, "geneformer": True, "scgpt": True}
    res = runner.invoke(models_app, ["list", "--models-dir", str(tmp_path)])
    assert res.exit_code == 0 and "geneformer" in res.output and "no" in res.output
    assert runner.invoke(models_app, ["info", "scgpt", "--model-path", str(models_dir / "scgpt")]).exit_code == 0
    missing = runner.invoke(models_app, ["info", "geneformer", "--model-path", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "pip install" in missing.output


def test_main_cli_mounts_models(models_dir, monkeypatch):
    from cellatlas.cli import app

    monkeypatch.setenv("CELLATLAS_MODELS_DIR", str(models_dir))
    res = CliRunner().invoke(app, ["models", "list", "--json"])
    assert res.exit_code == 0, res.output
    assert _by_name(json.loads(res.output))["scgpt"]["usable"]


def test_core_import_and_status_do_not_import_torch(models_dir):
    code = (
        "import sys, cellatlas, cellatlas.encoders.geneformer, cellatlas.encoders.scgpt, cellatlas.encoders.commands\n"
        "from cellatlas.encoders import available_models\n"
        "from cellatlas.config import Settings\n"
        f"rows = available_models(Settings(models_dir={str(models_dir)!r}))\n"
        "assert all(r['usable'] for r in rows), rows\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
