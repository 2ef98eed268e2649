"""torchrun: two real processes (gloo on CPU) train one model; only rank 0 writes.

The 2-process run is checked against a single-process emulation of data parallelism (each
rank's batches drawn from its own generator, gradients averaged), so "both ranks trained" is
shown by the weights, not only by the log.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from helpers import TINY_MODEL, TINY_TRAIN, cli_env, run_config

STEPS = 4


def _recipe(data, out) -> dict:
    return {"model": dict(TINY_MODEL), "data": {"path": str(data)},
            "train": {**TINY_TRAIN, "out_dir": str(out), "max_steps": STEPS, "eval_batches": 2}}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, prepared):
    root = tmp_path_factory.mktemp("ddp")
    out = root / "run"
    recipe = root / "recipe.yaml"
    raw = _recipe(prepared, out)
    recipe.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "zenlm.cli.main", "pretrain", "--config", str(recipe)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=cli_env(), cwd=root)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish in 180s: {exc.stdout!r} {exc.stderr!r}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"out": out, "proc": proc, "raw": raw}


def test_both_ranks_train_and_only_rank_0_writes(ddp_run):
    out, proc = ddp_run["out"], ddp_run["proc"]
    assert proc.stdout.count("2 process(es) on cpu") == 1  # logged once, by rank 0
    assert proc.stdout.count("done: ") == 1
    assert "Traceback" not in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["step"] == STEPS
    assert summary["tokens"] == STEPS * TINY_TRAIN["batch_size"] * TINY_TRAIN["seq_len"] * 2
    # one metrics file, each step in it once
    assert [p.name for p in out.glob("*.jsonl")] == ["metrics.jsonl"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in lines if "loss" in r]
    assert train_steps == list(range(1, STEPS + 1))
    assert len([r for r in lines if "val_loss" in r]) == 1
    # a complete checkpoint holding both ranks' data positions
    from zenlm.checkpoint import latest_checkpoint, load_checkpoint

    ckpt = latest_checkpoint(out)
    assert ckpt.name == f"step_{STEPS:08d}"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", ckpt.name]
    _, state, _ = load_checkpoint(ckpt)
    assert len(state["data_rng"]) == 2
    assert not torch.equal(state["data_rng"][0], state["data_rng"][1])  # ranks read different data
    assert (out / "loss.png").is_file() and (out / "config.yaml").is_file()


def test_ddp_equals_single_process_emulation(ddp_run, prepared):
    from zenlm.checkpoint import latest_checkpoint, load_checkpoint
    from zenlm.data.loader import TokenShards
    from zenlm.model import Transformer
    from zenlm.train.optim import lr_at, make_adamw

    cfg = run_config(prepared, "unused", max_steps=STEPS, eval_batches=2)
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = Transformer(cfg.model)
    opt = make_adamw(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, "cpu")
    gens = [torch.Generator().manual_seed(tc.seed + 1000 * rank) for rank in range(2)]
    shards = TokenShards(prepared)
    logged = []
    for step in range(STEPS):
        lr = lr_at(step / STEPS, step, lr=tc.lr, min_lr_ratio=tc.min_lr_ratio,
                   warmup_steps=tc.warmup_steps, warmup_frac=tc.warmup_frac, max_steps=tc.max_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        losses = [model(*shards.train_batch(tc.batch_size, tc.seq_len, g)) for g in gens]
        loss = (losses[0] + losses[1]) / 2  # DDP averages the two ranks' gradients
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        logged.append(loss.item())

    records = [json.loads(x) for x in (ddp_run["out"] / "metrics.jsonl").read_text().splitlines()]
    ddp_losses = [r["loss"] for r in records if "loss" in r]
    assert ddp_losses == pytest.approx(logged, abs=1e-5)
    weights, _, _ = load_checkpoint(latest_checkpoint(ddp_run["out"]), with_state=False)
    for name, value in model.state_dict().items():
        assert (weights[name] - value).abs().max().item() <= 1e-5, name


def test_resume_with_a_different_world_size_is_refused(ddp_run, tmp_path, prepared):
    import shutil

    from zenlm.errors import CheckpointError
    from zenlm.train.loop import pretrain

    run = tmp_path / "run"
    shutil.copytree(ddp_run["out"], run)
    cfg = run_config(prepared, run, max_steps=STEPS + 2, eval_batches=2)
    with pytest.raises(CheckpointError, match="trained with 2 processes"):
        pretrain(cfg, resume=True, log=lambda *a, **k: None)


def test_resume_under_torchrun(ddp_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ddp_run["out"], run)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "zenlm.cli.main", "pretrain", "--resume", str(run), "--set", f"train.max_steps={STEPS + 2}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=cli_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(f"from step {STEPS}") == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == STEPS + 2
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, STEPS + 3))
