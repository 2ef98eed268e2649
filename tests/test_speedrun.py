"""The main job end to end on a small corpus and a tiny budget: every stage runs, the report holds."""

from __future__ import annotations

import json

from zenlm.speedrun import SpeedrunConfig, looks_like_data, speedrun, stdlib_sources


def test_speedrun_writes_a_complete_report(tmp_path, corpus_file):
    run = speedrun(SpeedrunConfig(corpus=str(corpus_file), name="sr", runs_dir=str(tmp_path),
                                  minutes=0.05, vocab_size=400, batch_size=4), log=lambda *a, **k: None)
    report = (run / "report.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    for needed in ("parameters:", "tokens seen:", "tokens/s", "bits-per-byte", "loss.png", "## Samples"):
        assert needed in report, needed
    assert f"{summary['tokens']:,}" in report and summary["step"] > 0
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.count("```python") == 4  # one sample per code prompt


def test_default_corpus_is_code_not_data_tables():
    files = stdlib_sources(64 << 20)
    names = {f.name for f in files}
    assert "entities.py" not in names and "locale.py" not in names  # literal tables are skipped
    assert "textwrap.py" in names and not any("test" in f.parts for f in files)
    assert not any(looks_like_data(f) for f in files[:50])
