"""`zenlm finetune classify|chat --model M --train FILE ...`: fine-tune a model with LoRA or fully.

Flags fill the fine-tune config (``train/finetune.py``); ``--config`` reads a YAML recipe of the
same shape and ``--set a.b=value`` overrides any field (flags win over the recipe, ``--set``
over both).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from zenlm.cli.common import MODEL_HELP, add_key_arg, add_minutes_arg, add_resume_arg, resumed_config

# flag -> config key; a flag left out leaves the recipe's value or the default
COMMON = {
    "model": "base", "train": "data.train", "val": "data.val", "format": "data.format",
    "val_fraction": "data.val_fraction", "max_len": "data.max_len",
    "max_examples": "data.max_examples",
    "method": "finetune.method", "epochs": "finetune.epochs",
    "layer_decay": "finetune.layer_decay", "freeze_layers": "finetune.freeze_layers",
    "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "lora_targets": "lora.targets",
    "out": "train.out_dir", "max_steps": "train.max_steps", "minutes": "train.max_minutes",
    "batch_size": "train.batch_size", "grad_accum": "train.grad_accum", "lr": "train.lr",
    "eval_every": "train.eval_every", "early_stopping": "train.early_stop_patience",
    "early_stop_metric": "train.early_stop_metric", "seed": "train.seed",
    "dp_epsilon": "train.dp.epsilon", "dp_delta": "train.dp.delta",
    "dp_max_grad_norm": "train.dp.max_grad_norm", "dp_accountant": "train.dp.accountant",
}
CLASSIFY = {"text_col": "data.text_col", "label_col": "data.label_col",
            "class_weights": "finetune.class_weights", "pooling": "finetune.pooling"}
CHAT = {"prompt_field": "data.prompt_field", "response_field": "data.response_field",
        "messages_field": "data.messages_field", "system": "data.system",
        "canaries": "canaries.n", "canary_repeats": "canaries.repeats"}


def _common(p) -> None:
    p.add_argument("--model", metavar="RUN_OR_MODEL", help=f"the model to start from: {MODEL_HELP}")
    add_key_arg(p, help="the key file of an encrypted base model (to write encrypted "
                        "checkpoints: --set train.encrypt_key_file=FILE)")
    p.add_argument("--train", help="the training file")
    p.add_argument("--val", help="a validation file (default: carve --val-fraction of --train)")
    p.add_argument("--format", choices=["tsv", "csv", "jsonl"], help="file format (default: from the name)")
    p.add_argument("--val-fraction", type=float, help="share of --train held out when no --val (default 0.1, at most 1000 rows)")
    p.add_argument("--max-len", type=int, help="tokens per example (longer ones are cut)")
    p.add_argument("--max-examples", type=int, help="train on the first N examples only")
    p.add_argument("--out", help="the run folder (default: runs/TASK-DATE-TIME)")
    p.add_argument("--method", choices=["lora", "full"], help="LoRA adapters on a frozen model (default) or full fine-tuning")
    p.add_argument("--lora-r", type=int, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 16; the update is scaled by alpha/r)")
    p.add_argument("--lora-dropout", type=float, help="dropout on the LoRA input (default 0)")
    p.add_argument("--lora-targets", help="modules to adapt: q,k,v,o,gate,up,down or attn, mlp, all (default q,k,v,o)")
    p.add_argument("--layer-decay", type=float, help="layer-wise LR decay: lr x decay^(layers from the top) (default 1: off)")
    p.add_argument("--freeze-embeddings", action="store_true", default=None, help="do not train the embeddings (full fine-tuning)")
    p.add_argument("--freeze-layers", type=int, help="do not train the first N layers")
    p.add_argument("--epochs", type=float, help="passes over the training data (default 1 unless --max-steps/--minutes)")
    p.add_argument("--max-steps", type=int)
    add_minutes_arg(p)
    p.add_argument("--max-minutes", dest="minutes", type=float, help=argparse.SUPPRESS)  # the old name
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 for LoRA, 5e-5 for full)")
    p.add_argument("--eval-every", type=int, help="evaluate on val every N steps (default: at the end)")
    p.add_argument("--early-stopping", type=int, metavar="N", help="stop after N evaluations without improvement (needs --eval-every)")
    p.add_argument("--early-stop-metric", help="val metric to watch (default: val_accuracy / val_loss)")
    p.add_argument("--seed", type=int)
    p.add_argument("--dp-epsilon", type=float, metavar="EPS",
                   help="train with differential privacy (DP-SGD) to this epsilon, e.g. 8")
    p.add_argument("--dp-delta", metavar="DELTA", help="DP delta: auto (1/N^1.1, the default) or a number below 1/N")
    p.add_argument("--dp-max-grad-norm", type=float, metavar="C", help="clip each example's gradient to this norm (default 1.0)")
    p.add_argument("--dp-accountant", choices=["prv", "rdp"], help="privacy accountant (default prv)")
    p.add_argument("--config", help="a YAML recipe of the fine-tune config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set finetune.freeze_layers=4 (repeatable)")
    add_resume_arg(p)


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model: classification head or chat SFT, LoRA or full")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    c = tasks.add_parser("classify", help="train a classification head (TSV, CSV or JSONL with text and label columns)")
    _common(c)
    c.add_argument("--text-col", help="column holding the text (default: text)")
    c.add_argument("--label-col", help="column holding the label (default: label)")
    c.add_argument("--class-weights", help="none, balanced, or one weight per class in label order")
    c.add_argument("--pooling", choices=["auto", "last", "first", "mean", "pooler"],
                   help="how the head reads a sequence (default auto: last token for decoders, mean for encoders)")
    c.set_defaults(func=run, flags={**COMMON, **CLASSIFY})
    h = tasks.add_parser("chat", help="supervised fine-tuning on JSONL conversations (loss on assistant tokens)")
    _common(h)
    h.add_argument("--messages-field", help="JSONL field with the messages (default: messages)")
    h.add_argument("--prompt-field", help="instead of messages: a field holding the user's prompt (e.g. question)")
    h.add_argument("--response-field", help="... and the field holding the reply (e.g. answer)")
    h.add_argument("--system", help="a system message put in front of every conversation")
    h.add_argument("--canaries", type=int, metavar="N", dest="canaries",
                   help="plant N random secrets in the training data (for `zenlm audit memorization`)")
    h.add_argument("--canary-repeats", type=int, metavar="R", help="times each canary is planted (default 10)")
    h.add_argument("--no-pack", dest="pack", action="store_false", default=None,
                   help="one conversation per row instead of packing short ones together")
    h.set_defaults(func=run, flags={**COMMON, **CHAT})


def _put(raw: dict, key: str, value) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def run(args) -> int:
    import zenlm
    from zenlm.config import load_yaml, merge, parse_overrides
    from zenlm.errors import ConfigError
    from zenlm.train.finetune import finetune, resolve_finetune

    raw: dict = {}
    if args.resume:
        raw = resumed_config(args.resume, args.out)
        if raw.get("task") is None:
            raise ConfigError(f"{args.resume} is a pretraining run: continue it with "
                              f"`zenlm pretrain --resume {args.resume}`")
        if raw.get("task") != args.task:
            raise ConfigError(f"{args.resume} is a {raw['task']} run, not {args.task}")
        args.out = args.resume  # a resumed run stays in its folder, whatever a recipe says
    if args.config:
        raw = merge(raw, load_yaml(args.config))
    raw["task"] = args.task
    for flag, key in args.flags.items():
        value = getattr(args, flag, None)
        if value is not None:
            _put(raw, key, value)
    if args.freeze_embeddings:
        _put(raw, "finetune.freeze_embeddings", True)
    if getattr(args, "pack", None) is False:
        _put(raw, "data.pack", False)
    cfg = resolve_finetune(merge(raw, parse_overrides(args.overrides)))
    print(f"loading {cfg.base} ...", flush=True)
    base = zenlm.load(cfg.base, key_file=args.key_file)
    summary = finetune(cfg, base, resume=bool(args.resume))
    if summary.get("task") == "classify" and summary.get("val"):
        run_dir = Path(summary["run"])
        print(f"val accuracy {summary['val']['val_accuracy']:.4f}  macro-F1 "
              f"{summary['val']['val_macro_f1']:.4f}  ({summary['n_val']} examples); confusion "
              f"matrix: {run_dir / 'confusion.png'}")
    if summary.get("privacy"):
        pr = summary["privacy"]
        print(f"privacy: epsilon {pr['epsilon']:.3f} (target {pr['epsilon_target']:g}), delta "
              f"{pr['delta']:.3g}, {pr['accountant']} accountant, {pr['steps']} steps")
    if summary.get("adapter"):
        print(f"PEFT adapter: {summary['adapter']}")
    return 0
