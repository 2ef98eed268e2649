"""Attention capture with fused attention, checked against transformers' eager attention.

A tiny random Llama (grouped-query heads, RoPE) and GPT-2 are saved by transformers and loaded
by zenlm; the maps zenlm records beside SDPA are compared with ``output_attentions=True`` under
``attn_implementation="eager"`` on the same weights, with padded rows, and the logits with
capture on are compared with capture off.
"""

from __future__ import annotations

import pytest
import torch

import zenlm
from helpers import quiet_transformers

V, D, T = 300, 64, 48


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else 0.05))


@pytest.fixture(scope="module", params=["llama-gqa", "gpt2"])
def pair(request, tmp_path_factory):
    """(zenlm model, transformers model) holding the same weights."""
    tr = quiet_transformers()
    common = dict(vocab_size=V, bos_token_id=1, eos_token_id=2)
    if request.param == "gpt2":
        cfg = tr.GPT2Config(n_embd=D, n_layer=2, n_head=4, n_positions=T, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, **common)
        cls = tr.GPT2LMHeadModel
    else:
        cfg = tr.LlamaConfig(hidden_size=D, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T,
                             tie_word_embeddings=False, **common)
        cls = tr.LlamaForCausalLM
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    _perturb(hf, 1)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    hf = cls.from_pretrained(folder, attn_implementation="eager").eval()
    return zenlm.load(str(folder)).model, hf


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, V, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    mask[2, 5:] = 0
    return ids, mask


def test_captured_maps_equal_transformers_eager_attentions_with_padding(pair):
    model, hf = pair
    ids, mask = _batch()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, output_attentions=True).attentions
        with model.capture_attention() as cap:
            model(ids, attention_mask=mask)
    assert sorted(cap.maps) == [0, 1]
    for layer, ref in enumerate(want):
        got = cap.maps[layer]
        assert got.shape == ref.shape == (3, 4, 12, 12)
        for row in range(3):
            n = int(mask[row].sum())  # real queries and keys (padding rows are undefined in both)
            torch.testing.assert_close(got[row, :, :n, :n], ref[row, :, :n, :n].float(), atol=1e-5, rtol=0)
            assert torch.all(got[row, :, :n, n:] == 0)  # padding keys get no weight


def test_chosen_layers_and_heads_only(pair):
    model, hf = pair
    ids, mask = _batch()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, output_attentions=True).attentions
        with model.capture_attention(layers=[-1], heads=[1, 3]) as cap:
            model(ids, attention_mask=mask)
    assert list(cap.maps) == [1]
    torch.testing.assert_close(cap.maps[1][0], want[1][0, [1, 3]].float(), atol=1e-5, rtol=0)
    assert all(m.attn.capture is None for m in model.blocks)  # removed on exit


def test_capture_leaves_outputs_unchanged_and_is_off_by_default(pair):
    model, _ = pair
    ids, mask = _batch()
    assert all(b.attn.capture is None for b in model.blocks)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask)
        with model.capture_attention():
            captured = model(ids, attention_mask=mask)
        unmasked = model(ids)
        with model.capture_attention():
            unmasked_captured = model(ids)
    assert torch.equal(plain, captured)
    assert torch.equal(unmasked, unmasked_captured)


def test_capture_through_a_kv_cache_matches_the_full_sequence(pair):
    """Decoding token by token: each step's map is that row of the full causal map."""
    model, _ = pair
    ids = _batch()[0][:1, :8]
    with torch.no_grad():
        with model.capture_attention(layers=[0]) as full:
            model(ids)
        cache = model.new_cache(1, 8)
        with model.capture_attention(layers=[0]) as steps:
            model(ids[:, :5], cache=cache)
            for t in range(5, 8):
                model(ids[:, t:t + 1], cache=cache)
    calls = steps.calls[0]
    assert len(calls) == 4
    torch.testing.assert_close(calls[0][0], full.maps[0][0, :, :5, :5], atol=1e-6, rtol=0)
    for i, t in enumerate(range(5, 8), start=1):
        torch.testing.assert_close(calls[i][0, :, 0], full.maps[0][0, :, t, :t + 1], atol=1e-6, rtol=0)


def test_left_padding_equals_the_row_alone(pair):
    """A left-padded row's map over its real tokens is the map of that row without padding
    (positions count real tokens only), so padding masks are the ones SDPA really used."""
    model, _ = pair
    ids = _batch()[0][:1, :7]
    padded = torch.cat([torch.full((1, 3), 5), ids], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    with torch.no_grad(), model.capture_attention() as alone:
        model(ids)
    with torch.no_grad(), model.capture_attention() as pad:
        model(padded, attention_mask=mask)
    for layer in alone.maps:
        torch.testing.assert_close(pad.maps[layer][0, :, 3:, 3:], alone.maps[layer][0], atol=1e-5, rtol=0)
        assert torch.all(pad.maps[layer][0, :, 3:, :3] == 0)


def test_bad_heads_are_refused(pair):
    model, _ = pair
    with pytest.raises(ValueError, match="out of range"):
        model.capture_attention(heads=[7])
    with pytest.raises(ValueError, match="out of range"):
        model.capture_attention(layers=[2])
    assert all(b.attn.capture is None for b in model.blocks)
