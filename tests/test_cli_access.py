"""`zenlm keys` and `zenlm audit` through zenlm.cli.main.main, on a real state folder."""

from __future__ import annotations

import json

import pytest

from zenlm.cli.main import main
from zenlm.errors import AuthError
from zenlm.serve.audit import iter_records, segments
from zenlm.serve.keys import KeyStore, parse_key


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def state(tmp_path):
    return str(tmp_path / "state")


def create(capsys, state, *extra):
    code, out, err = run(capsys, "keys", "create", "--name", "support", "--scopes", "generate,embed",
                         "--state", state, "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def test_create_prints_the_key_once_and_it_works(capsys, state):
    made = create(capsys, state, "--rate", "60/min", "--tokens", "100000/day", "--concurrency", "2",
                  "--expires", "30d")
    assert made["key"].startswith("zk_") and made["id"] in made["key"]
    assert (made["rate_per_min"], made["tokens_per_day"], made["concurrency"]) == (60, 100000, 2)
    record = KeyStore(state).authenticate(made["key"])
    assert record.id == made["id"] and record.scopes == ("generate", "embed")
    assert record.expires - record.created == pytest.approx(30 * 86400)
    # plain output: the key alone on stdout (for scripts), the note on stderr
    code, out, err = run(capsys, "keys", "create", "--name", "b", "--scopes", "admin", "--state", state)
    assert code == 0 and out.strip().startswith("zk_") and len(out.strip().splitlines()) == 1
    assert "shown only now" in err


def test_list_never_shows_keys(capsys, state):
    a, b = create(capsys, state), create(capsys, state)
    code, out, _ = run(capsys, "keys", "list", "--state", state, "--json")
    listed = json.loads(out)
    assert code == 0 and [r["id"] for r in listed] == [a["id"], b["id"]]
    assert all(r["status"] == "active" for r in listed)
    code, table, _ = run(capsys, "keys", "list", "--state", state)
    for text in (out, table):
        assert a["key"] not in text and parse_key(a["key"])[1] not in text
    assert a["id"] in table and "generate,embed" in table


def test_revoke_and_rotate(capsys, state):
    a = create(capsys, state)
    b = create(capsys, state)
    assert run(capsys, "keys", "revoke", a["id"], "--state", state)[0] == 0
    store = KeyStore(state)
    with pytest.raises(AuthError, match="revoked"):
        store.authenticate(a["key"])
    code, out, _ = run(capsys, "keys", "rotate", b["id"], "--state", state, "--json")
    rotated = json.loads(out)
    assert code == 0 and rotated["id"] == b["id"] and rotated["key"] != b["key"]
    assert store.authenticate(rotated["key"]).id == b["id"]
    with pytest.raises(AuthError):
        store.authenticate(b["key"])
    listed = {r["id"]: r["status"] for r in json.loads(run(capsys, "keys", "list", "--state", state, "--json")[1])}
    assert listed == {a["id"]: "revoked", b["id"]: "active"}


def test_key_changes_are_audited_without_the_key(capsys, state, tmp_path):
    a = create(capsys, state)
    run(capsys, "keys", "rotate", a["id"], "--state", state)
    run(capsys, "keys", "revoke", a["id"], "--state", state)
    events = [(r["event"], r["key_id"]) for r in iter_records(tmp_path / "state" / "audit")]
    assert events == [("key.create", a["id"]), ("key.rotate", a["id"]), ("key.revoke", a["id"])]
    for _, path in segments(tmp_path / "state" / "audit"):
        assert parse_key(a["key"])[1].encode() not in path.read_bytes()
    code, out, _ = run(capsys, "audit", "verify", "--state", state)
    assert code == 0 and out.startswith("ok: 3 records")


def test_user_errors_are_one_line_exit_2(capsys, state):
    code, out, err = run(capsys, "keys", "create", "--name", "x", "--scopes", "generate,chat", "--state", state)
    assert code == 2 and err.strip() == "zenlm: error: unknown scope 'chat'; scopes are: generate, embed, admin"
    code, _, err = run(capsys, "keys", "revoke", "abcdefabcdef", "--state", state)
    assert code == 2 and "no key with id 'abcdefabcdef'" in err
    code, _, err = run(capsys, "audit", "verify", "--state", str(state) + "-nowhere")
    assert code == 2 and "no audit log" in err


def test_verify_names_the_first_bad_seq(capsys, state, tmp_path):
    for _ in range(4):
        create(capsys, state)
    seg = segments(tmp_path / "state" / "audit")[0][1]
    lines = seg.read_bytes().splitlines()
    del lines[1]
    seg.write_bytes(b"".join(line + b"\n" for line in lines))
    code, out, err = run(capsys, "audit", "verify", "--state", state)
    assert code == 1 and "first bad seq 2: deleted" in err
    code, out, _ = run(capsys, "audit", "verify", "--state", state, "--json")
    report = json.loads(out)
    assert code == 1 and report["first_bad_seq"] == 2 and report["records"] == 1


def test_tail_and_query(capsys, state, tmp_path):
    a, b, c = create(capsys, state), create(capsys, state), create(capsys, state)
    run(capsys, "keys", "revoke", b["id"], "--state", state)
    code, out, _ = run(capsys, "audit", "tail", "-n", "2", "--state", state)
    assert code == 0 and [json.loads(x)["key_id"] for x in out.splitlines()] == [c["id"], b["id"]]
    code, out, _ = run(capsys, "audit", "query", "--key", b["id"], "--since", "1h", "--state", state)
    assert [json.loads(x)["event"] for x in out.splitlines()] == ["key.create", "key.revoke"]
    code, out, _ = run(capsys, "audit", "query", "--since", "2999-01-01T00:00", "--state", state)
    assert code == 0 and out == ""
    code, out, _ = run(capsys, "audit", "query", "--since", "2000-01-01", "--event", "key.create", "--state", state)
    assert len(out.splitlines()) == 3
    code, _, err = run(capsys, "audit", "query", "--since", "yesterday", "--state", state)
    assert code == 2 and "bad time 'yesterday'" in err


def test_state_defaults_to_env(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ZENLM_STATE", str(tmp_path / "env-state"))
    code, out, _ = run(capsys, "keys", "create", "--name", "e", "--scopes", "embed", "--json")
    assert code == 0
    assert KeyStore(tmp_path / "env-state").authenticate(json.loads(out)["key"]).name == "e"
