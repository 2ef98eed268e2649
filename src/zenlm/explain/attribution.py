"""Token attributions: integrated gradients, gradient x input and attention rollout.

A target is one number the model computes from a text: a classifier's log-probability of a
label, or a language model's log-probability of a continuation (the sum over its tokens, so a
one-token continuation is the next token). Attributions say how much each input token moved it.

- Integrated gradients (Sundararajan et al. 2017) over the token embeddings: the path from a
  baseline (by default every attributed token replaced by the end-of-text token's embedding) to
  the input, integrated with Gauss-Legendre points, as Captum does by default. By completeness
  the attributions sum to f(input) - f(baseline); what they miss is the convergence delta, so a
  large delta says "more steps", not "trust this".
- Gradient x input: one backward; cheap and noisy.
- Attention rollout (Abnar & Zuidema 2020): head-averaged attention with the residual added,
  multiplied through the layers; needs no gradient and reads the maps
  :mod:`zenlm.model.capture` records beside the fused kernel.

Embeddings are replaced through a forward hook on the model's token embedding, so the model's
own forward runs unchanged (no second, embedding-taking forward to keep in step).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch

METHODS = ("ig", "gxi", "rollout")


def gauss_legendre(n: int) -> tuple[list[float], list[float]]:
    """Points and weights of n-point Gauss-Legendre quadrature on [0, 1]."""
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(n)
    return list(0.5 * (x + 1)), list(0.5 * w)


def riemann(n: int, kind: str = "trapezoid") -> tuple[list[float], list[float]]:
    """Points and weights of an n-point Riemann rule on [0, 1] (left, right, middle, trapezoid)."""
    if kind == "trapezoid":
        return [i / (n - 1) for i in range(n)], [(0.5 if i in (0, n - 1) else 1.0) / (n - 1) for i in range(n)]
    shift = {"left": 0.0, "right": 1.0, "middle": 0.5}[kind]
    return [(i + shift) / n for i in range(n)], [1.0 / n] * n


@dataclass
class Target:
    """What is explained. ``ids`` is the whole model input; ``attributed`` marks the positions
    that get attributions (the prompt or text, not a BOS or the continuation being scored)."""

    ids: list[int]
    attributed: list[bool]
    label: int | None = None  # a classifier's class index
    continuation: int = 0  # an LM: this many last ids are the scored continuation
    description: str = ""


def backbone_of(model) -> torch.nn.Module:
    return getattr(model, "backbone", model)


def is_classifier(model) -> bool:
    return hasattr(model, "labels")


def score_batch(model, target: Target, ids: torch.Tensor) -> torch.Tensor:
    """The target's score for each row of ``ids`` (n, T): log p(label) or log p(continuation)."""
    n, t = ids.shape
    if is_classifier(model):
        lengths = torch.full((n,), t, dtype=torch.long, device=ids.device)
        return torch.log_softmax(model(ids, lengths).float(), dim=-1)[:, target.label]
    c = target.continuation
    logits = model(ids).float()[:, t - c - 1:t - 1]
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, ids[:, t - c:, None]).squeeze(-1).sum(-1)


@contextlib.contextmanager
def embeddings_replaced(model, emb: torch.Tensor):
    """The token embedding layer outputs ``emb`` (n, T, d) instead of looking ids up."""
    handle = backbone_of(model).tok_emb.register_forward_hook(lambda module, inputs, output: emb)
    try:
        yield
    finally:
        handle.remove()


def _embed(model, ids: list[int]) -> torch.Tensor:
    layer = backbone_of(model).tok_emb
    with torch.no_grad():
        return layer(torch.tensor([ids], device=layer.weight.device))[0]


def baseline_embeddings(model, target: Target, baseline: str | int = "eot", eot_id: int | None = None) -> torch.Tensor:
    """(T, d): the input's embeddings with attributed positions replaced by the embedding of
    ``baseline`` ("eot": the end-of-text token; an int: that token id; "zero": zeros)."""
    x = _embed(model, target.ids)
    keep = torch.tensor(target.attributed, device=x.device)[:, None]
    if baseline == "zero":
        return torch.where(keep, torch.zeros_like(x), x)
    token = eot_id if baseline == "eot" else int(baseline)
    if token is None:
        raise ValueError("baseline 'eot' needs the tokenizer's end-of-text id")
    return torch.where(keep, _embed(model, [token])[0].expand_as(x), x)


def _score_embeddings(model, target: Target, emb: torch.Tensor) -> torch.Tensor:
    ids = torch.tensor([target.ids], device=emb.device).expand(emb.shape[0], -1)
    with embeddings_replaced(model, emb):
        return score_batch(model, target, ids)


def integrated_gradients(model, target: Target, baseline_emb: torch.Tensor, *, steps: int = 32,
                         method: str = "gausslegendre", batch: int = 16) -> tuple[list[float], float, float]:
    """Per-token IG (summed over the embedding), the convergence delta, and f(x) - f(baseline)."""
    x = _embed(model, target.ids)
    points, weights = gauss_legendre(steps) if method == "gausslegendre" else riemann(steps, method.split("_")[-1])
    total = torch.zeros_like(x, dtype=torch.float32)
    diff = x - baseline_emb
    for i in range(0, steps, batch):
        a = torch.tensor(points[i:i + batch], dtype=x.dtype, device=x.device)[:, None, None]
        w = torch.tensor(weights[i:i + batch], dtype=torch.float32, device=x.device)[:, None, None]
        emb = (baseline_emb + a * diff).detach().requires_grad_(True)
        score = _score_embeddings(model, target, emb)
        (grad,) = torch.autograd.grad(score.sum(), emb)
        total += (grad.float() * w).sum(0)
    attr = (total * diff.float()).sum(-1)
    with torch.no_grad():
        ends = _score_embeddings(model, target, torch.stack([x, baseline_emb]))
    gap = float(ends[0] - ends[1])
    return attr.tolist(), float(attr.sum()) - gap, gap


def gradient_x_input(model, target: Target) -> list[float]:
    x = _embed(model, target.ids)[None].detach().requires_grad_(True)
    score = _score_embeddings(model, target, x)
    (grad,) = torch.autograd.grad(score.sum(), x)
    return (grad * x).sum(-1)[0].float().tolist()


def attention_rollout(model, target: Target) -> list[float]:
    """Rollout from the positions the target is read at: a causal classifier's last token, a
    mean-pooled encoder's every token, or each position that predicts a continuation token."""
    from zenlm.model.capture import capture_attention

    ids = torch.tensor([target.ids], device=backbone_of(model).tok_emb.weight.device)
    with torch.no_grad(), capture_attention(backbone_of(model)) as cap:
        score_batch(model, target, ids)
    t = len(target.ids)
    rollout = torch.eye(t)
    for layer in sorted(cap.maps):
        a = cap.maps[layer][0].mean(0)  # heads averaged
        a = 0.5 * a + 0.5 * torch.eye(t)
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    if is_classifier(model):
        rows = [t - 1] if getattr(model.head, "pooling", "last") == "last" else list(range(t))
    else:
        rows = list(range(t - target.continuation - 1, t - 1))
    return rollout[rows].mean(0).tolist()


@dataclass
class Attribution:
    tokens: list[str]
    attributed: list[bool]
    target: str
    score: float
    methods: dict[str, list[float]] = field(default_factory=dict)
    ig_delta: float | None = None
    ig_gap: float | None = None  # f(input) - f(baseline)
    steps: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def lm_target(tokenizer, text: str, continuation: str | None = None, model=None) -> Target:
    """A language-model target: ``continuation`` after ``text``, or the model's own most
    likely next token when none is given."""
    prompt = tokenizer.encode_prompt(text)
    if not prompt:
        raise ValueError("the text has no tokens")
    if continuation:
        cont = tokenizer.encode(text + continuation)[len(tokenizer.encode(text)):]
        if tokenizer.encode(text) + cont != tokenizer.encode(text + continuation):
            cont = tokenizer.encode(continuation)
    else:
        with torch.no_grad():
            device = model.tok_emb.weight.device
            cont = [int(model(torch.tensor([prompt], device=device))[0, -1].argmax())]
    if not cont:
        raise ValueError("the continuation has no tokens")
    bos = 1 if tokenizer.add_bos and tokenizer.bos_id is not None and prompt[0] == tokenizer.bos_id else 0
    ids = prompt + cont
    return Target(ids, [bos <= i < len(prompt) for i in range(len(ids))], continuation=len(cont),
                  description=f"log p({tokenizer.decode(cont)!r} | text)")


def label_target(classifier, tokenizer, text: str, label: str | None = None) -> Target:
    """A classifier target: ``label`` (default: the predicted one)."""
    from zenlm.data.classify import encode_texts

    ids = encode_texts(tokenizer, [text], classifier.config.max_seq_len)[0]
    if label is None:
        with torch.no_grad():
            device = classifier.backbone.tok_emb.weight.device
            logits = classifier(torch.tensor([ids], device=device), torch.tensor([len(ids)], device=device))
        index = int(logits[0].argmax())
    elif str(label) in classifier.labels:
        index = classifier.labels.index(str(label))
    else:
        raise ValueError(f"label {label!r} is not one of {classifier.labels}")
    bos = 1 if tokenizer.add_bos and tokenizer.bos_id is not None and ids[0] == tokenizer.bos_id else 0
    return Target(ids, [i >= bos for i in range(len(ids))], label=index,
                  description=f"log p(label {classifier.labels[index]!r} | text)")


def explain(model, tokenizer, target: Target, methods=METHODS, *, steps: int = 32,
            baseline: str | int = "eot", ig_method: str = "gausslegendre") -> Attribution:
    """Every asked-for method on one target; the model is put in eval mode (dropout off)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown attribution methods {unknown}; choose from {list(METHODS)}")
    was_training = model.training
    model.eval()
    try:
        device = backbone_of(model).tok_emb.weight.device
        with torch.no_grad():
            score = float(score_batch(model, target, torch.tensor([target.ids], device=device))[0])
        tokens = [tokenizer.decode([i]) for i in target.ids]
        out = Attribution(tokens, list(target.attributed), target.description, score)
        keep = torch.tensor(target.attributed, dtype=torch.float32)
        if "ig" in methods:
            base = baseline_embeddings(model, target, baseline, tokenizer.eot_id)
            attr, delta, gap = integrated_gradients(model, target, base, steps=steps, method=ig_method)
            out.methods["ig"], out.ig_delta, out.ig_gap, out.steps = attr, delta, gap, steps
        if "gxi" in methods:
            out.methods["gxi"] = (torch.tensor(gradient_x_input(model, target)) * keep).tolist()
        if "rollout" in methods:
            out.methods["rollout"] = (torch.tensor(attention_rollout(model, target)) * keep).tolist()
        return out
    finally:
        model.train(was_training)


def _colour(value: float, scale: float) -> str:
    """Red for positive, blue for negative, white for nothing."""
    a = 0.0 if scale == 0 or math.isnan(value) else max(-1.0, min(1.0, value / scale))
    r, g, b = (255, int(255 * (1 - a)), int(255 * (1 - a))) if a >= 0 else \
        (int(255 * (1 + a)), int(255 * (1 + a)), 255)
    return f"rgb({r},{g},{b})"


NAMES = {"ig": "integrated gradients", "gxi": "gradient × input", "rollout": "attention rollout"}


def to_html(result: Attribution, title: str = "token attributions") -> str:
    """One self-contained page: each method a line of tokens coloured by their attribution."""
    from html import escape

    rows = []
    for method, values in result.methods.items():
        scale = max((abs(v) for v, a in zip(values, result.attributed) if a), default=0.0)
        spans = "".join(
            f'<span class="t" style="background:{_colour(v, scale) if a else "#eee"}" '
            f'title="{escape(repr(tok))}: {v:+.4g}">{escape(tok).replace(chr(10), "↵")}</span>'
            for tok, v, a in zip(result.tokens, values, result.attributed))
        note = ""
        if method == "ig":
            note = (f" (steps {result.steps}, f(x) - f(baseline) = {result.ig_gap:+.4f}, "
                    f"convergence delta {result.ig_delta:+.2e})")
        rows.append(f"<h2>{NAMES[method]}{escape(note)}</h2><p class='line'>{spans}</p>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + escape(title) + "</title>"
            "<style>body{font-family:sans-serif;margin:2em;max-width:60em}"
            ".t{font-family:monospace;white-space:pre;padding:2px 0;border-radius:2px}"
            ".line{line-height:2.2}h2{font-size:1em;margin-top:1.5em}</style></head><body>"
            f"<h1>{escape(title)}</h1><p>target: <b>{escape(result.target)}</b> = {result.score:.4f}. "
            "Red raised the target, blue lowered it; grey tokens are not attributed. "
            "Hover a token for its value.</p>" + "".join(rows) + "</body></html>")


__all__ = ["METHODS", "Target", "Attribution", "explain", "lm_target", "label_target",
           "integrated_gradients", "gradient_x_input", "attention_rollout", "baseline_embeddings",
           "gauss_legendre", "riemann", "to_html"]
