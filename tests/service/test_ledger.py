"""The key/credit ledger, on SQLite and on PostgreSQL (``db_url`` is parametrised)."""

from __future__ import annotations

import threading

import hashlib

import pytest
from sqlalchemy import select

from cellatlas.errors import AuthError, InputError, PaymentRequiredError
from cellatlas.service.db import api_keys, usage
from cellatlas.service.errors import IdempotencyKeyReusedError
from cellatlas.service.ledger import Ledger


def test_new_key_has_free_credits_and_is_stored_only_as_hash(ledger):
    secret, info = ledger.create_key("alice")
    assert secret.startswith("sk-ca-") and len(secret) > 40
    assert info.credits == 500 and info.name == "alice" and not info.revoked
    with ledger.engine.connect() as conn:
        rows = conn.execute(select(api_keys)).mappings().all()
    assert len(rows) == 1
    stored = " ".join(str(v) for v in rows[0].values())
    public, _, private = secret.partition("_")
    assert secret not in stored and private[:4] not in stored and len(private) >= 43
    assert rows[0]["prefix"] == public == info.prefix  # the stored prefix is the public part only
    assert rows[0]["key_hash"] == ledger.hash_key(secret) != hashlib.sha256(secret.encode()).hexdigest()
    assert ledger.authenticate(secret).key_id == info.id


@pytest.mark.parametrize("bad", [None, "", "sk-ca-wrong", "not-a-key"])
def test_authenticate_rejects_unknown_keys(ledger, bad):
    ledger.create_key("alice")
    with pytest.raises(AuthError) as e:
        ledger.authenticate(bad)
    assert e.value.status_code == 401 and e.value.fix


def test_revoked_key_stops_authenticating_and_cannot_be_charged(ledger):
    secret, info = ledger.create_key("bob")
    ledger.revoke(info.id)
    with pytest.raises(AuthError, match="revoked"):
        ledger.authenticate(secret)
    with pytest.raises(AuthError):
        ledger.charge(info.id, 10)
    assert ledger.get_key(info.id).credits == 500
    assert ledger.revoke(info.id).revoked  # second revoke is a no-op


def test_list_and_topup(ledger):
    _, a = ledger.create_key("a")
    _, b = ledger.create_key("b", credits=3)
    ledger.revoke(a.id)
    assert [k.id for k in ledger.list_keys()] == [a.id, b.id]
    assert [k.id for k in ledger.list_keys(include_revoked=False)] == [b.id]
    assert ledger.topup(b.id, 7).credits == 10
    with pytest.raises(InputError):
        ledger.topup(b.id, 0)
    with pytest.raises(InputError, match="No API key"):
        ledger.topup("key_nope", 5)


@pytest.mark.parametrize("cells,price", [(0, 0), (1, 1), (999, 1), (1000, 1), (1001, 2), (10_000, 10), (100_000, 100)])
def test_price_is_one_credit_per_started_block(ledger, cells, price):
    assert ledger.price(cells) == price


def test_charge_deducts_records_usage_and_refuses_overdraft(ledger):
    _, info = ledger.create_key("c", credits=5)
    ch = ledger.charge(info.id, 2500, endpoint="annotate")
    assert (ch.credits_charged, ch.credits_left, ch.replayed) == (3, 2, False)
    with pytest.raises(PaymentRequiredError) as e:
        ledger.charge(info.id, 2001)
    assert e.value.status_code == 402
    assert e.value.details["balance"] == 2 and e.value.details["price"] == 3
    with pytest.raises(PaymentRequiredError):
        ledger.check_balance(info.id, 5000)
    assert ledger.check_balance(info.id, 2000) == 2
    summary = ledger.usage_summary(info.id)
    assert summary["totals"] == {"requests": 1, "cells": 2500, "credits": 3}
    assert summary["recent"][0]["credits_left"] == 2


def test_concurrent_charges_never_overdraw(ledger):
    _, info = ledger.create_key("race", credits=10)
    ok, refused, errors = [], [], []

    def worker():
        try:
            ok.append(ledger.charge(info.id, 1000))
        except PaymentRequiredError:
            refused.append(1)
        except Exception as e:  # pragma: no cover - would be a bug
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(ok) == 10 and len(refused) == 6
    assert ledger.get_key(info.id).credits == 0
    assert sorted(c.credits_left for c in ok) == list(range(10))


def test_idempotent_charge_replays_without_second_charge(ledger):
    _, info = ledger.create_key("idem")
    bodies = iter([b'{"n": 1}', b'{"n": 2}'])
    first = ledger.charge(info.id, 1500, "req-1", request_hash="h1", render=lambda ch: next(bodies))
    again = ledger.charge(info.id, 1500, "req-1", request_hash="h1", render=lambda ch: next(bodies))
    assert first.body == again.body == b'{"n": 1}'
    assert again.replayed and again.credits_charged == 2 and again.credits_left == 498
    assert ledger.get_key(info.id).credits == 498
    with pytest.raises(IdempotencyKeyReusedError):
        ledger.replay(info.id, "req-1", "other-hash")
    # The same Idempotency-Key under another key is a different request.
    _, other = ledger.create_key("other")
    assert ledger.replay(other.id, "req-1", "h1") is None


def test_concurrent_idempotent_requests_are_charged_once(ledger):
    _, info = ledger.create_key("idem-race")
    results, barrier = [], threading.Barrier(6)

    def worker(i):
        barrier.wait()
        results.append(ledger.charge(info.id, 1000, "same", request_hash="h", render=lambda ch: f"body-{i}".encode()))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6
    assert len({r.body for r in results}) == 1
    assert ledger.get_key(info.id).credits == 499
    with ledger.engine.connect() as conn:
        assert len(conn.execute(select(usage)).all()) == 1


def test_local_mode_records_usage_without_charging(ledger):
    ch = ledger.charge(None, 4321, "loc-1", request_hash="x", render=lambda c: b"ok")
    assert (ch.credits_charged, ch.credits_left) == (0, None)
    assert ledger.charge(None, 4321, "loc-1", request_hash="x").replayed
    assert ledger.usage_summary(None)["totals"]["cells"] == 4321


def test_sqlite_file_uses_wal(tmp_path):
    led = Ledger(f"sqlite:///{tmp_path / 'sub' / 'x.db'}")
    with led.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar().lower() == "wal"
    led.close()


def test_describe_url_masks_password():
    assert "secret" not in Ledger.describe_url("postgresql://u:secret@h:5432/db")
    assert Ledger.describe_url("postgresql://u:secret@h/db").startswith("postgresql+psycopg://")
