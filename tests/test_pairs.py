"""Parallel text: line-checked reading, the joint BPE, pair shards and token-budget batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import run_cli, write_number_pairs
from zenlm.data.pairs import PAD, PairsConfig, PairShards, prepare_pairs, read_pairs
from zenlm.errors import DataError


def _write(tmp_path, a: str, b: str):
    (tmp_path / "a.txt").write_text(a, encoding="utf-8")
    (tmp_path / "b.txt").write_text(b, encoding="utf-8")
    return tmp_path / "a.txt", tmp_path / "b.txt"


def test_mismatched_line_count_names_the_line(tmp_path):
    a, b = _write(tmp_path, "x\ny\nz\n", "X\nY\n")
    with pytest.raises(DataError, match=r"a\.txt has 3 lines but .*b\.txt has 2: line 3 has no counterpart"):
        read_pairs(a, b)


def test_empty_line_on_one_side_names_the_line(tmp_path):
    a, b = _write(tmp_path, "x\ny\n\nw\n", "X\nY\nZ\nW\n")
    with pytest.raises(DataError, match=r"line 3 is empty in .*a\.txt but not in .*b\.txt"):
        read_pairs(a, b)
    a, b = _write(tmp_path, "x\ny\nz\n", "X\n   \nZ\n")
    with pytest.raises(DataError, match=r"line 2 is empty in .*b\.txt"):
        read_pairs(a, b)


def test_lines_empty_on_both_sides_are_skipped(tmp_path):
    a, b = _write(tmp_path, "x\n\ny\n", "X\n\nY\n")
    assert read_pairs(a, b) == (["x", "y"], ["X", "Y"])


def test_cli_reports_the_line_and_exits_2(tmp_path):
    a, b = _write(tmp_path, "x\ny\n", "X\n\n")
    res = run_cli("prepare", "--pairs", a, b, "--out", tmp_path / "out")
    assert res.returncode == 2
    assert "line 2 is empty" in res.stderr and "Traceback" not in res.stderr


def test_prepare_pairs_round_trips_every_sentence(tmp_path):
    src, tgt = write_number_pairs(tmp_path / "raw", n=200)
    man = prepare_pairs(PairsConfig(src=str(src), tgt=str(tgt), out=str(tmp_path / "d"),
                                    vocab_size=400, val_fraction=0.1), log=lambda *a: None)
    assert man["train_pairs"] == 180 and man["val_pairs"] == 20
    assert json.loads((tmp_path / "d/manifest.json").read_text()) == man
    data = PairShards(tmp_path / "d")
    from zenlm.tokenizer import Tokenizer

    tok = Tokenizer.load(tmp_path / "d/tokenizer.json")
    assert tok.hf.token_to_id(PAD) == data.pad_id and tok.eot_id == data.eot_id
    lines_src = src.read_text().splitlines()
    lines_tgt = tgt.read_text().splitlines()
    for i in range(180):  # one joint vocabulary: both languages come back exactly
        assert tok.decode(data.sentence("train", "src", i)) == lines_src[i]
        assert tok.decode(data.sentence("train", "tgt", i)) == lines_tgt[i]
    assert tok.decode(data.sentence("val", "tgt", 19)) == lines_tgt[199]
    # German words are in the vocabulary as whole tokens too: the BPE saw both sides
    assert len(tok.encode(" sieben")) == 1 and len(tok.encode(" seven")) == 1


def test_budget_batches_group_by_length_and_keep_the_budget(tmp_path):
    src, tgt = write_number_pairs(tmp_path / "raw", n=300)
    prepare_pairs(PairsConfig(src=str(src), tgt=str(tgt), out=str(tmp_path / "d"), vocab_size=300),
                  log=lambda *a: None)
    data = PairShards(tmp_path / "d")
    batches = data.budget_batches("train", max_tokens=120, max_len=48)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(len(data)))  # every pair once
    for idx in batches:
        src_b, mask, tgt_in, labels = data.collate("train", idx, 48)
        assert max(src_b.shape[1], tgt_in.shape[1]) * len(idx) <= 120 or len(idx) == 1
        assert (mask.sum(1) == (src_b != data.pad_id).sum(1)).all()
        assert (tgt_in[:, 0] == data.eot_id).all()
        # the decoder learns the next token: labels are the inputs shifted by one
        real = labels != -100
        inner = real[:, 1:]  # label j is a target token (not the end token)
        assert (tgt_in[:, 1:][inner] == labels[:, :-1][inner]).all()
        assert (labels.gather(1, real.sum(1, keepdim=True) - 1) == data.eot_id).all()
    spread = [int(data.lengths("train", "tgt")[idx].max() - data.lengths("train", "tgt")[idx].min())
              for idx in batches if len(idx) > 1]
    assert np.mean(spread) <= 2  # grouped by length: little padding
    short = data.budget_batches("train", max_tokens=120, max_len=6)
    assert all(max(len(data.sentence("train", "src", i)), len(data.sentence("train", "tgt", i))) + 1 <= 6
               for idx in short for i in idx)


def test_text_shards_are_not_pairs(tmp_path, corpus_file):
    from zenlm.data.shards import PrepareConfig, prepare

    prepare(PrepareConfig(inputs=[str(corpus_file)], out=str(tmp_path / "t"), vocab_size=300), log=lambda *a: None)
    with pytest.raises(DataError, match="no sentence pairs"):
        PairShards(tmp_path / "t")
