"""Hugging Face folders in and out, compared with transformers (a test-only import).

Tiny random GPT-2, Llama (GQA, Llama 3 rope scaling, tied), Mistral and Qwen2 (q/k/v biases)
models are built and saved by transformers itself, loaded by ``zenlm.load`` and compared logit
by logit and token by token; then exported by zenlm and loaded back by transformers with no
missing or unexpected weights.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

import zenlm
from zenlm.errors import InteropError, TokenizerError, UnsupportedArchitectureError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
try:  # the "Loading weights" bars of transformers 5 are noise here
    transformers.utils.logging.disable_progress_bar()
except AttributeError:
    pass

V, D, T = 300, 64, 64
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# a Llama-3-like template: the BOS written by the template, loop controls, raise_exception
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
                "{{ raise_exception('no tools') }}{% endif %}{% if m['content'] == 'skip' %}"
                "{% continue %}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
                "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")
TEXTS = ["def f(x):\n    return x ** 2  # square\n", "Hello, World! It's 2024.", "  leading  spaces\t\ttabs\n\n\n",
         "héllo 世界 🎉 👩‍👩‍👧", "<|im_start|>user\nhi<|im_end|>", "12345 + 678 = 13023", ""]


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Norms and biases off 1 and 0, so every parameter matters to the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else 0.02))


def _hf_configs():
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=V, bos_token_id=1, eos_token_id=2)
    llama = dict(hidden_size=D, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=T, rms_norm_eps=1e-5, **common)
    return {
        "gpt2": GPT2Config(n_embd=D, n_layer=2, n_head=4, n_positions=T, activation_function="gelu_new",
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common),
        "llama-gqa": LlamaConfig(tie_word_embeddings=False, **llama),
        "llama3-rope-tied": LlamaConfig(
            tie_word_embeddings=True, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, **llama),
        "llama-head-dim-bias": LlamaConfig(head_dim=32, attention_bias=True, mlp_bias=True,
                                           **{**llama, "num_key_value_heads": 1}),
        "mistral": MistralConfig(sliding_window=None, tie_word_embeddings=False, **llama),
        "qwen2-qkv-bias": Qwen2Config(tie_word_embeddings=True, **llama),
    }


FAMILIES = list(_hf_configs())


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory, corpus_text) -> Path:
    """A real byte-level BPE saved by transformers (tokenizer.json + tokenizer_config.json)."""
    from transformers import PreTrainedTokenizerFast

    from zenlm.tokenizer import Tokenizer

    tok = Tokenizer.train([corpus_text[:60_000]], V, SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.hf, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", add_bos_token=False)
    fast.chat_template = CHATML
    out = tmp_path_factory.mktemp("hf-tokenizer")
    fast.save_pretrained(out)
    return out


def _save_hf(family: str, folder: Path, tokenizer_dir: Path | None, **save):
    """Build a random transformers model of ``family``, save it (with the tokenizer) into folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_hf_configs()[family]).eval()
    _perturb(hf, 1)
    hf.save_pretrained(folder, **save)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
    return hf


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory, hf_tokenizer_dir):
    folder = tmp_path_factory.mktemp(request.param)
    hf = _save_hf(request.param, folder, hf_tokenizer_dir)
    return request.param, hf, folder


def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def _zenlm_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding through zenlm's KV cache (prefill, then one token per forward)."""
    ids = list(ids)
    cache = model.new_cache(1, len(ids) + n)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), cache=cache, last_only=True)
        for _ in range(n):
            ids.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[ids[-1]]]), cache=cache)
    return ids


# ----------------------------------------------------------------------------------------------
# (a) transformers -> zenlm


def test_hf_folder_logits_and_greedy_match_transformers(saved):
    family, hf, folder = saved
    lm = zenlm.load(folder)
    assert lm.source == str(folder)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, V, (2, 48), generator=g)
    with torch.no_grad():
        ref, got = hf(idx).logits, lm.model(idx)
    assert ref.std() > 0.1  # not two near-constant outputs
    assert (got - ref).abs().max().item() <= 1e-4, family

    prompt = idx[0, :12].tolist()
    expected = _hf_greedy(hf, prompt, 24)
    assert _zenlm_greedy(lm.model, prompt, 24) == expected
    # and through the public generate path (token ids in, text out, the same tokenizer)
    text = zenlm.generate(lm, prompt, max_new_tokens=24, temperature=0.0, stop_at_eot=False)
    assert text == lm.tokenizer.decode(expected[12:])


def test_hf_folder_config_is_read_faithfully(saved):
    family, hf, folder = saved
    c, hc = zenlm.load(folder).model.config, hf.config
    assert c.vocab_size == V and c.n_layer == 2 and c.d_model == D
    if family == "gpt2":
        assert (c.pos, c.norm, c.mlp, c.bias, c.tie_embeddings) == ("learned", "layernorm", "gelu", True, True)
    else:
        assert (c.pos, c.norm, c.mlp) == ("rope", "rmsnorm", "swiglu")
        assert c.n_kv_head == hc.num_key_value_heads and c.tie_embeddings == hc.tie_word_embeddings
        assert c.qkv_bias == family.startswith("qwen2")
        assert c.bias == (family == "llama-head-dim-bias")
        assert c.head_dim == (32 if family == "llama-head-dim-bias" else D // 4)
        assert (c.rope_scaling or {}).get("rope_type") == ("llama3" if "llama3" in family else None)


def test_tokenizer_from_hf_folder_matches_transformers(hf_tokenizer_dir):
    from transformers import AutoTokenizer

    from zenlm.tokenizer import Tokenizer

    ref = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    tok = Tokenizer.from_hf_folder(hf_tokenizer_dir)
    assert (tok.bos, tok.eot, tok.add_bos) == ("<|im_start|>", "<|im_end|>", False)
    assert tok.eot_id == ref.eos_token_id and tok.bos_id == ref.bos_token_id
    for text in TEXTS:
        assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids, text
        assert tok.encode_prompt(text) == ref(text).input_ids, text
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("template", [CHATML, BOS_TEMPLATE], ids=["chatml", "bos-loopcontrols"])
def test_chat_template_renders_like_transformers(hf_tokenizer_dir, tmp_path, template):
    from transformers import AutoTokenizer

    from zenlm.tokenizer import Tokenizer

    ref = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    ref.chat_template = template
    ref.save_pretrained(tmp_path)  # transformers' own way of storing the template
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.chat_template == template
    chats = [[{"role": "user", "content": "Hi there"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " 2+2? "},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "skip"}]]
    for chat in chats:
        for gen in (True, False):
            expected = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(chat, add_generation_prompt=gen) == expected
            assert tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True) == \
                ref(expected, add_special_tokens=False).input_ids
    if template is BOS_TEMPLATE:
        with pytest.raises(TokenizerError, match="no tools"):
            tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_bos_from_tokenizer_config_and_post_processor(hf_tokenizer_dir, tmp_path):
    """Llama-style tokenizers prepend the BOS; zenlm reads that whether tokenizer_config.json
    says add_bos_token or only tokenizer.json's post-processor does (as transformers 5 writes)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from zenlm.tokenizer import Tokenizer

    base = Tokenizer.from_hf_folder(hf_tokenizer_dir)
    PreTrainedTokenizerFast(tokenizer_object=base.hf, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                            add_bos_token=True).save_pretrained(tmp_path)
    tok, ref = Tokenizer.from_hf_folder(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert tok.add_bos and tok.bos_id == ref.bos_token_id == base.hf.token_to_id("<|endoftext|>")
    for text in TEXTS:
        assert tok.encode_prompt(text) == ref(text).input_ids
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = False  # an explicit setting wins over the post-processor
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert not Tokenizer.from_hf_folder(tmp_path).add_bos


def test_tokenizer_without_bos(hf_tokenizer_dir, tmp_path):
    """Qwen2-style: bos_token null. No BOS is invented (not even the EOS), none is exported."""
    from zenlm.tokenizer import Tokenizer

    for f in hf_tokenizer_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["bos_token"] = None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert (tok.bos, tok.bos_id, tok.add_bos, tok.eot) == (None, None, False, "<|im_end|>")
    assert tok.encode_prompt("hi") == tok.encode("hi")
    out = tmp_path / "out"
    tok.save_hf_folder(out)
    assert json.loads((out / "tokenizer_config.json").read_text())["bos_token"] is None
    assert Tokenizer.from_hf_folder(out).bos is None


def test_dtype_option(saved):
    family, hf, folder = saved
    lm = zenlm.load(folder, dtype="bfloat16")
    assert lm.model.tok_emb.weight.dtype == torch.bfloat16
    idx = torch.randint(0, V, (1, 16))
    with torch.no_grad():
        assert (lm.model(idx).float() - hf(idx).logits).abs().max().item() < 0.1
    with pytest.raises(InteropError, match="unknown dtype"):
        zenlm.load(folder, dtype="float7")


# ----------------------------------------------------------------------------------------------
# (b) zenlm -> transformers, and back


def test_export_loads_in_transformers_with_the_same_logits(saved, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family, hf, folder = saved
    lm = zenlm.load(folder)
    out = zenlm.export_hf(lm, tmp_path / "export")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json",
                                               "tokenizer.json", "tokenizer_config.json"}
    back, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # a Mistral without its sliding window computes exactly what a Llama does: written as one
    expected = "LlamaForCausalLM" if family == "mistral" else type(hf).__name__
    assert type(back).__name__ == expected
    idx = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (back.eval()(idx).logits - lm.model(idx)).abs().max().item() <= 1e-4
    from transformers import PreTrainedTokenizerFast

    ref_tok = PreTrainedTokenizerFast.from_pretrained(out)  # our tokenizer files, read as written
    for text in TEXTS:
        assert ref_tok(text).input_ids == lm.tokenizer.encode_prompt(text)
    auto = AutoTokenizer.from_pretrained(out)
    if family.startswith("qwen2"):
        # transformers 5 gives model_type qwen2 its Qwen2Tokenizer, which imposes Qwen's own
        # pre-tokenizer whatever tokenizer.json says: right for real Qwen2 vocabularies, not for
        # this test's toy BPE, so AutoTokenizer is compared on the special tokens only.
        assert (auto.bos_token_id, auto.eos_token_id) == (lm.tokenizer.bos_id, lm.tokenizer.eot_id)
    else:
        for text in TEXTS:
            assert auto(text).input_ids == lm.tokenizer.encode_prompt(text)
    chat = [{"role": "user", "content": "hi"}]
    assert ref_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        lm.tokenizer.apply_chat_template(chat)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == lm.tokenizer.eot_id == ref_tok.eos_token_id


def test_round_trip_zenlm_hf_zenlm_is_unchanged(saved, tmp_path):
    _, _, folder = saved
    lm = zenlm.load(folder)
    again = zenlm.load(zenlm.export_hf(lm, tmp_path / "export"))
    assert again.model.config == lm.model.config
    a, b = lm.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for text in TEXTS:
        assert again.tokenizer.encode_prompt(text) == lm.tokenizer.encode_prompt(text)
    assert (again.tokenizer.bos, again.tokenizer.eot, again.tokenizer.add_bos, again.tokenizer.chat_template) == \
        (lm.tokenizer.bos, lm.tokenizer.eot, lm.tokenizer.add_bos, lm.tokenizer.chat_template)


def test_trained_run_exports_to_transformers(loaded, tmp_path):
    """A model zenlm trained (Llama switches, its own BPE) becomes a transformers model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = zenlm.export_hf(loaded, tmp_path / "hf")
    back, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    text = "def main(argv):\n    return 0\n"
    ids = loaded.tokenizer.encode_prompt(text)
    assert ids[0] == loaded.tokenizer.eot_id  # zenlm documents start after <|endoftext|>
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == ids
    with torch.no_grad():
        x = torch.tensor([ids])
        assert (back.eval()(x).logits - loaded.model(x)).abs().max().item() <= 1e-4
    # and zenlm.load reads the run folder and the export alike
    assert zenlm.load(out).tokenizer.encode_prompt(text) == ids
    assert zenlm.load(loaded.source).step == loaded.step


def test_gpt2_preset_exports_untied(tmp_path):
    from transformers import AutoModelForCausalLM

    from zenlm.interop.load import LoadedModel
    from zenlm.config import TransformerConfig
    from zenlm.model import Transformer

    torch.manual_seed(0)
    model = Transformer(TransformerConfig.preset("gpt2", vocab_size=V, n_layer=2, n_head=4, d_model=D,
                                                 max_seq_len=T, tie_embeddings=False, mlp="gelu_exact")).eval()
    _perturb(model, 2)
    out = zenlm.export_hf(LoadedModel(model, None, "memory"), tmp_path)
    back, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    idx = torch.randint(0, V, (1, 30))
    with torch.no_grad():
        assert (back.eval()(idx).logits - model(idx)).abs().max().item() <= 1e-4


def test_export_refuses_a_model_no_hf_family_fits(tmp_path):
    from zenlm.interop.load import LoadedModel
    from zenlm.config import TransformerConfig
    from zenlm.model import Transformer

    odd = Transformer(TransformerConfig(vocab_size=V, n_layer=1, n_head=2, d_model=32, norm="layernorm",
                                        pos="rope", mlp="swiglu"))
    with pytest.raises(UnsupportedArchitectureError, match="no Hugging Face architecture fits"):
        zenlm.export_hf(LoadedModel(odd, None, "memory"), tmp_path)


# ----------------------------------------------------------------------------------------------
# weights on disk: shards, legacy .bin, refusing pickles


def test_sharded_safetensors(hf_tokenizer_dir, tmp_path):
    hf = _save_hf("llama-gqa", tmp_path, None, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    lm = zenlm.load(tmp_path)
    assert lm.tokenizer is None  # a weights-only folder still loads
    idx = torch.randint(0, V, (1, 20))
    with torch.no_grad():
        assert (lm.model(idx) - hf(idx).logits).abs().max().item() <= 1e-4
    with pytest.raises(TokenizerError, match="no tokenizer"):
        zenlm.generate(lm, "hello")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(InteropError, match="missing"):
        zenlm.load(tmp_path)


def test_legacy_pytorch_model_bin(tmp_path):
    hf = _save_hf("gpt2", tmp_path, None)
    state = {k: v for k, v in hf.state_dict().items()}
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    lm = zenlm.load(tmp_path)
    idx = torch.randint(0, V, (1, 20))
    with torch.no_grad():
        assert (lm.model(idx) - hf(idx).logits).abs().max().item() <= 1e-4


class _Payload:
    """Unpickling this would create a file: proof that a plain pickle.load ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_in_a_bin_is_refused(tmp_path):
    _save_hf("gpt2", tmp_path, None)
    (tmp_path / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": torch.zeros(2), "x": _Payload(marker)}, f, protocol=2)
    with pytest.raises(InteropError, match="refused"):
        zenlm.load(tmp_path)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# what users get wrong


def test_unknown_architecture_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"],
                                                      "model_type": "mamba"}))
    with pytest.raises(UnsupportedArchitectureError, match="MambaForCausalLM is not supported"):
        zenlm.load(tmp_path)


@pytest.mark.parametrize("change,match", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None}, "yarn"),
    ({"attention_bias": True, "mlp_bias": False}, "attention_bias"),
])
def test_unsupported_features_are_refused_by_name(tmp_path, change, match):
    _save_hf("llama-gqa", tmp_path, None)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match=match):
        zenlm.load(tmp_path)


def test_mistral_sliding_window_caps_the_context(tmp_path):
    _save_hf("mistral", tmp_path, None)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["sliding_window"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert zenlm.load(tmp_path).model.config.max_seq_len == 32
    assert zenlm.load(tmp_path, max_seq_len=16).model.config.max_seq_len == 16


def test_weights_that_do_not_fit_the_config(tmp_path):
    _save_hf("llama-gqa", tmp_path, None)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InteropError, match="does not fit its config: missing"):
        zenlm.load(tmp_path)


def test_offline_hub_id_names_what_is_missing(monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InteropError) as err:
        zenlm.load("zenlm-tests/surely-not-in-any-cache")
    msg = str(err.value)
    assert "offline" in msg and "not in the local Hugging Face cache" in msg
    assert "--local-dir" in msg and "zenlm.load('DIR')" in msg
    assert "\n" not in msg


def test_paths_that_are_nothing(tmp_path):
    with pytest.raises(InteropError, match="not found"):
        zenlm.load(tmp_path / "missing")
    with pytest.raises(InteropError, match="neither a zenlm run"):
        zenlm.load(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InteropError, match="not a GGUF file"):
        zenlm.load(tmp_path / "notes.txt")
    (tmp_path / "config.json").write_text("{ nope")
    with pytest.raises(InteropError, match="not valid JSON"):
        zenlm.load(tmp_path)


def test_import_zenlm_stays_light():
    import subprocess

    code = ("import sys, zenlm; heavy = [m for m in ('torch', 'tokenizers', 'gguf', 'jinja2', "
            "'transformers', 'huggingface_hub') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
