"""LoRA modules, classification heads and layer-wise LR decay groups, on real (tiny) models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from zenlm.config import TransformerConfig
from zenlm.errors import ConfigError
from zenlm.model import Transformer
from zenlm.model.adapt import adapt
from zenlm.model.heads import Classifier, pool
from zenlm.model.linear import Linear, is_plain_linear
from zenlm.model.lora import (LoRAConfig, LoRALinear, adapter_state_dict, apply_lora, merge_lora,
                              merged_state_dict)
from zenlm.train.optim import describe_groups, param_groups


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, d_model=64, max_seq_len=32)
    return Transformer(TransformerConfig(**{**cfg, **kw}))


def randomise_lora(model, seed=1, scale=0.05):
    """B starts at zero (a no-op); give every adapter a real update."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_lora_linear_computes_base_plus_scaled_low_rank_update():
    base = Linear(16, 8)  # the model's own layer: the same kernel as the adapter's base product
    lora = LoRALinear(base, r=4, alpha=8.0, dropout=0.0)
    x = torch.randn(5, 16)
    assert torch.equal(lora(x), base(x))  # B = 0: exactly the base at first
    assert lora.weight is base.weight and lora.bias is base.bias  # shared, not copied
    assert not lora.weight.requires_grad and lora.lora_A.weight.requires_grad
    randomise_lora(lora)
    A, B = lora.lora_A.weight, lora.lora_B.weight
    want = x @ base.weight.T + base.bias + (x @ A.T @ B.T) * (8.0 / 4)
    assert torch.allclose(lora(x), want, atol=1e-6)
    merged = lora.merged()
    assert is_plain_linear(merged)  # a plain layer again: fusable, exportable, quantizable
    assert torch.allclose(merged(x), lora(x), atol=1e-5)
    assert set(dict(lora.named_parameters())) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}


def test_apply_lora_targets_freezes_and_merges():
    model = tiny()
    x = torch.randint(0, 300, (2, 12))
    before = model(x)
    names = apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["attn", "up"]), first_layer=1)
    model.eval()  # LoRA dropout off
    assert sorted(names) == sorted(f"blocks.{i}.{m}" for i in (1, 2) for m in
                                   ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert not any(n.startswith("blocks.0.") for n in trainable)
    assert torch.equal(model(x), before)  # fresh adapters change nothing
    randomise_lora(model)
    adapted = model(x)
    assert not torch.allclose(adapted, before, atol=1e-4)
    # the base weights keep their names; the adapters add lora_A / lora_B beside them
    state = model.state_dict()
    assert "blocks.1.attn.q_proj.weight" in state and "blocks.1.attn.q_proj.lora_A.weight" in state
    assert set(adapter_state_dict(model)) == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    # merged weights compute the same function under the plain model's names
    merged = merged_state_dict(model)
    plain = tiny()
    plain.load_state_dict(merged)  # strict: exactly the base model's keys
    assert torch.allclose(plain(x), adapted, atol=1e-4)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(model(x), adapted, atol=1e-4)


def test_lora_config_refuses_unknown_targets_and_bad_rank():
    with pytest.raises(ConfigError, match="did you mean 'q_proj'"):
        LoRAConfig(targets=["q_prj"])
    with pytest.raises(ConfigError, match="lora.r"):
        LoRAConfig(r=0)
    assert LoRAConfig(targets=["mlp", "q"]).module_names() == ["q_proj", "gate_proj", "up_proj", "down_proj"]


def test_last_token_pooling_ignores_right_padding():
    model = tiny()
    clf = Classifier(model, ["a", "b", "c"]).eval()
    assert clf.head.pooling == "last"
    seqs = [torch.randint(1, 300, (n,)) for n in (5, 9, 3)]
    alone = torch.cat([clf(s[None], torch.tensor([len(s)])) for s in seqs])
    padded = torch.zeros(3, 9, dtype=torch.int64)
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = s
    batched = clf(padded, torch.tensor([len(s) for s in seqs]))
    assert torch.allclose(alone, batched, atol=1e-5)
    # and it is the head applied to the final hidden state of the last real token
    h = model.hidden_states(seqs[1][None])[0, -1]
    assert torch.allclose(batched[1], clf.head.score(h), atol=1e-5)


def test_mean_and_first_pooling():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    lengths = torch.tensor([2, 4])
    assert torch.equal(pool(h, lengths, "first"), h[:, 0])
    assert torch.allclose(pool(h, lengths, "mean")[0], h[0, :2].mean(0))
    assert torch.allclose(pool(h, lengths, "mean")[1], h[1].mean(0))
    encoder = tiny(causal=False)
    assert Classifier(encoder, ["x", "y"]).head.pooling == "mean"  # auto: encoders average


def test_layer_decay_groups_scale_the_lr_by_depth():
    model = tiny()
    clf = adapt(model, task="classify", labels=["0", "1"], method="full")
    groups = param_groups(clf, 0.1, layer_decay=0.5, n_layer=3)
    by_name = {g["name"]: g for g in groups}
    # depth 0 embeddings, 1..3 blocks, 4 top (final norm + head)
    assert by_name["layer_00.decay"]["lr_scale"] == pytest.approx(0.5 ** 4)
    assert by_name["layer_01.decay"]["lr_scale"] == pytest.approx(0.5 ** 3)
    assert by_name["layer_03.no_decay"]["lr_scale"] == pytest.approx(0.5)
    assert by_name["layer_04.decay"]["lr_scale"] == 1.0 and by_name["layer_04.no_decay"]["weight_decay"] == 0.0
    head = {id(p) for p in by_name["layer_04.decay"]["params"]}
    assert id(clf.head.score.weight) in head
    block2 = {id(p) for p in by_name["layer_03.decay"]["params"]}
    assert id(model.blocks[2].attn.q_proj.weight) in block2
    # every trainable parameter is in exactly one group (the frozen LM head is in none)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len([p for p in clf.parameters() if p.requires_grad])
    desc = describe_groups(groups)
    assert sum(d["params"] for d in desc) == sum(p.numel() for p in clf.parameters() if p.requires_grad)

    # the loop's update: group lr = lr * lr_scale, so a step moves lower layers less
    from zenlm.train.optim import make_adamw

    opt = make_adamw(clf, 1.0, 0.0, (0.9, 0.95), 1e-8, "cpu", groups=groups)
    for g in opt.param_groups:
        g["lr"] = 1e-2 * g["lr_scale"]
    before = {n: p.detach().clone() for n, p in clf.named_parameters()}
    x = torch.randint(0, 300, (4, 10))
    F.cross_entropy(clf(x, torch.full((4,), 10)), torch.tensor([0, 1, 0, 1])).backward()
    opt.step()
    # Adam's first step moves every weight by about lr: the step size shows the group's scale
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in clf.named_parameters()}
    assert moved["head.score.weight"] == pytest.approx(1e-2, rel=0.05)
    assert moved["backbone.blocks.0.attn.q_proj.weight"] == pytest.approx(1e-2 * 0.5 ** 3, rel=0.05)
    assert moved["backbone.tok_emb.weight"] == pytest.approx(1e-2 * 0.5 ** 4, rel=0.05)


def test_adapt_full_freezes_embeddings_and_first_layers():
    model = tiny(tie_embeddings=False)
    m = adapt(model, task="chat", method="full", freeze_embeddings=True, freeze_layers=2)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert "tok_emb.weight" in frozen
    assert all(n in frozen for n, _ in m.named_parameters() if n.startswith(("blocks.0.", "blocks.1.")))
    assert not any(n in frozen for n, _ in m.named_parameters() if n.startswith("blocks.2."))
    assert "lm_head.weight" not in frozen
    with pytest.raises(ConfigError, match="freeze_layers must be between 0 and 3"):
        adapt(tiny(), task="chat", method="full", freeze_layers=4)


def test_adapt_lora_classifier_trains_adapters_and_head_only():
    clf = adapt(tiny(), task="classify", labels=["n", "p"], method="lora",
                lora=LoRAConfig(r=2, targets=["q", "v"]), freeze_layers=1)
    trainable = sorted(n for n, p in clf.named_parameters() if p.requires_grad)
    assert "head.score.weight" in trainable
    assert all(".lora_" in n or n == "head.score.weight" for n in trainable)
    assert {n.split(".")[2] for n in trainable if "lora" in n} == {"1", "2"}
    with pytest.raises(ConfigError, match="nowhere to go"):
        adapt(tiny(), task="chat", method="lora", freeze_layers=3)
    clone = copy.deepcopy(clf)  # a LoRA model is an ordinary module tree
    assert set(clone.state_dict()) == set(clf.state_dict())
