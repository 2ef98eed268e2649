"""Shared fixtures: a small real corpus, a trained BPE tokenizer, prepared shards, a trained run.

Everything here is built once per session from real parts (no stubs). The default corpus is a
sample of the Python standard library's sources, which every installation has, so most tests do
not need ``../shared``; tests that want Shakespeare ask for ``shakespeare_file`` and are skipped
with a reason where the shared data set is absent.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from helpers import (CORPUS_BYTES, SHAKESPEARE, TRAINED_STEPS, VOCAB, head_at_line, run_config,
                     stdlib_sample)


def pytest_configure(config):
    # The models here are tiny: one thread is as fast, and it does not fight other processes
    # on a shared 2-core machine. Subprocesses get OMP_NUM_THREADS=1 (helpers.cli_env).
    import os
    import tempfile

    import torch

    torch.set_num_threads(1)
    # Runs sign their lineage cards with the user's keys: tests use a key folder of their own
    # (subprocesses inherit it), never ~/.config/zenlm.
    os.environ["ZENLM_HOME"] = tempfile.mkdtemp(prefix="zenlm-home-")
    os.environ.pop("ZENLM_SIGNING_KEY", None)


@pytest.fixture(scope="session")
def corpus_text() -> str:
    text = stdlib_sample()
    if len(text) < 50_000:
        pytest.skip(f"the standard library sources under {sysconfig.get_paths()['stdlib']} are missing")
    return text


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, corpus_text) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "stdlib.txt"
    p.write_text(corpus_text, encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"shared data set not found at {SHAKESPEARE} (tinyshakespeare/input.txt)")
    return head_at_line(SHAKESPEARE.read_text(encoding="utf-8"), CORPUS_BYTES)


@pytest.fixture(scope="session")
def shakespeare_file(tmp_path_factory, shakespeare_text) -> Path:
    p = tmp_path_factory.mktemp("shakespeare") / "input.txt"
    p.write_text(shakespeare_text, encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def tokenizer(corpus_text):
    """A real byte-level BPE trained on the corpus sample."""
    from zenlm.tokenizer import Tokenizer

    return Tokenizer.train([corpus_text], VOCAB)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus_file) -> Path:
    """Shards of the corpus sample (read-only: copy before changing anything in it)."""
    from zenlm.data.shards import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(PrepareConfig(inputs=[str(corpus_file)], out=str(out), vocab_size=VOCAB),
            log=lambda *a, **k: None)
    return out


@pytest.fixture
def make_cfg(prepared):
    def make(out_dir, model: dict | None = None, data_dir=None, **train):
        return run_config(data_dir or prepared, out_dir, model, **train)

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, prepared) -> Path:
    """A run folder with a model trained for a few dozen steps (read-only)."""
    from zenlm.train.loop import pretrain

    out = tmp_path_factory.mktemp("runs") / "tiny"
    pretrain(run_config(prepared, out, max_steps=TRAINED_STEPS), log=lambda *a, **k: None)
    return out


@pytest.fixture(scope="session")
def loaded(trained_run):
    from zenlm.interop.load import load_run

    return load_run(trained_run)
