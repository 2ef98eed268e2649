"""Evaluation: loss, perplexity and bits-per-byte, checked against sums done by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zenlm.data.loader import TokenShards
from zenlm.errors import DataError
from zenlm.eval.perplexity import evaluate_batches, evaluate_text, text_windows
from zenlm.tokenizer import EOT


@torch.no_grad()
def losses_by_hand(model, ids: list[int], seq_len: int) -> torch.Tensor:
    """Per-target losses (nats) of a token stream in non-overlapping windows, one window at a time."""
    out = []
    for s in range(0, len(ids) - 1, seq_len):
        chunk = ids[s:s + seq_len + 1]
        x, y = torch.tensor([chunk[:-1]]), torch.tensor(chunk[1:])
        logits = model(x)[0].double()
        out.append(F.cross_entropy(logits, y, reduction="none"))
    return torch.cat(out)


@pytest.mark.parametrize("seq_len,batch", [(64, 8), (17, 3), (64, 1)])
def test_bits_per_byte_equals_loss_times_tokens_over_bytes(loaded, corpus_text, seq_len, batch):
    model, tok = loaded.model, loaded.tokenizer
    text = corpus_text[-6000:] + "\nnon-ASCII: 世界 🎉 naïve café\n"
    assert EOT not in text
    res = evaluate_text(model, tok, text, seq_len=seq_len, batch=batch)
    ids = [tok.eot_id] + tok.encode(text)
    n_bytes = len(text.encode("utf-8"))
    assert res.tokens == len(ids) - 1  # every token after the separator is predicted once
    assert res.bytes == n_bytes  # no special token among the targets: every byte counted once
    by_hand = losses_by_hand(model, ids, seq_len)
    assert len(by_hand) == res.tokens
    assert res.loss == pytest.approx(by_hand.mean().item(), rel=1e-6)
    assert res.bits_per_byte == pytest.approx(res.loss * res.tokens / (math.log(2) * n_bytes), rel=1e-9)
    assert res.bits_per_byte == pytest.approx(by_hand.sum().item() / (math.log(2) * n_bytes), rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(res.loss), rel=1e-12)
    assert res.as_dict()["bpb"] == res.bits_per_byte


def test_trained_model_beats_uniform(loaded, corpus_text):
    res = evaluate_text(loaded.model, loaded.tokenizer, corpus_text[-8000:])
    assert res.loss < math.log(loaded.tokenizer.vocab_size) - 0.5
    assert res.perplexity < loaded.tokenizer.vocab_size
    assert 0 < res.bits_per_byte < 8  # better than spelling out every byte


def test_special_token_targets_count_in_loss_but_not_in_bits_per_byte(loaded):
    model, tok = loaded.model, loaded.tokenizer
    text = "def f(x):\n    return x\n" + EOT + "class A:\n    pass\n"
    ids = [tok.eot_id] + tok.encode(text)
    assert ids.count(tok.eot_id) == 2
    res = evaluate_text(model, tok, text)
    by_hand = losses_by_hand(model, ids, model.config.max_seq_len)
    targets = torch.tensor(ids[1:])
    ordinary = targets != tok.eot_id
    n_bytes = len(text.replace(EOT, "").encode())
    assert res.bytes == n_bytes
    assert res.loss == pytest.approx(by_hand.mean().item(), rel=1e-6)
    assert res.bits_per_byte == pytest.approx(by_hand[ordinary].sum().item() / (math.log(2) * n_bytes), rel=1e-6)


def test_text_windows_cover_every_target_once():
    ids = list(range(100, 150))  # 50 tokens -> 49 targets
    batches = list(text_windows(ids, seq_len=8, batch=4))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    targets = ys[ys != -100].tolist()
    assert targets == ids[1:]
    inputs = xs[ys != -100].tolist()
    assert inputs == ids[:-1]
    assert all(x.shape == y.shape for x, y in batches)


def test_evaluate_batches_on_val_shards_matches_by_hand(loaded, prepared):
    model = loaded.model
    shards = TokenShards(prepared)
    token_bytes = loaded.tokenizer.token_byte_lengths()
    res = evaluate_batches(model, shards.val_batches(4, 32, max_batches=3), token_bytes)
    losses, nbytes = [], 0
    with torch.no_grad():
        for x, y in shards.val_batches(4, 32, max_batches=3):
            loss = F.cross_entropy(model(x).flatten(0, 1).double(), y.flatten(), reduction="none")
            keep = torch.from_numpy(token_bytes)[y.flatten()] > 0
            losses.append((loss, keep))
            nbytes += int(torch.from_numpy(token_bytes)[y.flatten()].sum())
    all_loss = torch.cat([l for l, _ in losses])
    counted = torch.cat([l[k] for l, k in losses])
    assert res.tokens == 3 * 4 * 32 == len(all_loss)
    assert res.bytes == nbytes
    assert res.loss == pytest.approx(all_loss.mean().item(), rel=1e-6)
    assert res.bits_per_byte == pytest.approx(counted.sum().item() / (math.log(2) * nbytes), rel=1e-6)
    # bytes per token as the manifest measured it agrees with the token byte table on val
    assert res.bytes / res.tokens == pytest.approx(shards.bytes_per_token("val"), rel=0.25)


def test_evaluate_restores_training_mode(loaded):
    model = loaded.model
    model.train()
    try:
        evaluate_text(model, loaded.tokenizer, "def f():\n    pass\n")
        assert model.training
    finally:
        model.eval()


def test_empty_text_is_refused(loaded):
    for text in ("", "   \n\t"):
        with pytest.raises(DataError, match="empty"):
            evaluate_text(loaded.model, loaded.tokenizer, text)


def test_uniform_model_has_log_vocab_loss():
    """A model whose logits are all equal scores ln(V) nats per token, whatever the text."""
    from zenlm.config import TransformerConfig
    from zenlm.model import Transformer

    model = Transformer(TransformerConfig(vocab_size=300, n_layer=1, n_head=2, d_model=32, max_seq_len=16))
    with torch.no_grad():
        model.tok_emb.weight.zero_()  # tied head of zeros: every logit 0
    y = torch.randint(0, 300, (2, 16))
    bytes_per_token = np.full(300, 2)
    res = evaluate_batches(model, [(y, y)], bytes_per_token)
    assert res.loss == pytest.approx(math.log(300), rel=1e-6)
    assert res.perplexity == pytest.approx(300, rel=1e-5)
    assert res.bits_per_byte == pytest.approx(math.log2(300) / 2, rel=1e-6)
