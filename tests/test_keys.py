"""API keys, scopes and per-key limits on real SQLite files: the negative matrix of issue 11.

Every refusal is checked for its HTTP status and OpenAI code, through the same ``Gate`` the
server calls; time is faked with an injectable clock, never slept through.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
from datetime import datetime, timezone

import pytest

from zenlm.errors import AuthError, ConfigError, RateLimited, ScopeError, ZenlmError
from zenlm.serve import keys as keys_module
from zenlm.serve.access import Gate, bearer
from zenlm.serve.keys import KeyStore, format_key, parse_key, parse_rate, parse_tokens, require_scope
from zenlm.serve.limits import Limiter

T0 = datetime(2026, 3, 14, 12, 0, 0, tzinfo=timezone.utc).timestamp()


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    s = KeyStore(tmp_path / "state", clock=clock)
    yield s
    s.close()


def refused(exc_type, status, code, fn, *args, **kw):
    with pytest.raises(exc_type) as info:
        fn(*args, **kw)
    assert isinstance(info.value, ZenlmError)
    assert (info.value.status, info.value.code) == (status, code)
    return info.value


def auth(key: str) -> str:
    return f"Bearer {key}"


# ---- the key itself -------------------------------------------------------------------------

def test_key_has_prefix_id_checksum_and_is_stored_only_as_digest(store, tmp_path):
    key, record = store.create("support bot", "generate,embed")
    assert key.startswith("zk_")
    key_id, secret = parse_key(key)
    assert key_id == record.id and len(secret) >= 40
    assert format_key(key_id, secret) == key
    assert store.authenticate(key) == record
    assert record.scopes == ("generate", "embed")
    store.close()
    # neither the key nor its secret is anywhere in the state folder (db, WAL, secret file)
    for path in (tmp_path / "state").iterdir():
        data = path.read_bytes()
        assert secret.encode() not in data and key.encode() not in data, path.name


def test_state_files_are_owner_only(store, tmp_path):
    store.create("a", "generate")
    for name in ("secret", "keys.sqlite"):
        mode = stat.S_IMODE((tmp_path / "state" / name).stat().st_mode)
        assert mode & 0o077 == 0, (name, oct(mode))


def test_a_secret_readable_by_others_is_refused(tmp_path):
    KeyStore(tmp_path / "s").close()
    os.chmod(tmp_path / "s" / "secret", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        KeyStore(tmp_path / "s")


def test_unknown_id_takes_the_same_compare_path_as_a_wrong_secret(store, monkeypatch):
    key, record = store.create("a", "generate")
    calls = []
    real = keys_module.hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    _, secret = parse_key(key)
    wrong_secret = format_key(record.id, secret[::-1])
    unknown_id = format_key("0123456789ab", secret)
    monkeypatch.setattr(keys_module.hmac, "compare_digest", counting)
    e1 = refused(AuthError, 401, "invalid_api_key", store.authenticate, wrong_secret)
    n_wrong = len(calls)
    e2 = refused(AuthError, 401, "invalid_api_key", store.authenticate, unknown_id)
    assert str(e1) == str(e2) == "invalid API key"  # nothing says whether the id exists
    assert n_wrong == len(calls) - n_wrong >= 2  # checksum + digest compare, both ways
    assert calls[:n_wrong] == calls[n_wrong:]


def test_rotate_keeps_id_and_limits_and_kills_the_old_secret(store):
    old, record = store.create("a", "generate", rate="5/min", tokens="1000/day", concurrency=2)
    new, rotated = store.rotate(record.id)
    assert rotated.id == record.id and new != old
    assert (rotated.rate_per_min, rotated.tokens_per_day, rotated.concurrency) == (5, 1000, 2)
    assert store.authenticate(new).id == record.id
    refused(AuthError, 401, "invalid_api_key", store.authenticate, old)
    store.revoke(record.id)
    with pytest.raises(ConfigError, match="revoked"):
        store.rotate(record.id)
    with pytest.raises(ConfigError, match="no key with id"):
        store.revoke("ffffffffffff")


def test_has_keys_counts_only_usable_keys(store, clock):
    assert not store.has_keys()
    _, a = store.create("a", "generate", expires="1h")
    assert store.has_keys()
    clock.t += 3601
    assert not store.has_keys()
    _, b = store.create("b", "generate")
    assert store.has_keys()
    store.revoke(b.id)
    assert not store.has_keys()


@pytest.mark.parametrize("text,want", [("60/min", 60), ("2/s", 120), ("90", 90), ("1k/min", 1000)])
def test_parse_rate(text, want):
    assert parse_rate(text) == want


@pytest.mark.parametrize("bad", ["60/hour", "x/min", "0/min", "-3/min"])
def test_parse_rate_refuses(bad):
    with pytest.raises(ConfigError):
        parse_rate(bad)


def test_parse_tokens_and_bad_options(store):
    assert parse_tokens("100000/day") == parse_tokens("100k/day") == parse_tokens("100_000") == 100_000
    with pytest.raises(ConfigError, match="per day"):
        parse_tokens("5/min")
    with pytest.raises(ConfigError, match="unknown scope 'chat'"):
        store.create("a", "generate,chat")
    with pytest.raises(ConfigError, match="duration"):
        store.create("a", "generate", expires="30 days")
    with pytest.raises(ConfigError, match="concurrency"):
        store.create("a", "generate", concurrency=0)


# ---- the negative matrix -------------------------------------------------------------------

@pytest.fixture
def gate(store):
    return Gate(store, Limiter(store))


@pytest.mark.parametrize("header", [None, "", "   ", "Bearer", "Bearer   "])
def test_missing_key_is_401(gate, header):
    refused(AuthError, 401, "invalid_api_key", gate.check, header, "generate")


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Token zk_abc", "zk_123"])
def test_malformed_header_is_401(gate, header):
    refused(AuthError, 401, "invalid_api_key", gate.check, header, "generate")


def test_bearer_scheme_is_case_insensitive_key_is_exact(gate, store):
    key, record = store.create("a", "generate")
    assert bearer(f"bearer {key}") == key
    assert gate.check(f"BEARER {key}", "generate")[0].id == record.id
    refused(AuthError, 401, "invalid_api_key", gate.check, auth(key.upper()), "generate")


@pytest.mark.parametrize("mangle", [
    lambda k: k[:-1] + ("0" if k[-1] != "0" else "1"),      # checksum digit
    lambda k: k[:20] + ("A" if k[20] != "A" else "B") + k[21:],  # a secret character
    lambda k: k[:-4],                                        # cut short
    lambda k: k.replace("zk_", "zk_0", 1),                   # an extra character in the id
])
def test_bad_checksum_or_shape_is_401_before_any_lookup(gate, store, mangle, monkeypatch):
    key, _ = store.create("a", "generate")
    looked_up = []
    monkeypatch.setattr(store, "_digest", lambda *a: looked_up.append(a) or "x")
    err = refused(AuthError, 401, "invalid_api_key", gate.check, auth(mangle(key)), "generate")
    assert "checksum" in str(err) or "malformed" in str(err)
    assert looked_up == []


def test_forged_key_with_valid_checksum_is_401(gate, store):
    _, record = store.create("a", "generate")
    forged = format_key(record.id, "A" * 43)   # right id, right checksum, made-up secret
    refused(AuthError, 401, "invalid_api_key", gate.check, auth(forged), "generate")
    refused(AuthError, 401, "invalid_api_key", gate.check, auth(format_key("abcdefabcdef", "B" * 43)), "generate")


def test_key_of_another_state_dir_is_401(tmp_path, clock):
    a, b = KeyStore(tmp_path / "a", clock=clock), KeyStore(tmp_path / "b", clock=clock)
    key, _ = a.create("a", "generate")
    refused(AuthError, 401, "invalid_api_key", b.authenticate, key)
    # even with the very same database: the digests are keyed with the other folder's secret
    a.close(), b.close()
    for suffix in ("", "-wal", "-shm"):
        src = tmp_path / "a" / f"keys.sqlite{suffix}"
        if src.exists():
            shutil.copy(src, tmp_path / "b" / f"keys.sqlite{suffix}")
    b = KeyStore(tmp_path / "b", clock=clock)
    assert len(b.list()) == 1
    refused(AuthError, 401, "invalid_api_key", b.authenticate, key)
    assert KeyStore(tmp_path / "a", clock=clock).authenticate(key)


def test_revoked_key_is_401_even_revoked_from_another_process(gate, store, tmp_path, clock):
    key, record = store.create("a", "generate")
    assert gate.check(auth(key), "generate")[0].id == record.id
    other = KeyStore(tmp_path / "state", clock=clock)  # what `zenlm keys revoke` opens
    other.revoke(record.id)
    other.close()
    err = refused(AuthError, 401, "invalid_api_key", gate.check, auth(key), "generate")
    assert "revoked" in str(err)


def test_expired_key_is_401(gate, store, clock):
    key, _ = store.create("a", "generate", expires="12h")
    clock.t += 12 * 3600 - 1
    gate.check(auth(key), "generate")[1].release()
    clock.t += 1
    err = refused(AuthError, 401, "invalid_api_key", gate.check, auth(key), "generate")
    assert "expired" in str(err)


def test_missing_scope_is_403_and_scopes_are_independent(gate, store):
    key, _ = store.create("e", "embed")
    refused(ScopeError, 403, "insufficient_scope", gate.check, auth(key), "generate")
    gate.check(auth(key), "embed")[1].release()
    admin, record = store.create("ops", "admin")
    refused(ScopeError, 403, "insufficient_scope", gate.check, auth(admin), "generate")
    require_scope(record, "admin")


def test_auth_comes_before_scope(gate, store):
    key, _ = store.create("e", "embed")
    _, secret = parse_key(key)
    refused(AuthError, 401, "invalid_api_key", gate.check, auth(format_key(parse_key(key)[0], secret[::-1])),
            "generate")


def test_rate_limit_is_429_with_retry_after(gate, store, clock):
    key, _ = store.create("a", "generate", rate="3/min")
    for i in range(3):
        gate.check(auth(key), "generate")[1].release()
        clock.t += 10
    err = refused(RateLimited, 429, "rate_limit_exceeded", gate.check, auth(key), "generate")
    assert err.limit == "rate" and isinstance(err.retry_after, int)
    assert err.retry_after == 30  # the first admission (t=0) leaves the window at t=60; now t=30
    clock.t += 29.5
    refused(RateLimited, 429, "rate_limit_exceeded", gate.check, auth(key), "generate")
    clock.t += 0.5
    gate.check(auth(key), "generate")[1].release()


def test_token_quota_is_429_until_midnight_and_survives_restart(gate, store, clock, tmp_path):
    key, record = store.create("a", "generate", tokens="100/day")
    with gate.check(auth(key), "generate", tokens=40)[1] as permit:
        permit.charge(60)
    err = refused(RateLimited, 429, "rate_limit_exceeded", gate.check, auth(key), "generate", tokens=50)
    assert err.limit == "tokens" and err.retry_after == 12 * 3600  # T0 is noon UTC
    with gate.check(auth(key), "generate", tokens=40)[1] as permit:
        permit.charge(40)
    refused(RateLimited, 429, "rate_limit_exceeded", gate.check, auth(key), "generate", tokens=1)
    # a restart reads today's usage back from the SQLite file
    store.close()
    again = KeyStore(tmp_path / "state", clock=clock)
    gate2 = Gate(again)
    assert gate2.limiter.used_today(record.id) == 100
    refused(RateLimited, 429, "rate_limit_exceeded", gate2.check, auth(key), "generate", tokens=1)
    clock.t += 12 * 3600  # midnight UTC: a new day
    gate2.check(auth(key), "generate", tokens=100)[1].release()
    again.close()


def test_token_reservations_stop_concurrent_requests_overshooting(gate, store):
    key, _ = store.create("a", "generate", tokens="100/day")
    _, first = gate.check(auth(key), "generate", tokens=60)
    refused(RateLimited, 429, "rate_limit_exceeded", gate.check, auth(key), "generate", tokens=60)
    first.release()
    gate.check(auth(key), "generate", tokens=60)[1].release()


def test_concurrency_is_429_while_requests_run(gate, store):
    key, record = store.create("a", "generate", concurrency=2)
    _, p1 = gate.check(auth(key), "generate")
    _, p2 = gate.check(auth(key), "generate")
    err = refused(RateLimited, 429, "rate_limit_exceeded", gate.check, auth(key), "generate")
    assert err.limit == "concurrency" and err.retry_after == 1
    p1.release()
    p1.release()  # idempotent: a double release must not free a slot it does not hold
    assert gate.limiter.running(record.id) == 1
    _, p3 = gate.check(auth(key), "generate")
    refused(RateLimited, 429, "rate_limit_exceeded", gate.check, auth(key), "generate")
    p2.release(), p3.release()
    assert gate.limiter.running(record.id) == 0


def test_a_refusal_spends_no_other_limit(gate, store):
    key, record = store.create("a", "generate", rate="2/min", tokens="10/day")
    refused(RateLimited, 429, "rate_limit_exceeded", gate.check, auth(key), "generate", tokens=11)
    refused(RateLimited, 429, "rate_limit_exceeded", gate.check, auth(key), "generate", tokens=11)
    gate.check(auth(key), "generate", tokens=1)[1].release()   # the two refusals took no rate slot
    gate.check(auth(key), "generate", tokens=1)[1].release()
    err = refused(RateLimited, 429, "rate_limit_exceeded", gate.check, auth(key), "generate")
    assert err.limit == "rate"


def test_threads_share_one_store_safely(gate, store):
    key, record = store.create("a", "generate", tokens="1000000/day")
    errors = []

    def worker():
        try:
            for _ in range(50):
                with gate.check(auth(key), "generate", tokens=3)[1] as p:
                    p.charge(3)
        except Exception as exc:  # noqa: BLE001 - the test reports any
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert gate.limiter.used_today(record.id) == 8 * 50 * 3
    assert gate.limiter.running(record.id) == 0
