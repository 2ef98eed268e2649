"""The budget dial: families and sizes as two tables, and `model.size: auto` fitted to a budget.

The step rate is the one thing faked (it is what a machine measures); everything else - param
counts, the config path, a real training run writing config.yaml - is the real code.
"""

from __future__ import annotations

import pytest
import yaml

from zenlm.config import FAMILIES, SIZES, TransformerConfig, depth_shape
from zenlm.errors import ConfigError
from zenlm.train import budget
from zenlm.train.config import RunConfig, load_config, resolve

SHAPE = {"n_layer", "d_model", "n_head", "n_kv_head", "max_seq_len", "vocab_size", "d_ff", "head_dim"}


def fake_rate(flops_per_s: float = 2e10):
    """A machine that runs ~6 FLOPs per parameter per token at a fixed rate."""
    calls = []

    def measure(fields, batch, seq_len, lr, device="cpu", dtype="fp32"):
        calls.append(fields["n_layer"])
        return flops_per_s / (6 * budget.count_params(fields))

    measure.calls = calls
    return measure


def auto_raw(minutes: float = 3.0, model: dict | None = None, train: dict | None = None) -> dict:
    return {"model": {"family": "llama", "size": "auto", "vocab_size": 768, "tie_embeddings": True,
                      **(model or {})},
            "train": {"max_minutes": minutes, "max_steps": None, **(train or {})}}


def test_families_are_switches_and_sizes_are_shapes():
    for family, switches in FAMILIES.items():
        assert not set(switches) & SHAPE, family
    for size, shape in SIZES.items():
        assert set(shape) <= SHAPE, size
        assert TransformerConfig.preset("llama", size).n_layer == shape["n_layer"]
    # a recipe naming a family and a size builds the model preset() builds
    for family in FAMILIES:
        for size in (None, "tiny", 3):
            model = {"family": family, **({"size": size} if size is not None else {})}
            assert resolve({"model": model}).model == TransformerConfig.preset(family, size), (family, size)
    assert TransformerConfig.preset("llama", "tiny").n_kv_head == 2  # GQA is a shape, not a family


def test_recipe_fields_win_over_family_and_size():
    cfg = resolve({"model": {"family": "gpt2", "size": "tiny", "n_layer": 2, "tie_embeddings": False}})
    assert cfg.model.n_layer == 2 and cfg.model.d_model == SIZES["tiny"]["d_model"]
    assert cfg.model.tie_embeddings is False and cfg.model.norm == "layernorm"


def test_unknown_family_and_size_name_the_nearest():
    with pytest.raises(ConfigError, match="unknown model size key 'tinny'; did you mean 'tiny'"):
        resolve({"model": {"family": "llama", "size": "tinny"}})
    with pytest.raises(ConfigError, match="did you mean 'base'"):
        TransformerConfig.preset("llama", "bsae")
    with pytest.raises(ConfigError, match="did you mean 'llama'"):
        load_config(None, ["model.family=lama"])
    with pytest.raises(ConfigError, match="at least 1"):
        resolve({"model": {"size": 0}})


def test_a_depth_is_a_size():
    assert resolve({"model": {"size": 5}}).model.d_model == 320
    assert load_config(None, ["model.size=5"]).model == resolve({"model": {"size": "5"}}).model
    assert depth_shape(6) == {"n_layer": 6, "d_model": 384, "n_head": 6, "n_kv_head": 3}


def test_auto_choice_is_deterministic_given_the_rate(monkeypatch):
    monkeypatch.setattr(budget, "measure_tok_per_s", fake_rate())
    a, b = resolve(auto_raw(), log=lambda *a: None), resolve(auto_raw(), log=lambda *a: None)
    assert a == b and a.auto["depth"] >= budget.MIN_DEPTH
    depth = a.auto["depth"]
    # the rule: the largest depth whose predicted tokens per parameter meets the target
    rows = {r["depth"]: r for r in a.auto["tried"]}
    assert rows[depth]["tokens_per_param"] >= budget.TOKENS_PER_PARAM or depth == budget.MIN_DEPTH
    if depth + 1 in rows:
        assert rows[depth + 1]["tokens_per_param"] < budget.TOKENS_PER_PARAM
    assert (a.model.n_layer, a.model.d_model) == (depth, 64 * depth)
    assert a.train.lr == pytest.approx(budget.lr_for(64 * depth))
    assert a.train.batch_size * a.model.max_seq_len == budget.BATCH_TOKENS


def test_bigger_budgets_choose_bigger_or_equal_depths(monkeypatch):
    monkeypatch.setattr(budget, "measure_tok_per_s", fake_rate())
    depths = [resolve(auto_raw(m), log=lambda *a: None).auto["depth"] for m in (0.1, 1, 10, 100, 1e3, 1e4, 1e5)]
    assert depths == sorted(depths) and depths[-1] > depths[0], depths


def test_probe_stops_at_the_first_depth_under_target(monkeypatch):
    measure = fake_rate()
    monkeypatch.setattr(budget, "measure_tok_per_s", measure)
    cfg = resolve(auto_raw(1e4), log=lambda *a: None)
    assert cfg.auto["depth"] > budget.MIN_DEPTH
    assert measure.calls == list(range(budget.MIN_DEPTH, cfg.auto["depth"] + 2))
    measure.calls.clear()
    assert resolve(auto_raw(0.01), log=lambda *a: None).auto["depth"] == budget.MIN_DEPTH
    assert measure.calls == [budget.MIN_DEPTH]  # short of the target already: nothing bigger


def test_explicit_fields_are_never_overridden(monkeypatch):
    measure = fake_rate()
    monkeypatch.setattr(budget, "measure_tok_per_s", measure)
    cfg = resolve(auto_raw(60, model={"n_layer": 2, "max_seq_len": 64},
                           train={"lr": 1e-4, "batch_size": 3}), log=lambda *a: None)
    assert cfg.model.n_layer == 2 and cfg.model.max_seq_len == 64
    assert cfg.train.lr == 1e-4 and cfg.train.batch_size == 3
    assert "n_layer" not in cfg.auto["model"] and cfg.auto["train"] == {}
    assert cfg.model.d_model == 64 * cfg.auto["depth"]  # what was left to it, the dial chose


def test_auto_needs_a_wall_clock_budget():
    with pytest.raises(ConfigError, match="train.max_minutes"):
        resolve({"model": {"size": "auto", "vocab_size": 512}, "train": {"max_steps": 10}})
    with pytest.raises(ConfigError, match="wall-clock budget"):
        TransformerConfig.preset("llama", "auto")


def test_auto_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="torchrun"):
        resolve(auto_raw(), log=lambda *a: None)


def test_real_measurement_times_real_steps():
    fields = budget.candidate({**FAMILIES["llama"], "vocab_size": 256}, 2, 32)
    rate = budget.measure_tok_per_s(fields, 2, 32, 1e-3, steps=1)
    assert 0 < rate < 1e8


def test_choice_lands_in_the_log_and_config_yaml(monkeypatch, prepared, tmp_path):
    from zenlm.train.loop import pretrain

    monkeypatch.setattr(budget, "measure_tok_per_s", fake_rate(2e7))  # a slow machine: depth 2
    lines: list[str] = []
    raw = {"model": {"family": "llama", "size": "auto", "tie_embeddings": True},
           "data": {"path": str(prepared)},
           "train": {"out_dir": str(tmp_path / "run"), "max_minutes": 0.01, "max_steps": 3,
                     "eval_every": 0, "ckpt_every": 0, "eval_batches": 2, "progress": False,
                     "device": "cpu"}}
    cfg = resolve(raw, log=lines.append)
    pretrain(cfg, log=lines.append)
    assert any(line.startswith("auto size: depth 2 = 2 layers x 128") for line in lines), lines
    assert any("tok/s" in line and "measured" in line for line in lines)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["auto"]["depth"] == 2 and saved["model"]["n_layer"] == 2
    assert saved["auto"]["chosen"]["tokens_per_param"] < budget.TOKENS_PER_PARAM
    # the saved config resolves again as is: resuming never measures again
    monkeypatch.setattr(budget, "measure_tok_per_s", lambda *a, **k: pytest.fail("measured again"))
    again = resolve(saved)
    assert again == cfg and isinstance(again, RunConfig)


def test_speedrun_chooses_vocab_from_the_budget():
    assert budget.vocab_for(3) <= budget.vocab_for(10) <= budget.vocab_for(120)
