"""Raw text -> shards: tail and docs splits, JSONL fields, manifests, and the loaders over them."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from zenlm.data.loader import TokenShards
from zenlm.data.shards import PrepareConfig, prepare, split_natural
from zenlm.data.sources import doc_in_val
from zenlm.errors import DataError
from zenlm.tokenizer import EOT, Tokenizer


def quiet(*a, **k):
    pass


def shard_ids(out, side: str) -> np.ndarray:
    manifest = json.loads((out / "manifest.json").read_text())
    return np.fromfile(out / f"{side}.bin", dtype=np.dtype(manifest["dtype"]))


def docs_of(tok: Tokenizer, ids: np.ndarray) -> list[str]:
    """The documents in a shard: text between end-of-text separators (each doc starts with one)."""
    text = tok.decode(ids.tolist())
    assert text.startswith(EOT)
    return text.split(EOT)[1:]


def _prep(tmp_path, inputs, name="out", **kw):
    out = tmp_path / name
    manifest = prepare(PrepareConfig(inputs=[str(i) for i in inputs], out=str(out), **kw), log=quiet)
    return out, manifest


# ----------------------------------------------------------------------------------------------
# one text file: the tail split


def _check_tail_split(out, manifest, text: str):
    tok = Tokenizer.load(out)
    assert manifest["val_split"] == "tail"
    train, val = shard_ids(out, "train"), shard_ids(out, "val")
    (head,), (tail,) = docs_of(tok, train), docs_of(tok, val)
    assert head + tail == text  # nothing lost, nothing repeated, order kept
    assert head.endswith("\n")  # cut at a line break
    total = len(text.encode())
    assert manifest["train_bytes"] == len(head.encode()) and manifest["val_bytes"] == len(tail.encode())
    assert manifest["train_bytes"] + manifest["val_bytes"] == total
    assert 0.07 <= manifest["val_bytes"] / total <= 0.1  # the last ~10%, cut at the next boundary
    # split_natural pieces encode exactly like the whole text
    assert train.tolist() == [tok.eot_id] + tok.encode(head)
    assert val.tolist() == [tok.eot_id] + tok.encode(tail)


def test_prepare_text_file_tail_split(tmp_path, corpus_file, corpus_text):
    out, manifest = _prep(tmp_path, [corpus_file], vocab_size=384)
    _check_tail_split(out, manifest, corpus_text)


def test_prepare_shakespeare_tail_split(tmp_path, shakespeare_file, shakespeare_text):
    out, manifest = _prep(tmp_path, [shakespeare_file], vocab_size=384)
    _check_tail_split(out, manifest, shakespeare_text)
    assert shard_ids(out, "val").size > 1000


def test_prepare_tail_split_with_multibyte_text(tmp_path):
    lines = [f"{i} 世界のテキスト🎉 é\u0301 line {i}\n" + ("  indented\n" if i % 3 == 0 else "") for i in range(3000)]
    text = "".join(lines)
    corpus = tmp_path / "utf8.txt"
    corpus.write_text(text, encoding="utf-8")
    out, manifest = _prep(tmp_path, [corpus], vocab_size=300)
    _check_tail_split(out, manifest, text)


def test_split_natural_cuts_only_where_tokens_break(tokenizer, corpus_text):
    pieces = split_natural(corpus_text, every=5000)
    assert len(pieces) > 10 and "".join(pieces) == corpus_text
    assert all(p.endswith("\n") for p in pieces[:-1])
    joined = [i for p in pieces for i in tokenizer.encode(p)]
    assert joined == tokenizer.encode(corpus_text)


# ----------------------------------------------------------------------------------------------
# folders and JSONL: the docs split


def _doc_folder(tmp_path, n=60):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    texts = {}
    for i in range(n):
        p = folder / ("sub" if i % 2 else "") / f"doc{i:03d}.txt"
        texts[p] = f"Document {i}.\n" + f"line {i} of some text about item {i * 7}\n" * (5 + i % 4)
        p.write_text(texts[p])
    (folder / ".hidden").write_text("never read\n")
    (folder / "empty.txt").write_text("")
    return folder, texts


def test_prepare_folder_docs_split(tmp_path):
    folder, texts = _doc_folder(tmp_path)
    out, manifest = _prep(tmp_path, [folder], vocab_size=300)
    assert manifest["val_split"] == "docs"  # auto: many documents
    tok = Tokenizer.load(out)
    order = sorted(texts)  # sources are read in sorted path order
    in_val = {p: doc_in_val(p.name + str(p.stat().st_size), 0.1) for p in order}
    want_val = [texts[p] for p in order if in_val[p]]
    want_train = [texts[p] for p in order if not in_val[p]]
    assert 0 < len(want_val) < len(order)
    assert docs_of(tok, shard_ids(out, "val")) == want_val
    assert docs_of(tok, shard_ids(out, "train")) == want_train
    paths = [s["path"] for s in manifest["sources"]]
    assert not any(".hidden" in p or "empty.txt" in p for p in paths)
    assert len(paths) == len(texts)


def test_prepare_docs_split_is_stable(tmp_path):
    folder, _ = _doc_folder(tmp_path)
    a, _ = _prep(tmp_path, [folder], name="a", vocab_size=300)
    b, _ = _prep(tmp_path, [folder], name="b", vocab_size=300)
    for side in ("train", "val"):
        assert (a / f"{side}.bin").read_bytes() == (b / f"{side}.bin").read_bytes()


def test_prepare_folder_with_suffix_filter(tmp_path):
    folder, texts = _doc_folder(tmp_path, n=8)
    (folder / "notes.md").write_text("# not wanted\n" * 50)
    out, manifest = _prep(tmp_path, [folder], vocab_size=300, suffixes=(".txt",), val_split="tail",
                          val_fraction=0.4)
    assert all(s["path"].endswith(".txt") for s in manifest["sources"])
    assert "not wanted" not in Tokenizer.load(out).decode(shard_ids(out, "train").tolist())


def test_prepare_jsonl_with_named_field(tmp_path):
    records = [{"id": i, "body": f"record {i}: ünïcode 世界 {'x' * (i % 7)}\nsecond line {i}"} for i in range(30)]
    corpus = tmp_path / "data.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 5 else "") for i, r in enumerate(records)))
    out, manifest = _prep(tmp_path, [corpus], vocab_size=300, field="body")
    assert manifest["field"] == "body" and manifest["val_split"] == "tail"  # few records: tail
    tok = Tokenizer.load(out)
    train, val = docs_of(tok, shard_ids(out, "train")), docs_of(tok, shard_ids(out, "val"))
    assert train + val == [r["body"] for r in records]  # one document per record, in order
    assert len(val) == 3  # the last 10% of records


def test_prepare_many_jsonl_records_uses_docs_split(tmp_path):
    records = [{"text": f"record number {i} says hello"} for i in range(200)]
    corpus = tmp_path / "many.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    out, manifest = _prep(tmp_path, [corpus], vocab_size=300)
    assert manifest["val_split"] == "docs"
    tok = Tokenizer.load(out)
    val = docs_of(tok, shard_ids(out, "val"))
    assert val == [r["text"] for i, r in enumerate(records) if doc_in_val(f"many.jsonl:{i}", 0.1)]
    assert 5 < len(val) < 40


def test_jsonl_missing_field_names_it(tmp_path):
    corpus = tmp_path / "data.jsonl"
    corpus.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(DataError, match=r"data\.jsonl:1 has no field 'content'"):
        _prep(tmp_path, [corpus], vocab_size=300, field="content")


def test_jsonl_bad_line_and_bad_value(tmp_path):
    corpus = tmp_path / "data.jsonl"
    corpus.write_text(json.dumps({"text": "ok"}) + "\n{broken\n")
    with pytest.raises(DataError, match=r"data\.jsonl:2 is not valid JSON"):
        _prep(tmp_path, [corpus], vocab_size=300)
    corpus.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match="is not a string"):
        _prep(tmp_path, [corpus], vocab_size=300)


# ----------------------------------------------------------------------------------------------
# manifests


def test_manifest_fields(prepared, corpus_file):
    m = json.loads((prepared / "manifest.json").read_text())
    assert m["format"] == "zenlm-shards/1"
    assert m["dtype"] == "uint16"  # the vocabulary fits
    itemsize = np.dtype(m["dtype"]).itemsize
    for side in ("train", "val"):
        assert m[f"{side}_tokens"] * itemsize == (prepared / f"{side}.bin").stat().st_size
        assert m[f"{side}_tokens"] > 0
    tok = Tokenizer.load(prepared)
    assert m["vocab_size"] == tok.vocab_size
    assert m["tokenizer_sha256"] == tok.sha256
    assert m["tokenizer_sha256"] == hashlib.sha256((prepared / "tokenizer.json").read_bytes()).hexdigest()
    (src,) = m["sources"]
    assert src["path"] == str(corpus_file)
    assert src["bytes"] == corpus_file.stat().st_size
    assert src["sha256"] == hashlib.sha256(corpus_file.read_bytes()).hexdigest()
    assert m["val_fraction"] == 0.1
    ids = np.concatenate([shard_ids(prepared, "train"), shard_ids(prepared, "val")])
    assert ids.max() < tok.vocab_size
    assert not list(prepared.glob(".*.tmp"))


def test_prepare_with_an_existing_tokenizer(tmp_path, prepared, corpus_file):
    out, manifest = _prep(tmp_path, [corpus_file], tokenizer=str(prepared / "tokenizer.json"))
    assert manifest["tokenizer_sha256"] == json.loads((prepared / "manifest.json").read_text())["tokenizer_sha256"]
    assert (out / "train.bin").read_bytes() == (prepared / "train.bin").read_bytes()


def test_large_vocab_uses_uint32(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50)
    tok = Tokenizer.train(["hello world"], 300)
    # a vocabulary past 65536 ids: added tokens are enough to cross the uint16 range
    tok.hf.add_tokens([f"<extra_{i}>" for i in range(65_300)])
    tok.save(tmp_path / "big.json")
    out, manifest = _prep(tmp_path, [corpus], tokenizer=str(tmp_path / "big.json"))
    assert manifest["dtype"] == "uint32"
    assert (out / "train.bin").stat().st_size == manifest["train_tokens"] * 4


# ----------------------------------------------------------------------------------------------
# corpora that cannot be prepared


def test_missing_corpus(tmp_path):
    with pytest.raises(DataError, match="corpus not found"):
        _prep(tmp_path, [tmp_path / "nope.txt"], vocab_size=300)


def test_empty_corpus_file_and_folder(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="corpus is empty"):
        _prep(tmp_path, [empty], vocab_size=300)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / ".only_hidden").write_text("x\n")
    with pytest.raises(DataError, match="corpus is empty"):
        _prep(tmp_path, [folder], vocab_size=300)
    with pytest.raises(DataError, match="no corpus"):
        _prep(tmp_path, [], vocab_size=300)


def test_corpus_too_small_to_split(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("x")  # one byte: whichever side it goes to, the other is empty
    with pytest.raises(DataError, match="split of the corpus is empty"):
        _prep(tmp_path, [tiny], vocab_size=300)
    assert not list((tmp_path / "out").glob("*.bin*")) and not list((tmp_path / "out").glob(".*tmp"))


def test_bad_val_fraction(tmp_path, corpus_file):
    with pytest.raises(DataError, match="val_fraction"):
        _prep(tmp_path, [corpus_file], vocab_size=300, val_fraction=1.5)


# ----------------------------------------------------------------------------------------------
# loaders


def test_val_batches_are_deterministic_consecutive_windows(prepared):
    shards = TokenShards(prepared)
    a = list(shards.val_batches(4, 32))
    b = list(shards.val_batches(4, 32))
    assert len(a) == len(b) > 1
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    val = torch.from_numpy(shard_ids(prepared, "val").astype(np.int64))
    xs = torch.cat([x for x, _ in a])
    ys = torch.cat([y for _, y in a])
    n = (len(val) - 1) // 32
    assert xs.shape == (n, 32)
    for i in range(n):
        assert torch.equal(xs[i], val[i * 32:(i + 1) * 32])
        assert torch.equal(ys[i], val[i * 32 + 1:(i + 1) * 32 + 1])
    limited = list(shards.val_batches(4, 32, max_batches=2))
    assert len(limited) == 2 and all(torch.equal(p[0], q[0]) for p, q in zip(limited, a))


def test_train_batch_is_reproducible_from_generator_state(prepared):
    shards = TokenShards(prepared)
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    x1, y1 = shards.train_batch(8, 32, g)
    x2, _ = shards.train_batch(8, 32, g)
    assert not torch.equal(x1, x2)
    g.set_state(state)
    x1b, y1b = shards.train_batch(8, 32, g)
    assert torch.equal(x1, x1b) and torch.equal(y1, y1b)
    # windows: y is x shifted by one, both read from the train split
    assert x1.shape == y1.shape == (8, 32) and x1.dtype == torch.int64
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    train = shard_ids(prepared, "train").astype(np.int64)
    for row_x, row_y in zip(x1.numpy(), y1.numpy()):
        starts = np.flatnonzero(train[: len(train) - 32] == row_x[0])
        assert any(np.array_equal(train[s:s + 33], np.r_[row_x, row_y[-1]]) for s in starts)


def test_shards_refuse_missing_or_truncated_files(tmp_path, prepared):
    with pytest.raises(DataError, match="no prepared data"):
        TokenShards(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    with open(copy / "train.bin", "r+b") as f:
        f.truncate((copy / "train.bin").stat().st_size - 2)
    with pytest.raises(DataError, match="does not match its manifest"):
        TokenShards(copy)
    (copy / "val.bin").unlink()
    shutil.copy(prepared / "train.bin", copy / "train.bin")
    with pytest.raises(DataError, match="val.bin is missing"):
        TokenShards(copy)


def test_windows_longer_than_a_split(prepared):
    shards = TokenShards(prepared)
    n = shards.manifest["val_tokens"]
    with pytest.raises(DataError, match="fewer than one window"):
        list(shards.val_batches(1, n + 5))
    with pytest.raises(DataError, match="fewer than one window"):
        shards.train_batch(1, shards.manifest["train_tokens"], torch.Generator())
    assert shards.bytes_per_token("train") > 1.0
