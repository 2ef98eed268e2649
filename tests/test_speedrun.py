"""The main job end to end on a small corpus and a tiny budget: every stage runs, the report holds."""

from __future__ import annotations

import json

import pytest
import yaml

from zenlm.errors import ConfigError
from zenlm.train.budget import BATCH_TOKENS
from zenlm.speedrun import SpeedrunConfig, looks_like_data, speedrun, stdlib_sources


def test_speedrun_writes_a_complete_report(tmp_path, corpus_file):
    run = speedrun(SpeedrunConfig(corpus=str(corpus_file), name="sr", runs_dir=str(tmp_path),
                                  minutes=0.05, vocab_size=400, batch_size=4), log=lambda *a, **k: None)
    report = (run / "report.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    for needed in ("model: 2 layers x 128", "size auto: depth 2", "parameters:", "tokens seen:", "tokens/s", "bits-per-byte", "loss.png", "## Samples"):
        assert needed in report, needed
    assert f"{summary['tokens']:,}" in report and summary["step"] > 0
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.count("```python") == 4  # one sample per code prompt
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
