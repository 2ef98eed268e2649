"""Batched generation of prompts of different lengths: padding must change nothing."""

from __future__ import annotations

import pytest
import torch

from zenlm.config import TransformerConfig
from zenlm.infer import SamplingConfig
from zenlm.infer.generate import generate, generate_batch
from zenlm.model import Transformer


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padded_batch_equals_each_row_alone(family):
    torch.manual_seed(0)
    kv = 2 if family == "llama" else None
    cfg = TransformerConfig.preset(family, vocab_size=300, n_layer=2, n_head=4, n_kv_head=kv,
                                   d_model=64, max_seq_len=64)
    model = Transformer(cfg).eval()
    rows = [torch.randint(0, 300, (n,)) for n in (5, 11, 2)]
    width = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(idx)
    for i, r in enumerate(rows):
        idx[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    with torch.no_grad():
        batched = model(idx, attention_mask=mask)
        cache = model.new_cache(len(rows), width + 4)
        model(idx, cache=cache, attention_mask=mask)
        extra = torch.randint(0, 300, (len(rows), 4))
        for j in range(4):
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], 1)
            step = model(extra[:, j:j + 1], cache=cache, attention_mask=mask)[:, 0]
            for i, r in enumerate(rows):
                alone = model(torch.cat([r, extra[i, :j + 1]])[None])[0, -1]
                assert (step[i] - alone).abs().max() <= 1e-5
        for i, r in enumerate(rows):
            alone = model(r[None])[0]
            assert (batched[i, width - len(r):] - alone).abs().max() <= 1e-5


def test_generate_batch_greedy_equals_solo(loaded):
    model, tok = loaded.model, loaded.tokenizer
    prompts = ["def main(", "import", "class Foo:\n    def __init__(self):\n"]
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.0, stop=["\n\n"])
    assert len({len(tok.encode_prompt(p)) for p in prompts}) == 3  # really different lengths
    batch = generate_batch(model, tok, prompts, cfg)
    solo = [generate(model, tok, p, cfg) for p in prompts]
    assert batch == solo
    assert all("\n\n" not in t for t in batch)
