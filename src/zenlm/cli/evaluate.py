"""`zenlm eval`: perplexity of a text file, multiple-choice accuracy, or classification accuracy.

- ``--task ppl`` (default): loss, perplexity and bits-per-byte of a UTF-8 text file, scored as
  one document (BOS first where the model's prompts start with one) in non-overlapping windows
  of the model's context or of ``--seq-len`` tokens.
- ``--task choice``: JSONL rows ``{"context", "choices", "gold"}`` scored by log-likelihood;
  ``--train FILE --shots K`` puts K solved examples in front; raw and length-normalised accuracy.
- ``--task classify``: a labelled table. A classifier from ``zenlm finetune classify`` uses its
  head; any other model is prompted zero-shot or few-shot (``--shots K`` from ``--train``) and
  the label words (``--labels 0=negative,1=positive``) are scored by log-likelihood.
- ``--task crows-pairs``, ``--task counterfactual``, ``--task refusal``: bias and safety
  (:mod:`zenlm.eval.fairness`, :mod:`zenlm.eval.safety`); CrowS-Pairs and XSTest are read from
  ``shared/data`` beside the checkout when ``--data`` is not given.
- ``--task translate``: an encoder-decoder translates ``--src`` (one sentence a line) and is
  scored against ``--ref``: sacreBLEU with its signature, chrF, lower-cased tokenised BLEU.
"""

from __future__ import annotations

import json
from pathlib import Path

from zenlm.cli.common import add_model_arg, need_lm, subsample

BIAS_SAFETY = ("crows-pairs", "counterfactual", "refusal")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, multiple-choice or classification accuracy of a model")
    add_model_arg(p)
    p.add_argument("--data", help="text file (ppl), JSONL (choice) or TSV/CSV/JSONL (classify, "
                                   "counterfactual); CrowS-Pairs / XSTest folder or CSV")
    p.add_argument("--task", choices=["ppl", "choice", "classify", "translate", *BIAS_SAFETY], default="ppl")
    p.add_argument("--seq-len", type=int, help="ppl: tokens per window (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    g = p.add_argument_group("choice and classify")
    g.add_argument("--train", help="file to draw few-shot examples from")
    g.add_argument("--shots", type=int, default=0, help="examples put in front of each prompt (default 0)")
    g.add_argument("--seed", type=int, default=0, help="seed for drawing shots and --limit rows")
    g.add_argument("--limit", type=int, help="score a random subsample of N rows")
    g = p.add_argument_group("classify")
    g.add_argument("--text-col", default="text")
    g.add_argument("--label-col", default="label")
    g.add_argument("--labels", help="label words for prompting: 0=negative,1=positive (default: the labels)")
    g.add_argument("--prompt", help="prompt template with {text} (default: 'Text: {text}\\nLabel:' for "
                                    "base models, '{text}' as the user turn for chat models)")
    g.add_argument("--instruction", help="instruction before the examples (chat: the system message)")
    g.add_argument("--chat", choices=["auto", "yes", "no"], default="auto",
                   help="prompt through the chat template (auto: when the model has one)")
    g.add_argument("--calibrate", action="store_true",
                   help="prompting: divide out the label prior the prompt alone gives (contextual "
                        "calibration: label probabilities after content-free texts)")
    g.add_argument("--confusion", help="write the confusion matrix to this PNG")
    from zenlm.cli.fairness_safety import add_args

    add_args(p)
    g = p.add_argument_group("translate")
    g.add_argument("--src", help="source sentences, one a line")
    g.add_argument("--ref", help="reference translations, one a line")
    g.add_argument("--hyp-out", help="also write the translations to this file")
    from zenlm.cli.translate import add_translate_args

    add_translate_args(g, own_batch_and_seed=False)
    p.set_defaults(func=run)


def run(args) -> int:
    import zenlm
    from zenlm.errors import ConfigError

    if args.task in BIAS_SAFETY:
        from zenlm.cli.fairness_safety import run_task

        return run_task(args)
    if args.task == "translate":
        res = _translate(args)
        print(json.dumps(res) if args.json else
              f"{res['n']} sentences: BLEU {res['bleu']:.2f}  chrF {res['chrf']:.2f}  "
              f"BLEU (lower-cased, tokenised) {res['bleu_lc_tok']:.2f}\n{res['signature']}")
        return 0
    if not args.data:
        from zenlm.errors import ConfigError

        raise ConfigError(f"--task {args.task} needs --data FILE")
    loaded = zenlm.load(args.model, key_file=args.key_file)
    if args.task == "ppl":
        res = _ppl(args, loaded)
        text = (f"tokens {res['tokens']:,}  bytes {res['bytes']:,}\nloss {res['loss']:.4f}  "
                f"perplexity {res['perplexity']:.3f}  bits/byte {res['bpb']:.4f}")
    elif args.task == "choice":
        res = _choice(args, loaded)
        text = (f"{res['n']} items, {args.shots}-shot: accuracy {res['accuracy']:.4f}  "
                f"length-normalised {res['accuracy_norm']:.4f}")
    else:
        res = _classify(args, loaded)
        text = (f"{res['n']} examples ({res['mode']}): accuracy {res['accuracy']:.4f}  "
                f"macro-F1 {res['macro_f1']:.4f}")
        if "accuracy_norm" in res:
            text += f"  length-normalised accuracy {res['accuracy_norm']:.4f}"
    print(json.dumps(res) if args.json else text)
    return 0


def _translate(args) -> dict:
    from zenlm.cli.translate import decode_config, load_translator
    from zenlm.errors import ConfigError
    from zenlm.eval.translate import read_lines, score_translations
    from zenlm.infer.beam import translate
    from zenlm.io import atomic_write_text

    if not (args.src and args.ref):
        raise ConfigError("--task translate needs --src FILE and --ref FILE")
    cfg = decode_config(args)
    srcs, refs = read_lines(args.src), read_lines(args.ref)
    if len(srcs) != len(refs):
        raise ConfigError(f"{args.src} has {len(srcs)} lines but {args.ref} has {len(refs)}")
    loaded = load_translator(args.model)
    hyps = translate(loaded.model, loaded.tokenizer, srcs, cfg=cfg, batch_size=args.batch_size)
    if args.hyp_out:
        atomic_write_text(args.hyp_out, "".join(h + "\n" for h in hyps))
    return {**score_translations(hyps, refs).as_dict(), "beam": cfg.beam,
            "length_penalty": cfg.length_penalty}


def _ppl(args, loaded) -> dict:
    from zenlm.data.sources import read_text_file
    from zenlm.eval.perplexity import evaluate_text

    text = read_text_file(args.data)
    need_lm(loaded, "ppl")
    if args.seq_len is not None and args.seq_len < 1:
        from zenlm.errors import ConfigError

        raise ConfigError("--seq-len must be at least 1")
    context = loaded.model.config.max_seq_len
    seq_len = min(args.seq_len or context, context)
    return evaluate_text(loaded.model, loaded.tokenizer, text, seq_len=seq_len, batch=args.batch_size).as_dict()


def _choice(args, loaded) -> dict:
    from zenlm.eval.choice import draw, multiple_choice, read_choice_file

    need_lm(loaded, "choice")
    if args.shots and not args.train:
        from zenlm.errors import ConfigError

        raise ConfigError("--shots needs --train FILE to draw the examples from")
    rows = subsample(read_choice_file(args.data), args.limit, args.seed)
    shots = draw(read_choice_file(args.train), args.shots, args.seed) if args.shots else []
    res = multiple_choice(loaded.model, loaded.tokenizer, rows, shots, batch_size=args.batch_size)
    return {**res.as_dict(), "shots": args.shots}


def _classify(args, loaded) -> dict:
    from zenlm.data.classify import label_ids, label_names, read_labelled
    from zenlm.errors import ConfigError, DataError
    from zenlm.eval.classify import classify_texts, score

    data = read_labelled(args.data, args.text_col, args.label_col)
    keep = subsample(list(range(len(data))), args.limit, args.seed)
    data = data.subset(keep)
    model, tok = loaded.model, loaded.tokenizer
    if hasattr(model, "labels"):  # a fine-tuned classifier: its head decides
        labels = model.labels
        gold = label_ids(data.labels, labels, data.source)
        probs = classify_texts(model, tok, data.texts, batch_size=args.batch_size)
        res = score(gold, probs.argmax(-1).tolist(), labels)
        mode = "fine-tuned head"
        out = res.as_dict()
    else:
        from zenlm.eval.choice import draw, prompt_classify

        need_lm(loaded, "classify")
        words = _label_words(args.labels)
        labels = list(words) if words else label_names(data.labels)
        gold = label_ids(data.labels, labels, data.source)
        shots = []
        if args.shots:
            if not args.train:
                raise ConfigError("--shots needs --train FILE to draw the examples from")
            pool = read_labelled(args.train, args.text_col, args.label_col)
            pool_y = label_ids(pool.labels, labels, pool.source)
            picked = draw(list(range(len(pool))), args.shots, args.seed, key=lambda i: pool_y[i])
            shots = [(pool.texts[i], pool_y[i]) for i in picked]
        chat = {"yes": True, "no": False}.get(args.chat, bool(tok.chat_template))
        if chat and not tok.chat_template:
            raise DataError(f"{loaded.source} has no chat template (use --chat no)")
        res, acc_norm = prompt_classify(model, tok, data.texts, gold, labels,
                                        [words.get(label, label) for label in labels], shots,
                                        chat=chat, template=args.prompt, instruction=args.instruction,
                                        batch_size=args.batch_size, calibrate=args.calibrate)
        mode = f"{args.shots}-shot {'chat' if chat else 'base'} prompt" + (", calibrated" if args.calibrate else "")
        out = {**res.as_dict(), "accuracy_norm": acc_norm}
    if args.confusion:
        from zenlm.explain.plots import plot_confusion

        plot_confusion(res.confusion, res.labels, args.confusion, title=f"{Path(args.data).name}: {mode}")
    return {**out, "mode": mode}


def _label_words(spec: str | None) -> dict[str, str]:
    """``0=negative,1=positive`` -> {"0": "negative", "1": "positive"}, in the order given."""
    from zenlm.errors import ConfigError

    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        if "=" not in part:
            raise ConfigError(f"--labels expects label=word pairs, got {part!r}")
        label, word = part.split("=", 1)
        out[label.strip()] = word.strip()
    return out
