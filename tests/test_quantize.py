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
    smoothed = smooth(copy.deepcopy(loaded.model), calib)
    with torch.no_grad():
        ref, got = loaded.model(x), smoothed(x)
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max()
    changed = smoothed.blocks[0].attn_norm.weight != loaded.model.blocks[0].attn_norm.weight
    assert changed.any()  # the factors really moved something
    model = quantize_int8(copy.deepcopy(loaded.model), calibration=calib)
    lins = [m for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert lins == [] and model.quantized == "int8-smoothed"
    text = corpus_text[:4000]
    base = evaluate_text(loaded.model, tok, text, seq_len=32).loss
    quant = evaluate_text(model, tok, text, seq_len=32).loss
    assert abs(quant - base) / base < 0.02
