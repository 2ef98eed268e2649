"""Attention capture on a bidirectional encoder and on an encoder-decoder, checked against
transformers' eager attention on the same weights.

- all-MiniLM-L6-v2 (a BERT encoder; zenlm's built-in ``minilm``) against ``BertModel`` with
  ``attn_implementation="eager"`` and ``output_attentions=True``, on a right-padded batch;
- a tiny random Seq2Seq exported to a Marian folder (zenlm.interop.marian) against
  ``MarianMTModel``'s ``encoder_attentions``, ``decoder_attentions`` and ``cross_attentions``,
  with padded sources, and through a KV cache one target token at a time.

Padding queries are left out of the comparison (their rows are arbitrary in both libraries);
padding keys must get exactly zero weight.
"""

from __future__ import annotations

import pytest
import torch

import zenlm
from helpers import TINY_SEQ2SEQ, quiet_transformers, random_seq2seq

ATOL = 1e-5


def assert_maps_equal(got: torch.Tensor, ref: torch.Tensor, q_len: list[int], k_len: list[int]) -> None:
    """Row by row: real queries over real keys equal within ATOL; padding keys get no weight."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    for row, (nq, nk) in enumerate(zip(q_len, k_len)):
        torch.testing.assert_close(got[row, :, :nq, :nk], ref[row, :, :nq, :nk].float(), atol=ATOL, rtol=0)
        assert torch.all(got[row, :, :nq, nk:] == 0)


# ----------------------------------------------------------------------------------------------
# a BERT encoder


@pytest.fixture(scope="module")
def minilm():
    from zenlm.interop.load import minilm_path

    try:
        folder = minilm_path()
    except zenlm.errors.ZenlmError as exc:
        pytest.skip(str(exc))
    tr = quiet_transformers()
    hf = tr.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    return zenlm.load("minilm"), hf


def _bert_batch(tok):
    cls, sep, pad = (tok.hf.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    texts = ["The cat sat on the mat because it was warm.", "A short one.", "Attention maps, padded."]
    rows = [[cls] + tok.encode(t) + [sep] for t in texts]
    n = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (n - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    return ids, mask, [len(r) for r in rows]


def test_encoder_maps_equal_transformers_bert_eager_with_padding(minilm):
    loaded, hf = minilm
    model = loaded.model
    assert not model.config.causal
    ids, mask, lengths = _bert_batch(loaded.tokenizer)
    assert len(set(lengths)) == 3  # every row padded differently
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        plain = model.hidden_states(ids, attention_mask=mask)
        with model.capture_attention() as cap:
            captured = model.hidden_states(ids, attention_mask=mask)
    assert torch.equal(plain, captured)  # capture changes nothing the model computes
    assert sorted(cap.maps) == list(range(len(want))) == list(range(6))
    for layer, ref in enumerate(want):
        assert_maps_equal(cap.maps[layer], ref, lengths, lengths)
    # bidirectional: an early query reads later keys (a causal map would be zero there)
    assert float(cap.maps[0][0, :, 1, 2:lengths[0]].sum()) > 0.1


# ----------------------------------------------------------------------------------------------
# an encoder-decoder (cross-attention)


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
    """(zenlm Seq2Seq, MarianMTModel eager) with the same weights; the Seq2Seq has three
    encoder and two decoder layers, so a wrong side would show in the number of maps."""
    from zenlm.interop.marian import export_marian

    tr = quiet_transformers()
    model = random_seq2seq(200, seed=5, scale=0.2, encoder_layers=3)
    folder = tmp_path_factory.mktemp("marian")
    export_marian(model, None, folder)
    hf = tr.MarianMTModel.from_pretrained(folder, attn_implementation="eager").eval()
    return model, hf


def _pairs():
    g = torch.Generator().manual_seed(7)
    src = torch.randint(3, 200, (3, 11), generator=g)
    src_mask = torch.ones(3, 11, dtype=torch.long)
    src_mask[1, 7:] = 0  # padded sources
    src_mask[2, 4:] = 0
    src[src_mask == 0] = 1
    tgt = torch.randint(3, 200, (3, 9), generator=g)
    tgt[:, 0] = 0  # the decoder start token (export_marian without a tokenizer: id 0)
    return src, src_mask, tgt


def test_seq2seq_maps_equal_marian_eager_with_source_padding(marian):
    model, hf = marian
    src, src_mask, tgt = _pairs()
    src_len, tgt_len = src_mask.sum(1).tolist(), [tgt.shape[1]] * 3
    with torch.no_grad():
        out = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, output_attentions=True)
        plain = model(src, src_mask, tgt)
        with model.capture_attention("encoder") as enc, model.capture_attention("decoder") as dec, \
                model.capture_attention("cross") as cross:
            captured = model(src, src_mask, tgt)
    assert torch.equal(plain, captured)
    torch.testing.assert_close(captured, out.logits, atol=1e-4, rtol=1e-4)  # the same model
    assert (len(enc.maps), len(dec.maps), len(cross.maps)) == (3, 2, 2)
    for layer, ref in enumerate(out.encoder_attentions):
        assert_maps_equal(enc.maps[layer], ref, src_len, src_len)
    for layer, ref in enumerate(out.decoder_attentions):
        assert_maps_equal(dec.maps[layer], ref, tgt_len, tgt_len)
        assert torch.all(dec.maps[layer].triu(1) == 0)  # causal
    for layer, ref in enumerate(out.cross_attentions):
        assert cross.maps[layer].shape == (3, TINY_SEQ2SEQ["n_head"], 9, 11)  # target x source
        assert_maps_equal(cross.maps[layer], ref, tgt_len, src_len)
    assert all(m.capture is None for m in model.modules() if hasattr(m, "capture"))  # removed


def test_cross_attention_through_a_kv_cache_matches_the_full_pass(marian):
    """Decoding step by step: the cross-attention keys come from the cache after the first
    step, and each step's map is that row of the whole target's map."""
    model, hf = marian
    src, src_mask, tgt = _pairs()
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt,
                 output_attentions=True).cross_attentions
        memory = model.encode(src, src_mask)
        cache = model.new_cache(3, tgt.shape[1])
        with model.capture_attention("cross", layers=[-1], heads=[1]) as cap:
            for t in range(tgt.shape[1]):
                model.decode(tgt[:, t:t + 1], memory, src_mask, cache)
    calls = cap.calls[1]
    assert len(calls) == tgt.shape[1] and calls[0].shape == (3, 1, 1, 11)
    src_len = src_mask.sum(1).tolist()
    for t, step in enumerate(calls):
        assert_maps_equal(step, ref[1][:, [1], t:t + 1], [1] * 3, src_len)


def test_sides_and_kinds_are_refused_by_name(marian):
    model, _ = marian
    with pytest.raises(ValueError, match="side must be one of encoder, decoder, cross"):
        model.capture_attention("memory")
    with pytest.raises(ValueError, match="no zenlm cross-attention layers"):
        model.encoder.capture_attention(cross=True)
    with pytest.raises(ValueError, match="out of range: the model has 2 attention layers"):
        model.capture_attention("cross", layers=[2])
