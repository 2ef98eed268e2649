"""The one Transformer: KV-cache equivalence, parameter counts, tying, init, and logits against
Hugging Face's GPT2LMHeadModel and LlamaForCausalLM with the same weights."""

from __future__ import annotations

import math

import pytest
import torch

from zenlm.config import TransformerConfig
from zenlm.errors import ConfigError
from zenlm.model import Transformer

V, D, L, H, T = 300, 64, 2, 4, 64


def gpt2_config(**kw) -> TransformerConfig:
    return TransformerConfig.preset("gpt2", **{"vocab_size": V, "n_layer": L, "n_head": H, "d_model": D,
                                                "max_seq_len": T, **kw})


def llama_config(**kw) -> TransformerConfig:
    return TransformerConfig.preset("llama", **{"vocab_size": V, "n_layer": L, "n_head": H, "n_kv_head": 2,
                                                 "d_model": D, "max_seq_len": T, **kw})


FAMILIES = {"gpt2": gpt2_config, "llama_gqa": llama_config}


def _model(config: TransformerConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    # Move norms and biases off their trivial init so every parameter matters to the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_matches_full_forward_token_by_token(family):
    model = _model(FAMILIES[family]())
    torch.manual_seed(1)
    idx = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch=2)
        prefix = 7
        out = model(idx[:, :prefix], cache=cache)
        assert cache.pos == prefix
        assert (out - full[:, :prefix]).abs().max() <= 1e-5
        for t in range(prefix, idx.shape[1]):
            step = model(idx[:, t:t + 1], cache=cache)
            assert cache.pos == t + 1
            assert (step[:, 0] - full[:, t]).abs().max() <= 1e-5, f"position {t}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunks", [(5, 9, 1, 13), (1, 1, 20), (16, 16)])
def test_kv_cache_matches_full_forward_with_chunks(family, chunks):
    """Chunks of several tokens appended to a filled cache need the offset causal mask."""
    model = _model(FAMILIES[family]())
    torch.manual_seed(2)
    n = sum(chunks)
    idx = torch.randint(0, V, (3, n))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch=3, max_len=n)
        start = 0
        for size in chunks:
            out = model(idx[:, start:start + size], cache=cache)
            assert (out - full[:, start:start + size]).abs().max() <= 1e-5, f"chunk at {start}"
            start += size
        assert cache.pos == n


@pytest.mark.parametrize("family", FAMILIES)
def test_last_only_and_loss(family):
    model = _model(FAMILIES[family]())
    idx = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        full = model(idx)
        last = model(idx, last_only=True)
        assert last.shape == (2, 1, V)
        assert torch.allclose(last[:, 0], full[:, -1], atol=1e-6)
        targets = torch.randint(0, V, (2, 12))
        targets[0, :4] = -100  # masked positions carry no loss
        loss = model(idx, targets)
        keep = targets != -100
        expected = torch.nn.functional.cross_entropy(full[keep], targets[keep])
        assert torch.allclose(loss, expected, atol=1e-6)
        per_token = model(idx, targets, reduction="none")
        assert per_token.shape == (2, 12)
        assert torch.all(per_token[~keep] == 0)
    # the head runs only where a target counts; the gradients are those of the full computation
    model(idx, targets).backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(idx).view(-1, V), targets.view(-1), ignore_index=-100).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(fast[n], p.grad, atol=1e-6), n


def test_cache_and_context_overflow_raise():
    model = _model(llama_config())
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, T + 1, dtype=torch.long))
    cache = model.new_cache(batch=1, max_len=8)
    model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_causality_future_tokens_do_not_change_past_logits():
    model = _model(llama_config())
    a = torch.randint(0, V, (1, 20))
    b = a.clone()
    b[0, 10:] = torch.randint(0, V, (10,))
    with torch.no_grad():
        la, lb = model(a), model(b)
    assert (la[0, :10] - lb[0, :10]).abs().max() <= 1e-6
    assert (la[0, 10:] - lb[0, 10:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# parameters


def expected_params(c: TransformerConfig) -> int:
    """The parameter count from the architecture, written out by hand."""
    d, hd, f = c.d_model, c.head_dim, c.d_ff
    b = 1 if c.bias else 0
    qkv_b = 1 if (c.bias or c.qkv_bias) else 0
    attn = d * c.n_head * hd + 2 * d * c.n_kv_head * hd + c.n_head * hd * d
    attn += qkv_b * (c.n_head * hd + 2 * c.n_kv_head * hd) + b * d
    mlp = (3 if c.mlp == "swiglu" else 2) * d * f + b * ((2 if c.mlp == "swiglu" else 1) * f + d)
    norm = d * (2 if (c.norm == "layernorm" and c.bias) else 1)
    per_layer = attn + mlp + 2 * norm
    emb = c.vocab_size * d + (c.max_seq_len * d if c.pos == "learned" else 0)
    head = 0 if c.tie_embeddings else c.vocab_size * d
    return c.n_layer * per_layer + norm + emb + head


@pytest.mark.parametrize("config", [gpt2_config(), llama_config(), llama_config(tie_embeddings=True),
                                    gpt2_config(bias=False), llama_config(qkv_bias=True, n_kv_head=1)],
                         ids=["gpt2", "llama", "llama-tied", "gpt2-nobias", "llama-mqa-qkvbias"])
def test_parameter_counts(config):
    model = Transformer(config)
    state = model.state_dict()
    from_state = sum(t.numel() for t in state.values())
    assert model.num_params() == from_state == expected_params(config)
    emb = state["tok_emb.weight"].numel() + (state["pos_emb.weight"].numel() if "pos_emb.weight" in state else 0)
    assert model.num_params(non_embedding=True) == from_state - emb


def test_gpt2_small_shape_has_124m_parameters():
    """The gpt2 family's switches at GPT-2 small's size (and the recipe named for it)."""
    from pathlib import Path

    from zenlm.train.config import load_config

    config = TransformerConfig.preset("gpt2", vocab_size=50257, n_layer=12, n_head=12, d_model=768,
                                      max_seq_len=1024)
    assert expected_params(config) == 124_439_808  # the published GPT-2 small count
    assert config.d_ff == 3072 and config.head_dim == 64
    recipe = load_config(str(Path(__file__).parents[1] / "recipes" / "gpt2-124m.yaml")).model
    assert expected_params(recipe) == 124_439_808 + (50304 - 50257) * 768  # vocab padded to 64


def test_tied_embeddings_share_storage():
    model = Transformer(gpt2_config())
    assert model.lm_head is None
    assert model.head_weight() is model.tok_emb.weight
    assert "lm_head.weight" not in model.state_dict()
    # one tensor, trained by both uses: a gradient from the head lands on the embedding
    idx = torch.randint(0, V, (1, 8))
    model(idx, idx).backward()
    unused = torch.ones(V, dtype=torch.bool)
    unused[idx.flatten()] = False  # rows the embedding lookup never touched: only the head's gradient
    assert unused.any() and model.tok_emb.weight.grad[unused].abs().sum(-1).gt(0).all()
    untied = Transformer(llama_config())
    assert untied.lm_head is not None
    assert untied.head_weight().data_ptr() != untied.tok_emb.weight.data_ptr()


@pytest.mark.parametrize("n_layer", [2, 8])
def test_gpt2_scaled_residual_init(n_layer):
    torch.manual_seed(0)
    config = gpt2_config(n_layer=n_layer, d_model=256, n_head=4)
    model = Transformer(config)
    scaled = 0.02 / math.sqrt(2 * n_layer)
    for block in model.blocks:
        for lin in (block.attn.o_proj, block.mlp.down_proj):
            assert lin.weight.std().item() == pytest.approx(scaled, rel=0.05)
            assert torch.all(lin.bias == 0)
        for lin in (block.attn.q_proj, block.attn.k_proj, block.mlp.up_proj):
            assert lin.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.pos_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("kw,match", [
    (dict(n_head=4, n_kv_head=3), "multiple of model.n_kv_head"),
    (dict(n_head=6, n_kv_head=4, d_model=96), "multiple of model.n_kv_head"),
    (dict(n_head=5, d_model=64), "not divisible"),
    (dict(n_head=4, d_model=20, pos="rope"), "even head_dim"),
    (dict(norm="batchnorm"), "model.norm"),
    (dict(n_layer=0), "model.n_layer must be positive"),
])
def test_config_rejects_bad_shapes(kw, match):
    with pytest.raises(ConfigError, match=match):
        TransformerConfig(**kw)


def test_config_defaults():
    c = TransformerConfig(n_head=8, d_model=512)
    assert c.n_kv_head == 8 and c.head_dim == 64
    assert c.d_ff == 1408  # 8/3 * 512 = 1365.3, rounded up to a multiple of 64
    assert TransformerConfig(mlp="gelu", d_model=128, n_head=4).d_ff == 512


# ----------------------------------------------------------------------------------------------
# peers: the same weights in Hugging Face's reference implementations give the same logits


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1  # activations of order one
            p.add_(noise)


def test_matches_hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_config = GPT2Config(vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_positions=T,
                           layer_norm_epsilon=1e-5, activation_function="gelu_new",
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    hf = GPT2LMHeadModel(hf_config).eval()
    _perturb(hf, 1)  # biases and layer-norm parameters away from 0 and 1
    sd = hf.state_dict()

    ours = Transformer(gpt2_config()).eval()
    new = {"tok_emb.weight": sd["transformer.wte.weight"], "pos_emb.weight": sd["transformer.wpe.weight"],
           "norm.weight": sd["transformer.ln_f.weight"], "norm.bias": sd["transformer.ln_f.bias"]}
    for i in range(L):
        h = f"transformer.h.{i}."
        b = f"blocks.{i}."
        for src, dst in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            new[b + dst + ".weight"] = sd[h + src + ".weight"]
            new[b + dst + ".bias"] = sd[h + src + ".bias"]
        # HF Conv1D stores weights as (in, out): transpose; c_attn holds q, k and v side by side.
        qw, kw, vw = sd[h + "attn.c_attn.weight"].t().split(D, dim=0)
        qb, kb, vb = sd[h + "attn.c_attn.bias"].split(D)
        for name, w, bias in (("q_proj", qw, qb), ("k_proj", kw, kb), ("v_proj", vw, vb)):
            new[b + f"attn.{name}.weight"] = w
            new[b + f"attn.{name}.bias"] = bias
        new[b + "attn.o_proj.weight"] = sd[h + "attn.c_proj.weight"].t()
        new[b + "attn.o_proj.bias"] = sd[h + "attn.c_proj.bias"]
        new[b + "mlp.up_proj.weight"] = sd[h + "mlp.c_fc.weight"].t()
        new[b + "mlp.up_proj.bias"] = sd[h + "mlp.c_fc.bias"]
        new[b + "mlp.down_proj.weight"] = sd[h + "mlp.c_proj.weight"].t()
        new[b + "mlp.down_proj.bias"] = sd[h + "mlp.c_proj.bias"]
    ours.load_state_dict(new, strict=True)

    idx = torch.randint(0, V, (2, T))
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx)
        assert (got - ref).abs().max().item() <= 1e-4
        assert ref.std() > 0.1  # the comparison is not between two near-constant outputs
        # and through the KV cache
        cache = ours.new_cache(batch=2)
        cached = torch.cat([ours(idx[:, :40], cache=cache)]
                           + [ours(idx[:, t:t + 1], cache=cache) for t in range(40, T)], dim=1)
        assert (cached - ref).abs().max().item() <= 1e-4


def test_matches_hf_llama_with_gqa():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = llama_config(rope_base=10000.0)
    hf_config = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=config.d_ff,
                            num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=2,
                            max_position_embeddings=T, rms_norm_eps=config.norm_eps,
                            tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                            hidden_act="silu", bos_token_id=0, eos_token_id=0)
    assert hf_config.num_key_value_heads < hf_config.num_attention_heads
    hf = LlamaForCausalLM(hf_config).eval()
    _perturb(hf, 2)
    sd = hf.state_dict()

    ours = Transformer(config).eval()
    new = {"tok_emb.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(L):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        new[b + "attn_norm.weight"] = sd[h + "input_layernorm.weight"]
        new[b + "mlp_norm.weight"] = sd[h + "post_attention_layernorm.weight"]
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            new[b + f"attn.{p}.weight"] = sd[h + f"self_attn.{p}.weight"]
        for p in ("gate_proj", "up_proj", "down_proj"):
            new[b + f"mlp.{p}.weight"] = sd[h + f"mlp.{p}.weight"]
    ours.load_state_dict(new, strict=True)

    idx = torch.randint(0, V, (2, T))
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx)
        assert (got - ref).abs().max().item() <= 1e-4
        assert ref.std() > 0.1
        cache = ours.new_cache(batch=2)
        cached = torch.cat([ours(idx[:, :33], cache=cache), ours(idx[:, 33:50], cache=cache)]
                           + [ours(idx[:, t:t + 1], cache=cache) for t in range(50, T)], dim=1)
        assert (cached - ref).abs().max().item() <= 1e-4


def test_a_bf16_model_on_the_cpu_caches_and_attends_in_fp32():
    """CPU attention over a cache is several times faster in fp32 than in bf16, so a bf16 model
    keeps an fp32 cache; decoding through it gives the full forward's logits (bf16 tolerance)
    and the bf16 hidden states the rest of the model expects."""
    model = _model(llama_config()).to(torch.bfloat16)
    idx = torch.randint(0, V, (2, 10))
    cache = model.new_cache(2, 16)
    assert cache.layers[0][0].dtype == torch.float32
    with torch.no_grad():
        full = model(idx).float()
        model(idx[:, :-1], cache=cache)
        step = model(idx[:, -1:], cache=cache)
    assert step.dtype == torch.bfloat16
    assert (step[:, -1].float() - full[:, -1]).abs().max() < 0.05 * full.abs().max()
    assert (step[:, -1].argmax(-1) == full[:, -1].argmax(-1)).all()
