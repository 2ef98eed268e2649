"""Int8 decoding: close to fp32, same greedy text on a trained model, both code paths covered."""

from __future__ import annotations

import copy

import torch

from zenlm.infer import generate
from zenlm.infer.quantize import INT8_MAX_ROWS, Int8Linear, quantize_int8


def test_int8_linear_matches_float_within_quantization_error():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 160)
    q = Int8Linear.from_linear(lin)
    for rows in (1, 7, INT8_MAX_ROWS, INT8_MAX_ROWS + 1, 200):  # the int8 and the dequantized path
        x = torch.randn(rows, 96)
        ref = lin(x)
        err = (q(x) - ref).abs().max() / ref.abs().max()
        assert err < 0.02, (rows, float(err))
    assert q.weight_t.dtype == torch.int8 and q.weight_t.shape == (96, 160)


def test_quantized_model_keeps_loss_and_greedy_text(loaded, corpus_text, monkeypatch):
    import zenlm.infer.quantize as quantize
    from zenlm.eval.perplexity import evaluate_text

    monkeypatch.setattr(quantize, "INT8_MAX_ROWS", 1 << 30)  # score through the int8 x int8 path

    model = copy.deepcopy(loaded.model)
    quantize_int8(model)
    assert isinstance(model.blocks[0].attn.o_proj, Int8Linear) and isinstance(model.blocks[0].mlp.up_proj, Int8Linear)
    assert isinstance(model.blocks[0].mlp.down_proj, torch.nn.Linear)  # kept float by default
    assert isinstance(model.blocks[0].attn.q_proj, torch.nn.Linear)
    text = corpus_text[:4000]
    base = evaluate_text(loaded.model, loaded.tokenizer, text, seq_len=32).loss
    quant = evaluate_text(model, loaded.tokenizer, text, seq_len=32).loss
    assert abs(quant - base) / base < 0.02
    prompt = "def main():\n"
    a = generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=16, temperature=0)
    b = generate(model, loaded.tokenizer, prompt, max_new_tokens=16, temperature=0)
    assert len(b) > 0 and a[:4] == b[:4]
