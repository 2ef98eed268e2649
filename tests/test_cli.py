"""The `zenlm` command as a user runs it: real subprocesses, end to end, and one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from helpers import TINY_MODEL, run_cli

RECIPE = {
    "model": {k: v for k, v in TINY_MODEL.items()},
    "train": {"batch_size": 8, "seq_len": 32, "max_steps": 4, "lr": 3e-3, "eval_every": 0,
              "eval_batches": 4, "ckpt_every": 0, "log_every": 1, "device": "cpu", "seed": 7},
}


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("zenlm: error: ")
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, corpus_file):
    """prepare -> pretrain through the command line, once for this module."""
    root = tmp_path_factory.mktemp("cli")
    data, run = root / "data", root / "run"
    p = run_cli("prepare", corpus_file, "--out", data, "--vocab-size", 384)
    assert p.returncode == 0, p.stderr
    assert "train and" in p.stdout and "val tokens" in p.stdout
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "data": {"path": str(data)}, "train": {**RECIPE["train"],
                                                                                      "out_dir": str(run)}}))
    p = run_cli("pretrain", "--config", recipe, "--set", "train.max_steps=5", "--set", "train.lr=2e-3")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert "1 process(es)" in p.stdout and "done: 5 steps" in p.stdout
    return {"root": root, "data": data, "run": run, "recipe": recipe, "corpus": corpus_file}


def test_end_to_end_prepare_pretrain_generate_eval(cli_run, corpus_text):
    from zenlm.interop.load import load_run
    from zenlm.eval.perplexity import evaluate_text
    from zenlm.infer import generate

    run = cli_run["run"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 5 and summary["world_size"] == 1
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["lr"] == 2e-3 and cfg["train"]["max_steps"] == 5  # --set won over the recipe
    assert cfg["model"]["vocab_size"] == 384  # taken from the prepared data
    (manifest,) = [json.loads((cli_run["data"] / "manifest.json").read_text())]
    assert manifest["vocab_size"] == 384

    # generate: the prompt, then exactly the library's greedy completion
    p = run_cli("generate", "--model", run, "--prompt", "def main(", "--greedy", "--max-new-tokens", 20)
    assert p.returncode == 0, p.stderr
    loaded = load_run(run)
    want = generate(loaded.model, loaded.tokenizer, "def main(", temperature=0, max_new_tokens=20)
    assert p.stdout == "def main(" + want + "\n"

    # the fast decoding options give the library's own results for the same settings
    import copy

    import torch

    from zenlm.infer.quantize import quantize_int4, quantize_int8

    variants = {("--quantize", "int8"): quantize_int8,
                ("--int8",): quantize_int8,  # the flag before --quantize, still read
                ("--quantize", "int4"): quantize_int4,
                ("--dtype", "bf16"): lambda m: m.to(torch.bfloat16)}
    for flags, prepare in variants.items():
        p = run_cli("generate", "--run", run, "--prompt", "def main(", "--greedy", "--max-new-tokens", 12, *flags)
        assert p.returncode == 0, (flags, p.stderr)
        model = prepare(copy.deepcopy(loaded.model))
        want = generate(model, loaded.tokenizer, "def main(", temperature=0, max_new_tokens=12)
        assert p.stdout == "def main(" + want + "\n", flags

    # seeded sampling is reproducible across processes
    args = ("generate", "--run", run, "--prompt", "import ", "--temperature", 1.0, "--seed", 3,
            "--max-new-tokens", 15)
    a, b = run_cli(*args), run_cli(*args)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout

    # eval: the same numbers as the library
    text_file = cli_run["root"] / "eval.txt"
    text_file.write_text(corpus_text[-5000:])
    p = run_cli("eval", "--model", run, "--data", text_file, "--json")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    res = evaluate_text(loaded.model, loaded.tokenizer, corpus_text[-5000:])
    assert got["tokens"] == res.tokens and got["bytes"] == res.bytes == len(corpus_text[-5000:].encode())
    assert got["loss"] == pytest.approx(res.loss, rel=1e-6)
    assert got["bpb"] == pytest.approx(res.bits_per_byte, rel=1e-6)
    p = run_cli("eval", "--run", run, "--data", text_file)
    assert p.returncode == 0 and "bits/byte" in p.stdout


def test_pretrain_out_and_minutes_and_resume(cli_run, tmp_path):
    """--out names the run folder and --minutes the budget, over the recipe's values; --resume
    RUN_DIR continues in that folder and will not be pointed at another."""
    run = tmp_path / "elsewhere"
    p = run_cli("pretrain", "--config", cli_run["recipe"], "--out", run, "--minutes", 5,
                "--set", "train.max_steps=2")
    assert p.returncode == 0, p.stderr
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["out_dir"] == str(run) and saved["train"]["max_minutes"] == 5.0
    assert json.loads((run / "summary.json").read_text())["step"] == 2
    assert_one_line_error(run_cli("pretrain", "--resume", run, "--out", tmp_path / "other"),
                          "continues that run in its own folder", "drop --out")
    p = run_cli("pretrain", "--resume", run, "--config", cli_run["recipe"], "--set", "train.max_steps=3")
    assert p.returncode == 0, p.stderr  # the recipe's out_dir does not move a resumed run
    assert "from step 2" in p.stdout and json.loads((run / "summary.json").read_text())["step"] == 3


def test_resume_from_the_command_line(cli_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cli_run["run"], run)
    p = run_cli("pretrain", "--resume", run, "--set", "train.max_steps=7")
    assert p.returncode == 0, p.stderr
    assert "resuming" in p.stdout and "from step 5" in p.stdout
    assert json.loads((run / "summary.json").read_text())["step"] == 7
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4, 5, 6, 7]


# ----------------------------------------------------------------------------------------------
# errors a user can cause: exit status 2, one line, no traceback


def test_missing_corpus(tmp_path):
    p = run_cli("prepare", tmp_path / "nope.txt", "--out", tmp_path / "out")
    assert_one_line_error(p, "corpus not found", "nope.txt")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    p = run_cli("prepare", tmp_path / "empty.txt", "--out", tmp_path / "out")
    assert_one_line_error(p, "corpus is empty")


def test_vocab_too_small(tmp_path, corpus_file):
    p = run_cli("prepare", corpus_file, "--out", tmp_path / "out", "--vocab-size", 100)
    assert_one_line_error(p, "vocab_size=100 is too small", "at least 257")


def test_jsonl_missing_field(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "hello there"}\n' * 20)
    p = run_cli("prepare", tmp_path / "d.jsonl", "--out", tmp_path / "out", "--vocab-size", 300,
                "--field", "content")
    assert_one_line_error(p, "no field 'content'")


def test_unknown_config_key_names_the_nearest(cli_run, tmp_path):
    p = run_cli("pretrain", "--config", cli_run["recipe"], "--set", "train.lrr=0.1",
                "--set", f"train.out_dir={tmp_path / 'run'}")
    assert_one_line_error(p, "'train.lrr'", "did you mean 'train.lr'?")
    assert not (tmp_path / "run").exists()


def test_bad_config_value(cli_run, tmp_path):
    p = run_cli("pretrain", "--config", cli_run["recipe"], "--set", "model.n_layer=two")
    assert_one_line_error(p, "model.n_layer must be int")


def test_new_run_in_an_existing_run_folder(cli_run):
    p = run_cli("pretrain", "--config", cli_run["recipe"])
    assert_one_line_error(p, "already holds a run", "--resume")


@pytest.mark.parametrize("command", ["generate", "eval", "resume"])
def test_a_folder_that_is_not_a_run(tmp_path, command):
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    (tmp_path / "t.txt").write_text("some text to score\n")
    args = {"generate": ("generate", "--run", folder, "--prompt", "hi"),
            "eval": ("eval", "--run", folder, "--data", tmp_path / "t.txt"),
            "resume": ("pretrain", "--resume", folder)}[command]
    # generate and eval take any model (zenlm.load): the message names what the folder is not
    expected = "not a zenlm run folder" if command == "resume" else "neither a zenlm run"
    assert_one_line_error(run_cli(*args), expected)


def test_corrupted_checkpoint(trained_run, tmp_path):
    from zenlm.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    weights = latest_checkpoint(run) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-50:-40] = bytes(b ^ 0xFF for b in data[-50:-40])
    weights.write_bytes(bytes(data))
    p = run_cli("generate", "--run", run, "--prompt", "def ")
    assert_one_line_error(p, "corrupt", "model.safetensors does not match its checksum")
    p = run_cli("pretrain", "--resume", run, "--set", "train.max_steps=50")
    assert_one_line_error(p, "checksum")


def test_prompt_longer_than_the_context(trained_run):
    p = run_cli("generate", "--run", trained_run, "--prompt", "alpha beta gamma delta " * 40)
    assert_one_line_error(p, "the prompt is", "context is 64 tokens")
    assert p.stdout == "" or "alpha" in p.stdout  # nothing but (at most) the echoed prompt


def test_eval_of_a_missing_or_binary_file(trained_run, tmp_path):
    assert_one_line_error(run_cli("eval", "--run", trained_run, "--data", tmp_path / "nope.txt"),
                          "file not found")
    (tmp_path / "bin.dat").write_bytes(b"\xff\xfe\x00\x81" * 10)
    assert_one_line_error(run_cli("eval", "--run", trained_run, "--data", tmp_path / "bin.dat"),
                          "is not UTF-8 text")


def test_pretrain_without_a_recipe(tmp_path):
    assert_one_line_error(run_cli("pretrain"), "give --config")


@pytest.mark.parametrize("flags,fragments", [
    (("--quantize", "int3"), ("unknown quantization 'int3'", "none, int8, int4")),
    (("--dtype", "fp16"), ("unknown dtype 'fp16'", "fp32, bf16, auto")),
])
def test_bad_quantize_or_dtype(tmp_path, flags, fragments):
    """Refused by name before anything loads (the model here does not even exist)."""
    for command in (("generate", "--prompt", "x"), ("chat",)):
        p = run_cli(*command, "--model", tmp_path / "missing", *flags)
        assert_one_line_error(p, *fragments)


def test_export_refuses_a_gguf_quantization_for_hf(tmp_path):
    p = run_cli("export", "--model", tmp_path / "missing", "--format", "hf", "--out", tmp_path / "x",
                "--quantize", "q8_0")
    assert_one_line_error(p, "GGUF quantization", "--format gguf")


def test_version():
    from importlib.metadata import version

    p = run_cli("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"zenlm {version('zenlm')}"


@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "x"], ["chat"], ["eval", "--data", "t.txt"], ["predict"],
    ["export", "--format", "gguf", "--out", "o.gguf"], ["finetune", "chat", "--train", "t.jsonl"],
    ["finetune", "classify", "--train", "t.tsv"],
])
def test_every_command_that_takes_a_model_takes_model(command):
    """--model on every such command (--run its alias where it was the name before)."""
    from zenlm.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args([*command, "--model", "M"]).model == "M"
    if command[0] != "finetune":  # --run there would read as the run being written
        assert parser.parse_args([*command, "--run", "M"]).model == "M"


@pytest.mark.slow
def test_shakespeare_learns_from_the_command_line(tmp_path, shakespeare_file, shakespeare_text):
    """A longer run (1500 steps) on real English: well below the uniform baseline of ln 512 = 6.24.

    Measured here: val loss 3.11, 2.39 bits/byte; the bounds leave a wide margin.
    """
    import math

    data, run = tmp_path / "data", tmp_path / "run"
    p = run_cli("prepare", shakespeare_file, "--out", data, "--vocab-size", 512)
    assert p.returncode == 0, p.stderr
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "data": {"path": str(data)},
                                      "train": {**RECIPE["train"], "out_dir": str(run), "max_steps": 1500,
                                                "batch_size": 16, "log_every": 50, "eval_every": 500}}))
    p = run_cli("pretrain", "--config", recipe, timeout=900)
    assert p.returncode == 0, p.stderr
    val = json.loads((run / "summary.json").read_text())["val"]
    assert val["val_loss"] < min(3.5, math.log(512) - 2.5)
    held_out = tmp_path / "tail.txt"
    held_out.write_text(shakespeare_text[-4000:])
    got = json.loads(run_cli("eval", "--run", run, "--data", held_out, "--json").stdout)
    assert got["bpb"] < 2.8
    p = run_cli("generate", "--run", run, "--prompt", "ROMEO:\n", "--greedy", "--max-new-tokens", 30)
    assert p.returncode == 0 and len(p.stdout) > len("ROMEO:\n") + 10


def test_one_name_for_the_time_budget_and_the_run_folder(tmp_path, monkeypatch):
    """--minutes and --out on pretrain, finetune and speedrun (finetune's --max-minutes and
    speedrun's --name/--runs-dir still read)."""
    import zenlm.speedrun
    from zenlm.cli.finetune import COMMON
    from zenlm.cli.main import build_parser, main

    parser = build_parser()
    for command in (["pretrain"], ["finetune", "chat"], ["speedrun"]):
        args = parser.parse_args([*command, "--minutes", "3", "--out", "r"])
        assert args.minutes == 3.0 and args.out == "r", command
    assert parser.parse_args(["finetune", "classify", "--max-minutes", "4"]).minutes == 4.0
    assert COMMON["minutes"] == "train.max_minutes" and COMMON["out"] == "train.out_dir"

    seen = []
    monkeypatch.setattr(zenlm.speedrun, "speedrun", lambda cfg: seen.append(cfg))
    assert main(["speedrun", "--out", str(tmp_path / "sr"), "--minutes", "2"]) == 0
    assert (seen[0].runs_dir, seen[0].name, seen[0].minutes) == (str(tmp_path), "sr", 2.0)
    assert main(["speedrun", "--name", "old", "--runs-dir", str(tmp_path)]) == 0
    assert (seen[1].runs_dir, seen[1].name) == (str(tmp_path), "old")
    assert main(["speedrun", "--out", "a", "--name", "b"]) == 2


@pytest.mark.parametrize("flags,want", [
    ([], ("M", "fp32", "none")),
    (["--dtype", "fp16"], ("M", "fp16", "none")),
    (["--quantize", "q8_0"], ("M", "fp32", "q8_0")),
    (["--dtype", "f16"], ("M", "fp16", "none")),  # GGUF's names, as export spelled them before
    (["--dtype", "q8_0"], ("M", "fp32", "q8_0")),
])
def test_export_reads_one_dtype_vocabulary_and_the_old_names(flags, want):
    from zenlm.cli.export import _options
    from zenlm.cli.main import build_parser

    for model in (["M"], ["--model", "M"]):
        args = build_parser().parse_args(["export", *model, "--format", "gguf", "--out", "o", *flags])
        assert _options(args) == want
