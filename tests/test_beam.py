"""Decoding an encoder-decoder: the KV cache against the full forward, greedy against beam 1,
batched against one at a time, and beam search against exhaustive search."""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers import random_seq2seq
from zenlm.data.pairs import collate_pairs
from zenlm.infer.beam import DecodeConfig, beam_search, gnmt_penalty, greedy

EOS, PAD, V = 0, 1, 40


def _sources(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(2, V, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist() + [EOS]
            for _ in range(n)]
    src, mask, _, _ = collate_pairs(rows, [[] for _ in rows], EOS, PAD)
    return rows, src, mask


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_cached_decoding_equals_the_full_forward_at_every_step(norm_position):
    model = random_seq2seq(V, norm_position=norm_position)
    _, src, mask = _sources()
    tgt = torch.randint(2, V, (src.shape[0], 9))
    with torch.no_grad():
        full = model(src, mask, tgt)
        memory = model.encode(src, mask)
        cache = model.new_cache(src.shape[0], 16)
        for t in range(tgt.shape[1]):
            step = model.decode(tgt[:, t:t + 1], memory, mask, cache)
            torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
        # cross-attention keys/values were projected once and kept, one entry per decoder layer
        assert sorted(cache.cross) == list(range(model.config.n_layer))
        assert cache.cross[0][0].shape[2] == src.shape[1]


def test_beams_read_their_source_once_as_if_it_were_repeated():
    """Decoder rows grouped by source (beam search's layout) read each source's cross-attention
    keys once; the logits equal those of the memory repeated per row, and a reorder within
    the groups leaves the per-source keys alone."""
    model = random_seq2seq(V)
    _, src, mask = _sources()
    k = 3
    tgt = torch.randint(2, V, (src.shape[0] * k, 4))
    with torch.no_grad():
        memory = model.encode(src, mask)
        grouped, repeated = model.new_cache(len(tgt), 8), model.new_cache(len(tgt), 8)
        a = model.decode(tgt[:, :2], memory, mask, grouped)
        b = model.decode(tgt[:, :2], memory.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), repeated)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert grouped.cross[0][0].shape[0] == src.shape[0] and repeated.cross[0][0].shape[0] == len(tgt)
        rows = torch.tensor([r // k * k + (r + 1) % k for r in range(len(tgt))])  # shuffled within sources
        grouped.reorder(rows)
        repeated.reorder(rows)
        a = model.decode(tgt[rows, 2:], memory, mask, grouped)
        b = model.decode(tgt[rows, 2:], None, mask.repeat_interleave(k, 0), repeated)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_reorder_moves_only_the_rows_that_change_and_equals_an_indexed_copy():
    """Rows that extend themselves stay; the others take a copy of their parent's keys, even
    when that parent is itself replaced in the same step (a swap, a row copied twice)."""
    from zenlm.model.kv_cache import KVCache

    g = torch.Generator().manual_seed(0)
    cache = KVCache(2, 6, 2, 4, 10)
    for keys, values in cache.layers:
        keys.copy_(torch.randn(keys.shape, generator=g))
        values.copy_(torch.randn(values.shape, generator=g))
    cache.pos = 7
    cache.cross = {0: (torch.randn(6, 2, 5, 4, generator=g), torch.randn(6, 2, 5, 4, generator=g))}
    for rows in ([0, 1, 2, 3, 4, 5], [1, 0, 2, 2, 5, 5], [3, 3, 3, 0, 4, 1]):
        rows = torch.tensor(rows)
        want = [(k.clone(), v.clone()) for k, v in cache.layers]
        for k, v in want:
            k[:, :, :7] = k[rows, :, :7]
            v[:, :, :7] = v[rows, :, :7]
        want_cross = cache.cross[0][0][rows]
        cache.reorder(rows)
        for (k, v), (wk, wv) in zip(cache.layers, want):
            assert torch.equal(k, wk) and torch.equal(v, wv)  # positions past pos untouched too
        assert torch.equal(cache.cross[0][0], want_cross)


def test_padding_of_the_source_changes_nothing():
    model = random_seq2seq(V)
    rows, src, mask = _sources()
    with torch.no_grad():
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), torch.tensor([[EOS, 5, 6]]))
            batched = model(src[i:i + 1], mask[i:i + 1], torch.tensor([[EOS, 5, 6]]))
            torch.testing.assert_close(alone, batched, rtol=1e-5, atol=1e-5)


def test_beam_one_is_greedy():
    model = random_seq2seq(V, seed=1)
    _, src, mask = _sources(8)
    ids = dict(bos_id=EOS, eos_id=EOS, pad_id=PAD)
    g = greedy(model, src, mask, **ids)
    assert len({tuple(x) for x in g}) > 1 and any(len(x) > 0 for x in g)  # not a degenerate model
    assert beam_search(model, src, mask, cfg=DecodeConfig(beam=1), **ids) == g


@pytest.mark.parametrize("beam", [1, 4])
def test_batched_equals_one_at_a_time(beam):
    model = random_seq2seq(V, seed=2)
    rows, src, mask = _sources(6, seed=3)
    ids = dict(bos_id=EOS, eos_id=EOS, pad_id=PAD)
    cfg = DecodeConfig(beam=beam, length_penalty=0.6)
    decode = greedy if beam == 1 else beam_search
    batched = decode(model, src, mask, cfg=cfg, **ids)
    alone = [decode(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), cfg=cfg, **ids)[0]
             for r in rows]
    assert batched == alone


def _logprob(model, src, seq):
    """log p(seq + end token | src), summed, by the full forward."""
    with torch.no_grad():
        mask = torch.ones_like(src)
        full = [EOS] + seq
        logp = model(src, mask, torch.tensor([full])).float().log_softmax(-1)[0]
        return float(sum(logp[t, tok] for t, tok in enumerate(seq + [EOS])))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_finds_the_best_hypothesis_exhaustive_search_finds(alpha):
    """A tiny vocabulary and length limit: every target can be scored. With a beam as wide as
    every prefix, beam search must return the best one under the length penalty."""
    v = 5
    model = random_seq2seq(v, seed=4, scale=1.0, max_seq_len=8)
    src = torch.tensor([[2, 3, 4, EOS]])
    limit = 3  # at most 3 target tokens, the end token included
    cfg = DecodeConfig(beam=v ** 2, length_penalty=alpha, max_len_a=0.0, max_len_b=limit)
    best, best_score = None, float("-inf")
    words = [t for t in range(v) if t != EOS]
    for n in range(limit):  # n tokens, then the end token
        for seq in itertools.product(words, repeat=n):
            score = _logprob(model, src, list(seq)) / gnmt_penalty(n + 1, alpha)
            if score > best_score:
                best, best_score = list(seq), score
    if alpha == 0.0:
        # alpha 0 with a full beam is exact: nothing can overtake what stopped it
        assert beam_search(model, src, torch.ones_like(src), bos_id=EOS, eos_id=EOS, cfg=cfg)[0] == best
    else:
        found = beam_search(model, src, torch.ones_like(src), bos_id=EOS, eos_id=EOS, cfg=cfg)[0]
        score = _logprob(model, src, found) / gnmt_penalty(len(found) + 1, alpha)
        assert score >= best_score - 1e-4


def test_beam_search_beats_greedy_on_its_own_objective():
    model = random_seq2seq(V, seed=5, scale=0.6)
    rows, src, mask = _sources(6, seed=6)
    ids = dict(bos_id=EOS, eos_id=EOS, pad_id=PAD)
    g = greedy(model, src, mask, cfg=DecodeConfig(length_penalty=0.0), **ids)
    b = beam_search(model, src, mask, cfg=DecodeConfig(beam=5, length_penalty=0.0), **ids)
    for r, gs, bs in zip(rows, g, b):
        if len(gs) + 1 >= int(len(r) * 1.5 + 10):  # greedy ran into the limit: not a finished hypothesis
            continue
        assert _logprob(model, torch.tensor([r]), bs) >= _logprob(model, torch.tensor([r]), gs) - 1e-4


def test_sampling_shares_the_step_and_follows_its_seed():
    model = random_seq2seq(V, seed=7)
    _, src, mask = _sources(4)
    ids = dict(bos_id=EOS, eos_id=EOS, pad_id=PAD)
    a = greedy(model, src, mask, cfg=DecodeConfig(temperature=1.0, seed=3), **ids)
    assert a == greedy(model, src, mask, cfg=DecodeConfig(temperature=1.0, seed=3), **ids)
    draws = {tuple(map(tuple, greedy(model, src, mask, cfg=DecodeConfig(temperature=1.5, seed=s), **ids)))
             for s in range(4)}
    assert len(draws) > 1
    assert all(PAD not in x for x in a)
