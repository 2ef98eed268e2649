"""Fine-tuning through the one loop: classification heads (LoRA and full), chat SFT, training
strategies (layer-wise LR decay, freezing, class weights, early stopping), budgets and resume.

The base model is the session's tiny pretrained run (a real run folder loaded by zenlm.load);
the data are small synthetic tables and conversations written to disk per test.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import zenlm
from zenlm.checkpoint import latest_checkpoint, load_checkpoint
from zenlm.errors import CheckpointError, ConfigError, DataError
from zenlm.train.finetune import ChatTask, ClassifyTask, finetune, resolve_finetune

KEYWORDS = {"ret": "return", "imp": "import", "cls": "class"}  # label -> the word that decides it
FILLER = "alpha beta gamma delta for while if else self value data".split()


def quiet(*a, **k):
    pass


def toy_rows(n: int, seed: int = 0, labels=("ret", "imp", "cls"), weights=None) -> list[tuple[str, str]]:
    """Texts of filler words with one keyword; the keyword is the label."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choices(labels, weights=weights)[0]
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
        words.insert(rng.randrange(len(words) + 1), KEYWORDS[label])
        rows.append((" ".join(words), label))
    return rows


def write_tsv(path: Path, rows, text_col="sentence", label_col="label") -> Path:
    path.write_text(f"{text_col}\t{label_col}\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return path


def cls_cfg(tmp_path, base, train_file, **sections):
    train = {"out_dir": str(tmp_path / "run"), "batch_size": 16, "lr": 1e-2, "progress": False,
             "device": "cpu", "log_every": 1, "seed": 3, **sections.pop("train", {})}
    raw = {"task": "classify", "base": str(base),
           "data": {"train": str(train_file), "text_col": "sentence", **sections.pop("data", {})},
           "train": train, **sections}
    return resolve_finetune(raw)


@pytest.fixture(scope="module")
def toy_train(tmp_path_factory) -> Path:
    return write_tsv(tmp_path_factory.mktemp("toy") / "train.tsv", toy_rows(600))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, trained_run, toy_train):
    """A LoRA classifier trained once for this module (read-only)."""
    tmp = tmp_path_factory.mktemp("lora")
    cfg = cls_cfg(tmp, trained_run, toy_train, lora={"r": 4, "targets": ["all"]},
                  finetune={"layer_decay": 0.8}, train={"max_steps": 80, "eval_every": 40})
    summary = finetune(cfg, zenlm.load(str(trained_run)), log=quiet)
    return tmp / "run", summary, cfg


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# classification


def test_lora_classifier_learns_and_its_run_folder_says_so(lora_run, trained_run):
    run, summary, cfg = lora_run
    assert summary["task"] == "classify" and summary["step"] == 80
    assert summary["n_val"] == 60 and summary["n_train"] == 540  # 10% carved from train
    assert summary["val"]["val_accuracy"] >= 0.9, summary["val"]  # chance is 1/3
    assert summary["val"]["val_macro_f1"] >= 0.9
    assert summary["params_trainable"] < summary["params"] / 5
    evals = [r for r in records(run) if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [40, 80]
    # the saved config: the layer-wise LR groups, the labels, the strategy
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["labels"] == ["cls", "imp", "ret"]
    assert saved["finetune"]["layer_decay"] == 0.8 and saved["finetune"]["method"] == "lora"
    scales = {g["name"]: g["lr_scale"] for g in saved["param_groups"]}
    assert scales["layer_03.decay"] == 1.0  # the head, above the 2 blocks
    assert scales["layer_02.decay"] == pytest.approx(0.8)
    assert scales["layer_01.decay"] == pytest.approx(0.64)
    assert "layer_00.decay" not in scales  # LoRA: embeddings frozen, in no group
    assert resolve_finetune(saved) == cfg  # the saved config builds the same config again
    # the checkpoint holds only what trained: adapters and head
    weights, _, _ = load_checkpoint(latest_checkpoint(run), with_state=False)
    assert "head.score.weight" in weights
    assert all(".lora_" in k or k == "head.score.weight" for k in weights)
    # a real confusion-matrix PNG, and the matrix in the summary agrees with the accuracy
    png = (run / "confusion.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    cm = summary["confusion"]
    assert sum(map(sum, cm)) == 60
    assert sum(cm[i][i] for i in range(3)) / 60 == pytest.approx(summary["val"]["val_accuracy"])
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    # the carved val rows travel with the run, for scoring other ways on the same examples
    val = [json.loads(x) for x in (run / "val.jsonl").read_text().splitlines()]
    assert len(val) == 60 and set(val[0]) == {"sentence", "label"}
    train_rows = Path(cfg.data.train).read_text().splitlines()[1:]
    assert all(f"{r['sentence']}\t{r['label']}" in train_rows for r in val)


def test_a_finished_run_loads_and_reproduces_its_val_accuracy(lora_run):
    from zenlm.data.classify import carve_val
    from zenlm.eval.classify import classify_texts, score

    run, summary, cfg = lora_run
    lm = zenlm.load(str(run))
    assert lm.model.labels == ["cls", "imp", "ret"] and not lm.model.training
    rows = [line.split("\t") for line in Path(cfg.data.train).read_text().splitlines()[1:]]
    _, val = carve_val(len(rows), 0.1, 1000, cfg.train.seed)
    texts, gold = [rows[i][0] for i in val], [lm.model.labels.index(rows[i][1]) for i in val]
    probs = classify_texts(lm.model, lm.tokenizer, texts)
    assert torch.allclose(probs.sum(-1), torch.ones(len(texts)), atol=1e-5)
    res = score(gold, probs.argmax(-1).tolist(), lm.model.labels)
    assert res.accuracy == pytest.approx(summary["val"]["val_accuracy"])
    with pytest.raises(CheckpointError, match="fine-tuned run"):
        from zenlm.interop.load import load_run

        load_run(run)


def test_full_finetune_freezes_what_it_is_told(tmp_path, trained_run, toy_train):
    cfg = cls_cfg(tmp_path, trained_run, toy_train,
                  finetune={"method": "full", "freeze_embeddings": True, "freeze_layers": 1},
                  train={"max_steps": 6, "lr": 1e-3})
    assert cfg.train.lr == 1e-3
    base = zenlm.load(str(trained_run))
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    finetune(cfg, base, log=quiet)
    after = base.model.state_dict()  # the base module was trained in place
    for key in before:
        same = torch.equal(before[key], after[key])
        if key.startswith(("tok_emb", "blocks.0.")) or key == "lm_head.weight":
            assert same, key
        else:
            assert not same, key
    weights, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "run"), with_state=False)
    assert not any(k.startswith(("backbone.tok_emb", "backbone.blocks.0.")) for k in weights)
    assert "backbone.blocks.1.attn.q_proj.weight" in weights and "head.score.weight" in weights
    # loading the run gives the trained model back
    lm = zenlm.load(str(tmp_path / "run"))
    assert torch.equal(lm.model.backbone.blocks[1].attn.q_proj.weight, after["blocks.1.attn.q_proj.weight"])
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["finetune"]["freeze_layers"] == 1 and saved["finetune"]["freeze_embeddings"] is True


def test_class_weights_weight_the_loss(tmp_path, trained_run):
    rows = toy_rows(300, seed=5, labels=("ret", "imp"), weights=(9, 1))
    train = write_tsv(tmp_path / "imbalanced.tsv", rows)
    cfg = cls_cfg(tmp_path, trained_run, train, finetune={"class_weights": "balanced"},
                  train={"max_steps": 1})
    task = ClassifyTask(cfg, zenlm.load(str(trained_run)), quiet)
    n = len(task.train_y)
    counts = [task.train_y.count(i) for i in range(2)]
    assert task.labels == ["imp", "ret"] and counts[0] < counts[1] / 4
    assert task.class_weights.tolist() == pytest.approx([n / (2 * c) for c in counts])
    from zenlm.train.distributed import World

    model = task.build(World())
    batch = task.train_batch(torch.Generator())
    x, lengths, y = batch
    logits = model(x, lengths)
    assert task.loss(model, batch).item() == pytest.approx(
        F.cross_entropy(logits, y, weight=task.class_weights).item(), rel=1e-5)
    assert task.loss(model, batch).item() != pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-3)
    explicit = cls_cfg(tmp_path, trained_run, train, finetune={"class_weights": "1,3"})
    assert ClassifyTask(explicit, zenlm.load(str(trained_run)), quiet).class_weights.tolist() == [1.0, 3.0]
    with pytest.raises(DataError, match="give 2 positive numbers"):
        ClassifyTask(cls_cfg(tmp_path, trained_run, train, finetune={"class_weights": "1,2,3"}),
                     zenlm.load(str(trained_run)), quiet)


def test_early_stopping_stops_and_restores_the_best_weights(tmp_path, trained_run, toy_train):
    # A learning rate too small to change any prediction: val accuracy never beats the
    # evaluation at the start, so the run stops after `patience` evaluations and ends with
    # the start's weights.
    cfg = cls_cfg(tmp_path, trained_run, toy_train,
                  train={"max_steps": 100, "lr": 1e-6, "eval_every": 2, "early_stop_patience": 3,
                         "eval_at_start": True})
    lines = []
    torch.manual_seed(cfg.train.seed)
    summary = finetune(cfg, zenlm.load(str(trained_run)), log=lines.append)
    assert summary["step"] == 6
    assert any("early stop at step 6" in line for line in lines)
    assert summary["best"]["step"] == 0 and summary["best"]["metric"] == "val_accuracy"
    assert summary["val"]["restored_from_step"] == 0
    evals = [r for r in records(tmp_path / "run") if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6, 6]  # the last: after restoring
    assert evals[-1]["val_loss"] == pytest.approx(evals[0]["val_loss"], abs=1e-6)
    assert evals[1]["val_loss"] != evals[0]["val_loss"]  # the weights did move in between
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["early_stop_patience"] == 3
    with pytest.raises(ConfigError, match="needs train.eval_every"):
        cls_cfg(tmp_path, trained_run, toy_train, train={"early_stop_patience": 2})


def test_classify_resume_after_a_crash_matches_a_straight_run(tmp_path, trained_run, toy_train, monkeypatch):
    def cfg(out):
        return cls_cfg(out, trained_run, toy_train, train={"max_steps": 8, "ckpt_every": 4})

    straight = tmp_path / "a"
    finetune(cfg(straight), zenlm.load(str(trained_run)), log=quiet)
    crashed = tmp_path / "b"
    real = ClassifyTask.train_batch
    calls = {"n": 0}

    def crash(self, gen):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("power cut")
        return real(self, gen)

    monkeypatch.setattr(ClassifyTask, "train_batch", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        finetune(cfg(crashed), zenlm.load(str(trained_run)), log=quiet)
    monkeypatch.setattr(ClassifyTask, "train_batch", real)
    finetune(cfg(crashed), zenlm.load(str(trained_run)), resume=True, log=quiet)
    a = {r["step"]: r for r in records(straight / "run") if "loss" in r}
    b = {r["step"]: r for r in records(crashed / "run") if "loss" in r}
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], abs=1e-6), step
        assert a[step]["tokens"] == b[step]["tokens"]
    wa, _, _ = load_checkpoint(latest_checkpoint(straight / "run"), with_state=False)
    wb, _, _ = load_checkpoint(latest_checkpoint(crashed / "run"), with_state=False)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


def test_epochs_and_minutes_budgets(tmp_path, trained_run, toy_train):
    cfg = cls_cfg(tmp_path, trained_run, toy_train, finetune={"epochs": 2}, train={"batch_size": 64})
    summary = finetune(cfg, zenlm.load(str(trained_run)), log=quiet)
    assert summary["step"] == 2 * 9  # 540 examples in batches of up to 64, in pools by length
    assert summary["epochs"] == pytest.approx(2.0)
    timed = cls_cfg(tmp_path / "t", trained_run, toy_train, train={"max_minutes": 0.02})
    assert timed.train.max_steps is None and timed.finetune.epochs is None
    summary = finetune(timed, zenlm.load(str(trained_run)), log=quiet)
    assert 0 < summary["step"] and summary["train_seconds"] < 10


def test_length_bucketed_batches_cover_each_epoch_once():
    from zenlm.data.batching import BucketSampler, PackedSampler

    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(1000)]
    s = BucketSampler(lengths, 16, seed=1)
    batches = s.epoch_batches(0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.05 * sum(lengths)  # almost no padding
    assert s.epoch_batches(1) != batches and BucketSampler(lengths, 16, seed=1).epoch_batches(0) == batches
    ranks = [BucketSampler(lengths, 16, seed=1, rank=r, world=2).epoch_batches(0) for r in (0, 1)]
    seen = [i for r in ranks for b in r for i in b]
    assert sorted(seen) == list(range(1000))  # two ranks split one permutation
    packed = PackedSampler(lengths, 4, 63, seed=1).epoch_batches(0)
    rows = [row for b in packed for row in b]
    assert sorted(i for row in rows for i in row) == list(range(1000))
    assert all(sum(lengths[i] for i in row) <= 64 or len(row) == 1 for row in rows)
    assert len(rows) < 1000 * 0.7  # short examples do share rows


# ----------------------------------------------------------------------------------------------
# chat SFT

CAPITALS = {"France": "Paris", "Peru": "Lima", "Japan": "Tokyo", "Egypt": "Cairo", "Italy": "Rome",
            "Chile": "Santiago", "Kenya": "Nairobi", "Spain": "Madrid", "Cuba": "Havana"}


def write_chats(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        country = rng.choice(list(CAPITALS))
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"Capital of {country}?"},
            {"role": "assistant", "content": f"It is {CAPITALS[country]}."}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def chat_cfg(tmp_path, base, train_file, method="lora", **train):
    return resolve_finetune({"task": "chat", "base": str(base), "data": {"train": str(train_file)},
                             "finetune": {"method": method},
                             "train": {"out_dir": str(tmp_path / "chat"), "batch_size": 8,
                                       "progress": False, "device": "cpu", "log_every": 1,
                                       "seed": 1, **train}})


def test_packed_examples_are_computed_as_if_each_stood_alone():
    """Packing is a speed device only: every packed example's logits and per-token losses equal
    those of the same example in a row of its own (block-diagonal attention, positions that
    restart per example), for both position schemes."""
    from zenlm.config import TransformerConfig
    from zenlm.data.chat import ChatExample, to_batch
    from zenlm.model import Transformer

    g = torch.Generator().manual_seed(0)
    exs = [ChatExample(torch.randint(0, 200, (n,), generator=g).tolist(), [False, True] * (n // 2) + [True] * (n % 2))
           for n in (7, 12, 5, 9)]
    for family in ("gpt2", "llama"):
        torch.manual_seed(0)
        model = Transformer(TransformerConfig.preset(family, vocab_size=256, n_layer=2, n_head=4,
                                                     d_model=32, max_seq_len=64)).eval()
        x, y, seg = to_batch(exs, [[0, 1], [2, 3]], pad_id=0)
        assert seg[0].tolist()[:6] == [0] * 6 and seg[0, 7] == 1 and (seg[1, 13:] == -1).all()
        packed = model(x, segment_ids=seg)
        packed_loss = model(x, y, reduction="none", segment_ids=seg)
        # without the segment ids the second example of a row would see the first
        mixed = model(x)
        offsets = {0: (0, 0), 1: (0, 7), 2: (1, 0), 3: (1, 5)}
        for i, e in enumerate(exs):
            xs, ys, _ = to_batch(exs, [[i]], pad_id=0)
            alone = model(xs)
            alone_loss = model(xs, ys, reduction="none")
            r, o = offsets[i]
            n = len(e.ids) - 1
            assert torch.allclose(packed[r, o:o + n], alone[0, :n], atol=1e-5), (family, i)
            assert torch.allclose(packed_loss[r, o:o + n], alone_loss[0, :n], atol=1e-5)
            if o:
                assert not torch.allclose(mixed[r, o:o + n], alone[0, :n], atol=1e-3)


def test_chat_loss_is_on_assistant_tokens_only(tmp_path, trained_run):
    from zenlm.data.chat import PLAIN_TEMPLATE, render, to_batch

    base = zenlm.load(str(trained_run))
    tok = base.tokenizer
    assert tok.chat_template is None
    tok.chat_template = PLAIN_TEMPLATE  # what a fine-tune gives a model without a template
    messages = [{"role": "user", "content": "Peru?"},
                {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "Japan?"},
                {"role": "assistant", "content": "Tokyo."}]
    ex = render(tok, messages)
    assert len(ex.ids) <= 64
    # the tokens that carry loss are exactly the two replies and their end-of-text markers
    assert tok.decode([i for i, m in zip(ex.ids, ex.mask) if m]) == " Lima.<|endoftext|>\n Tokyo.<|endoftext|>\n"
    assert tok.decode(ex.ids) == tok.apply_chat_template(messages, add_generation_prompt=False)
    other = render(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    x, y, _ = to_batch([ex, other], [[0], [1]], pad_id=0)
    # targets: -100 exactly where the next token is not the assistant's (and on padding)
    for r, e in enumerate([ex, other]):
        n = len(e.ids) - 1
        want = [t if m else -100 for t, m in zip(e.ids[1:], e.mask[1:])]
        assert y[r, :n].tolist() == want and (y[r, n:] == -100).all()
    model = base.model.train()
    loss = model(x, y)
    per_token = model(x, y, reduction="none")
    assert (per_token[y == -100] == 0).all()
    logits = model(x)
    keep = y != -100
    assert loss.item() == pytest.approx(F.cross_entropy(logits[keep], y[keep]).item(), rel=1e-5)
    # masked positions carry no gradient: the loss does not move when only their logits would
    loss.backward()
    g = torch.autograd.grad(F.cross_entropy(logits[keep], y[keep]), logits)[0]
    assert (g[~keep] == 0).all() and (g[keep] != 0).any()


def test_chat_sft_lowers_the_held_out_assistant_loss(tmp_path, trained_run):
    train = write_chats(tmp_path / "chats.jsonl", 300)
    cfg = chat_cfg(tmp_path, trained_run, train, method="full", max_steps=40, lr=3e-3)
    assert cfg.train.eval_at_start and cfg.data.pack
    base = zenlm.load(str(trained_run))
    lines = []
    summary = finetune(cfg, base, log=lines.append)
    evals = [r for r in records(tmp_path / "chat") if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[0]["val_tokens"] == evals[-1]["val_tokens"] > 0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0, evals
    assert summary["n_val"] == 30
    assert any("packed into rows of 64" in line for line in lines)
    # the run loads with its template, and answers in the trained format
    lm = zenlm.load(str(tmp_path / "chat"))
    from zenlm.data.chat import PLAIN_TEMPLATE

    assert lm.tokenizer.chat_template == PLAIN_TEMPLATE
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Capital of Peru?"}],
                                              tokenize=True)
    out = zenlm.generate(lm, prompt, max_new_tokens=12, temperature=0)
    assert out.startswith(" It is"), out


def test_chat_data_errors_are_one_line(tmp_path, trained_run):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="no assistant message"):
        ChatTask(chat_cfg(tmp_path, trained_run, bad), zenlm.load(str(trained_run)), quiet)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match="no 'messages' list"):
        ChatTask(chat_cfg(tmp_path, trained_run, pairs), zenlm.load(str(trained_run)), quiet)


def test_finetune_under_torchrun_shards_the_data(tmp_path, trained_run, toy_train):
    """Two real processes (gloo): each rank trains on its half of every epoch, rank 0 writes."""
    import subprocess
    import sys

    from helpers import cli_env

    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "zenlm.cli.main", "finetune", "classify", "--model", str(trained_run),
           "--train", str(toy_train), "--text-col", "sentence", "--out", str(run), "--max-steps", "4",
           "--set", "train.progress=false", "--set", "train.device=cpu", "--set", "train.log_every=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cli_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("2 process(es) on cpu") == 1 and proc.stdout.count("done: ") == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4
    steps = [r["step"] for r in records(run) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    _, state, _ = load_checkpoint(latest_checkpoint(run))
    assert state["task"] == [{"epoch": 0, "pos": 4}, {"epoch": 0, "pos": 4}]  # each rank's position
    from zenlm.data.batching import BucketSampler

    lengths = list(range(540))
    halves = [BucketSampler(lengths, 16, seed=3, rank=r, world=2).epoch_batches(0) for r in (0, 1)]
    assert not {i for b in halves[0] for i in b} & {i for b in halves[1] for i in b}


def test_texts_are_stripped_so_the_last_token_is_the_texts_own(loaded):
    from zenlm.data.classify import encode_texts

    tok = loaded.tokenizer
    a, b, empty = encode_texts(tok, ["a fine film ", "a fine film", "  "], 64)
    assert a == b == tok.encode_prompt("a fine film") and a[0] == tok.bos_id
    assert empty == [tok.bos_id]  # nothing but the BOS: still a token to pool
    assert len(encode_texts(tok, ["word " * 100], 10)[0]) == 10
