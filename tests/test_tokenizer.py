"""Byte-level BPE: exact round trips on any text, save/load, the vocabulary floor, byte lengths."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from zenlm.errors import TokenizerError
from zenlm.tokenizer import EOT, Tokenizer, byte_level_alphabet

# Text with what breaks naive tokenizers: emoji (4-byte UTF-8, ZWJ sequences), CJK, combining
# marks, control characters and runs of mixed whitespace.
_pieces = st.one_of(
    st.text(),
    st.sampled_from(["🎉", "👩‍👩‍👧", "🇫🇷", "世界", "日本語のテキスト", "é", "e\u0301", "\u200b", "\x00",
                     "\r\n", "\t\t", "   ", "\n\n\n", " \n \t\n", "\u3000", "\ufffd", "ﬁ"]),
    st.text(alphabet=st.sampled_from(" \t\n\r\x0b\x0c\u00a0\u2028"), min_size=1, max_size=12),
)
any_text = st.lists(_pieces, max_size=8).map("".join)
settings_ = settings(max_examples=200, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings_
@given(text=any_text)
@example(text="")
@example(text="héllo 世界 🎉  \n\n\t  x")
@example(text="    def f(x):\n\treturn x  \n")
def test_encode_decode_round_trips_any_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


@settings_
@given(text=any_text)
def test_token_byte_lengths_sum_to_utf8_length(tokenizer, text):
    ids = tokenizer.encode(text)
    lengths = tokenizer.token_byte_lengths()
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


def test_token_byte_lengths_match_each_decoded_token(tokenizer):
    lengths = tokenizer.token_byte_lengths()
    assert lengths.shape == (tokenizer.vocab_size,)
    assert lengths[tokenizer.eot_id] == 0
    table = byte_level_alphabet()
    for token, idx in tokenizer.hf.get_vocab().items():
        if idx == tokenizer.eot_id:
            continue
        raw = bytes(table[ch] for ch in token)
        assert lengths[idx] == len(raw) >= 1, token


def test_byte_level_alphabet_is_a_bijection_onto_bytes():
    table = byte_level_alphabet()
    assert sorted(table.values()) == list(range(256))
    assert all(not ch.isspace() and ch.isprintable() for ch in table)


def test_corpus_round_trip_and_compression(tokenizer, corpus_text):
    ids = tokenizer.encode(corpus_text)
    assert tokenizer.decode(ids) == corpus_text
    # merges were learned: fewer tokens than bytes on the text it was trained on
    assert len(ids) < 0.75 * len(corpus_text.encode())


def test_special_token_is_one_id_and_decodes_back(tokenizer):
    assert tokenizer.eot_id is not None
    assert tokenizer.hf.id_to_token(tokenizer.eot_id) == EOT
    ids = tokenizer.encode(f"a{EOT}b")
    assert ids.count(tokenizer.eot_id) == 1
    assert tokenizer.decode(ids) == f"a{EOT}b"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"


def test_save_load_round_trip_gives_identical_ids(tokenizer, corpus_text, tmp_path):
    path = tokenizer.save(tmp_path / "tokenizer.json")
    json.loads(path.read_text())  # a real tokenizer.json
    again = Tokenizer.load(path)
    folder = Tokenizer.load(tmp_path)  # a folder holding tokenizer.json works too
    sample = corpus_text[:20_000] + " 世界 🎉 \t\n"
    assert again.encode(sample) == tokenizer.encode(sample) == folder.encode(sample)
    assert again.vocab_size == tokenizer.vocab_size
    assert again.eot_id == tokenizer.eot_id
    assert again.sha256 == tokenizer.sha256
    assert np.array_equal(again.token_byte_lengths(), tokenizer.token_byte_lengths())
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


def test_training_is_deterministic(corpus_text):
    a = Tokenizer.train([corpus_text[:50_000]], 300)
    b = Tokenizer.train([corpus_text[:50_000]], 300)
    assert a.sha256 == b.sha256


def test_trained_vocabulary_has_the_requested_size(tokenizer):
    from helpers import VOCAB

    assert tokenizer.vocab_size == VOCAB


@pytest.mark.parametrize("vocab", [0, 100, 256])
def test_vocab_too_small_raises(vocab):
    with pytest.raises(TokenizerError, match="too small"):
        Tokenizer.train(["hello world"], vocab)


def test_vocab_floor_counts_special_tokens():
    with pytest.raises(TokenizerError, match="at least 259"):
        Tokenizer.train(["hello world"], 258, special_tokens=[EOT, "<a>", "<b>"])
    tok = Tokenizer.train(["hello world"], 259, special_tokens=[EOT, "<a>", "<b>"])
    assert tok.vocab_size == 259  # just the bytes and the three specials


def test_load_missing_or_corrupt_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer.load(bad)


@settings_
@given(text=any_text)
def test_stream_decoder_pieces_join_to_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    dec = tokenizer.stream_decode()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    # no piece ever shows a replacement character that the text does not hold
    if "\ufffd" not in text:
        assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_survives_long_streams(tokenizer, corpus_text):
    text = corpus_text[:3000] + "世界🎉" * 50  # past the 64-id window, with multi-byte chars
    ids = tokenizer.encode(text)
    dec = tokenizer.stream_decode()
    assert "".join(dec.push(i) for i in ids) + dec.flush() == text
