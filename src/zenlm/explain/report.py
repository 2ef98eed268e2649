"""The report card of a run folder: one self-contained HTML page and the same in Markdown.

The card reads whatever the run left (``config.yaml``, ``summary.json``, ``metrics.jsonl``,
``card.json``, ``val.jsonl``, the data manifest its config names) rather than asking each kind
of run for a report of its own, so pretraining, fine-tuning (classify, chat), translation and
DP runs all get one, and a kind added later gets one without touching this file: unknown
``val_*`` metrics are plotted and tabled, privacy fields are shown whatever their names.

The HTML carries everything inline (figures as base64 PNG, CSS in a style element, no script),
so it can be mailed, attached to a model card or opened offline years later and look the same.
The Markdown references the same figures as files in ``report_files/`` beside it.

What needs the model (a confusion matrix the run did not record, attention and attribution
examples) asks for a ``load`` function: loading run folders sits on a floor above this one
(``zenlm.load``), so the caller hands it down. Without it those sections say what is missing.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from zenlm.io import atomic_write_text

CARD_FORMAT = "zenlm-card/1"
KINDS = {"lm": "pretraining (causal LM)", "mlm": "pretraining (masked LM)",
         "classify": "fine-tuning: classification", "chat": "fine-tuning: chat SFT",
         "seq2seq": "translation (encoder-decoder)"}
# shown first in the headline, in this order, when the last evaluation has them
HEADLINE = ("val_loss", "val_ppl", "val_bpb", "val_accuracy", "val_macro_f1", "val_bleu", "val_chrf")
EXAMPLE_TOKENS = 24  # longer texts make heat maps no one can read


@dataclass
class RunInfo:
    """Everything the card shows, as plain data read from the run folder."""

    run: Path
    config: dict
    summary: dict
    metrics: list[dict]
    kind: str
    manifest: dict | None = None
    card: dict | None = None
    privacy: dict = field(default_factory=dict)
    confusion: list[list[int]] | None = None
    labels: list[str] | None = None
    confusion_source: str = ""

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.metrics if any(k.startswith("val_") for k in r)]

    @property
    def last_eval(self) -> dict:
        ev = self.summary.get("val")
        if isinstance(ev, dict) and ev:
            return ev
        return self.evals[-1] if self.evals else {}

    @property
    def dp(self) -> bool:
        return self.privacy.get("epsilon") is not None


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def collect(run: str | Path) -> RunInfo:
    """Read a run folder; raises CheckpointError when it is not one."""
    import yaml

    from zenlm.errors import CheckpointError
    from zenlm.explain.plots import read_metrics

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise CheckpointError(f"{run} is not a zenlm run folder (no config.yaml)")
    try:
        config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{run / 'config.yaml'} is not valid YAML: {exc}".splitlines()[0]) from None
    summary = _read_json(run / "summary.json") or {}
    kind = str(summary.get("task") or config.get("task") or "lm")
    card = _read_json(run / "card.json")
    if not (isinstance(card, dict) and card.get("format") == CARD_FORMAT):
        card = None
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    manifest = None
    if data.get("path") and (Path(data["path"]) / "manifest.json").is_file():
        manifest = _read_json(Path(data["path"]) / "manifest.json")
    # the summary is the run's own record; the card's copy is what was signed
    privacy = {k: v for k, v in ((card or {}).get("privacy") or {}).items() if v is not None}
    privacy.update({k: v for k, v in (summary.get("privacy") or {}).items() if v is not None})
    info = RunInfo(run, config, summary, read_metrics(run / "metrics.jsonl"), kind, manifest, card, privacy)
    if summary.get("confusion"):
        info.confusion, info.labels = summary["confusion"], summary.get("labels") or config.get("labels")
        info.confusion_source = "the run's last validation (summary.json)"
    return info


# ----------------------------------------------------------------------------------------------
# what needs the model


def classify_val(info: RunInfo, loaded) -> tuple[list[list[int]], list[str], str]:
    """The confusion matrix of a classifier on the run's own val rows (``val.jsonl``, else the
    config's val file), through the evaluation code the run itself used."""
    from zenlm.data.classify import label_ids, read_labelled
    from zenlm.errors import DataError
    from zenlm.eval.classify import classify_texts, score

    d = info.config.get("data") or {}
    path = info.run / "val.jsonl" if (info.run / "val.jsonl").is_file() else d.get("val")
    if not path or not Path(path).is_file():
        raise DataError(f"{info.run} has no val.jsonl and its config names no val file")
    text_col, label_col = d.get("text_col", "text"), d.get("label_col", "label")
    rows = read_labelled(str(path), text_col, label_col, None if Path(path).suffix == ".jsonl" else d.get("format"))
    model = loaded.model
    gold = label_ids(rows.labels, model.labels, rows.source)
    probs = classify_texts(model, loaded.tokenizer, rows.texts, max_len=d.get("max_len") or 256)
    res = score(gold, probs.argmax(-1).tolist(), model.labels)
    return res.confusion, list(model.labels), f"{Path(path).name}, scored now by the run's model"


def example_text(info: RunInfo, tokenizer) -> tuple[str, str | None]:
    """A text from the run's own data, so the examples show what the model was trained on, and
    for a chat run the reference reply (attributed as a continuation of the templated prompt),
    for a translation run the reference translation of the source."""
    d = info.config.get("data") or {}
    try:
        if info.kind == "seq2seq":
            from zenlm.data.pairs import PairShards

            pairs = PairShards(d["path"])
            split = "val" if pairs.n_pairs("val") else "train"
            src, tgt = (tokenizer.decode(pairs.sentence(split, side, 0), skip_special_tokens=True).strip()
                        for side in ("src", "tgt"))
            if src:
                return src, tgt or None
        if info.kind == "classify" and (info.run / "val.jsonl").is_file():
            first = (info.run / "val.jsonl").read_text(encoding="utf-8").splitlines()[0]
            return str(json.loads(first)[d.get("text_col", "text")]), None
        if info.kind == "chat":
            from zenlm.data.chat import read_conversations

            convs = read_conversations(d.get("val") or d["train"], messages_field=d.get("messages_field", "messages"),
                                       prompt_field=d.get("prompt_field"), response_field=d.get("response_field"))
            user = next(m for m in convs[0] if m["role"] == "user")
            reply = next((m["content"] for m in convs[0] if m["role"] == "assistant"), None)
            if tokenizer.chat_template and reply:
                prompt = tokenizer.apply_chat_template([user], add_generation_prompt=True)
                if len(tokenizer.encode(prompt + reply)) <= 2 * EXAMPLE_TOKENS:
                    return prompt, reply
            return user["content"], None
        if d.get("path") and (Path(d["path"]) / "val.bin").is_file():
            import numpy as np

            dtype = (info.manifest or {}).get("dtype", "uint16")
            ids = np.fromfile(Path(d["path"]) / "val.bin", dtype=dtype, count=4 * EXAMPLE_TOKENS)
            ids = [int(i) for i in ids if int(i) != tokenizer.eot_id][:EXAMPLE_TOKENS]  # the prompt adds its own
            text = tokenizer.decode(ids).strip()
            if text:
                return text, None
    except Exception:  # a moved or unreadable data file: any text will do for an example
        pass
    return "The quick brown fox jumps over the lazy dog.", None


def examples(info: RunInfo, loaded, text: str | None, files: Path) -> dict:
    """One attention heat map (last layer, first two heads) and one attribution of ``text``:
    the label the classifier predicts, a chat run's reference reply, or the language model's
    next token."""
    from zenlm.explain.attention import is_seq2seq, plot_layer, text_attention
    from zenlm.explain.attribution import explain, label_target, lm_target

    model, tok = loaded.model, loaded.tokenizer
    if tok is None:
        raise ValueError("the run's model has no tokenizer")
    text, reply = (text, None) if text else example_text(info, tok)
    if is_seq2seq(model):
        return translation_example(model, tok, text, reply, files)
    ids = tok.encode(text)
    if reply is None and len(ids) > EXAMPLE_TOKENS:
        text = tok.decode(ids[:EXAMPLE_TOKENS])
    backbone = getattr(model, "backbone", model)
    layer = backbone.config.n_layer - 1
    heads = list(range(min(2, backbone.config.n_head)))  # two stay legible across a page
    tokens, maps = text_attention(model, tok, text, layers=[layer], heads=heads)
    got = max(maps)
    png = plot_layer(maps[got], tokens, files / "attention.png", layer=got, heads=heads)
    target = label_target(model, tok, text) if hasattr(model, "labels") else \
        lm_target(tok, text, reply, model=model)  # no reply: the model's own next token
    attr = explain(model, tok, target)
    return {"text": text, "attention": png, "attention_layer": got, "heads": heads, "attribution": attr}


def translation_example(model, tok, source: str, reference: str | None, files: Path) -> dict:
    """An encoder-decoder's example: its greedy translation of ``source`` and the last decoder
    layer's cross-attention while writing it (where each target token looked in the source).
    No token attribution: the attribution targets are a decoder's or a classifier's."""
    from zenlm.explain.attention import pair_attention, plot_layer

    ids = tok.encode(source)
    if len(ids) > EXAMPLE_TOKENS:
        source = tok.decode(ids[:EXAMPLE_TOKENS])
    layer = model.config.n_layer - 1
    heads = list(range(min(2, model.config.n_head)))
    pair = pair_attention(model, tok, source, side="cross", layers=[layer], heads=heads)
    png = plot_layer(pair["maps"][layer], pair["queries"], files / "attention.png", layer=layer,
                     heads=heads, keys=pair["keys"], what="cross-attention layer")
    return {"text": source, "reference": reference, "translation": pair["target"], "attention": png,
            "attention_layer": layer, "heads": heads, "attribution": None, "side": "cross"}


# ----------------------------------------------------------------------------------------------
# formatting


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "–"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def _flat(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def per_class(confusion: list[list[int]], labels: list[str]) -> list[dict]:
    """Precision, recall and F1 of each class, from the matrix (rows true, columns predicted)."""
    n = len(confusion)
    out = []
    for c in range(n):
        tp = confusion[c][c]
        pred = sum(confusion[r][c] for r in range(n))
        true = sum(confusion[c])
        p = tp / pred if pred else 0.0
        r = tp / true if true else 0.0
        out.append({"label": labels[c], "support": true, "precision": p, "recall": r,
                    "f1": 2 * p * r / (p + r) if p + r else 0.0})
    return out


class _Doc:
    """The page built twice over, HTML and Markdown, section by section, so the two always say
    the same things in the same order."""

    def __init__(self) -> None:
        self.html: list[str] = []
        self.md: list[str] = []
        self.toc: list[tuple[str, str]] = []
        self.figures: list[Path] = []

    def section(self, title: str) -> None:
        anchor = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
        self.toc.append((anchor, title))
        if self.html:
            self.html.append("</section>")
        self.html.append(f'<section id="{anchor}"><h2>{html.escape(title)}</h2>')
        self.md.append(f"## {title}\n\n")

    def para(self, text: str, md: str | None = None) -> None:
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md.append((md if md is not None else text) + "\n\n")

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
        b = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
        self.html.append(f"<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>")

        def cell(v: Any) -> str:
            return _fmt(v).replace("|", "\\|").replace("\n", " ")

        self.md.append("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
                       + "".join("| " + " | ".join(cell(v) for v in row) + " |\n" for row in rows) + "\n")

    def kv(self, pairs: list[tuple[str, Any]]) -> None:
        self.table(["field", "value"], [[k, v] for k, v in pairs])

    def figure(self, png: Path, alt: str) -> None:
        self.figures.append(png)
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        self.html.append(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{html.escape(alt)}</figcaption></figure>")
        self.md.append(f"![{alt}](report_files/{png.name})\n\n")

    def seam(self, text: str) -> None:
        """What a section could not show, and why (highlighted: it is not a result)."""
        self.raw(f"<p class='seam'>{html.escape(text)}</p>", f"> {text}\n\n")

    def raw(self, html_part: str, md_part: str) -> None:
        self.html.append(html_part)
        self.md.append(md_part)


_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:64em;margin:0 auto;padding:1.5em 1.2em 3em;background:#fff}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.2em;border-bottom:2px solid #e3e6eb;padding-bottom:.2em;margin-top:1.8em}
.sub{color:#5b6475;margin:0 0 1em}
.cards{display:flex;flex-wrap:wrap;gap:.6em;margin:1em 0}
.card{border:1px solid #dde1e7;border-radius:6px;padding:.5em .9em;min-width:8em;background:#fafbfc}
.card b{display:block;font-size:1.35em}.card span{color:#5b6475;font-size:.85em}
nav{font-size:.9em;color:#5b6475}nav a{color:#2856b6;margin-right:.9em;text-decoration:none}
table{border-collapse:collapse;font-size:.88em;margin:.4em 0}
th,td{border:1px solid #dde1e7;padding:2px 8px;text-align:left;vertical-align:top}
th{background:#f1f3f6;font-weight:600}td{font-variant-numeric:tabular-nums;word-break:break-word}
figure{margin:.6em 0}img{max-width:100%;height:auto}figcaption{color:#5b6475;font-size:.85em}
pre{background:#f4f5f7;padding:.7em;overflow:auto;font-size:.82em}
.t{font-family:ui-monospace,monospace;white-space:pre;padding:2px 1px;border-radius:2px}
.line{line-height:2.3}.seam{color:#8a5a00;background:#fff7e0;padding:.5em .8em;border-radius:4px}
"""


def _attribution_html(attr) -> str:
    from zenlm.explain.attribution import NAMES, _colour

    rows = []
    for method, values in attr.methods.items():
        scale = max((abs(v) for v, a in zip(values, attr.attributed) if a), default=0.0)
        spans = "".join(
            f'<span class="t" style="background:{_colour(v, scale) if a else "#eee"}" '
            f'title="{html.escape(repr(tok))}: {v:+.4g}">{html.escape(tok).replace(chr(10), "↵")}</span>'
            for tok, v, a in zip(attr.tokens, values, attr.attributed))
        rows.append(f"<p><b>{html.escape(NAMES.get(method, method))}</b></p><p class='line'>{spans}</p>")
    return "".join(rows)


def _attribution_md(attr) -> str:
    methods = list(attr.methods)
    lines = ["| token | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for i, tok in enumerate(attr.tokens):
        vals = [f"{attr.methods[m][i]:+.4f}" if attr.attributed[i] else "–" for m in methods]
        lines.append(f"| `{repr(tok)[1:-1].replace('|', '¦')}` | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n\n"


# ----------------------------------------------------------------------------------------------
# the report


def write_report(run: str | Path, out: str | Path | None = None, *, text: str | None = None,
                 load: Callable | None = None, verify: Callable | None = None,
                 with_examples: bool = True, log=print) -> dict:
    """``report.html`` (self-contained) and ``report.md`` with ``report_files/`` in ``out``
    (default ``RUN/report``); returns their paths and what each section found.

    ``load(run)`` gives the run's model (``zenlm.load``), for examples and for a confusion matrix
    the run did not record; ``verify(card)`` checks the lineage card's signature and returns a
    line to show (``zenlm.privacy.card.check_signature``, wrapped by the CLI).
    """
    info = collect(run)
    out = Path(out) if out is not None else info.run / "report"
    files = out / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    notes: dict[str, str] = {}
    loaded = None

    def model():
        nonlocal loaded
        if loaded is None:
            loaded = load(str(info.run))
        return loaded

    if info.kind == "classify" and info.confusion is None and load is not None:
        try:
            info.confusion, info.labels, info.confusion_source = classify_val(info, model())
        except Exception as exc:  # the report is still worth having without the matrix
            notes["confusion"] = f"no confusion matrix: {exc}"
    ex = None
    if with_examples and load is not None:
        try:
            ex = examples(info, model(), text, files)
        except ImportError as exc:
            notes["examples"] = f"attention and attribution examples need zenlm.explain.attention and " \
                                f"zenlm.explain.attribution, not in this build ({exc})"
        except Exception as exc:
            notes["examples"] = f"no attention or attribution example for this model: {type(exc).__name__}: {exc}"
    elif not with_examples:
        notes["examples"] = "examples were not asked for (--no-examples)"
    else:
        notes["examples"] = "examples need the run's model (write_report(load=zenlm.load))"

    doc = _Doc()
    for section in (_metrics, _curves, _confusion, _examples, _privacy, _lineage, _data, _config):
        section(doc, info, files=files, ex=ex, notes=notes, verify=verify)
    title = f"zenlm report: {info.name}"
    atomic_write_text(out / "report.html", _page(doc, info, title))
    atomic_write_text(out / "report.md", _markdown(doc, info, title))
    return {"html": str(out / "report.html"), "markdown": str(out / "report.md"),
            "figures": [str(p) for p in doc.figures], "kind": info.kind,
            "sections": [t for _, t in doc.toc], "notes": notes, "confusion": info.confusion}


# ----------------------------------------------------------------------------------------------
# the sections, in page order (each takes the same keywords and uses what it needs)


def _metrics(doc: _Doc, info: RunInfo, **_) -> None:
    doc.section("Metrics")
    s, last = info.summary, info.last_eval
    scalars = [(k, v) for k, v in s.items() if k not in ("val", "confusion", "labels", "privacy", "best", "run")
               and not isinstance(v, (list, dict))]
    if scalars:
        doc.kv(scalars)
    else:
        doc.para("The run has no summary.json (it did not finish, or was stopped before the end).")
    if last:
        doc.para(f"Last evaluation (step {last.get('step', '?')}):")
        doc.kv([(k, v) for k, v in last.items() if k != "step"])
    evals = info.evals
    if len(evals) > 1:
        keys = sorted({k for r in evals for k in r if k.startswith("val_") or k == "epsilon"})
        shown = evals if len(evals) <= 40 else evals[:: math.ceil(len(evals) / 40)] + [evals[-1]]
        doc.para("Every evaluation during the run:" if shown is evals else "Evaluations during the run (every few):")
        doc.table(["step"] + keys, [[r.get("step")] + [r.get(k) for k in keys] for r in shown])


def _curves(doc: _Doc, info: RunInfo, *, files: Path, **_) -> None:
    from zenlm.explain.plots import plot_loss, plot_series

    doc.section("Loss and validation curves")
    png = plot_loss(info.run / "metrics.jsonl", files / "loss.png", title=info.name)
    if png is not None:
        doc.figure(png, "train and val loss against tokens seen")
    else:
        doc.para("metrics.jsonl has no loss records.")
    evals = info.evals
    other = sorted({k for r in evals for k in r if (k.startswith("val_") and k not in ("val_loss", "val_tokens"))
                    or k == "epsilon"})
    if len(evals) > 1 and other:
        png = plot_series(evals, other, files / "metrics.png", title="validation metrics by step")
        if png is not None:
            doc.figure(png, "validation metrics by step" + (" and ε spent" if "epsilon" in other else ""))


def _confusion(doc: _Doc, info: RunInfo, *, files: Path, notes: dict, **_) -> None:
    from zenlm.explain.plots import plot_confusion

    if info.kind != "classify":
        return
    doc.section("Confusion matrix")
    if not info.confusion:
        doc.seam(notes.get("confusion", "no confusion matrix recorded"))
        return
    labels = info.labels or [str(i) for i in range(len(info.confusion))]
    png = plot_confusion(info.confusion, labels, files / "confusion.png", title=info.name)
    doc.figure(png, f"confusion matrix (rows true, columns predicted): {info.confusion_source}")
    rows = per_class(info.confusion, labels)
    doc.table(["label", "support", "precision", "recall", "F1"],
              [[r["label"], r["support"], r["precision"], r["recall"], r["f1"]] for r in rows])
    total = sum(r["support"] for r in rows)
    common = max(rows, key=lambda r: r["support"])
    if total:
        doc.para(f"Always answering the most common class ({common['label']}) would score accuracy "
                 f"{common['support'] / total:.4g} on these {total:,} rows.")
    doc.table(["true ↓ predicted →"] + labels, [[labels[i]] + row for i, row in enumerate(info.confusion)])


def _examples(doc: _Doc, info: RunInfo, *, ex: dict | None, notes: dict, **_) -> None:
    doc.section("Attention and attribution")
    if ex is None:
        doc.seam(notes["examples"])
        return
    attr = ex["attribution"]
    if ex.get("side") == "cross":
        doc.para(f"Source (from the run's data unless given): {ex['text']!r}")
        doc.kv([("the model's translation (greedy)", ex["translation"]),
                ("reference", ex["reference"] if ex["reference"] is not None else "–")])
        doc.figure(ex["attention"], f"cross-attention of decoder layer {ex['attention_layer']}, heads "
                                    f"{', '.join(map(str, ex['heads']))} (rows: the target token being "
                                    "written, columns: source tokens)")
        doc.para("Token attributions are computed for decoders and classifiers; for an encoder-decoder "
                 "the cross-attention above shows which source tokens each target token read.")
        return
    doc.para(f"Text (from the run's data unless given): {ex['text']!r}")
    doc.figure(ex["attention"], f"attention of layer {ex['attention_layer']}, heads "
                                f"{', '.join(map(str, ex['heads']))} (rows: queries, columns: keys)")
    ig = ""
    if attr.ig_delta is not None:
        ig = f"; integrated gradients over {attr.steps} steps, convergence delta {attr.ig_delta:+.2e}"
    doc.para(f"Target: {attr.target} = {attr.score:.4f}{ig}. Red raised the target, blue lowered it.")
    doc.raw(_attribution_html(attr), _attribution_md(attr))


def _privacy(doc: _Doc, info: RunInfo, **_) -> None:
    doc.section("Differential privacy")
    if info.dp:
        doc.kv(sorted(info.privacy.items()))
    else:
        doc.para("Not trained with differential privacy: no ε guarantee.")


def _lineage(doc: _Doc, info: RunInfo, *, verify: Callable | None, **_) -> None:
    doc.section("Lineage card")
    c = info.card
    if c is None:
        doc.para("The run has no card.json.")
        return
    sig = c.get("signature") or {}
    parent = c.get("parent") or {}
    rows = [("kind", c.get("kind")), ("created", c.get("created")), ("zenlm", c.get("zenlm_version")),
            ("parent", parent.get("model") if parent else "none (trained from scratch)")]
    if parent:
        rows += [("parent sha256", parent.get("sha256")), ("parent card signature", parent.get("card_signature"))]
    rows += [("steps", c.get("steps")), ("tokens", c.get("tokens")),
             ("epsilon", (c.get("privacy") or {}).get("epsilon")),
             ("files hashed", len(c.get("files") or {})),
             ("signature", f"{sig.get('scheme')} (key {sig.get('key_id')})")]
    if verify is not None:
        try:
            rows.append(("signature check", verify(c)))
        except Exception as exc:  # a card that fails its check is news for the report, not a crash
            rows.append(("signature check", f"not confirmed: {exc}"))
    doc.kv(rows)
    doc.para("Check every file it names with `zenlm card verify RUN`.")


def _data(doc: _Doc, info: RunInfo, **_) -> None:
    doc.section("Data")
    rows = [[d.get("path"), name, digest[:16] + "…"]
            for d in (info.card or {}).get("data") or [] for name, digest in (d.get("files") or {}).items()]
    if rows:
        doc.table(["data", "file", "sha256"], rows)
    if info.manifest:
        doc.para("Prepared data manifest:")
        doc.kv(_flat({k: v for k, v in info.manifest.items() if k != "sources"}))
        srcs = info.manifest.get("sources") or []
        if srcs:
            doc.table(["source", "bytes", "sha256"],
                      [[x.get("path"), x.get("bytes"), (x.get("sha256") or "")[:16] + "…"] for x in srcs[:50]])
    elif not rows:
        doc.kv(_flat(info.config.get("data") or {}))


def _config(doc: _Doc, info: RunInfo, **_) -> None:
    doc.section("Configuration")
    doc.kv([(k, v) for k, v in _flat(info.config) if not k.startswith("param_groups")])


def _headline(info: RunInfo) -> list[tuple[str, Any]]:
    last, s = info.last_eval, info.summary
    cards = [(k, last[k]) for k in HEADLINE if isinstance(last.get(k), (int, float))]
    cards += [(k, last[k]) for k in sorted(last) if k.startswith("val_") and k not in HEADLINE
              and isinstance(last[k], (int, float))]
    if info.dp:
        cards.append(("ε spent", info.privacy["epsilon"]))
    cards += [(k, s[k]) for k in ("step", "tokens") if isinstance(s.get(k), int)]
    return cards


def _kind(info: RunInfo) -> str:
    return KINDS.get(info.kind, info.kind) + (", differentially private" if info.dp else "")


def _page(doc: _Doc, info: RunInfo, title: str) -> str:
    cards = "".join(f"<div class='card'><b>{html.escape(_fmt(v))}</b><span>{html.escape(k)}</span></div>"
                    for k, v in _headline(info))
    nav = "".join(f"<a href='#{a}'>{html.escape(t)}</a>" for a, t in doc.toc)
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            "<link rel='icon' href='data:,'>"  # no favicon request: nothing leaves the file
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>"
            f"<h1>{html.escape(title)}</h1><p class='sub'>{html.escape(_kind(info))} · "
            f"{html.escape(str(info.run))}</p><div class='cards'>{cards}</div><nav>{nav}</nav>"
            + "".join(doc.html) + "</section></main></body></html>")


def _markdown(doc: _Doc, info: RunInfo, title: str) -> str:
    cards = " · ".join(f"**{k}** {_fmt(v)}" for k, v in _headline(info))
    return f"# {title}\n\n{_kind(info)} · `{info.run}`\n\n" + (cards + "\n\n" if cards else "") + "".join(doc.md)


__all__ = ["RunInfo", "collect", "classify_val", "examples", "per_class", "write_report"]
