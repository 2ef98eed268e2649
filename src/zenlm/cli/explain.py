"""`zenlm explain`: why a model said what it said.

- ``zenlm explain --model RUN "text"``: token attributions (integrated gradients with its
  convergence delta, gradient x input, attention rollout) for a classifier's label (``--label``,
  default the predicted one) or a language model's continuation (``--continuation``, default
  its most likely next token); a coloured HTML page and JSON in ``--out``.
- ``zenlm explain attention --model M "text" --out DIR``: attention maps recorded beside the
  fused kernel: a PNG of heat maps per layer, an interactive ``head_view.html``, the maps as JSON.
  For an encoder-decoder the text is the source, and ``--side`` (cross by default, encoder,
  decoder) is shown over ``--target`` or the model's own translation.
"""

from __future__ import annotations

import argparse
import json

from zenlm.cli.common import add_model_arg

MODES = ("attention", "attribute")


def _options(p, later: bool = False) -> None:
    """The options, on the command's parser and again (``later``) for what follows the first
    word: argparse cannot put options between the words of one positional by itself."""
    kw = {"default": argparse.SUPPRESS} if later else {}
    add_model_arg(p, required=False, **({"default": argparse.SUPPRESS} if later else {}))
    p.add_argument("--out", help="folder for the HTML/PNG/JSON files (attention: required)", **kw)
    p.add_argument("--json", action="store_true", help="print the result as JSON", **kw)
    g = p.add_argument_group("attention")
    g.add_argument("--layers", help="layers to capture, e.g. 0,1,-1 (default: all)", **kw)
    g.add_argument("--heads", help="heads to capture, e.g. 0,3 (default: all)", **kw)
    g.add_argument("--side", choices=("cross", "encoder", "decoder"),
                   help="encoder-decoder: which attention (default: cross, target over source)",
                   **(kw or {"default": "cross"}))
    g.add_argument("--target", help="encoder-decoder: the target text (default: the model's translation)", **kw)
    g = p.add_argument_group("attributions")
    g.add_argument("--method", help="any of ig, gxi, rollout (default: all)",
                   **(kw or {"default": "ig,gxi,rollout"}))
    g.add_argument("--label", help="classifier: the label to explain (default: the predicted one)", **kw)
    g.add_argument("--continuation", help="language model: the continuation to explain "
                                          "(default: the most likely next token)", **kw)
    g.add_argument("--steps", type=int, help="integrated gradients: quadrature points (default 32)",
                   **(kw or {"default": 32}))
    g.add_argument("--baseline", help="IG baseline: eot (default), zero, or a token id",
                   **(kw or {"default": "eot"}))


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="token attributions or attention maps of a text")
    _options(p)
    p.add_argument("words", nargs=argparse.REMAINDER, metavar="[attention|attribute] TEXT",
                   help="the text (after 'attention' for attention maps)")
    p.set_defaults(func=run)


def _rest(args) -> None:
    """Options given after the first word, parsed into ``args``."""
    from zenlm.errors import ConfigError

    inner = argparse.ArgumentParser(prog="zenlm explain", add_help=False)
    _options(inner, later=True)
    inner.add_argument("words", nargs="*")
    try:
        later, unknown = inner.parse_known_intermixed_args(args.words)
    except SystemExit:
        raise ConfigError("could not read the options after the text (see zenlm explain --help)") from None
    if unknown:
        raise ConfigError(f"unrecognized arguments: {' '.join(unknown)}")
    vars(args).update(vars(later))
    if not args.model:
        raise ConfigError("zenlm explain needs --model RUN_OR_MODEL")


def _ints(spec: str | None, what: str):
    from zenlm.errors import ConfigError

    if not spec:
        return None
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{what} takes comma-separated integers, got {spec!r}") from None


def run(args) -> int:
    from pathlib import Path

    import zenlm
    from zenlm.errors import ConfigError, TokenizerError

    _rest(args)
    words = list(args.words)
    mode = words.pop(0) if len(words) > 1 and words[0] in MODES else "attribute"
    if len(words) != 1:
        raise ConfigError("give the text as one argument (quote it)")
    text = words[0]
    loaded = zenlm.load(args.model)
    if loaded.tokenizer is None:
        raise TokenizerError(f"{args.model} has no tokenizer")
    if mode == "attention":
        from zenlm.explain.attention import write_attention

        if not args.out:
            raise ConfigError("zenlm explain attention needs --out DIR")
        try:
            res = write_attention(loaded.model, loaded.tokenizer, text, args.out,
                                  _ints(args.layers, "layers"), _ints(args.heads, "heads"),
                                  side=args.side, target=args.target)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if args.json:
            print(json.dumps(res))
            return 0
        if "side" in res:
            print(f"{res['side']} attention over the target {res['target']!r}")
        print(f"{len(res['tokens'])} tokens, layers {res['layers']}: {len(res['pngs'])} PNGs, "
              f"{res['html']}, {res['json']}")
        return 0
    from zenlm.explain.attention import is_seq2seq

    if is_seq2seq(loaded.model):
        raise ConfigError("token attributions are for decoders and classifiers; for an encoder-decoder "
                          "use zenlm explain attention (its cross-attention over the source)")
    from zenlm.explain.attribution import explain, label_target, lm_target, to_html
    from zenlm.io import atomic_write_text

    model, tok = loaded.model, loaded.tokenizer
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    baseline = int(args.baseline) if args.baseline.isdigit() else args.baseline
    if baseline not in ("eot", "zero") and not isinstance(baseline, int):
        raise ConfigError(f"--baseline must be eot, zero or a token id, got {args.baseline!r}")
    try:
        if hasattr(model, "labels"):
            if args.continuation:
                raise ConfigError("--continuation is for language models; a classifier takes --label")
            target = label_target(model, tok, text, args.label)
        else:
            if args.label:
                raise ConfigError("--label is for classifiers; a language model takes --continuation")
            target = lm_target(tok, text, args.continuation, model=model)
        res = explain(model, tok, target, methods, steps=args.steps, baseline=baseline)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "attributions.html", to_html(res, title=f"attributions: {text[:60]}"))
        atomic_write_text(out / "attributions.json", json.dumps(res.as_dict(), indent=1))
    if args.json:
        print(json.dumps(res.as_dict()))
        return 0
    print(f"target: {res.target} = {res.score:.4f}")
    if res.ig_delta is not None:
        print(f"integrated gradients: {res.steps} steps, f(x) - f(baseline) = {res.ig_gap:+.4f}, "
              f"convergence delta {res.ig_delta:+.3e}")
    names = list(res.methods)
    print(f"{'token':<20}" + "".join(f"{m:>12}" for m in names))
    for i, tokn in enumerate(res.tokens):
        if res.attributed[i]:
            print(f"{tokn!r:<20}" + "".join(f"{res.methods[m][i]:>12.4f}" for m in names))
    if args.out:
        print(f"wrote {Path(args.out) / 'attributions.html'} and attributions.json")
    return 0
