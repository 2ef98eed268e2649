"""The chunked head + cross-entropy gives F.cross_entropy's loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

import zenlm.model.loss as LS
from zenlm.config import TransformerConfig
from zenlm.model import Transformer
from zenlm.model.loss import head_cross_entropy


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 rows, so that a few hundred rows cross several chunk boundaries."""
    monkeypatch.setattr(LS, "MIN_ROWS", 64)
    monkeypatch.setattr(LS, "CHUNK_ELEMENTS", 1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bf16", [False, True])
def test_loss_and_gradients_match_cross_entropy(small_chunks, reduction, bf16):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 48, generator=g, requires_grad=True)
    w = (torch.randn(500, 48, generator=g) * 0.2).requires_grad_()
    t = torch.randint(0, 500, (300,), generator=g)
    t[::7] = -100  # masked positions carry neither loss nor gradient
    out = {}
    for name, fn in (("fused", lambda: head_cross_entropy(h, w, t, reduction)),
                     ("plain", lambda: F.cross_entropy(F.linear(h, w), t, reduction=reduction))):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = fn()
        out[name] = (loss, *torch.autograd.grad(loss * 1.5, [h, w]))
    for got, want in zip(out["fused"], out["plain"]):
        assert got.dtype == want.dtype and got.shape == want.shape
        if bf16:  # both round products to bf16, at different points: compare as a whole
            assert (got - want).norm() <= 1e-2 * want.norm()
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not out["fused"][1][::7].any()  # no gradient into masked rows


def test_a_frozen_head_and_an_all_masked_batch():
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(20, 8)  # frozen (LoRA fine-tuning): only the input gradient
    loss = head_cross_entropy(h, w, torch.randint(0, 20, (10,)))
    loss.backward()
    assert h.grad is not None and w.grad is None
    nothing = head_cross_entropy(h, w, torch.full((10,), -100))
    assert nothing.item() == 0.0  # F.cross_entropy would give NaN
    with pytest.raises(ValueError, match="reduction"):
        head_cross_entropy(h, w, torch.zeros(10, dtype=torch.long), "none")


def tiny_model_and_batch(tied: bool, masked: tuple[int, slice]):
    """A one-layer Llama (vocab 300), inputs (3, 64) and their next-token targets, ``masked`` -100."""
    cfg = TransformerConfig.preset("llama", vocab_size=300, n_layer=1, n_head=2, d_model=32,
                                   n_kv_head=2, max_seq_len=64, tie_embeddings=tied)
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(0, 300, (3, 65))
    y = x[:, 1:].clone()
    y[masked] = -100
    return model, x, y


@pytest.mark.parametrize("tied", [True, False])
def test_model_loss_equals_cross_entropy_of_its_logits(small_chunks, tied):
    model, x, y = tiny_model_and_batch(tied, (0, slice(None, 10)))
    loss = model(x[:, :-1], y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = model(x[:, :-1])
    want = F.cross_entropy(logits.reshape(-1, 300), y.reshape(-1))
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-6)


def test_lm_loss_gives_one_loss_whichever_way_it_computes_it(small_chunks, monkeypatch):
    """Chunked head (a plain matrix, eager), the plain loss of ``model.logits`` (a head that is
    no plain matrix; a compiled graph, which also keeps the untargeted positions) and the
    per-token losses: the same numbers."""
    from zenlm.model.loss import lm_loss

    model, x, y = tiny_model_and_batch(False, (1, slice(5, 30)))
    h = model.hidden_states(x[:, :-1])
    calls = []
    monkeypatch.setattr(LS, "head_cross_entropy", lambda *a: calls.append(a) or head_cross_entropy(*a))
    chunked = lm_loss(model, h, y, "sum")
    assert len(calls) == 1 and calls[0][0].shape[0] == int((y != -100).sum())  # untargeted rows dropped
    per_token = lm_loss(model, h, y, "none")
    assert per_token.shape == y.shape and not per_token[1, 5:30].any()
    with monkeypatch.context() as m:
        m.setattr(type(model), "head_weight", lambda self: None)  # e.g. a quantized head
        plain = lm_loss(model, h, y, "sum")
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        compiled = lm_loss(model, h, y, "mean")
    assert len(calls) == 1  # neither of these went through the chunked loss
    torch.testing.assert_close(plain, chunked, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(per_token.sum(), chunked, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(compiled, chunked / (y != -100).sum(), rtol=1e-5, atol=1e-5)
