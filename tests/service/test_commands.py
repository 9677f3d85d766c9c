"""``cellatlas keys ...`` and ``cellatlas serve`` through typer's CliRunner."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from cellatlas.service.commands import keys_app, serve
from cellatlas.service.ledger import Ledger

runner = CliRunner()


def _keys(db_url, *args):
    return runner.invoke(keys_app, [*args, "--database-url", db_url])


def test_keys_lifecycle(db_url):
    r = _keys(db_url, "create", "--name", "lab", "--json")
    assert r.exit_code == 0, r.output
    created = json.loads(r.stdout)
    assert created["api_key"].startswith("sk-ca-") and created["credits"] == 500
    key_id = created["id"]

    led = Ledger(db_url)
    assert led.authenticate(created["api_key"]).key_id == key_id

    r = _keys(db_url, "topup", key_id, "250")
    assert r.exit_code == 0 and "750" in r.stdout
    listed = json.loads(_keys(db_url, "list", "--json").stdout)
    assert [(k["id"], k["credits"], k["revoked"]) for k in listed] == [(key_id, 750, False)]
    assert created["api_key"] not in _keys(db_url, "list").stdout

    r = _keys(db_url, "revoke", key_id)
    assert r.exit_code == 0 and "revoked" in r.stdout
    assert json.loads(_keys(db_url, "list", "--active", "--json").stdout) == []
    led.close()


def test_keys_create_plain_prints_only_the_secret_on_stdout(tmp_path):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    r = runner.invoke(keys_app, ["create", "-n", "x", "--credits", "7", "--database-url", url])
    assert r.exit_code == 0
    assert r.stdout.strip().startswith("sk-ca-") and len(r.stdout.strip().splitlines()) == 1
    assert json.loads(_keys(url, "list", "--json").stdout)[0]["credits"] == 7


@pytest.mark.parametrize("args", [["topup", "key_missing", "5"], ["revoke", "key_missing"], ["create", "-n", "x", "--credits", "-1"]])
def test_keys_errors_exit_2_with_fix(tmp_path, args):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    r = runner.invoke(keys_app, [*args, "--database-url", url])
    assert r.exit_code == 2
    assert "error:" in r.output and "Fix:" in r.output


def test_keys_default_database_follows_settings(tmp_path, monkeypatch):
    from cellatlas.config import get_settings

    monkeypatch.setenv("CELLATLAS_HOME", str(tmp_path))
    monkeypatch.delenv("CELLATLAS_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        assert runner.invoke(keys_app, ["create", "-n", "home"]).exit_code == 0
        assert (tmp_path / "cellatlas.db").exists()
    finally:
        get_settings.cache_clear()


def test_serve_passes_options_to_uvicorn(monkeypatch, tmp_path):
    import uvicorn

    from cellatlas.config import get_settings

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setenv("CELLATLAS_HOME", str(tmp_path))
    monkeypatch.setenv("CELLATLAS_REQUIRE_API_KEY", "true")  # restored by monkeypatch after --local
    get_settings.cache_clear()
    app = typer.Typer()
    app.command()(serve)
    r = runner.invoke(app, ["--host", "0.0.0.0", "--port", "9123", "--workers", "2", "--local"])
    assert r.exit_code == 0, r.output
    assert seen["app"] == "cellatlas.service.app:create_app" and seen["factory"] is True
    assert (seen["host"], seen["port"], seen["workers"]) == ("0.0.0.0", 9123, 2)
    assert get_settings().require_api_key is False
    assert "warning" in r.output and "no API keys" in r.output
    monkeypatch.setenv("CELLATLAS_REQUIRE_API_KEY", "true")
    get_settings.cache_clear()
    r = runner.invoke(app, [])
    assert r.exit_code == 0 and (seen["host"], seen["port"], seen["workers"]) == ("127.0.0.1", 8000, 1)
    assert "API keys required" in r.output
    get_settings.cache_clear()
