"""LoRA adapters and fine-tuned classifiers against their peers: peft and transformers.

zenlm writes the base model with ``export_hf`` and the adapters with ``save_adapter``;
transformers loads the base, peft puts the adapters on it, and the logits must equal zenlm's.
The merged exports (adapters folded into the weights; a classifier written as the family's
``*ForSequenceClassification``) load in transformers alone and give the same logits too.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

import zenlm
from zenlm.config import TransformerConfig
from zenlm.interop.hf import export_hf
from zenlm.interop.peft import save_adapter
from zenlm.model import Transformer
from zenlm.model.adapt import adapt
from zenlm.model.lora import LoRAConfig

from helpers import quiet_transformers

transformers = quiet_transformers()
peft = pytest.importorskip("peft")


def tiny_llama(vocab: int) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=vocab, n_layer=3, n_head=4, n_kv_head=2, d_model=64,
                                          max_seq_len=64, tie_embeddings=False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms off 1, so every weight matters
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else 0.02))
    return model.eval()


def randomise_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def batch(vocab: int, lengths=(11, 7, 16), seed=3):
    """Right-padded rows of real tokens (ids >= 1; 0 is the pad) and their lengths."""
    rng = random.Random(seed)
    x = torch.zeros(len(lengths), max(lengths), dtype=torch.int64)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.tensor([rng.randrange(1, vocab) for _ in range(n)])
    return x, torch.tensor(lengths)


def test_causal_lm_adapters_load_in_peft_with_the_same_logits(tmp_path, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    vocab = tokenizer.vocab_size
    model = tiny_llama(vocab)
    export_hf(model, tokenizer, tmp_path / "base")
    lora = adapt(model, task="chat", method="lora",
                 lora=LoRAConfig(r=4, alpha=8, dropout=0.0, targets=["all"]), freeze_layers=1).eval()
    randomise_adapters(lora)
    out = save_adapter(lora, tmp_path / "adapter", base=str(tmp_path / "base"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["layers_to_transform"] == [1, 2]
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    x, _ = batch(vocab, lengths=(16, 16, 16))
    ours = lora(x)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    with torch.no_grad():
        plain = hf(x).logits
    peft_model = PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        theirs = peft_model(x).logits
    assert not torch.allclose(plain, theirs, atol=1e-3)  # the adapters do change the model ...
    assert torch.allclose(ours, theirs, atol=1e-4)  # ... exactly as zenlm's do
    # PEFT's merge gives the weights zenlm's merged export holds
    export_hf(lora, tokenizer, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, ours, atol=1e-4)
    unloaded = peft_model.merge_and_unload()
    for name, p in merged.state_dict().items():
        assert torch.allclose(p, unloaded.state_dict()[name], atol=1e-6), name


def test_classifier_adapters_and_merged_export_match_transformers(tmp_path, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    vocab = tokenizer.vocab_size
    model = tiny_llama(vocab)
    export_hf(model, tokenizer, tmp_path / "base")
    clf = adapt(model, task="classify", labels=["neg", "neu", "pos"], method="lora",
                lora=LoRAConfig(r=2, alpha=4, dropout=0.0, targets=["q", "v"])).eval()
    randomise_adapters(clf)
    out = save_adapter(clf, tmp_path / "adapter", base=str(tmp_path / "base"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    x, lengths = batch(vocab)
    ours = clf(x, lengths)
    pad = tokenizer.eot_id
    assert pad == 0
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3, pad_token_id=pad,
                                                            dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(hf, out).eval()
    mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        theirs = peft_model(input_ids=x, attention_mask=mask).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    # merged: a plain LlamaForSequenceClassification with the labels named
    export_hf(clf, tokenizer, tmp_path / "merged")
    hf_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForSequenceClassification"]
    assert hf_config["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x, attention_mask=mask).logits, ours, atol=1e-4)


def test_a_finetune_runs_adapter_loads_in_peft(tmp_path, trained_run):
    """The adapter a real `finetune` run writes, on the HF export of its real base."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from test_finetune import toy_rows, write_tsv
    from zenlm.train.finetune import finetune, resolve_finetune

    train = write_tsv(tmp_path / "train.tsv", toy_rows(200, seed=9))
    cfg = resolve_finetune({"task": "classify", "base": str(trained_run),
                            "data": {"train": str(train), "text_col": "sentence"},
                            "lora": {"targets": ["attn", "mlp"]},
                            "train": {"out_dir": str(tmp_path / "run"), "max_steps": 10, "lr": 1e-2,
                                      "progress": False, "device": "cpu"}})
    finetune(cfg, zenlm.load(str(trained_run)), log=lambda *a, **k: None)
    lm = zenlm.load(str(tmp_path / "run"))
    zenlm.export_hf(zenlm.load(str(trained_run)), str(tmp_path / "base-hf"))
    texts = ["alpha return beta", "import self", "data class value while"]
    ids = [lm.tokenizer.encode_prompt(t) for t in texts]
    x = torch.zeros(3, max(map(len, ids)), dtype=torch.int64)
    for i, row in enumerate(ids):
        x[i, :len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(r) for r in ids])
    with torch.no_grad():
        ours = lm.model(x, lengths)
    hf = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base-hf", num_labels=3, pad_token_id=lm.tokenizer.eot_id, dtype=torch.float32)
    theirs_model = PeftModel.from_pretrained(hf, tmp_path / "run" / "adapter").eval()
    mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        theirs = theirs_model(input_ids=x, attention_mask=mask).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_gpt2_family_classifier_exports_merged_and_refuses_peft_adapters(tmp_path, prepared):
    """A GPT-2-family model from `zenlm pretrain`: LoRA fine-tune, then the merged export loads
    as GPT2ForSequenceClassification with the same logits. PEFT adapters for GPT-2's fused
    c_attn are refused by name, and the run says so instead of failing."""
    from transformers import AutoModelForSequenceClassification

    from helpers import run_config
    from test_finetune import toy_rows, write_tsv
    from zenlm.train.finetune import finetune, resolve_finetune
    from zenlm.train.loop import pretrain

    base = tmp_path / "gpt2"
    pretrain(run_config(prepared, base, {"family": "gpt2", "n_kv_head": None}, max_steps=3),
             log=lambda *a, **k: None)
    train = write_tsv(tmp_path / "train.tsv", toy_rows(100, seed=4))
    cfg = resolve_finetune({"task": "classify", "base": str(base),
                            "data": {"train": str(train), "text_col": "sentence"},
                            "lora": {"targets": ["q", "v", "o", "up"]},
                            "train": {"out_dir": str(tmp_path / "run"), "max_steps": 4, "lr": 1e-2,
                                      "progress": False, "device": "cpu"}})
    lines = []
    summary = finetune(cfg, zenlm.load(str(base)), log=lines.append)
    assert "adapter" not in summary
    assert any("adapter not written" in line and "gpt2" in line for line in lines)
    lm = zenlm.load(str(tmp_path / "run"))
    zenlm.export_hf(lm, str(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == \
        ["GPT2ForSequenceClassification"]
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x, lengths = batch(lm.tokenizer.vocab_size)
    mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x, attention_mask=mask).logits, lm.model(x, lengths), atol=1e-4)
