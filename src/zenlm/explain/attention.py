"""Attention maps of a text: recorded beside the fused kernel, drawn as PNG heat maps and as one
self-contained interactive HTML head view (inline script and style, no external assets, so
the file opens anywhere, offline, and can be attached to a report)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zenlm.io import atomic_write_text


def text_attention(model, tokenizer, text: str, layers=None, heads=None) -> tuple[list[str], dict[int, torch.Tensor]]:
    """Tokens of ``text`` (with the BOS where the model's prompts start with one) and the
    (heads, T, T) attention map of each chosen layer."""
    backbone = getattr(model, "backbone", model)
    ids = tokenizer.encode_prompt(text)
    if not ids:
        raise ValueError("the text has no tokens")
    ids = ids[:backbone.config.max_seq_len]
    device = backbone.tok_emb.weight.device
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad(), backbone.capture_attention(layers, heads) as cap:
            backbone.hidden_states(torch.tensor([ids], device=device))
    finally:
        backbone.train(was_training)
    return [tokenizer.decode([i]) for i in ids], {layer: m[0] for layer, m in cap.maps.items()}


def is_seq2seq(model) -> bool:
    from zenlm.model.seq2seq import Seq2Seq

    return isinstance(model, Seq2Seq)


def pair_attention(model, tokenizer, source: str, target: str | None = None, side: str = "cross",
                   layers=None, heads=None) -> dict:
    """An encoder-decoder's maps of one side (``encoder``, ``decoder`` or ``cross``) for a
    source and its target, by default the model's own greedy translation (what it attends to
    while producing it). Returns query and key tokens, the maps (heads, queries, keys) by layer,
    and the target text.

    The decoder's rows are labelled with the token each position *predicts* (its input is the
    token before): row i of the cross-attention is where the model looked in the source to
    write target token i, the reading of an alignment plot.
    """
    from zenlm.errors import ConfigError
    from zenlm.infer.beam import greedy

    eos = tokenizer.eot_id
    if eos is None:
        raise ConfigError("the tokenizer has no end token: an encoder-decoder starts and ends on it")
    cap = model.config.max_seq_len
    src_ids = tokenizer.encode(source)[: cap - 1] + [eos]
    if len(src_ids) < 2:
        raise ValueError("the source has no tokens")
    dev = next(model.parameters()).device
    src = torch.tensor([src_ids], device=dev)
    mask = torch.ones_like(src)
    was_training = model.training
    model.eval()
    try:
        if target is None:
            tgt_ids = greedy(model, src, mask, bos_id=eos, eos_id=eos)[0]
        else:
            tgt_ids = tokenizer.encode(target)
        tgt_ids = tgt_ids[: cap - 1]
        tgt_in = torch.tensor([[eos] + tgt_ids], device=dev)
        with torch.no_grad(), model.capture_attention(side, layers, heads) as rec:
            model(src, mask, tgt_in)
    finally:
        model.train(was_training)
    words = [tokenizer.decode([i]) for i in src_ids]
    predicted = [tokenizer.decode([i]) for i in tgt_ids] + [tokenizer.decode([eos])]
    inputs = [tokenizer.decode([eos])] + predicted[:-1]
    queries, keys = {"encoder": (words, words), "decoder": (predicted, inputs),
                     "cross": (predicted, words)}[side]
    return {"side": side, "queries": queries, "keys": keys, "maps": {k: m[0] for k, m in rec.maps.items()},
            "source": source, "target": tokenizer.decode(tgt_ids, skip_special_tokens=True).strip()}


def _label(token: str) -> str:
    return token.replace("\n", "↵").replace("\t", "⇥") or "∅"


def plot_layer(weights: torch.Tensor, tokens: list[str], png_path: str | Path, *, layer: int,
               heads: list[int] | None = None, keys: list[str] | None = None, what: str = "layer") -> Path:
    """One PNG of a layer: a heat map per head (rows: queries ``tokens``, columns: keys, the
    same tokens unless ``keys`` names others, as cross-attention's source tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from zenlm.explain.plots import _save

    n = weights.shape[0]
    heads = heads or list(range(n))
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    t = len(tokens)
    keys = tokens if keys is None else keys
    width = max(2.5, min(0.25 * len(keys), 6))
    cell = max(2.5, min(0.25 * t, 6))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 1, cell * rows + 0.6), dpi=100, squeeze=False)
    labels, key_labels = [_label(x) for x in tokens], [_label(x) for x in keys]
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        ax.imshow(weights[k].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"{what} {layer} head {heads[k]}", fontsize=9)
        if max(t, len(keys)) <= 40:
            ax.set_xticks(range(len(keys)), key_labels, rotation=90, fontsize=7)
            ax.set_yticks(range(t), labels, fontsize=7)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, png_path)


_HEAD_VIEW = """<!doctype html><html><head><meta charset="utf-8"><title>%(title)s</title><style>
body{font-family:sans-serif;margin:1.5em}#tok{font-family:monospace;line-height:2.2}
.t{padding:2px 1px;margin:0 1px;border-radius:3px;cursor:pointer;white-space:pre}
.sel{outline:2px solid #d33}select{margin-right:1em}#grid{margin-top:1em}
td{width:14px;height:14px;padding:0}table{border-collapse:collapse}
</style></head><body><h1>%(title)s</h1>
<p>Layer <select id="layer"></select> Head <select id="head"></select>
<label><input type="checkbox" id="avg"> average the heads</label></p>
<p>Hover a token to see where it attends (red: as a query); the key tokens are shaded by weight.</p>
<div id="qtok"></div><div id="tok"></div><div id="grid"></div>
<script>
const DATA = %(data)s;
const KEYS = DATA.keys || DATA.tokens, SPLIT = !!DATA.keys;
const L = document.getElementById("layer"), H = document.getElementById("head"), A = document.getElementById("avg");
const qDiv = document.getElementById("qtok"), tokDiv = document.getElementById("tok"), grid = document.getElementById("grid");
DATA.layers.forEach((l, i) => { const o = document.createElement("option"); o.value = i; o.textContent = l; L.appendChild(o); });
DATA.heads.forEach((h, i) => { const o = document.createElement("option"); o.value = i; o.textContent = h; H.appendChild(o); });
let query = DATA.tokens.length - 1;
function weights() {
  const m = DATA.maps[L.value];
  if (!A.checked) return m[H.value];
  return m[0].map((row, q) => row.map((_, k) => m.reduce((s, h) => s + h[q][k], 0) / m.length));
}
function span(t, cls, a) {
  const s = document.createElement("span");
  s.className = "t" + cls;
  s.style.background = "rgba(30,90,200," + a.toFixed(3) + ")";
  s.style.color = a > 0.5 ? "white" : "black";
  s.textContent = t; s.title = "weight " + a.toFixed(4);
  return s;
}
function draw() {
  const w = weights();
  qDiv.innerHTML = ""; tokDiv.innerHTML = ""; grid.innerHTML = "";
  if (SPLIT) {  // queries and keys are different sequences (cross-attention): one row each
    qDiv.textContent = "queries: ";
    DATA.tokens.forEach((t, q) => {
      const s = span(t, q === query ? " sel" : "", 0);
      s.onmouseenter = () => { query = q; draw(); };
      qDiv.appendChild(s);
    });
    tokDiv.appendChild(document.createTextNode("keys: "));
  }
  KEYS.forEach((t, k) => {
    const a = k < w[query].length ? w[query][k] : 0;
    const s = span(t, !SPLIT && k === query ? " sel" : "", a);
    if (!SPLIT) s.onmouseenter = () => { query = k; draw(); };
    tokDiv.appendChild(s);
  });
  const table = document.createElement("table");
  w.forEach((row, q) => {
    const tr = document.createElement("tr");
    row.forEach((v, k) => {
      const td = document.createElement("td");
      td.style.background = "rgba(30,90,200," + v.toFixed(3) + ")";
      td.title = DATA.tokens[q] + " -> " + KEYS[k] + ": " + v.toFixed(4);
      tr.appendChild(td);
    });
    table.appendChild(tr);
  });
  grid.appendChild(table);
}
[L, H, A].forEach(e => e.onchange = draw);
draw();
</script></body></html>
"""


def head_view_html(tokens: list[str], maps: dict[int, torch.Tensor], heads: list[int] | None = None,
                   title: str = "attention head view", keys: list[str] | None = None) -> str:
    """``tokens`` are the queries and, unless ``keys`` names others (cross-attention), the keys."""
    from html import escape

    layers = sorted(maps)
    n = maps[layers[0]].shape[0]
    data = {"tokens": [_label(t) for t in tokens], "layers": layers, "heads": heads or list(range(n)),
            "maps": [[[[round(float(v), 4) for v in row] for row in head] for head in maps[layer]]
                     for layer in layers]}
    if keys is not None:
        data["keys"] = [_label(t) for t in keys]
    # "</" inside the JSON would end the script element early
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    return _HEAD_VIEW % {"title": escape(title), "data": payload}


def write_attention(model, tokenizer, text: str, out_dir: str | Path, layers=None, heads=None, *,
                    side: str = "cross", target: str | None = None) -> dict:
    """PNG heat maps per layer, ``head_view.html`` and ``attention.json`` in ``out_dir``. For an
    encoder-decoder ``text`` is the source and ``side`` the attention shown (see
    :func:`pair_attention`), over ``target`` or the model's own translation."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra: dict = {}
    if is_seq2seq(model):
        pair = pair_attention(model, tokenizer, text, target, side, layers, heads)
        tokens, keys, maps = pair["queries"], pair["keys"], pair["maps"]
        extra = {"side": side, "target": pair["target"], "keys": keys}
    else:
        (tokens, maps), keys = text_attention(model, tokenizer, text, layers, heads), None
    head_list = list(heads) if heads is not None else None
    what = {"encoder": "encoder layer", "decoder": "decoder layer", "cross": "cross-attention layer"}
    pngs = [str(plot_layer(maps[layer], tokens, out / f"attention_layer{layer:02d}.png", layer=layer,
                           heads=head_list, keys=keys, what=what[side] if extra else "layer"))
            for layer in sorted(maps)]
    html = out / "head_view.html"
    title = f"attention: {text[:60]}" + (f" → {extra['target'][:60]} ({side})" if extra else "")
    atomic_write_text(html, head_view_html(tokens, maps, head_list, title=title,
                                           keys=keys if keys is not tokens else None))
    record = {"text": text, "tokens": tokens, "heads": head_list, **extra,
              "maps": {str(k): v.tolist() for k, v in maps.items()}}
    atomic_write_text(out / "attention.json", json.dumps(record))
    return {"tokens": tokens, "layers": sorted(maps), "pngs": pngs, "html": str(html),
            "json": str(out / "attention.json"), **extra}


__all__ = ["text_attention", "is_seq2seq", "pair_attention", "plot_layer", "head_view_html",
           "write_attention"]
