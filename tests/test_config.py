"""Configs: dataclasses filled from YAML and `--set`, typed, with unknown keys named and corrected."""

from __future__ import annotations

import json

import pytest

from zenlm.config import TransformerConfig, build, load_yaml, merge, parse_overrides
from zenlm.errors import ConfigError
from zenlm.train.config import RunConfig, TrainConfig, load_config, resolve


@pytest.mark.parametrize("raw,wrong,near", [
    ({"train": {"lrr": 1e-3}}, "train.lrr", "train.lr"),
    ({"train": {"max_step": 10}}, "train.max_step", "train.max_steps"),
    ({"model": {"n_layers": 4}}, "model.n_layers", "model.n_layer"),
    ({"modle": {}}, "modle", "model"),
    ({"data": {"pth": "x"}}, "data.pth", "data.path"),
])
def test_unknown_key_names_the_key_and_the_nearest_valid_one(raw, wrong, near):
    with pytest.raises(ConfigError) as info:
        resolve(raw)
    msg = str(info.value)
    assert f"'{wrong}'" in msg
    assert f"did you mean '{near}'?" in msg
    assert "\n" not in msg


def test_unknown_key_without_a_near_one_lists_the_valid_keys():
    with pytest.raises(ConfigError) as info:
        build(RunConfig, {"zzzzzzzz": 1})
    assert "valid keys: auto, data, mlm, model, train" in str(info.value)


def test_unknown_key_through_set_overrides():
    with pytest.raises(ConfigError, match=r"'train\.lrr'; did you mean 'train\.lr'\?"):
        load_config(None, ["train.lrr=0.1"])


def test_unknown_preset_and_family_suggest_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'gpt2'"):
        TransformerConfig.preset("gtp2")
    with pytest.raises(ConfigError, match="did you mean 'llama'"):
        resolve({"model": {"family": "lama"}})


def test_parse_overrides_nests_and_types_with_yaml():
    out = parse_overrides(["train.lr=3.0e-4", "model.n_layer=4", "train.compile=true",
                           "train.seq_len=null", "data.path=some/dir", "train.out_dir=",
                           "model.rope_base=5e5", "a.b.c=x=y"])
    assert out == {"train": {"lr": 3.0e-4, "compile": True, "seq_len": None, "out_dir": ""},
                   "model": {"n_layer": 4, "rope_base": "5e5"},  # YAML 1.1 reads 5e5 as a string
                   "data": {"path": "some/dir"}, "a": {"b": {"c": "x=y"}}}


def test_set_values_are_typed_by_the_dataclass():
    cfg = load_config(None, ["train.lr=3e-4", "model.n_layer=4.0", "train.compile=yes",
                             "train.seq_len=none", "train.max_minutes=2", "model.rope_base=5e5",
                             "train.out_dir=123", "model.tie_embeddings=off", "train.max_steps=50"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.n_layer == 4 and isinstance(cfg.model.n_layer, int)
    assert cfg.train.compile is True
    assert cfg.train.seq_len is None
    assert cfg.train.max_minutes == 2.0 and isinstance(cfg.train.max_minutes, float)
    assert cfg.model.rope_base == 500000.0
    assert cfg.train.out_dir == "123"
    assert cfg.model.tie_embeddings is False
    assert cfg.train.max_steps == 50


def test_set_overrides_win_over_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  family: gpt2\n  n_layer: 3\n  n_head: 2\n  d_model: 32\n"
                      "  vocab_size: 500\ntrain:\n  lr: 0.01\n  batch_size: 4\n")
    cfg = load_config(str(recipe), ["train.lr=0.002", "model.n_layer=5"])
    assert cfg.train.lr == 0.002 and cfg.train.batch_size == 4
    assert cfg.model.n_layer == 5 and cfg.model.n_head == 2
    # the family fills architecture switches, never sizes
    assert (cfg.model.norm, cfg.model.pos, cfg.model.mlp, cfg.model.bias) == ("layernorm", "learned", "gelu", True)
    assert cfg.model.vocab_size == 500 and cfg.model.max_seq_len == TransformerConfig().max_seq_len


@pytest.mark.parametrize("pair,match", [
    ("model.n_layer=abc", "model.n_layer must be int"),
    ("model.n_layer=4.5", "model.n_layer must be int"),
    ("train.lr=fast", "train.lr must be float"),
    ("train.lr=[1, 2]", "train.lr must be float"),
    ("train.compile=maybe", "train.compile must be true or false"),
    ("model.norm=batchnorm", "model.norm must be one of"),
    ("train=3", "train must be a mapping"),
    ("train.lr.x=1", "train.lr must be float"),
    ("train.dtype=fp16", "train.dtype must be fp32, bf16 or auto"),
    ("train.batch_size=0", "train.batch_size must be at least 1"),
])
def test_bad_types_give_config_error(pair, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [pair])


def test_malformed_set_pairs():
    with pytest.raises(ConfigError, match="expects key=value"):
        parse_overrides(["train.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        parse_overrides(["train=1", "train.lr=2"])


def test_a_run_needs_a_stopping_rule():
    with pytest.raises(ConfigError, match="max_steps or train.max_minutes"):
        load_config(None, ["train.max_steps=null"])
    assert TrainConfig(max_steps=None, max_minutes=1.0).max_minutes == 1.0


def test_merge_is_deep_and_leaves_inputs_alone():
    base = {"a": {"x": 1, "y": 2}, "b": 1}
    out = merge(base, {"a": {"y": 3}, "c": 4})
    assert out == {"a": {"x": 1, "y": 3}, "b": 1, "c": 4}
    assert base == {"a": {"x": 1, "y": 2}, "b": 1}


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_yaml(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_yaml(str(scalar))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(str(empty)) == {}


def test_vocab_size_comes_from_prepared_data_rounded_up(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"vocab_size": 385}))
    cfg = resolve({"data": {"path": str(tmp_path)}})
    assert cfg.model.vocab_size == 448
    explicit = resolve({"data": {"path": str(tmp_path)}, "model": {"vocab_size": 1000}})
    assert explicit.model.vocab_size == 1000


def test_shipped_recipe_resolves(tmp_path):
    from helpers import REPO

    recipe = REPO / "recipes" / "tiny.yaml"
    if not recipe.is_file():
        pytest.skip("recipes/tiny.yaml is absent")
    cfg = load_config(str(recipe), [f"data.path={tmp_path}", "model.vocab_size=512"])
    assert cfg.model.n_kv_head < cfg.model.n_head
    assert cfg.model.pos == "rope" and cfg.model.norm == "rmsnorm"


def test_config_round_trips_through_its_dict():
    from zenlm.config import to_dict

    cfg = load_config(None, ["model.family=gpt2", "model.n_layer=3", "train.lr=0.01"])
    again = build(RunConfig, to_dict(cfg))
    assert again == cfg
