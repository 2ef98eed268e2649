"""The main job end to end on a small corpus and a tiny budget: every stage runs, the report holds."""

from __future__ import annotations

import json

import pytest
import yaml

from zenlm.errors import ConfigError
from zenlm.infer import generate
from zenlm.interop.load import load_run
from zenlm.speedrun import CODE_PROMPTS, SAMPLING, SpeedrunConfig, looks_like_data, speedrun, stdlib_sources
from zenlm.train.budget import BATCH_TOKENS


def test_speedrun_writes_a_complete_report(tmp_path, corpus_file):
    """Every figure in the report is the run's own, checked against what is on disk: the final
    checkpoint's parameters, steps x batch x length tokens, the shards' manifest, and the
    completions the final model gives the code prompts with the report's sampling settings."""
    cfg = SpeedrunConfig(corpus=str(corpus_file), name="sr", runs_dir=str(tmp_path), minutes=0.05,
                         vocab_size=400, batch_size=4)
    run = speedrun(cfg, log=lambda *a, **k: None)
    report = (run / "report.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    train = yaml.safe_load((run / "config.yaml").read_text())["train"]
    loaded = load_run(run)
    assert summary["step"] > 0 and loaded.step == summary["step"]  # the report's model is the last one
    seq_len = train["seq_len"] or loaded.model.config.max_seq_len
    assert summary["tokens"] == summary["step"] * cfg.batch_size * seq_len
    params = sum(p.numel() for p in loaded.model.parameters())
    assert f"- parameters: {params:,} (" in report
    assert f"- steps: {summary['step']:,}; tokens seen: {summary['tokens']:,}" in report
    assert f"{manifest['train_tokens']:,} train / {manifest['val_tokens']:,} val" in report
    # train_seconds is rounded to a tenth: the rate must be tokens over the unrounded time
    assert abs(summary["tokens"] / summary["tok_per_s"] - summary["train_seconds"]) <= 0.05 + 1e-9
    assert f"throughput: {summary['tok_per_s']:,.0f} tokens/s" in report
    bpb = summary["val"]["val_bpb"]
    assert 0 < bpb < 8 and f"**bits-per-byte {bpb:.4f}**" in report  # a number, not nan
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.count("```python") == len(CODE_PROMPTS)
    for prompt in CODE_PROMPTS:
        completion = generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=96, seed=cfg.seed,
                              **SAMPLING)
        assert f"```python\n{prompt}{completion}\n```" in report, prompt
    assert "size auto: depth 2" in report and "model: 2 layers x 128" in report
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["auto"]["depth"] == 2 and saved["model"]["vocab_size"] == 448  # 400 rounded up


def test_speedrun_with_a_depth_and_an_unknown_size(tmp_path, corpus_file):
    run = speedrun(SpeedrunConfig(corpus=str(corpus_file), name="d", runs_dir=str(tmp_path),
                                  minutes=0.02, size="2", vocab_size=300), log=lambda *a, **k: None)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["auto"] is None and saved["model"]["n_layer"] == 2
    assert saved["train"]["batch_size"] * saved["model"]["max_seq_len"] == BATCH_TOKENS
    with pytest.raises(ConfigError, match="did you mean 'small'"):
        speedrun(SpeedrunConfig(corpus=str(corpus_file), runs_dir=str(tmp_path), size="smal"))


def test_default_corpus_is_code_not_data_tables():
    files = stdlib_sources(64 << 20)
    names = {f.name for f in files}
    assert "entities.py" not in names and "locale.py" not in names  # literal tables are skipped
    assert "textwrap.py" in names and not any("test" in f.parts for f in files)
    assert not any(looks_like_data(f) for f in files[:50])
