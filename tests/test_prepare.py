"""``zenlm.infer.prepare``: one policy for decoding (merge LoRA, fuse, cast, quantize), and LoRA
adapters that survive int8."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import run_cli, write_addition_pairs
from zenlm.errors import ConfigError
from zenlm.infer.prepare import prepare_for_decoding
from zenlm.infer.quantize import Int4Linear, Int8Linear, quantize_int8
from zenlm.model.lora import LoRAConfig, LoRALinear, apply_lora, lora_modules


def with_adapters(model, seed: int = 1, scale: float = 0.1):
    """``model`` wrapped with LoRA on every projection, each with a real (nonzero) update."""
    model = copy.deepcopy(model)
    apply_lora(model, LoRAConfig(r=4, alpha=8.0, targets=["all"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in lora_modules(model).values():
            lora.lora_B.weight.copy_(torch.randn(lora.lora_B.weight.shape, generator=g) * scale)
    return model.eval()


def ids_of(tokenizer, text: str, n: int = 48) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(text)[:n]])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_int8_keeps_lora_adapters(loaded, corpus_text, monkeypatch):
    """A LoRA model through int8 computes what the merged fp32 model computes (up to int8's
    rounding), not what the base model without its adapters computes."""
    import zenlm.infer.quantize as quantize

    monkeypatch.setattr(quantize, "INT8_MAX_ROWS", 1 << 30)  # score through the int8 kernels
    ids = ids_of(loaded.tokenizer, corpus_text[:2000])
    tuned = with_adapters(loaded.model)
    base_logits, tuned_logits = loaded.model(ids), tuned(ids)
    assert rel(base_logits, tuned_logits) > 0.1  # the adapters matter

    merged = prepare_for_decoding(copy.deepcopy(tuned))  # fp32: merged and fused, same function
    assert not lora_modules(merged) and merged.blocks[0].attn.qkv_proj is not None
    assert torch.allclose(merged(ids), tuned_logits, atol=1e-4, rtol=1e-4)

    q = prepare_for_decoding(copy.deepcopy(tuned), quantize="int8")
    assert isinstance(q.blocks[0].attn.o_proj, Int8Linear) and isinstance(q.lm_head, Int8Linear)
    q_logits = q(ids)
    assert rel(q_logits, tuned_logits) < 0.05
    assert rel(q_logits, tuned_logits) < rel(base_logits, tuned_logits) / 4


def test_quantizing_an_unmerged_lora_model_is_refused(loaded):
    """replace_projections reads only weight and bias: on a LoRALinear it would drop the update."""
    tuned = with_adapters(loaded.model)
    with pytest.raises(ConfigError, match="LoRALinear.*merge LoRA adapters"):
        quantize_int8(tuned)
    assert isinstance(tuned.blocks[0].attn.o_proj, LoRALinear)


@pytest.mark.parametrize("kwargs,message", [
    ({"dtype": "fp16"}, "unknown dtype 'fp16': choose fp32, bf16, auto"),
    ({"quantize": "int3"}, "unknown quantization 'int3': choose none, int8, int4"),
    ({"quantize": "int4", "dtype": "bf16"}, "drop dtype bf16"),
])
def test_vocabulary_errors_are_config_errors(loaded, kwargs, message):
    model = copy.deepcopy(loaded.model)
    with pytest.raises(ConfigError, match=message):
        prepare_for_decoding(model, **kwargs)
    assert not hasattr(model.blocks[0].attn, "qkv_proj")  # refused before anything changed


@pytest.mark.parametrize("native", [False, True])
def test_int4_runs_whatever_the_machine_reports(loaded, corpus_text, monkeypatch, native):
    """int4 is weight-only (bf16 inputs, fp32 accumulation in torch's kernel), so it is not
    refused where bf16 products would be emulated; its float parts stay fp32 under auto."""
    import zenlm.hardware

    monkeypatch.setattr(zenlm.hardware, "native_bf16", lambda device="cpu": native)
    tuned = with_adapters(loaded.model)
    q = prepare_for_decoding(copy.deepcopy(tuned), dtype="auto", quantize="int4")
    assert isinstance(q.blocks[0].attn.qkv_proj, Int4Linear) and q.tok_emb.weight.dtype == torch.float32
    ids = ids_of(loaded.tokenizer, corpus_text[:2000], n=8)
    with torch.no_grad():
        tuned_logits = tuned(ids)
        assert rel(q(ids), tuned_logits) < rel(loaded.model(ids), tuned_logits) / 2


def test_dtype_auto_follows_the_hardware(loaded, monkeypatch):
    import zenlm.hardware

    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(zenlm.hardware, "native_bf16", lambda device="cpu", n=native: n)
        model = prepare_for_decoding(copy.deepcopy(loaded.model), dtype="auto")
        assert model.tok_emb.weight.dtype == want and model.blocks[0].attn.qkv_proj.weight.dtype == want


def test_a_classifier_is_merged_but_not_quantized(loaded):
    from zenlm.model.heads import Classifier

    clf = Classifier(with_adapters(loaded.model), ["a", "b"]).eval()
    ids, lengths = torch.tensor([[5, 6, 7, 8]]), torch.tensor([4])
    with torch.no_grad():
        want = clf(ids, lengths)
    with pytest.raises(ConfigError, match="classifier runs in float"):
        prepare_for_decoding(copy.deepcopy(clf), quantize="int8")
    prepare_for_decoding(clf)
    assert not lora_modules(clf)
    with torch.no_grad():
        assert torch.allclose(clf(ids, lengths), want, atol=1e-5)


def test_a_lora_fine_tune_decodes_in_int8_from_the_command_line(tmp_path, trained_run):
    """finetune chat (LoRA) -> generate --quantize int8: the library's int8 text of the merged
    model, and that model's logits are the fine-tune's, not the base's."""
    import zenlm
    from zenlm.infer import generate

    data = write_addition_pairs(tmp_path / "pairs.jsonl")
    run = tmp_path / "chat"
    p = run_cli("finetune", "chat", "--model", trained_run, "--train", data, "--prompt-field", "question",
                "--response-field", "answer", "--out", run, "--max-steps", 6, "--lr", "3e-2",
                "--lora-targets", "all", "--batch-size", 8, "--set", "train.progress=false")
    assert p.returncode == 0, p.stderr[-3000:]
    prompt = "Add 2 and 3?"
    p = run_cli("generate", "--model", run, "--prompt", prompt, "--raw", "--greedy",
                "--max-new-tokens", 12, "--quantize", "int8")
    assert p.returncode == 0, p.stderr

    tuned = zenlm.load(run)
    assert lora_modules(tuned.model)
    q = prepare_for_decoding(copy.deepcopy(tuned.model), quantize="int8")
    want = generate(q, tuned.tokenizer, prompt, temperature=0, max_new_tokens=12)
    assert p.stdout == prompt + want + "\n"
    ids = torch.tensor([tuned.tokenizer.encode_prompt(prompt + " It is 5.")])
    with torch.no_grad():
        tuned_logits, base_logits = tuned.model(ids), zenlm.load(trained_run).model(ids)
        assert rel(q(ids), tuned_logits) < rel(base_logits, tuned_logits) / 2
