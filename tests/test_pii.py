"""PII scrubbing: each kind found and replaced, Luhn-valid card numbers only, ordinary numbers,
dates, times, versions and code left alone; counts in the data manifest and the run summary."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli
from zenlm.data.pii import Scrubber, luhn_ok, scrub

CASES = {
    "email": ["john.doe+news@example.co.uk", "JANE_99@mail.example.org", "a@b.io"],
    "phone": ["+1 (555) 123-4567", "+44 20 7946 0958", "+33 6 12 34 56 78", "+4915123456789",
              "(555) 123-4567", "555-123-4567", "555.123.4567", "020 7946 0958", "030 12345678",
              "06 12 34 56 78", "0171-1234567"],
    "ipv4": ["192.168.1.20", "10.0.0.1", "8.8.8.8", "255.255.255.255"],
    "ipv6": ["2001:db8::8a2e:370:7334", "fe80::1", "::ffff:10.0.0.1",
             "2001:0db8:85a3:0000:0000:8a2e:0370:7334"],
    # issuers' published test numbers: Visa, Mastercard, Amex, Discover, JCB; spaces or hyphens
    "card": ["4111 1111 1111 1111", "5555-5555-5555-4444", "378282246310005", "6011111111111117",
             "3530111333300000", "4012888888881881"],
}
TOKEN = {"email": "<EMAIL>", "phone": "<PHONE>", "ipv4": "<IP>", "ipv6": "<IP>", "card": "<CARD>"}

ORDINARY = [
    "1234567890123456",  # 16 digits that fail Luhn
    "4111 1111 1111 1112", "5555-5555-5555-4445",  # card-shaped, one digit off
    "0000 0000 0000 0000",  # passes Luhn, but no issuer starts with 0
    "2024-01-15", "12/03/2024", "01-02-2024", "01/02/2024", "2024.01.15", "10:30:45", "12:30",
    "version 1.2.3", "Python 3.12.1", "x[::2]", "y[1::2]", "a::b", "3.14159", "1,234,567",
    "$12.50", "+5 points", "0.5", "0x1F", "order #1234567", "ISBN 978-3-16-148410-0", "year 1999",
    "port 8080", "room 12345", "call me maybe", "user@localhost", "1e-10",
]


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_kind_is_found_and_replaced(kind):
    for value in CASES[kind]:
        text = f"contact: {value}, thanks."
        out, counts = scrub(text)
        assert out == f"contact: {TOKEN[kind]}, thanks.", value
        assert counts[kind] == 1 and sum(counts.values()) == 1, (value, counts)


def test_luhn_and_card_numbers():
    for number in CASES["card"]:
        digits = number.replace(" ", "").replace("-", "")
        assert luhn_ok(digits)
        for d in "0123456789":  # changing the check digit breaks it, except to itself
            other = digits[:-1] + d
            assert luhn_ok(other) == (other == digits)
            assert ("<CARD>" in scrub(other)[0]) == (other == digits)
    # a random 16-digit number is a card only when Luhn says so
    import random

    rng = random.Random(0)
    for _ in range(200):
        n = str(rng.randrange(4 * 10**15, 5 * 10**15))
        assert ("<CARD>" in scrub(f"id {n}")[0]) == luhn_ok(n)


def test_ordinary_numbers_dates_times_and_code_are_left_alone():
    for text in ORDINARY:
        out, counts = scrub(text)
        assert out == text and sum(counts.values()) == 0, (text, counts)


def test_counts_accumulate_over_texts():
    s = Scrubber()
    s("mail a@example.com or b@example.com")
    s("server 10.1.2.3, card 4111-1111-1111-1111")
    assert s.summary()["counts"] == {"email": 2, "card": 1, "ipv6": 0, "ipv4": 1, "phone": 0}
    assert s.summary()["total"] == 4


def _planted_corpus(tmp_path, corpus_text):
    planted = ("Write to alice.smith@example.com or call +44 20 7946 0958.\n"
               "Payment card 4111 1111 1111 1111 from 203.0.113.7.\n")
    path = tmp_path / "corpus.txt"
    # the PII in the train part (the head of the file): a tail split keeps it there
    path.write_text(planted * 5 + corpus_text[:60_000], encoding="utf-8")
    return path


def test_prepare_scrubs_and_the_manifest_counts(tmp_path, corpus_text):
    from zenlm.data.shards import PrepareConfig, prepare
    from zenlm.tokenizer import Tokenizer

    path = _planted_corpus(tmp_path, corpus_text)
    expected = scrub(path.read_text())[1]
    assert expected["email"] >= 5 and expected["phone"] >= 5 and expected["card"] == 5 and expected["ipv4"] >= 5
    out = tmp_path / "data"
    manifest = prepare(PrepareConfig(inputs=[str(path)], out=str(out), vocab_size=384, scrub_pii=True,
                                     val_split="tail"), log=lambda *a: None)
    assert manifest["pii"]["scrubbed"] and manifest["pii"]["counts"] == expected
    assert json.loads((out / "manifest.json").read_text())["pii"] == manifest["pii"]
    import numpy as np

    tok = Tokenizer.load(out / "tokenizer.json")
    text = tok.decode(np.fromfile(out / "train.bin", dtype=manifest["dtype"]).tolist())
    assert "alice.smith@example.com" not in text and "4111 1111" not in text and "203.0.113.7" not in text
    assert text.count("<EMAIL>") == expected["email"] and "<CARD>" in text and "<PHONE>" in text
    # without the flag the text is kept as it is
    plain = prepare(PrepareConfig(inputs=[str(path)], out=str(tmp_path / "plain"), vocab_size=384,
                                  val_split="tail"), log=lambda *a: None)
    assert plain["pii"] == {"scrubbed": False}
    tok = Tokenizer.load(tmp_path / "plain" / "tokenizer.json")
    assert "alice.smith@example.com" in tok.decode(
        np.fromfile(tmp_path / "plain" / "train.bin", dtype=plain["dtype"]).tolist())


def test_cli_prepare_scrub_pii_reaches_the_run_summary_and_card(tmp_path, corpus_text, make_cfg, monkeypatch):
    from zenlm.privacy.card import read_card
    from zenlm.train.loop import pretrain

    monkeypatch.setenv("ZENLM_HOME", str(tmp_path / "home"))
    path = _planted_corpus(tmp_path, corpus_text)
    r = run_cli("prepare", path, "--out", tmp_path / "data", "--vocab-size", 384, "--scrub-pii",
                "--val-split", "tail")
    assert r.returncode == 0, r.stderr
    assert "PII scrubbed: 5 email" in r.stdout
    pii = json.loads((tmp_path / "data" / "manifest.json").read_text())["pii"]
    summary = pretrain(make_cfg(tmp_path / "run", data_dir=tmp_path / "data", max_steps=2),
                       log=lambda *a: None)
    assert summary["data_pii"] == pii
    assert read_card(tmp_path / "run")["data"][0]["pii"] == pii
