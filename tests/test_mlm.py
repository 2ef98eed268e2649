"""Masked-LM pretraining in the one loop: BERT's masking rule, a short run that learns, and
fill-mask on what it wrote."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO, TINY_TRAIN, cli_env

TINY_BERT = {"family": "bert", "n_layer": 2, "n_head": 2, "d_model": 64, "max_seq_len": 64}


def test_masking_follows_berts_rule():
    from zenlm.data.masking import MaskingConfig, mask_tokens

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (64, 512), generator=gen)
    ids[:, ::50] = 3  # a special token: never chosen
    inputs, targets = mask_tokens(ids, gen, mask_id=5, vocab_size=1000, special_ids=[3])
    chosen = targets != -100
    n = chosen.sum().item()
    eligible = (ids != 3).sum().item()
    assert abs(n / eligible - 0.15) < 0.005
    assert not chosen[ids == 3].any()
    assert torch.equal(targets[chosen], ids[chosen])  # targets are the original tokens
    assert torch.equal(inputs[~chosen], ids[~chosen])  # what is not chosen is not touched
    masked = (inputs == 5) & chosen
    kept = (inputs == ids) & chosen
    changed = chosen & ~masked & ~kept  # random replacements (a few land on the same token)
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    assert abs(changed.sum().item() / n - 0.1) < 0.01
    assert abs(kept.sum().item() / n - 0.1) < 0.01
    # a Cramming-style rate, all masks
    _, t = mask_tokens(ids, gen, mask_id=5, vocab_size=1000, cfg=MaskingConfig(rate=0.3, mask_frac=1.0,
                                                                              random_frac=0.0))
    assert abs((t != -100).float().mean().item() - 0.3 * eligible / ids.numel()) < 0.01
    from zenlm.errors import ConfigError

    with pytest.raises(ConfigError, match="mlm.rate"):
        MaskingConfig(rate=1.5)


def test_bert_tiny_recipe_resolves_to_an_encoder():
    from zenlm.config import load_yaml
    from zenlm.train.config import resolve

    cfg = resolve(load_yaml(str(REPO / "recipes" / "bert-tiny.yaml")))
    assert cfg.model.causal is False and cfg.model.norm_position == "post" and cfg.model.mlm_head
    assert cfg.model.n_kv_head == cfg.model.n_head and cfg.mlm.rate == 0.15


def test_short_mlm_run_lowers_masked_loss_and_fills_masks(tmp_path, prepared):
    from zenlm.train.config import resolve
    from zenlm.train.loop import pretrain

    out = tmp_path / "run"
    cfg = resolve({"model": TINY_BERT, "data": {"path": str(prepared)}, "mlm": {"rate": 0.25},
                   "train": {**TINY_TRAIN, "out_dir": str(out), "max_steps": 80, "lr": 2e-3,
                             "batch_size": 16, "eval_every": 80, "eval_at_start": True}})
    assert cfg.model.vocab_size > 384  # room for [MASK]
    summary = pretrain(cfg, log=lambda *a, **k: None)
    assert summary["task"] == "mlm"
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"val_loss"' in line]
    first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
    assert last < first - 1.0, (first, last)
    # the run's tokenizer has the [MASK] it trained with; fill-mask reads the run
    import zenlm
    from zenlm.infer.fill_mask import fill_mask

    loaded = zenlm.load(str(out))
    assert loaded.tokenizer.mask_id is not None and loaded.model.config.mlm_head
    fills = fill_mask(loaded.model, loaded.tokenizer, "import os\nimport [MASK]\n", k=3)
    assert len(fills) == 1 and len(fills[0]) == 3
    probs = [c.prob for c in fills[0]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    r = subprocess.run([sys.executable, "-m", "zenlm.cli.main", "fill-mask", "--model", str(out),
                        "--json", "-k", "2", "def [MASK](self):"], capture_output=True, text=True,
                       env=cli_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.splitlines()[0])
    assert row["mask"] == 0 and len(row["candidates"]) == 2
    r = subprocess.run([sys.executable, "-m", "zenlm.cli.main", "fill-mask", "--model", str(out),
                        "no mask here"], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 2 and "[MASK]" in r.stderr
