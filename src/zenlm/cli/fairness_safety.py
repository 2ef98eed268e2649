"""The bias and safety tasks of `zenlm eval`: ``crows-pairs``, ``counterfactual``, ``refusal``.

Kept apart from ``evaluate.py`` so the quality tasks there stay short; ``evaluate`` dispatches
here by task name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_args(p) -> None:
    g = p.add_argument_group("crows-pairs, counterfactual, refusal")
    g.add_argument("--swaps", help="counterfactual: swap list, two words a line (default: zenlm's)")
    g.add_argument("--system-prompt", help="refusal: a system prompt for every prompt")
    g.add_argument("--safety-prompt", action="store_true",
                   help="refusal: use zenlm's built-in safety system prompt")
    g.add_argument("--judge", metavar="MODEL", help="refusal: a chat model that judges refusals "
                                                    "(default: refusal phrases)")
    g.add_argument("--policy", metavar="FILE", help="refusal: a moderation policy in front of the model")
    g.add_argument("--max-new-tokens", type=int, default=64, help="refusal: reply length (default 64)")
    g.add_argument("--replies", metavar="FILE", help="refusal: write every reply as JSONL; "
                                                     "crows-pairs: every pair's scores")


def find_shared(name: str) -> Path | None:
    """``shared/data/<name>`` beside the checkout or above the working folder."""
    here = [Path.cwd(), *Path.cwd().parents, *Path(__file__).resolve().parents]
    for base in here:
        for cand in (base / "shared" / "data" / name, base / "data" / name):
            if cand.is_dir():
                return cand
    return None


def _data(args, name: str) -> str:
    from zenlm.errors import DataError

    if args.data:
        return args.data
    found = find_shared(name)
    if found is None:
        raise DataError(f"--task {args.task}: {name} not found under shared/data; pass --data")
    return str(found)


def _write_rows(path: str, rows: list[dict]) -> None:
    from zenlm.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def run_task(args) -> int:
    import zenlm
    from zenlm.cli.common import need_lm, subsample
    from zenlm.errors import ConfigError

    loaded = zenlm.load(args.model, key_file=getattr(args, "key_file", None))
    if args.task == "crows-pairs":
        from zenlm.eval.fairness import crows_pairs, format_crows, read_crows_pairs

        need_lm(loaded, args.task)
        pairs = subsample(read_crows_pairs(_data(args, "crows_pairs")), args.limit, args.seed)
        res = crows_pairs(loaded.model, loaded.tokenizer, pairs, batch_size=args.batch_size, seed=args.seed)
        if args.replies:
            _write_rows(args.replies, res.pairs)
        out, text = res.as_dict(), format_crows(res)
        if args.limit:
            text += f"\n(--limit {args.limit}: a random subsample of the pairs)"
    elif args.task == "counterfactual":
        from zenlm.data.classify import read_labelled
        from zenlm.eval.fairness import counterfactual, format_counterfactual, read_swaps

        if not hasattr(loaded.model, "labels"):
            raise ConfigError(f"--task counterfactual needs a classifier (a zenlm finetune classify run); "
                              f"{args.model} is not one")
        if not args.data:
            raise ConfigError("--task counterfactual needs --data FILE (texts to swap words in)")
        texts = subsample(read_labelled(args.data, args.text_col, None).texts, args.limit, args.seed)
        out = counterfactual(loaded.model, loaded.tokenizer, texts, read_swaps(args.swaps),
                             batch_size=args.batch_size)
        text = format_counterfactual(out)
    else:
        from zenlm.cli.common import load_policy
        from zenlm.eval.safety import SAFETY_SYSTEM_PROMPT, Judge, format_refusal, read_xstest, refusal_eval

        need_lm(loaded, args.task)
        if args.safety_prompt and args.system_prompt:
            raise ConfigError("--safety-prompt and --system-prompt both set a system prompt: give one")
        system = SAFETY_SYSTEM_PROMPT if args.safety_prompt else args.system_prompt
        prompts = subsample(read_xstest(_data(args, "xstest")), args.limit, args.seed)
        judge = None
        if args.judge:
            j = zenlm.load(args.judge)
            need_lm(j, args.task)
            judge = Judge(j.model, j.tokenizer)
        res = refusal_eval(loaded.model, loaded.tokenizer, prompts, system=system,
                           policy=load_policy(args.policy), judge=judge,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        if args.replies:
            _write_rows(args.replies, res.replies)
        out, text = res.as_dict(), format_refusal(res)
        if args.limit:
            text += f"\n(--limit {args.limit}: a random subsample of the prompts)"
    print(json.dumps(out) if args.json else text)
    sys.stdout.flush()
    return 0
