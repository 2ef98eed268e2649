"""`zenlm finetune`, `zenlm predict` and `zenlm eval --task` as a user runs them (subprocesses)."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from helpers import run_cli, write_addition_pairs
from test_cli import assert_one_line_error
from test_finetune import toy_rows, write_tsv


@pytest.fixture(scope="module")
def cli_classifier(tmp_path_factory, trained_run):
    root = tmp_path_factory.mktemp("cli-ft")
    train = write_tsv(root / "train.tsv", toy_rows(400, seed=1))
    val = write_tsv(root / "val.tsv", toy_rows(60, seed=2))
    run = root / "run"
    p = run_cli("finetune", "classify", "--model", trained_run, "--train", train, "--val", val,
                "--text-col", "sentence", "--label-col", "label", "--out", run, "--max-steps", 60,
                "--lr", "1e-2", "--lora-targets", "all", "--layer-decay", "0.9", "--class-weights",
                "balanced", "--set", "train.progress=false", "--set", "train.log_every=20")
    assert p.returncode == 0, p.stderr[-3000:]
    return {"root": root, "run": run, "train": train, "val": val, "proc": p, "base": trained_run}


def test_finetune_classify_reports_accuracy_f1_and_confusion(cli_classifier):
    p, run = cli_classifier["proc"], cli_classifier["run"]
    assert "Traceback" not in p.stderr
    assert "classify: 400 train / 60 val examples, 3 classes (cls, imp, ret)" in p.stdout
    line = next(x for x in p.stdout.splitlines() if x.startswith("val accuracy"))
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['val']['val_accuracy']:.4f}" in line and "macro-F1" in line and "confusion.png" in line
    assert summary["val"]["val_accuracy"] >= 0.9
    assert (run / "confusion.png").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["finetune"]["class_weights"] == "balanced" and saved["lora"]["targets"] == ["all"]
    assert sorted({round(g["lr_scale"], 6) for g in saved["param_groups"]}) == [0.81, 0.9, 1.0]


def test_predict_keeps_rows_and_adds_label_and_probabilities(cli_classifier):
    root, run = cli_classifier["root"], cli_classifier["run"]
    rows = toy_rows(20, seed=7)
    src = root / "new.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "sentence"])
        for i, (text, _) in enumerate(rows):
            w.writerow([i, f'{text}, "quoted"'])
    out = root / "pred.jsonl"
    p = run_cli("predict", "--model", run, "--input", src, "--out", out)
    assert p.returncode == 0, p.stderr
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in got] == [str(i) for i in range(20)]
    assert all(r["sentence"].endswith('"quoted"') for r in got)
    for r in got:
        probs = [r["prob_cls"], r["prob_imp"], r["prob_ret"]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert r["label"] == ["cls", "imp", "ret"][probs.index(max(probs))]
    correct = sum(r["label"] == y for r, (_, y) in zip(got, rows))
    assert correct >= 17
    # TSV with a label column already: the prediction goes next to it; stdin lines -> JSONL stdout
    out_tsv = root / "pred.tsv"
    assert run_cli("predict", "--run", run, "--input", cli_classifier["val"], "--output", out_tsv).returncode == 0
    header = out_tsv.read_text().splitlines()[0].split("\t")
    assert header == ["sentence", "label", "predicted_label", "prob_cls", "prob_imp", "prob_ret"]
    import subprocess
    import sys

    from helpers import cli_env

    p = subprocess.run([sys.executable, "-m", "zenlm.cli.main", "predict", "--run", str(run)],
                       input="alpha import beta\nreturn gamma\n", capture_output=True, text=True,
                       env=cli_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert [r["text"] for r in lines] == ["alpha import beta", "return gamma"]
    assert [r["label"] for r in lines] == ["imp", "ret"]


def test_eval_compares_fine_tuned_zero_shot_and_few_shot(cli_classifier):
    val, run, train = cli_classifier["val"], cli_classifier["run"], cli_classifier["train"]
    common = ["--data", val, "--task", "classify", "--text-col", "sentence", "--json"]
    tuned = run_cli("eval", "--model", run, *common)
    assert tuned.returncode == 0, tuned.stderr
    tuned = json.loads(tuned.stdout)
    summary = json.loads((run / "summary.json").read_text())
    assert tuned["mode"] == "fine-tuned head" and tuned["n"] == 60
    assert tuned["accuracy"] == pytest.approx(summary["val"]["val_accuracy"])
    import zenlm
    from zenlm.eval.choice import prompt_classify

    rows = toy_rows(60, seed=2)  # what val.tsv holds
    labels, words = ["cls", "imp", "ret"], ["class", "import", "return"]
    base = zenlm.load(str(cli_classifier["base"]))
    zero_shot, zero_shot_norm = prompt_classify(base.model, base.tokenizer, [t for t, _ in rows],
                                                [labels.index(y) for _, y in rows], labels, words)
    for shots in (0, 3):
        p = run_cli("eval", "--model", cli_classifier["base"], *common, "--labels",
                    "cls=class,imp=import,ret=return", "--shots", shots, "--train", train,
                    "--confusion", cli_classifier["root"] / f"cm{shots}.png")
        assert p.returncode == 0, p.stderr
        res = json.loads(p.stdout)
        assert res["mode"] == f"{shots}-shot base prompt" and res["n"] == 60
        confusion = res["confusion"]
        assert sum(map(sum, confusion)) == 60
        assert res["accuracy"] == pytest.approx(sum(confusion[i][i] for i in range(3)) / 60)
        if shots == 0:  # the command is the library call, nothing more
            assert res["accuracy"] == pytest.approx(zero_shot.accuracy)
            assert res["accuracy_norm"] == pytest.approx(zero_shot_norm)
            assert confusion == zero_shot.confusion
        assert (cli_classifier["root"] / f"cm{shots}.png").read_bytes()[:4] == b"\x89PNG"


def test_export_writes_the_fine_tuned_classifier_merged_for_transformers(cli_classifier):
    """`zenlm export RUN` on a LoRA classifier run: a sequence-classification folder with the
    adapters merged, which transformers scores like zenlm does."""
    import torch
    from transformers import AutoModelForSequenceClassification

    import zenlm

    run, out = cli_classifier["run"], cli_classifier["root"] / "exported"
    p = run_cli("export", run, "--format", "hf", "--out", out)
    assert p.returncode == 0, p.stderr
    lm = zenlm.load(str(run))
    texts = ["alpha import beta", "return gamma delta", "class value"]
    ids = [lm.tokenizer.encode_prompt(t) for t in texts]
    x = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.int64)
    for i, row in enumerate(ids):
        x[i, :len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(r) for r in ids])
    hf = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.id2label == {0: "cls", 1: "imp", 2: "ret"}
    mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        ours, theirs = lm.model(x, lengths), hf(input_ids=x, attention_mask=mask).logits
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_eval_multiple_choice(tmp_path, trained_run, corpus_text):
    lines = [x for x in corpus_text.splitlines() if len(x.strip()) > 30][:30]
    rows = [{"context": x[:20], "choices": [x[20:28], "~~##@@%%"], "gold": 0} for x in lines]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = run_cli("eval", "--model", trained_run, "--task", "choice", "--data", data, "--train", data,
                "--shots", 2)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("30 items, 2-shot: accuracy ") and "length-normalised" in p.stdout
    assert float(p.stdout.split("accuracy ")[1].split()[0]) >= 0.9


def test_finetune_chat_from_prompt_response_pairs(tmp_path, trained_run):
    data = write_addition_pairs(tmp_path / "pairs.jsonl")
    run = tmp_path / "chat"
    p = run_cli("finetune", "chat", "--model", trained_run, "--train", data, "--prompt-field", "question",
                "--response-field", "answer", "--out", run, "--max-steps", 8, "--method", "full",
                "--lr", "3e-3", "--batch-size", 8, "--set", "train.progress=false")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "chat: 90 train / 10 val conversations" in p.stdout
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 8] and evals[1]["val_loss"] < evals[0]["val_loss"]


@pytest.mark.parametrize("args,fragments", [
    (["finetune", "classify", "--train", "{train}", "--model", "{base}", "--text-col", "sentense"],
     ["no column 'sentense'", "did you mean 'sentence'"]),
    (["finetune", "classify", "--train", "{train}", "--model", "{base}", "--text-col", "sentence",
      "--lora-targets", "q,kk"], ["unknown lora target key 'kk'", "did you mean 'k'"]),
    (["finetune", "classify", "--train", "{train}", "--text-col", "sentence"], ["base is not set"]),
    (["finetune", "classify", "--train", "{train}", "--model", "{base}", "--text-col", "sentence",
      "--set", "finetune.layer_decy=0.9"], ["unknown config key 'finetune.layer_decy'",
                                           "did you mean 'finetune.layer_decay'"]),
    (["predict", "--run", "{base}", "--input", "{train}"], ["is not a classifier"]),
    (["predict", "--model", "{base}", "--dtype", "f32"], ["unknown dtype 'f32'"]),
    (["finetune", "classify", "--resume", "{base}", "--out", "elsewhere"],
     ["continues that run in its own folder", "drop --out"]),
    (["finetune", "chat", "--resume", "{base}"], ["is a pretraining run", "zenlm pretrain --resume"]),
    (["eval", "--model", "{base}", "--task", "classify", "--data", "{train}", "--text-col", "sentence",
      "--shots", "2"], ["--shots needs --train"]),
])
def test_one_line_errors(cli_classifier, args, fragments):
    fill = {"train": str(cli_classifier["train"]), "base": str(cli_classifier["base"])}
    p = run_cli(*[a.format(**fill) for a in args], cwd=cli_classifier["root"])
    assert_one_line_error(p, *fragments)
