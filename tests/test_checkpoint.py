"""Checkpoints: checksums, crash safety, and loading a run folder for inference."""

from __future__ import annotations

import os
import shutil

import pytest
import safetensors.torch
import torch

from zenlm.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, verify_checkpoint
from zenlm.config import TransformerConfig, to_dict
from zenlm.errors import CheckpointError
from zenlm.interop.load import is_run_dir, load_run
from zenlm.model import Transformer
from zenlm.train.loop import pretrain


def quiet(*a, **k):
    pass


def tiny_model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=300, n_layer=1, n_head=2, n_kv_head=1, d_model=32,
                                         max_seq_len=16))


def save(run, step, model, **kw):
    state = {"step": step, "note": torch.arange(5)}
    return save_checkpoint(run, step, model.state_dict(), state, {"model": to_dict(model.config)}, **kw)


def flip_bytes(path, at: int | None = None, n: int = 4):
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    for i in range(at, at + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------------
# the round trip


def test_save_verify_load_round_trip(tmp_path):
    model = tiny_model()
    ckpt = save(tmp_path, 7, model)
    assert ckpt.name == "step_00000007"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "state.pt", "meta.json"}
    assert latest_checkpoint(tmp_path) == ckpt
    meta = verify_checkpoint(ckpt)
    assert meta["step"] == 7 and set(meta["sha256"]) == {"model.safetensors", "state.pt"}
    weights, state, meta2 = load_checkpoint(ckpt)
    assert meta2 == meta
    assert weights.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v)
    assert state["step"] == 7 and torch.equal(state["note"], torch.arange(5))
    # the weights are plain safetensors that anyone can open
    assert safetensors.torch.load_file(str(ckpt / "model.safetensors")).keys() == weights.keys()
    _, no_state, _ = load_checkpoint(ckpt, with_state=False)
    assert no_state is None


def test_keep_last_prunes_old_checkpoints_and_stale_temp_folders(tmp_path):
    model = tiny_model()
    stale = tmp_path / "checkpoints" / ".step_00000001.crashed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000003", "step_00000004"]
    assert latest_checkpoint(tmp_path).name == "step_00000004"


def test_resaving_a_step_replaces_it_whole(tmp_path):
    save(tmp_path, 3, tiny_model(0))
    other = tiny_model(1)
    ckpt = save(tmp_path, 3, other)
    weights, _, _ = load_checkpoint(ckpt)
    assert torch.equal(weights["tok_emb.weight"], other.tok_emb.weight)


# ----------------------------------------------------------------------------------------------
# crashes during a save leave the previous checkpoint whole and pointed to


def _assert_previous_is_latest(run, step, model):
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.name == f"step_{step:08d}"
    weights, _, meta = load_checkpoint(ckpt)  # verifies every checksum
    assert meta["step"] == step
    assert torch.equal(weights["tok_emb.weight"], model.tok_emb.weight)


def test_crash_while_writing_weights(tmp_path, monkeypatch):
    first = tiny_model(0)
    save(tmp_path, 1, first)

    def partial_then_crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # half a file on disk, then the process dies
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", partial_then_crash)
    with pytest.raises(OSError, match="No space"):
        save(tmp_path, 2, tiny_model(1))
    _assert_previous_is_latest(tmp_path, 1, first)
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_crash_while_writing_training_state(tmp_path, monkeypatch):
    first = tiny_model(0)
    save(tmp_path, 1, first)
    real_save = torch.save

    def partial_then_crash(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(10)
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing

    monkeypatch.setattr(torch, "save", partial_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, tiny_model(1))
    _assert_previous_is_latest(tmp_path, 1, first)


def test_crash_while_moving_the_latest_pointer(tmp_path, monkeypatch):
    first = tiny_model(0)
    save(tmp_path, 1, first)
    real_replace = os.replace

    def crash_on_pointer(src, dst):
        if os.path.basename(dst) == "latest":
            raise OSError("I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_pointer)
    with pytest.raises(OSError):
        save(tmp_path, 2, tiny_model(1))
    _assert_previous_is_latest(tmp_path, 1, first)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000001\n"


def test_crash_while_resaving_the_latest_step(tmp_path, monkeypatch):
    """Re-saving the step ``latest`` points to must not leave ``latest`` pointing at nothing."""
    first = tiny_model(0)
    save(tmp_path, 1, first)
    real_rename = os.rename
    crashed = []

    def crash_on_final_rename(src, dst):  # the move of the new folder into place fails (once)
        if os.path.basename(dst) == "step_00000001" and not crashed:
            crashed.append(src)
            raise OSError("I/O error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_final_rename)
    with pytest.raises(OSError):
        save(tmp_path, 1, tiny_model(1))
    assert crashed
    _assert_previous_is_latest(tmp_path, 1, first)


def test_crash_during_a_training_run_keeps_the_last_checkpoint(tmp_path, make_cfg, monkeypatch):
    out = tmp_path / "run"
    real_save_file = safetensors.torch.save_file
    calls = {"n": 0}

    def second_save_crashes(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(filename, "wb") as f:
                f.write(b"\x00" * 64)
            raise OSError("No space left on device")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", second_save_crashes)
    with pytest.raises(OSError, match="No space"):
        pretrain(make_cfg(out, max_steps=6, ckpt_every=2), log=quiet)
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "step_00000002" and verify_checkpoint(ckpt)["step"] == 2
    assert load_run(out).step == 2
    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    summary = pretrain(make_cfg(out, max_steps=6, ckpt_every=2), resume=True, log=quiet)
    assert summary["step"] == 6 and verify_checkpoint(latest_checkpoint(out))["step"] == 6


# ----------------------------------------------------------------------------------------------
# corruption is detected by checksum


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt"])
def test_flipped_bytes_are_detected(tmp_path, name):
    ckpt = save(tmp_path, 1, tiny_model())
    flip_bytes(ckpt / name)
    with pytest.raises(CheckpointError, match=f"{name} does not match its checksum"):
        verify_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(ckpt)


def test_corrupt_weights_in_a_run_are_refused_by_load_and_resume(tmp_path, trained_run, make_cfg):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ckpt = latest_checkpoint(run)
    # flip bytes inside the tensor data (past the JSON header), where safetensors itself cannot tell
    flip_bytes(ckpt / "model.safetensors", at=(ckpt / "model.safetensors").stat().st_size - 100)
    safetensors.torch.load_file(str(ckpt / "model.safetensors"))  # still parses: only the checksum knows
    with pytest.raises(CheckpointError, match="checksum"):
        load_run(run)
    with pytest.raises(CheckpointError, match="checksum"):
        pretrain(make_cfg(run, max_steps=50), resume=True, log=quiet)


def test_incomplete_checkpoints(tmp_path):
    ckpt = save(tmp_path, 1, tiny_model())
    (ckpt / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="state.pt is missing"):
        verify_checkpoint(ckpt)
    (ckpt / "meta.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="meta.json is not valid JSON"):
        verify_checkpoint(ckpt)
    (ckpt / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        verify_checkpoint(ckpt)


# ----------------------------------------------------------------------------------------------
# run folders -> a ready model


def test_load_run_gives_an_eval_model_that_matches_the_checkpoint(trained_run):
    loaded = load_run(trained_run)
    from helpers import TRAINED_STEPS

    assert loaded.step == TRAINED_STEPS and loaded.source == str(trained_run)
    assert not loaded.model.training
    weights, _, meta = load_checkpoint(latest_checkpoint(trained_run), with_state=False)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, weights[k])
    assert loaded.tokenizer.vocab_size <= loaded.model.config.vocab_size
    assert meta["config"]["model"]["n_layer"] == loaded.model.config.n_layer == 2
    import zenlm

    again = zenlm.load(str(trained_run))
    assert again.step == loaded.step


def test_load_run_errors(tmp_path, trained_run):
    with pytest.raises(CheckpointError, match="run folder not found"):
        load_run(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="not a zenlm run folder"):
        load_run(tmp_path / "plain")
    assert not is_run_dir(tmp_path / "plain")
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "checkpoints" / "latest").unlink()
    with pytest.raises(CheckpointError, match="no finished checkpoint"):
        load_run(run)


def test_load_run_refuses_weights_that_do_not_fit_the_config(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ckpt = latest_checkpoint(run)
    weights, state, meta = load_checkpoint(ckpt)
    del weights["norm.weight"]
    save_checkpoint(run, meta["step"], weights, state, meta["config"])
    with pytest.raises(CheckpointError, match="does not fit its config"):
        load_run(run)
