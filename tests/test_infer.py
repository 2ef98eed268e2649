"""Generation: KV-cache decoding against naive full forwards, sampling, stop strings, streaming."""

from __future__ import annotations

import pytest
import torch

from zenlm.config import TransformerConfig
from zenlm.errors import ConfigError, PromptTooLongError
from zenlm.infer import SamplingConfig, generate, stream
from zenlm.infer.generate import token_steps
from zenlm.infer.sampling import apply_repetition_penalty, filter_top_k_top_p
from zenlm.model import Transformer

PROMPTS = ["def ", "import os\n\nclass Foo:\n    def __init__(self", "    return ", "# 世界 🎉\n"]


@pytest.fixture(scope="module")
def random_model(tokenizer):
    """An untrained model: near-uniform predictions, so decoding rarely ends early."""
    torch.manual_seed(0)
    config = TransformerConfig.preset("llama", vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4,
                                      n_kv_head=2, d_model=64, max_seq_len=64, tie_embeddings=False)
    model = Transformer(config).eval()
    with torch.no_grad():  # sharper than init, so that argmax is far from ties
        model.lm_head.weight.mul_(20)
    return model


def models(loaded, random_model, tokenizer):
    return {"trained": (loaded.model, loaded.tokenizer), "random": (random_model, tokenizer)}


@torch.no_grad()
def hand_decode(model, tok, prompt: str, max_new: int, pick) -> list[int]:
    """The naive path: a full forward over everything so far, for every new token."""
    ids = [tok.eot_id] + tok.encode(prompt)
    out = []
    for _ in range(min(max_new, model.config.max_seq_len - len(ids))):
        logits = model(torch.tensor([ids]))[:, -1].float()
        nxt = pick(logits, torch.tensor([ids]))
        if nxt == tok.eot_id:
            break
        ids.append(nxt)
        out.append(nxt)
    return out


def argmax(logits, seen):
    return int(logits.argmax(-1))


@pytest.mark.parametrize("which", ["trained", "random"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_argmax_by_hand(loaded, random_model, tokenizer, which, prompt):
    model, tok = models(loaded, random_model, tokenizer)[which]
    want = tok.decode(hand_decode(model, tok, prompt, 30, argmax))
    got = generate(model, tok, prompt, temperature=0, max_new_tokens=30)
    assert got == want
    assert generate(model, tok, prompt, temperature=0, max_new_tokens=30) == got  # deterministic
    if which == "random":
        assert len(got) > 10


def test_greedy_runs_to_the_end_of_the_context(random_model, tokenizer):
    prompt = "x = 1\n" * 8
    n_prompt = 1 + len(tokenizer.encode(prompt))
    ids = hand_decode(random_model, tokenizer, prompt, 1000, argmax)
    assert len(ids) == 64 - n_prompt  # nothing stopped it but the context
    assert generate(random_model, tokenizer, prompt, temperature=0, max_new_tokens=1000) == tokenizer.decode(ids)


def test_prompt_of_token_ids(random_model, tokenizer):
    ids = [tokenizer.eot_id] + tokenizer.encode("def f(x):")
    assert generate(random_model, tokenizer, ids, temperature=0, max_new_tokens=12) == \
        generate(random_model, tokenizer, "def f(x):", temperature=0, max_new_tokens=12)


def test_repetition_penalty_matches_transformers(random_model, tokenizer):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    hf = RepetitionPenaltyLogitsProcessor(1.5)
    want = hand_decode(random_model, tokenizer, "def ", 30, lambda lg, seen: int(hf(seen, lg.clone()).argmax(-1)))
    got = generate(random_model, tokenizer, "def ", temperature=0, repetition_penalty=1.5, max_new_tokens=30)
    assert got == tokenizer.decode(want)
    assert got != generate(random_model, tokenizer, "def ", temperature=0, max_new_tokens=30)


def test_allowed_tokens_constrain_greedy_decoding_as_by_hand(random_model, tokenizer):
    """``SamplingConfig.allowed``: the argmax over the tokens the constraint leaves, step by step."""
    ok = sorted(set(tokenizer.encode("abc xyz 123 ()")))

    def allowed(made):  # a different set after an even and an odd number of tokens
        return ok[: max(2, len(ok) // 2)] if len(made) % 2 else ok

    def pick(lg, seen):
        made = seen[0, n_prompt:].tolist()
        mask = torch.full_like(lg, float("-inf"))
        mask[..., allowed(made)] = 0
        return int((lg + mask).argmax(-1))

    n_prompt = 1 + len(tokenizer.encode("def "))
    want = hand_decode(random_model, tokenizer, "def ", 20, pick)
    got = generate(random_model, tokenizer, "def ", temperature=0, max_new_tokens=20, allowed=allowed)
    assert got == tokenizer.decode(want)
    assert got != generate(random_model, tokenizer, "def ", temperature=0, max_new_tokens=20)


def test_sampling_with_a_seed_is_reproducible_and_matches_by_hand(random_model, tokenizer):
    cfg = dict(temperature=0.9, max_new_tokens=25)
    torch.manual_seed(123)  # the global RNG must not matter
    a = generate(random_model, tokenizer, "def ", seed=5, **cfg)
    torch.manual_seed(999)
    b = generate(random_model, tokenizer, "def ", seed=5, **cfg)
    assert a == b
    outputs = {generate(random_model, tokenizer, "def ", seed=s, **cfg) for s in range(6)}
    assert len(outputs) > 1  # seeds matter
    gen = torch.Generator().manual_seed(5)
    by_hand = hand_decode(random_model, tokenizer, "def ", 25,
                          lambda lg, seen: int(torch.multinomial((lg / 0.9).softmax(-1), 1, generator=gen)))
    assert a == tokenizer.decode(by_hand)


@pytest.mark.parametrize("which", ["trained", "random"])
def test_top_k_one_equals_greedy(loaded, random_model, tokenizer, which):
    model, tok = models(loaded, random_model, tokenizer)[which]
    for prompt in PROMPTS:
        greedy = generate(model, tok, prompt, temperature=0, max_new_tokens=25)
        assert generate(model, tok, prompt, temperature=1.3, top_k=1, seed=3, max_new_tokens=25) == greedy


def test_top_k_and_top_p_match_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(4, 1, dtype=torch.long)
    for trial in range(50):
        logits = torch.randn(4, 300, generator=g) * (1 + trial % 5)
        for k in (1, 5, 50, 299, 300, 1000):
            ours = filter_top_k_top_p(logits, k, None)
            theirs = TopKLogitsWarper(k)(ids, logits.clone())
            assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), k
            assert (torch.isfinite(ours).sum(-1) == min(k, 300)).all()
        for p in (0.05, 0.5, 0.9, 0.999, 1.0):
            ours = filter_top_k_top_p(logits, None, p)
            theirs = TopPLogitsWarper(p)(ids, logits.clone())
            for row in range(4):
                a, b = torch.isfinite(ours[row]), torch.isfinite(theirs[row])
                if torch.equal(a, b):
                    continue
                # the two may only disagree where the kept mass is p to float32 precision
                small = a if a.sum() < b.sum() else b
                assert (a ^ b).sum() == 1, (trial, p)
                assert abs(logits[row].softmax(-1)[small].sum().item() - p) < 1e-5, (trial, p)
            kept = logits.softmax(-1).masked_fill(torch.isinf(ours), 0).sum(-1)
            assert (kept >= p - 1e-6).all()
            assert torch.isfinite(ours).any(-1).all()  # the top token is always kept


def test_repetition_penalty_matches_transformers_on_random_logits():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 100, generator=g)
    seen = torch.randint(0, 100, (3, 20), generator=g)
    for penalty in (0.7, 1.0, 1.3, 2.0):
        want = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone())
        assert torch.allclose(apply_repetition_penalty(logits, seen, penalty), want)


# ----------------------------------------------------------------------------------------------
# stop strings and streaming


def test_stop_strings_cut_before_the_stop(loaded, random_model, tokenizer):
    checked = 0
    for model, tok in models(loaded, random_model, tokenizer).values():
        for prompt in PROMPTS:
            full = generate(model, tok, prompt, temperature=0, max_new_tokens=40)
            for k in (0, 3, len(full) // 2, len(full) - 4):
                stop = full[k:k + 3]
                if len(stop) < 3 or not stop.strip():
                    continue
                got = generate(model, tok, prompt, temperature=0, max_new_tokens=40, stop=[stop])
                assert got == full[:full.find(stop)]
                assert stop not in got
                assert "".join(stream(model, tok, prompt, temperature=0, max_new_tokens=40, stop=[stop])) == got
                checked += 1
    assert checked >= 10


def test_the_earliest_of_several_stop_strings_wins(random_model, tokenizer):
    full = generate(random_model, tokenizer, "def ", temperature=0, max_new_tokens=40)
    late, early = full[-6:-3], full[5:8]
    got = generate(random_model, tokenizer, "def ", temperature=0, max_new_tokens=40, stop=[late, early])
    assert got == full[:min(full.find(late), full.find(early))]


def test_a_stop_string_that_never_completes_is_not_swallowed(random_model, tokenizer):
    full = generate(random_model, tokenizer, "def ", temperature=0, max_new_tokens=40)
    # the output's last two characters start this stop string, which never completes: the
    # held-back prefix must still come out at the end
    stop = full[-2:] + "\x00\x00never"
    assert generate(random_model, tokenizer, "def ", temperature=0, max_new_tokens=40, stop=[stop]) == full


@pytest.mark.parametrize("which", ["trained", "random"])
def test_stream_pieces_join_to_generate(loaded, random_model, tokenizer, which):
    model, tok = models(loaded, random_model, tokenizer)[which]
    for prompt in PROMPTS:
        for kw in (dict(temperature=0), dict(temperature=1.0, seed=11, top_p=0.95)):
            pieces = list(stream(model, tok, prompt, max_new_tokens=40, **kw))
            assert all(isinstance(p, str) and p for p in pieces)
            assert "".join(pieces) == generate(model, tok, prompt, max_new_tokens=40, **kw)


def test_streaming_holds_back_partial_characters(random_model, tokenizer):
    # sampling at a high temperature from a random model emits lone bytes of multi-byte
    # characters; streamed pieces must never show a replacement character that the whole
    # completion, decoded at once from the same tokens, does not hold at that place
    prompt = [tokenizer.eot_id] + tokenizer.encode("世界")
    split_chars = 0
    for seed in range(5):
        cfg = SamplingConfig(temperature=2.0, seed=seed, max_new_tokens=50)
        new = [int(t[0]) for t in token_steps(random_model, [prompt], cfg)]
        new = new[:new.index(tokenizer.eot_id)] if tokenizer.eot_id in new else new
        want = tokenizer.decode(new)  # the reference: no streaming at all
        split_chars += sum("\ufffd" in tokenizer.decode([t]) for t in new)
        pieces = list(stream(random_model, tokenizer, prompt, cfg))
        assert "".join(pieces) == want, seed
        assert all(pieces)
    assert split_chars > 0  # the case under test happened: some token was part of a character


def test_prompt_longer_than_the_context(random_model, tokenizer):
    long_prompt = "alpha beta gamma delta " * 40
    assert len(tokenizer.encode(long_prompt)) >= 64
    with pytest.raises(PromptTooLongError, match="context is 64 tokens"):
        generate(random_model, tokenizer, long_prompt, max_new_tokens=5)
    with pytest.raises(PromptTooLongError):
        generate(random_model, tokenizer, list(range(64)), max_new_tokens=5)
    # one free position is enough for one token, the model's argmax there
    ids = list(range(63))
    steps = list(token_steps(random_model, [ids], SamplingConfig(temperature=0, max_new_tokens=5)))
    with torch.no_grad():
        best = int(random_model(torch.tensor([ids]))[0, -1].argmax())
    assert [int(t[0]) for t in steps] == [best] and best != tokenizer.eot_id
    assert generate(random_model, tokenizer, ids, temperature=0, max_new_tokens=5) == tokenizer.decode([best])


def test_max_new_tokens_zero_and_bad_sampling_configs(random_model, tokenizer):
    assert generate(random_model, tokenizer, "def ", max_new_tokens=0) == ""
    for kw in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
               dict(repetition_penalty=0), dict(max_new_tokens=-1)):
        with pytest.raises(ConfigError):
            SamplingConfig(**kw)


def test_eot_ends_generation(random_model, tokenizer):
    import copy

    from zenlm.tokenizer import EOT

    tok = tokenizer
    free = generate(random_model, tok, "def ", temperature=0, max_new_tokens=40, stop_at_eot=False)
    assert EOT not in free
    # a model that ends documents: its EOT row copies (and outbids) the row of the greedy
    # token at step 6, so greedy decoding meets the EOT by then, with text before and after it
    model = copy.deepcopy(random_model)
    ids = [tok.eot_id] + tok.encode("def ")
    greedy = [int(t[0]) for t in token_steps(random_model, [ids], SamplingConfig(temperature=0, max_new_tokens=6))]
    with torch.no_grad():
        model.lm_head.weight[tok.eot_id] = 1.5 * random_model.lm_head.weight[greedy[-1]]
    text_with_eot = generate(model, tok, "def ", temperature=0, max_new_tokens=40, stop_at_eot=False)
    text = generate(model, tok, "def ", temperature=0, max_new_tokens=40)
    assert EOT in text_with_eot and text_with_eot.index(EOT) > 0
    assert text == text_with_eot[:text_with_eot.index(EOT)]
    assert text == tok.decode(hand_decode(model, tok, "def ", 40, argmax))  # the naive path stops there too
    assert "".join(stream(model, tok, "def ", temperature=0, max_new_tokens=40)) == text


def test_top_level_api(loaded, trained_run):
    import zenlm

    model = zenlm.load(str(trained_run))
    assert zenlm.generate(model, "def ", temperature=0, max_new_tokens=10) == \
        generate(loaded.model, loaded.tokenizer, "def ", temperature=0, max_new_tokens=10)


def test_loading_and_decoding_never_import_the_compiler(trained_run):
    """torch._dynamo costs about a second of every cold start; loading a run and decoding from
    it must not import it (a fresh process: this one may have compiled already)."""
    import subprocess
    import sys

    code = ("import sys, zenlm\n"
            f"m = zenlm.load({str(trained_run)!r})\n"
            "zenlm.generate(m, 'def ', temperature=0, max_new_tokens=4)\n"
            "from zenlm.infer.generate import generate_batch\n"
            "generate_batch(m.model, m.tokenizer, ['a', 'bc d'], temperature=0, max_new_tokens=4)\n"
            "print('torch._dynamo' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-800:]
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_compiled_decoding_gives_the_eager_tokens(tokenizer):
    """`compile_decoding` (torch.compile of the one-token step, dynamic shapes) decodes the same
    greedy tokens as eager decoding, for one prompt and for a left-padded batch, and compiles
    a bounded number of times rather than once per token."""
    import copy

    import torch._dynamo

    from zenlm.infer.generate import compile_decoding, generate_batch

    torch.manual_seed(0)
    config = TransformerConfig.preset("llama", vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4,
                                      n_kv_head=2, d_model=64, max_seq_len=96, tie_embeddings=False)
    eager = Transformer(config).eval()
    with torch.no_grad():
        eager.lm_head.weight.mul_(20)
    fast = copy.deepcopy(eager)
    torch._dynamo.reset()
    compile_decoding(fast)
    prompts = PROMPTS[:3]
    want = [generate(eager, tokenizer, p, temperature=0, max_new_tokens=40) for p in prompts]
    assert [generate(fast, tokenizer, p, temperature=0, max_new_tokens=40) for p in prompts] == want
    assert generate_batch(fast, tokenizer, prompts, temperature=0, max_new_tokens=40) == \
        generate_batch(eager, tokenizer, prompts, temperature=0, max_new_tokens=40)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < frames <= 8, frames
