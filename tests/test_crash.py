"""kill -9 and Ctrl-C in the middle of training: no corrupt checkpoint, and --resume continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from zenlm.checkpoint import latest_checkpoint, verify_checkpoint
from zenlm.data.shards import PrepareConfig, prepare


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("crash-data")
    files = [str(root / name) for name in ("json/decoder.py", "json/encoder.py", "textwrap.py",
                                            "string.py", "heapq.py", "bisect.py")]
    prepare(PrepareConfig(inputs=files, out=str(out), vocab_size=320, val_split="tail"), log=lambda *a: None)
    return out


def _pretrain_cmd(data: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "zenlm.cli.main", "pretrain",
            "--set", f"data.path={data}", "--set", f"train.out_dir={run}",
            "--set", "model.family=llama", "--set", "model.n_layer=2", "--set", "model.n_head=2",
            "--set", "model.d_model=64", "--set", "model.max_seq_len=64",
            "--set", "train.batch_size=4", "--set", "train.ckpt_every=3", "--set", "train.eval_every=0",
            "--set", "train.log_every=1", "--set", "train.progress=false", *extra]


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen, min_step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        ckpt = latest_checkpoint(run)
        if ckpt is not None and int(ckpt.name.split("_")[1]) >= min_step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read().decode()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_kill_9_then_resume(shards, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_pretrain_cmd(shards, run, "--set", "train.max_steps=100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    _wait_for_checkpoint(run, proc, min_step=6)
    time.sleep(0.3)  # land the kill anywhere, possibly in the middle of the next checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    ckpt = latest_checkpoint(run)
    meta = verify_checkpoint(ckpt)  # raises on a partial or corrupt checkpoint
    killed_at = meta["step"]
    for stale in (run / "checkpoints").glob("step_*"):
        verify_checkpoint(stale)

    target = killed_at + 4
    res = subprocess.run([sys.executable, "-m", "zenlm.cli.main", "pretrain", "--resume", str(run),
                          "--set", f"train.max_steps={target}"],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"resuming {run} from step {killed_at}" in res.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == target
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), "metrics repeat or go backwards"
    assert steps[-1] == target


def test_ctrl_c_checkpoints_and_exits_cleanly(shards, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_pretrain_cmd(shards, run, "--set", "train.max_steps=100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    _wait_for_checkpoint(run, proc, min_step=3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert b"stopped by request" in out
    summary = json.loads((run / "summary.json").read_text())
    meta = verify_checkpoint(latest_checkpoint(run))
    assert meta["step"] == summary["step"]  # the interrupted step was checkpointed, nothing lost
