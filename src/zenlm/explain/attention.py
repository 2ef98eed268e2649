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


def _label(token: str) -> str:
    return token.replace("\n", "↵").replace("\t", "⇥") or "∅"


def plot_layer(weights: torch.Tensor, tokens: list[str], png_path: str | Path, *, layer: int,
               heads: list[int] | None = None) -> Path:
    """One PNG of a layer: a heat map per head (rows: queries, columns: keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from zenlm.explain.plots import _save

    n = weights.shape[0]
    heads = heads or list(range(n))
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    t = len(tokens)
    cell = max(2.5, min(0.25 * t, 6))
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + 1, cell * rows + 0.6), dpi=100, squeeze=False)
    labels = [_label(x) for x in tokens]
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        ax.imshow(weights[k].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {layer} head {heads[k]}", fontsize=9)
        if t <= 40:
            ax.set_xticks(range(t), labels, rotation=90, fontsize=7)
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
<div id="tok"></div><div id="grid"></div>
<script>
const DATA = %(data)s;
const L = document.getElementById("layer"), H = document.getElementById("head"), A = document.getElementById("avg");
const tokDiv = document.getElementById("tok"), grid = document.getElementById("grid");
DATA.layers.forEach((l, i) => { const o = document.createElement("option"); o.value = i; o.textContent = l; L.appendChild(o); });
DATA.heads.forEach((h, i) => { const o = document.createElement("option"); o.value = i; o.textContent = h; H.appendChild(o); });
let query = DATA.tokens.length - 1;
function weights() {
  const m = DATA.maps[L.value];
  if (!A.checked) return m[H.value];
  return m[0].map((row, q) => row.map((_, k) => m.reduce((s, h) => s + h[q][k], 0) / m.length));
}
function draw() {
  const w = weights();
  tokDiv.innerHTML = ""; grid.innerHTML = "";
  DATA.tokens.forEach((t, k) => {
    const s = document.createElement("span");
    s.className = "t" + (k === query ? " sel" : "");
    const a = k <= w[query].length ? w[query][k] : 0;
    s.style.background = "rgba(30,90,200," + a.toFixed(3) + ")";
    s.style.color = a > 0.5 ? "white" : "black";
    s.textContent = t; s.title = "weight " + a.toFixed(4);
    s.onmouseenter = () => { query = k; draw(); };
    tokDiv.appendChild(s);
  });
  const table = document.createElement("table");
  w.forEach((row, q) => {
    const tr = document.createElement("tr");
    row.forEach((v, k) => {
      const td = document.createElement("td");
      td.style.background = "rgba(30,90,200," + v.toFixed(3) + ")";
      td.title = DATA.tokens[q] + " -> " + DATA.tokens[k] + ": " + v.toFixed(4);
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
                   title: str = "attention head view") -> str:
    from html import escape

    layers = sorted(maps)
    n = maps[layers[0]].shape[0]
    data = {"tokens": [_label(t) for t in tokens], "layers": layers, "heads": heads or list(range(n)),
            "maps": [[[[round(float(v), 4) for v in row] for row in head] for head in maps[layer]]
                     for layer in layers]}
    # "</" inside the JSON would end the script element early
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    return _HEAD_VIEW % {"title": escape(title), "data": payload}


def write_attention(model, tokenizer, text: str, out_dir: str | Path, layers=None, heads=None) -> dict:
    """PNG heat maps per layer, ``head_view.html`` and ``attention.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens, maps = text_attention(model, tokenizer, text, layers, heads)
    head_list = list(heads) if heads is not None else None
    pngs = [str(plot_layer(maps[layer], tokens, out / f"attention_layer{layer:02d}.png", layer=layer,
                           heads=head_list)) for layer in sorted(maps)]
    html = out / "head_view.html"
    atomic_write_text(html, head_view_html(tokens, maps, head_list, title=f"attention: {text[:60]}"))
    record = {"text": text, "tokens": tokens, "heads": head_list,
              "maps": {str(k): v.tolist() for k, v in maps.items()}}
    atomic_write_text(out / "attention.json", json.dumps(record))
    return {"tokens": tokens, "layers": sorted(maps), "pngs": pngs, "html": str(html),
            "json": str(out / "attention.json")}


__all__ = ["text_attention", "plot_layer", "head_view_html", "write_attention"]
