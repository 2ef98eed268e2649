"""Encryption at rest: round trips of files, checkpoints and real run folders; every kind of
tampering (wrong key, a changed byte anywhere, truncation, appended bytes, moved chunks, blobs
swapped between sealed folders) is a clear CryptError, never plaintext; loading is transparent."""

from __future__ import annotations

import os
import shutil
import stat

import pytest
import torch

import zenlm
from helpers import run_cli
from zenlm import crypt
from zenlm.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from zenlm.crypt import HEADER_SIZE, Key, TAG
from zenlm.errors import CheckpointError, CryptError
from zenlm.io import sha256_file

FULL = (1 << crypt.CHUNK_LOG2) + TAG + 4  # one full chunk record on disk


def quiet(*a, **k):
    pass


@pytest.fixture
def key() -> Key:
    return Key(raw=os.urandom(32))


@pytest.fixture
def sealed(key):
    """Plaintext of three full chunks and a part, and its sealed bytes."""
    data = os.urandom(3 * (1 << crypt.CHUNK_LOG2) + 1234)
    return data, crypt.seal_bytes(data, key)


def fails(blob: bytes, key, match: str) -> str:
    with pytest.raises(CryptError, match=match) as exc:
        crypt.unseal_bytes(blob, key, "f")
    return str(exc.value)


def records(blob: bytes) -> list[bytes]:
    body, out = blob[HEADER_SIZE:], []
    while body:
        n = int.from_bytes(body[:4], "big")
        out.append(body[:4 + n])
        body = body[4 + n:]
    return out


# ----------------------------------------------------------------------------------------------
# the format


@pytest.mark.parametrize("size", [0, 1, (1 << 16) - 1, 1 << 16, 2 << 16, 300_001])
def test_files_round_trip_streamed(tmp_path, key, size):
    src = tmp_path / "plain.bin"
    src.write_bytes(os.urandom(size))
    crypt.encrypt_file(src, tmp_path / "sealed.zenc", key)
    blob = (tmp_path / "sealed.zenc").read_bytes()
    # the final chunk is always shorter than a full one (empty when the data ends on a boundary)
    n_chunks = size // (1 << 16) + 1
    assert len(blob) == HEADER_SIZE + size + n_chunks * (TAG + 4)
    assert len(records(blob)) == n_chunks
    crypt.decrypt_file(tmp_path / "sealed.zenc", tmp_path / "back.bin", key)
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    if size >= 64:  # the ciphertext shows nothing of the plaintext
        assert src.read_bytes()[:64] not in blob


def test_each_file_gets_fresh_randomness(key):
    a, b = crypt.seal_bytes(b"same" * 100, key), crypt.seal_bytes(b"same" * 100, key)
    assert a != b and a[HEADER_SIZE:] != b[HEADER_SIZE:]


def test_key_sources(tmp_path, monkeypatch):
    k = crypt.new_key_file(tmp_path / "k.key")
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600
    assert len((tmp_path / "k.key").read_text().strip()) == 64
    with pytest.raises(CryptError, match="already exists"):
        crypt.new_key_file(tmp_path / "k.key")
    blob = crypt.seal_bytes(b"secret weights", k)
    # the same key as hex file, raw 32-byte file, environment variable
    raw = bytes.fromhex((tmp_path / "k.key").read_text())
    (tmp_path / "raw.key").write_bytes(raw)
    assert crypt.unseal_bytes(blob, crypt.read_key_file(tmp_path / "k.key")) == b"secret weights"
    assert crypt.unseal_bytes(blob, crypt.read_key_file(tmp_path / "raw.key")) == b"secret weights"
    monkeypatch.setenv("ZENLM_KEY", raw.hex())
    assert crypt.unseal_bytes(blob, crypt.resolve_key()) == b"secret weights"
    monkeypatch.delenv("ZENLM_KEY")
    with pytest.raises(CryptError, match="no key given"):
        crypt.resolve_key()
    (tmp_path / "bad.key").write_text("not a key\n")
    with pytest.raises(CryptError, match="neither 32 raw bytes nor 64 hex"):
        crypt.read_key_file(tmp_path / "bad.key")
    # a passphrase: scrypt with its salt and cost in the header
    sealed = crypt.seal_bytes(b"x" * 1000, Key(passphrase="correct horse"))
    h = crypt.read_header(__import__("io").BytesIO(sealed), "f")
    assert h["kdf_name"].startswith("passphrase") and h["scrypt"] == crypt.SCRYPT
    assert crypt.unseal_bytes(sealed, Key(passphrase="correct horse")) == b"x" * 1000
    fails(sealed, Key(passphrase="wrong horse"), "wrong key")
    fails(sealed, k, "sealed with a passphrase")


def test_wrong_key_is_named_and_leaves_no_output(tmp_path, key, sealed):
    fails(sealed[1], Key(raw=os.urandom(32)), "wrong key")
    (tmp_path / "s.zenc").write_bytes(sealed[1])
    with pytest.raises(CryptError, match="wrong key"):
        crypt.decrypt_file(tmp_path / "s.zenc", tmp_path / "out.bin", Key(raw=os.urandom(32)))
    assert not (tmp_path / "out.bin").exists() and os.listdir(tmp_path) == ["s.zenc"]


def test_a_changed_byte_anywhere_is_caught(key, sealed):
    data, blob = sealed
    # every byte of the header: magic, version, KDF fields, salt, file id, nonce prefix, key
    # check, header MAC
    messages = set()
    for i in range(HEADER_SIZE):
        b = bytearray(blob)
        b[i] ^= 0x01
        messages.add(fails(bytes(b), key, "."))
    assert any("not a zenlm encrypted file" in m for m in messages)
    assert any("header was modified" in m for m in messages)
    assert any("version" in m for m in messages)
    # inside chunks (first, middle, final), in their tags, and in a length field
    offsets = {"chunk 0": HEADER_SIZE + 4 + 10, "chunk 1": HEADER_SIZE + FULL + 4 + 5000,
               "chunk 3": len(blob) - 500}
    for where, at in offsets.items():
        b = bytearray(blob)
        b[at] ^= 0x80
        assert where in fails(bytes(b), key, "fails authentication: its bytes were modified")
    for tag_end in (HEADER_SIZE + FULL, HEADER_SIZE + 2 * FULL, len(blob)):  # last byte of a tag
        b = bytearray(blob)
        b[tag_end - 1] ^= 0x01
        fails(bytes(b), key, "fails authentication")
    b = bytearray(blob)
    b[HEADER_SIZE + 3] ^= 0x01  # the length of chunk 0
    fails(bytes(b), key, "chunk 0")
    assert crypt.unseal_bytes(blob, key) == data  # the original still opens


def test_truncation_and_appended_bytes(key, sealed):
    _, blob = sealed
    fails(blob[:HEADER_SIZE - 3], key, "truncated: its header is incomplete")
    fails(blob[:HEADER_SIZE], key, "holds no chunk")
    for n in (1, 2, 3):  # ends exactly after a full chunk: the final one is missing
        fails(blob[:HEADER_SIZE + n * FULL], key, f"ends after chunk {n - 1} without its final chunk")
    fails(blob[:HEADER_SIZE + FULL + 2], key, "truncated in the middle of chunk 1")
    fails(blob[:-1], key, "truncated in the middle of chunk 3")
    fails(blob + b"\0", key, "appended after its final chunk")
    fails(blob + records(blob)[-1], key, "appended after its final chunk")


def test_reordered_duplicated_and_foreign_chunks(key, sealed):
    _, blob = sealed
    head, recs = blob[:HEADER_SIZE], records(blob)
    fails(head + b"".join([recs[1], recs[0], *recs[2:]]), key, "chunk 0 is chunk 1 of this file: chunks were reordered")
    fails(head + b"".join([recs[0], recs[0], *recs[2:]]), key, "chunk 1 is chunk 0 of this file")
    fails(head + b"".join([recs[0], recs[2], recs[1], recs[3]]), key, "chunk 1 is chunk 2")
    fails(head + b"".join([recs[0], recs[1], recs[3]]), key, "chunk 2 is chunk 3")  # one dropped
    other = records(crypt.seal_bytes(os.urandom(len(blob)), key))  # same key, another file
    fails(head + b"".join([recs[0], other[1], *recs[2:]]), key, "chunk 1 fails authentication")
    # a whole header of another file in front of this file's chunks
    fails(crypt.seal_bytes(b"y" * 10, key)[:HEADER_SIZE] + blob[HEADER_SIZE:], key, "chunk 0")


# ----------------------------------------------------------------------------------------------
# checkpoints and run folders


def test_sealed_checkpoint_round_trip(tmp_path, key):
    from zenlm.config import TransformerConfig, to_dict
    from zenlm.model import Transformer

    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=300, n_layer=1, n_head=2, n_kv_head=1,
                                          d_model=32, max_seq_len=16))
    state = {"step": 3, "note": torch.arange(5)}
    ckpt = save_checkpoint(tmp_path, 3, model.state_dict(), state, {"model": to_dict(model.config)}, key=key)
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json.zenc", "model.safetensors.zenc", "state.pt.zenc"]
    for p in ckpt.iterdir():
        raw = p.read_bytes()
        assert b"blocks" not in raw and b"tok_emb" not in raw and b"vocab_size" not in raw
    with pytest.raises(CheckpointError, match="is encrypted: give its key"):
        load_checkpoint(ckpt)
    with pytest.raises(CryptError, match="wrong key"):
        load_checkpoint(ckpt, key=Key(raw=os.urandom(32)))
    weights, back, meta = load_checkpoint(ckpt, key=key)
    assert meta["step"] == 3 and meta["encrypted"]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert torch.equal(back["note"], torch.arange(5))


def _logits(loaded, n=24):
    x = torch.arange(n).remainder(loaded.model.config.vocab_size)[None]
    with torch.no_grad():
        return loaded.model(x)


def _tree(folder):
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in folder.rglob("*") if p.is_file()}


def test_a_sealed_run_folder_reveals_nothing_and_loads_transparently(tmp_path, trained_run, loaded):
    key_file = tmp_path / "run.key"
    key = crypt.new_key_file(key_file)
    res = crypt.encrypt_folder(trained_run, tmp_path / "sealed", key)
    sealed = tmp_path / "sealed"
    assert res["files"] == len(_tree(trained_run))
    # no file names, tensor names or config anywhere: names or contents
    names = [p.name for p in sealed.iterdir()]
    assert "manifest.zenc" in names and all(n.endswith(".zenc") for n in names)
    leaks = [b"config", b"safetensors", b"tok_emb", b"blocks.0", b"step_", b"vocab_size", b"tokenizer",
             b"n_layer", b"metrics", b"summary", b"card"]
    for p in sealed.iterdir():
        raw = p.read_bytes()
        assert not any(w in raw for w in leaks), p
        assert not any(w.decode() in p.name for w in leaks), p
    # back again: the same tree, byte for byte
    crypt.decrypt_folder(sealed, tmp_path / "plain", key)
    assert _tree(tmp_path / "plain") == _tree(trained_run)
    # loading with the key gives the very same model; without it, a clear error
    with pytest.raises(CryptError, match="is encrypted: give its key"):
        zenlm.load(str(sealed))
    with pytest.raises(CryptError, match="wrong key"):
        zenlm.load(str(sealed), key_file=crypt_key_file(tmp_path))
    again = zenlm.load(str(sealed), key_file=str(key_file))
    assert again.source == str(sealed) and again.step == loaded.step
    assert torch.equal(_logits(again), _logits(loaded))
    assert again.tokenizer.encode("def f(x): return x") == loaded.tokenizer.encode("def f(x): return x")
    # a single sealed checkpoint file opens the same way
    ckpt = latest_checkpoint(trained_run) / "model.safetensors"
    crypt.encrypt_file(ckpt, tmp_path / "w.zenc", key)
    crypt.decrypt_file(tmp_path / "w.zenc", tmp_path / "w.safetensors", key)
    assert sha256_file(tmp_path / "w.safetensors") == sha256_file(ckpt)


def crypt_key_file(tmp_path):
    p = tmp_path / "other.key"
    if not p.exists():
        crypt.new_key_file(p)
    return str(p)


def test_blobs_swapped_between_sealed_folders_are_caught(tmp_path, trained_run, key):
    a, b = tmp_path / "a", tmp_path / "b"
    crypt.encrypt_folder(trained_run, a, key)
    crypt.encrypt_folder(trained_run, b, key)  # the same files under the same key
    ma = {e["path"]: e["blob"] for e in crypt.read_folder_manifest(a, key)["files"]}
    mb = {e["path"]: e["blob"] for e in crypt.read_folder_manifest(b, key)["files"]}
    assert set(ma.values()).isdisjoint(mb.values())  # opaque names, fresh for every folder
    # b's config.yaml put in the place of a's: each opens alone, but not as a's config.yaml
    shutil.copy(b / mb["config.yaml"], a / ma["config.yaml"])
    with pytest.raises(CryptError, match="holds another file than the one the manifest names "
                                         r"\(config.yaml\): swapped"):
        crypt.decrypt_folder(a, tmp_path / "out", key)
    assert not (tmp_path / "out").exists()
    # b's manifest in a: it names blobs a does not hold
    crypt.encrypt_folder(trained_run, a, key)
    shutil.copy(b / "manifest.zenc", a / "manifest.zenc")
    with pytest.raises(CryptError, match="is not named by the folder's manifest"):
        crypt.decrypt_folder(a, tmp_path / "out", key)
    # a missing blob, an added one
    crypt.encrypt_folder(trained_run, a, key)
    (a / ma_any(a, key)).unlink()
    with pytest.raises(CryptError, match="is missing"):
        crypt.decrypt_folder(a, tmp_path / "out", key)
    crypt.encrypt_folder(trained_run, a, key)
    shutil.copy(b / mb["config.yaml"], a / "0123.zenc")
    with pytest.raises(CryptError, match="0123.zenc is not named"):
        crypt.decrypt_folder(a, tmp_path / "out", key)


def ma_any(folder, key) -> str:
    return crypt.read_folder_manifest(folder, key)["files"][0]["blob"]


def test_training_writes_sealed_checkpoints_and_resumes_from_them(tmp_path, make_cfg, monkeypatch):
    from zenlm.data.loader import TokenShards
    from zenlm.train.loop import pretrain

    key_file = tmp_path / "train.key"
    crypt.new_key_file(key_file)
    cfg = lambda out, **kw: make_cfg(out, max_steps=6, ckpt_every=2, lr=1e-2, **kw)  # noqa: E731
    pretrain(cfg(tmp_path / "straight", encrypt_key_file=str(key_file)), log=quiet)
    real_batch, calls = TokenShards.train_batch, {"n": 0}

    def batch_then_crash(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("power cut")
        return real_batch(self, *a, **k)

    monkeypatch.setattr(TokenShards, "train_batch", batch_then_crash)
    with pytest.raises(RuntimeError, match="power cut"):
        pretrain(cfg(tmp_path / "crashed", encrypt_key_file=str(key_file)), log=quiet)
    monkeypatch.setattr(TokenShards, "train_batch", real_batch)
    ckpt = latest_checkpoint(tmp_path / "crashed")
    assert ckpt.name == "step_00000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json.zenc", "model.safetensors.zenc", "state.pt.zenc"]
    with pytest.raises(CheckpointError, match="is encrypted"):
        pretrain(cfg(tmp_path / "crashed"), resume=True, log=quiet)
    pretrain(cfg(tmp_path / "crashed", encrypt_key_file=str(key_file)), resume=True, log=quiet)
    with pytest.raises(CheckpointError, match="is encrypted: give its key"):
        zenlm.load(str(tmp_path / "crashed"))
    a = zenlm.load(str(tmp_path / "straight"), key_file=str(key_file))
    b = zenlm.load(str(tmp_path / "crashed"), key_file=str(key_file))
    assert a.step == b.step == 6
    assert torch.equal(_logits(a), _logits(b))  # resuming from sealed state is exact


def test_cli_encrypt_decrypt_and_generate_with_key_file(tmp_path, trained_run):
    key_file, sealed = tmp_path / "k.key", tmp_path / "sealed"
    r = run_cli("encrypt", trained_run, "--new-key-file", key_file, "--out", sealed)
    assert r.returncode == 0, r.stderr
    assert "new key in" in r.stdout and key_file.is_file()
    prompt = ["--prompt", "def ", "--greedy", "--max-new-tokens", "12"]
    plain = run_cli("generate", "--model", trained_run, *prompt)
    opened = run_cli("generate", "--model", sealed, "--key-file", key_file, *prompt)
    assert plain.returncode == 0 and opened.returncode == 0, opened.stderr
    assert opened.stdout == plain.stdout
    crypt.new_key_file(tmp_path / "wrong.key")
    r = run_cli("decrypt", sealed, "--key-file", tmp_path / "wrong.key", "--out", tmp_path / "plain")
    assert r.returncode == 2 and "wrong key" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "plain").exists()
    r = run_cli("decrypt", sealed, "--key-file", key_file, "--out", tmp_path / "plain")
    assert r.returncode == 0, r.stderr
    assert _tree(tmp_path / "plain") == _tree(trained_run)
    r = run_cli("decrypt", sealed, "--key-file", key_file, "--out", tmp_path / "plain")
    assert r.returncode == 2 and "already exists" in r.stderr  # never replaces a folder


def test_a_lora_run_with_sealed_checkpoints_writes_no_plaintext_adapter(tmp_path, trained_run, loaded):
    from zenlm.train.finetune import finetune, resolve_finetune

    key_file = tmp_path / "ft.key"
    crypt.new_key_file(key_file)
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"{w} value {i}\t{w}\n" for i in range(40)
                                                  for w in ("return", "import")))
    cfg = resolve_finetune({"task": "classify", "base": str(trained_run),
                            "data": {"train": str(train), "text_col": "sentence"},
                            "train": {"out_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 8,
                                      "progress": False, "device": "cpu",
                                      "encrypt_key_file": str(key_file)}})
    finetune(cfg, zenlm.load(str(trained_run)), log=quiet)
    run = tmp_path / "run"
    assert not (run / "adapter").exists()
    ckpt = latest_checkpoint(run)
    assert all(p.name.endswith(".zenc") for p in ckpt.iterdir())
    assert not any(b"lora" in p.read_bytes() for p in ckpt.iterdir())
    with pytest.raises(CheckpointError, match="is encrypted"):
        zenlm.load(str(run))
    lm = zenlm.load(str(run), key_file=str(key_file))
    assert lm.step == 3 and lm.model.labels == ["import", "return"]
