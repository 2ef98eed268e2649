"""A report card for a run folder: one self-contained HTML page and the same in Markdown.

It reads only what the run wrote (``config.yaml``, ``summary.json``, ``metrics.jsonl``, the data
manifest its config points to, ``confusion`` in the summary, privacy accounting and a lineage
card where present), so any kind of run gets a card: pretrain, finetune (classify, chat,
translation), DP. Figures are drawn afresh and inlined as base64 PNGs in the HTML (no external
files to lose), and written beside the Markdown. Attention and attribution examples come from
the run's model when it loads and a text is given.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from zenlm.io import atomic_write_text

LINEAGE_NAMES = ("lineage.json", "lineage_card.json", "lineage.signed.json")
PRIVACY_KEYS = ("epsilon", "epsilon_spent", "target_epsilon", "delta", "noise_multiplier", "max_grad_norm")


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _find_privacy(*sources) -> dict:
    """ε and its companions wherever the run recorded them (summary, last metrics, config)."""
    out: dict = {}

    def walk(d, prefix=""):
        if isinstance(d, dict):
            for k, v in d.items():
                if k in PRIVACY_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool):
                    out.setdefault(prefix + k, v)
                elif isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
    for s in sources:
        walk(s)
    # without an epsilon there is no privacy accounting (a clipping norm alone is not DP)
    return out if any("epsilon" in k for k in out) else {}


def collect(run: str | Path) -> dict:
    """Everything the card shows, as plain data."""
    import yaml

    from zenlm.errors import CheckpointError
    from zenlm.explain.plots import read_metrics

    run = Path(run)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{run} is not a zenlm run folder (no config.yaml)")
    config = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    summary = _read_json(run / "summary.json") or {}
    metrics = read_metrics(run / "metrics.jsonl")
    manifest = None
    data_path = (config.get("data") or {}).get("path") if isinstance(config.get("data"), dict) else None
    if data_path and (Path(data_path) / "manifest.json").is_file():
        manifest = _read_json(Path(data_path) / "manifest.json")
    lineage = next((_read_json(run / n) for n in LINEAGE_NAMES if (run / n).is_file()), None)
    evals = [r for r in metrics if any(k.startswith("val_") for k in r)]
    return {"run": str(run), "name": run.name, "kind": str(config.get("task") or "pretrain"),
            "config": config, "summary": summary, "metrics": metrics, "last_eval": evals[-1] if evals else None,
            "manifest": manifest, "confusion": summary.get("confusion"), "labels": summary.get("labels"),
            "privacy": _find_privacy(summary, metrics[-1] if metrics else {},
                                     {k: v for k, v in config.items() if k in ("privacy", "dp")}), "lineage": lineage}


def _png_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _figures(info: dict, files: Path) -> dict[str, Path]:
    from zenlm.explain.plots import plot_confusion, plot_loss

    files.mkdir(parents=True, exist_ok=True)
    out = {}
    run = Path(info["run"])
    p = plot_loss(run / "metrics.jsonl", files / "loss.png", title=info["name"])
    if p is not None:
        out["loss and validation"] = p
    if info["confusion"]:
        labels = info["labels"] or [str(i) for i in range(len(info["confusion"]))]
        out["confusion matrix"] = plot_confusion(info["confusion"], labels, files / "confusion.png",
                                                 title="validation")
    return out


def _examples(loaded, text: str, files: Path) -> dict:
    """Attention maps of the last layer and attributions of ``text`` from the run's model."""
    from zenlm.explain.attention import plot_layer, text_attention
    from zenlm.explain.attribution import explain, label_target, lm_target, to_html

    model, tok = loaded.model, loaded.tokenizer
    tokens, maps = text_attention(model, tok, text, layers=[-1])
    layer = max(maps)
    heads = maps[layer][: min(4, maps[layer].shape[0])]
    png = plot_layer(heads, tokens, files / "attention.png", layer=layer)
    if hasattr(model, "labels"):
        target = label_target(model, tok, text)
    else:
        target = lm_target(tok, text, model=model)
    attr = explain(model, tok, target, steps=16)
    page = to_html(attr, title="attributions")
    body = page.split("<body>", 1)[1].rsplit("</body>", 1)[0].replace("<h1>attributions</h1>", "")
    return {"attention": png, "attribution_html": body, "attribution": attr.as_dict()}


def _kv_rows(d: dict) -> list[tuple[str, str]]:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows += [(f"{k}.{k2}", v2) for k2, v2 in _kv_rows(v)]
        elif isinstance(v, float):
            rows.append((k, f"{v:.6g}"))
        else:
            rows.append((k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)))
    return rows


def _html_table(d: dict) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                               for k, v in _kv_rows(d)) + "</table>"


def _md_table(d: dict) -> str:
    rows = _kv_rows(d)

    def cell(v: str) -> str:
        return v.replace("|", "\\|").replace("\n", " ")[:200]

    return "| key | value |\n|---|---|\n" + "".join(f"| {k} | {cell(v)} |\n" for k, v in rows)


def _scalars(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("confusion", "labels") and not isinstance(v, list)}


def write_report(run: str | Path, out: str | Path | None = None, *, text: str | None = None,
                 load=None) -> dict:
    """``report.html`` (self-contained) and ``report.md`` (+ ``report_files/``) for ``run``;
    returns their paths. ``text`` adds attention and attribution examples from the run's model,
    loaded with ``load`` (``zenlm.load``: passed in, since loading runs sits on a floor above)."""
    info = collect(run)
    out = Path(out) if out else Path(run)
    out.mkdir(parents=True, exist_ok=True)
    files = out / "report_files"
    figs = _figures(info, files)
    examples = _examples(load(str(run)), text, files) if text and load is not None else None
    if examples:
        figs["attention (last layer)"] = examples["attention"]

    sections_html, sections_md = [], []

    def section(title: str, body_html: str, body_md: str) -> None:
        sections_html.append(f"<section><h2>{html.escape(title)}</h2>{body_html}</section>")
        sections_md.append(f"## {title}\n\n{body_md}\n")

    section("Summary", _html_table(_scalars(info["summary"])) if info["summary"] else "<p>no summary.json</p>",
            _md_table(_scalars(info["summary"])) if info["summary"] else "no summary.json")
    if info["last_eval"]:
        section("Last evaluation", _html_table(info["last_eval"]), _md_table(info["last_eval"]))
    for title, png in figs.items():
        section(title.capitalize(), f'<img alt="{html.escape(title)}" src="data:image/png;base64,{_png_b64(png)}">',
                f"![{title}](report_files/{png.name})")
    if examples:
        section("Attributions", examples["attribution_html"],
                "```json\n" + json.dumps({k: examples["attribution"][k] for k in ("tokens", "target", "methods")},
                                         indent=None) + "\n```")
    if info["privacy"]:
        section("Differential privacy", _html_table(info["privacy"]), _md_table(info["privacy"]))
    if info["lineage"]:
        section("Lineage card", f"<pre>{html.escape(json.dumps(info['lineage'], indent=1))}</pre>",
                "```json\n" + json.dumps(info["lineage"], indent=1) + "\n```")
    section("Configuration", _html_table(info["config"]), _md_table(info["config"]))
    if info["manifest"]:
        section("Data manifest", _html_table(info["manifest"]), _md_table(info["manifest"]))

    title = f"zenlm report: {info['name']}"
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif;margin:2em auto;max-width:70em;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;font-size:.9em}th,td{border:1px solid #ccc;padding:2px 8px;"
            "text-align:left;vertical-align:top}th{background:#f4f4f4;font-weight:normal}"
            "td{font-family:monospace;word-break:break-all}img{max-width:100%}section{margin-bottom:2em}"
            ".t{font-family:monospace;white-space:pre;padding:2px 0}.line{line-height:2.2}"
            "</style></head><body><h1>" + html.escape(title) + "</h1><p>" + html.escape(info["run"]) + "</p>"
            + "".join(sections_html) + "</body></html>")
    atomic_write_text(out / "report.html", page)
    atomic_write_text(out / "report.md", f"# {title}\n\n`{info['run']}`\n\n" + "\n".join(sections_md))
    return {"html": str(out / "report.html"), "markdown": str(out / "report.md"),
            "figures": [str(p) for p in figs.values()]}


__all__ = ["collect", "write_report"]
