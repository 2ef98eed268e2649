"""The training loop: exact resume, budgets, optimizer groups, the schedule, run folders."""

from __future__ import annotations

import json
import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
import yaml

from zenlm.checkpoint import latest_checkpoint, load_checkpoint, verify_checkpoint
from zenlm.data.loader import TokenShards
from zenlm.errors import CheckpointError, ConfigError
from zenlm.model import Transformer
from zenlm.train.config import resolve
from zenlm.train.loop import pretrain
from zenlm.train.optim import lr_at, make_adamw, param_groups


def quiet(*a, **k):
    pass


def records(run, key="loss") -> dict[int, dict]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = rec
    return out


def final_weights(run) -> dict[str, torch.Tensor]:
    weights, _, _ = load_checkpoint(latest_checkpoint(run), with_state=False)
    return weights


def assert_same_weights(a: dict, b: dict, tol: float = 1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= tol, k


# ----------------------------------------------------------------------------------------------
# resume


N = 6  # steps before the interruption; runs are 2N steps


def _resume_cfg(make_cfg, out):
    # dropout makes the global torch RNG matter; grad_accum makes every step draw two batches
    return make_cfg(out, model={"dropout": 0.1}, max_steps=2 * N, grad_accum=2, lr=1e-2)


def test_resume_after_stop_request_matches_an_uninterrupted_run(tmp_path, make_cfg, monkeypatch):
    import threading

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("a SIGINT handler can only be installed from the main thread")
    straight = tmp_path / "straight"
    pretrain(_resume_cfg(make_cfg, straight), log=quiet)

    # Interrupt a second run with a real SIGINT during step N: it finishes the step, writes a
    # checkpoint and returns; then resume it for the remaining N steps.
    interrupted = tmp_path / "interrupted"
    calls = {"n": 0}
    real_batch = TokenShards.train_batch

    def batch_then_ctrl_c(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2 * N:  # the second micro-batch of step N
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(self, *a, **k)

    monkeypatch.setattr(TokenShards, "train_batch", batch_then_ctrl_c)
    lines = []
    summary = pretrain(_resume_cfg(make_cfg, interrupted), log=lines.append)
    monkeypatch.setattr(TokenShards, "train_batch", real_batch)
    assert summary["step"] == N
    assert any("stopped by request" in line for line in lines)
    assert verify_checkpoint(latest_checkpoint(interrupted))["step"] == N

    lines = []
    summary = pretrain(_resume_cfg(make_cfg, interrupted), resume=True, log=lines.append)
    assert any(f"resuming {interrupted} from step {N}" in line for line in lines)
    assert summary["step"] == 2 * N

    a, b = records(straight), records(interrupted)
    assert sorted(a) == sorted(b) == list(range(1, 2 * N + 1))
    for step in range(N + 1, 2 * N + 1):
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-6, step
        assert a[step]["lr"] == b[step]["lr"]
        assert a[step]["tokens"] == b[step]["tokens"]
    assert a[N + 1]["loss"] != a[N]["loss"]  # the losses compared are not all one number
    assert_same_weights(final_weights(straight), final_weights(interrupted))
    assert summary["tokens"] == json.loads((straight / "summary.json").read_text())["tokens"]


def test_resume_after_a_crash_redoes_steps_past_the_checkpoint(tmp_path, make_cfg, monkeypatch):
    straight = tmp_path / "straight"
    cfg = lambda out: make_cfg(out, max_steps=10, ckpt_every=4, lr=1e-2)  # noqa: E731
    pretrain(cfg(straight), log=quiet)

    crashed = tmp_path / "crashed"
    calls = {"n": 0}
    real_batch = TokenShards.train_batch

    def batch_then_crash(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("power cut")
        return real_batch(self, *a, **k)

    monkeypatch.setattr(TokenShards, "train_batch", batch_then_crash)
    with pytest.raises(RuntimeError, match="power cut"):
        pretrain(cfg(crashed), log=quiet)
    monkeypatch.setattr(TokenShards, "train_batch", real_batch)
    assert sorted(records(crashed)) == [1, 2, 3, 4, 5, 6]  # logged past the last checkpoint (4)
    assert verify_checkpoint(latest_checkpoint(crashed))["step"] == 4

    pretrain(cfg(crashed), resume=True, log=quiet)
    a, b = records(straight), records(crashed)
    assert sorted(b) == list(range(1, 11))  # steps 5 and 6 were redone, not logged twice
    for step in range(1, 11):
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-6, step
    assert_same_weights(final_weights(straight), final_weights(crashed))


def test_resume_needs_a_checkpoint_and_a_new_run_needs_an_empty_folder(tmp_path, make_cfg):
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="nothing to resume"):
        pretrain(make_cfg(out, max_steps=2), resume=True, log=quiet)
    pretrain(make_cfg(out, max_steps=2), log=quiet)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="already holds a run"):
        pretrain(make_cfg(out, max_steps=2), log=quiet)
    assert (out / "metrics.jsonl").read_text() == before  # nothing was touched


def test_resume_extends_a_finished_run(tmp_path, make_cfg):
    out = tmp_path / "run"
    pretrain(make_cfg(out, max_steps=3), log=quiet)
    summary = pretrain(make_cfg(out, max_steps=5), resume=True, log=quiet)
    assert summary["step"] == 5
    assert sorted(records(out)) == [1, 2, 3, 4, 5]
    assert verify_checkpoint(latest_checkpoint(out))["step"] == 5


# ----------------------------------------------------------------------------------------------
# budgets


def test_max_minutes_budget_stops_the_run(tmp_path, make_cfg):
    out = tmp_path / "budget"
    summary = pretrain(make_cfg(out, max_steps=None, max_minutes=0.05, log_every=5), log=quiet)
    assert summary["step"] > 0
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and verify_checkpoint(ckpt)["step"] == summary["step"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["step"] == summary["step"] and on_disk["val"]["step"] == summary["step"]
    # the schedule was fitted to the budget: the LR decayed from its peak
    lrs = [r["lr"] for r in records(out).values()]
    assert max(lrs) <= 3e-3 and lrs[-1] < max(lrs)


def test_max_minutes_stops_before_max_steps(tmp_path, make_cfg):
    out = tmp_path / "budget"
    summary = pretrain(make_cfg(out, max_steps=10**7, max_minutes=0.03, log_every=50), log=quiet)
    assert 0 < summary["step"] < 10**7
    assert verify_checkpoint(latest_checkpoint(out))["step"] == summary["step"]


# ----------------------------------------------------------------------------------------------
# optimizer and schedule


def test_weight_decay_only_on_matrices():
    from zenlm.config import TransformerConfig

    model = Transformer(TransformerConfig.preset("gpt2", vocab_size=300, n_layer=2, n_head=4, d_model=64,
                                                 max_seq_len=32))
    opt = make_adamw(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, "cpu")
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    decay = {id(p) for p in groups["decay"]["params"]}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    named = dict(model.named_parameters())
    assert decay | no_decay == {id(p) for p in named.values()} and not decay & no_decay
    for name, p in named.items():
        if name.endswith(".bias") or "norm" in name:
            assert id(p) in no_decay, name
        else:
            assert id(p) in decay, name
    assert id(model.tok_emb.weight) in decay and id(model.blocks[0].attn.q_proj.weight) in decay

    # behaviour: with zero gradients AdamW only applies decay, so matrices shrink by (1 - lr*wd)
    # and vectors do not move at all
    before = {n: p.detach().clone() for n, p in named.items()}
    for p in named.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in named.items():
        if p.dim() >= 2:
            assert torch.allclose(p, before[name] * (1 - 1e-3 * 0.1), atol=1e-9), name
        else:
            assert torch.equal(p, before[name]), name


def test_frozen_parameters_are_left_out_of_the_groups():
    from zenlm.config import TransformerConfig

    model = Transformer(TransformerConfig(vocab_size=300, n_layer=1, n_head=2, d_model=32))
    model.tok_emb.weight.requires_grad_(False)
    groups = param_groups(model, 0.1)
    assert all(p is not model.tok_emb.weight for g in groups for p in g["params"])


def test_lr_schedule_with_warmup_fraction():
    kw = dict(lr=1.0, min_lr_ratio=0.1, warmup_steps=None, warmup_frac=0.1)
    ps = [i / 1000 for i in range(1001)]
    lrs = [lr_at(p, int(p * 1000), **kw) for p in ps]
    peak = ps.index(0.1)
    # linear warmup, rising (the first step starts from a small floor, not from zero)
    assert all(b > a for a, b in zip(lrs[1:peak], lrs[2:peak + 1]))
    assert lrs[peak] == pytest.approx(1.0)
    assert lr_at(0.05, 50, **kw) == pytest.approx(0.5)  # linear: halfway up at half the warmup
    assert all(b <= a + 1e-12 for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # cosine, falling
    assert lrs[-1] == pytest.approx(0.1)  # ends on the floor
    assert min(lrs[peak:]) >= 0.1 - 1e-12
    mid = lr_at(0.55, 550, **kw)  # halfway through the cosine: halfway between peak and floor
    assert mid == pytest.approx(0.55)
    assert lr_at(1.5, 1500, **kw) == pytest.approx(0.1)  # past the end: stays on the floor
    assert 0 < lrs[0] < 0.02


def test_lr_schedule_with_warmup_steps():
    kw = dict(lr=2.0, min_lr_ratio=0.0, warmup_steps=10, warmup_frac=0.5)
    total = 100
    lrs = [lr_at(s / total, s, **kw) for s in range(total + 1)]
    assert lrs[:10] == pytest.approx([2.0 * (s + 1) / 10 for s in range(10)])
    assert all(b <= a + 1e-12 for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert max(lrs) == pytest.approx(2.0)
    # knowing the run length, the cosine starts where warmup ends: no drop after warmup
    lrs = [lr_at(s / total, s, **kw, max_steps=total) for s in range(total + 1)]
    assert lrs[9] == pytest.approx(2.0) and lrs[10] == pytest.approx(2.0)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_logged_lr_follows_the_schedule(tmp_path, make_cfg):
    out = tmp_path / "run"
    pretrain(make_cfg(out, max_steps=8, warmup_steps=3, lr=1e-2, min_lr_ratio=0.1), log=quiet)
    for step, rec in records(out).items():
        s = step - 1  # the LR of a step is set before the step counter moves
        assert rec["lr"] == pytest.approx(lr_at(s / 8, s, lr=1e-2, min_lr_ratio=0.1, warmup_steps=3,
                                                warmup_frac=0.05, max_steps=8))


# ----------------------------------------------------------------------------------------------
# run folders


def test_run_folder_contents(tmp_path, make_cfg):
    out = tmp_path / "run"
    cfg = make_cfg(out, max_steps=6, eval_every=3, log_every=2, ckpt_every=3, keep_last=1)
    summary = pretrain(cfg, log=quiet)
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.jsonl", "loss.png", "summary.json",
                                                "tokenizer.json", "checkpoints"}
    # the config written is the resolved one and builds the same config again
    assert resolve(yaml.safe_load((out / "config.yaml").read_text())) == cfg
    # metrics: train records at step 1 and every log_every steps, val records at every eval
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    val = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 4, 6]
    assert [r["step"] for r in val] == [3, 6]
    for r in train:
        assert math.isfinite(r["loss"]) and r["tokens"] == r["step"] * 8 * 32 and r["tok_per_s"] > 0
    for r in val:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert 0 < r["val_bpb"] < 10
    # a real PNG
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    import matplotlib.image

    assert matplotlib.image.imread(out / "loss.png").ndim == 3
    # the summary
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["step"] == 6 and on_disk["world_size"] == 1 and on_disk["tokens"] == 6 * 8 * 32
    assert on_disk["params"] == Transformer(cfg.model).num_params()
    assert on_disk["val"]["step"] == 6
    # checkpoints: keep_last=1 leaves only the final one, pointed to by latest
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_00000006"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    # the tokenizer travels with the run
    assert (out / "tokenizer.json").read_bytes() == (Path(cfg.data.path) / "tokenizer.json").read_bytes()
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temp files left behind


def test_training_lowers_the_loss(trained_run):
    recs = records(trained_run)
    first = recs[1]["loss"]
    assert first == pytest.approx(math.log(384), abs=0.3)  # starts near uniform over the vocab
    last = sum(recs[s]["loss"] for s in sorted(recs)[-3:]) / 3
    assert last < first - 1.0
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["val"]["val_loss"] < first - 0.8


def test_activation_checkpointing_gives_the_same_steps(tmp_path, make_cfg):
    a, b = tmp_path / "plain", tmp_path / "ckpt"
    pretrain(make_cfg(a, max_steps=3), log=quiet)
    pretrain(make_cfg(b, max_steps=3, activation_checkpointing=True), log=quiet)
    ra, rb = records(a), records(b)
    for s in (1, 2, 3):
        assert abs(ra[s]["loss"] - rb[s]["loss"]) <= 1e-5
    assert_same_weights(final_weights(a), final_weights(b), tol=1e-5)


def test_gpt2_family_trains_too(tmp_path, make_cfg):
    out = tmp_path / "gpt2"
    cfg = make_cfg(out, model={"family": "gpt2", "n_kv_head": None}, max_steps=3)
    assert cfg.model.pos == "learned" and cfg.model.bias
    summary = pretrain(cfg, log=quiet)
    assert summary["step"] == 3
    weights = final_weights(out)
    assert "pos_emb.weight" in weights and "lm_head.weight" not in weights


@pytest.mark.parametrize("flags,onednn,want", [
    ({"avx2", "fma"}, False, "fp32"),                       # Zen 3: AVX2 only
    ({"avx2", "avx512f", "avx512_bf16"}, False, "fp32"),    # the flag without oneDNN's kernels
    ({"avx2", "avx512f"}, True, "fp32"),                    # oneDNN emulating on AVX-512F
    ({"avx2", "avx512f", "avx512_bf16"}, True, "bf16"),     # Zen 4/5
    ({"avx2", "amx_bf16"}, True, "bf16"),                   # Sapphire Rapids
])
def test_dtype_auto_follows_what_the_machine_reports(monkeypatch, flags, onednn, want):
    """auto is bf16 exactly where the flags and oneDNN both say bf16 is native: both branches
    are taken on any machine by faking what it reports."""
    from zenlm import hardware

    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: onednn)
    assert hardware.native_bf16() is (want == "bf16")
    assert hardware.resolve_dtype("auto") == want
    assert hardware.resolve_dtype("fp32") == "fp32" and hardware.resolve_dtype("bf16") == "bf16"
    assert ("native bf16: yes" if want == "bf16" else "native bf16: no") in hardware.describe()


def test_the_cpu_is_named_with_the_flags_that_matter():
    from zenlm import hardware

    line = hardware.describe()
    assert hardware.cpu_model() in line
    for flag in hardware.FLAGS_THAT_MATTER:
        assert (flag in line.split("flags:")[1].split(";")[0].split()) == (flag in hardware.cpu_flags())


@pytest.mark.parametrize("native", [False, True])
def test_dtype_auto_trains_in_the_precision_the_machine_computes_natively(tmp_path, make_cfg,
                                                                          monkeypatch, native):
    """dtype auto trains in bf16 autocast where the machine reports native bf16 and in fp32
    elsewhere (faked both ways); the run's log says which; a bf16 run's loss tracks fp32's."""
    from zenlm import hardware

    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": native)
    want = "bf16" if native else "fp32"
    lines = []
    summary = pretrain(make_cfg(tmp_path / "auto", max_steps=3, dtype="auto"), log=lines.append)
    assert summary["dtype"] == want
    model_line = next(line for line in lines if line.startswith("model:"))
    assert re.search(rf", {want} \(dtype auto\)(;|$)", model_line), model_line
    assert ("fp32 products via" in model_line) == (want == "fp32")
    if native:
        return
    fp32 = pretrain(make_cfg(tmp_path / "fp32", max_steps=3), log=quiet)
    bf16 = pretrain(make_cfg(tmp_path / "bf16", max_steps=3, dtype="bf16"), log=quiet)
    assert fp32["dtype"] == "fp32" and bf16["dtype"] == "bf16"
    for s in (1, 2, 3):  # bf16 rounding moves the loss a little, not the trajectory
        assert abs(records(tmp_path / "fp32")[s]["loss"] - records(tmp_path / "bf16")[s]["loss"]) < 0.05


@pytest.mark.parametrize("kw,match", [
    (dict(seq_len=128), "exceeds model.max_seq_len"),
    (dict(model={"vocab_size": 256}), "smaller than the tokenizer"),
])
def test_bad_run_configs(tmp_path, make_cfg, kw, match):
    model = kw.pop("model", None)
    with pytest.raises(ConfigError, match=match):
        pretrain(make_cfg(tmp_path / "run", model=model, max_steps=1, **kw), log=quiet)


def test_data_path_required(tmp_path):
    with pytest.raises(ConfigError, match="data.path is not set"):
        pretrain(resolve({"model": {"vocab_size": 384}, "train": {"out_dir": str(tmp_path), "device": "cpu"}}),
                 log=quiet)
