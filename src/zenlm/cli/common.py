"""What several commands share: the model option, the decoding options, sampling, one loader.

Each option has one spelling here, so ``--model``, ``--dtype`` and ``--quantize`` read the same
on every command that takes them. Nothing heavy is imported at the top: ``zenlm --help`` builds
every command's parser.
"""

from __future__ import annotations

import argparse
import sys

MODEL_HELP = "a run folder, Hugging Face folder, .gguf file, 'smollm2' or a hub id"


def add_model_arg(p, *, required: bool = True, default: str | None = None,
                  help: str = MODEL_HELP) -> None:
    """``--model`` (``--run`` is the same option, kept from before models came from anywhere)."""
    p.add_argument("--model", "--run", dest="model", required=required, default=default,
                   metavar="RUN_OR_MODEL", help=help)
    add_key_arg(p)


def add_key_arg(p, help: str = "the key file of an encrypted model (zenlm encrypt); "
                               "ZENLM_KEY or ZENLM_PASSPHRASE in the environment also work") -> None:
    """``--key-file``: opens what ``zenlm encrypt`` sealed, and runs with sealed checkpoints."""
    p.add_argument("--key-file", metavar="FILE", help=help)


class _QuantizeAlias(argparse.Action):
    """``--int8 [safe|all]`` and ``--int4``, the flags before ``--quantize``: hidden, still read."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == "--int4":
            namespace.quantize = "int4"
        else:
            namespace.quantize = "int8"  # "all" named a mode that weight-only int8 made redundant


def add_dtype_arg(p) -> None:
    """``--dtype`` of a model that is used, not trained (checked by ``zenlm.infer.prepare``:
    argparse choices would need its vocabulary, and with it torch, to build the parser)."""
    p.add_argument("--dtype", default="fp32", metavar="fp32|bf16|auto",
                   help="weights and activations: fp32 (default), bf16 (half the bytes per token; "
                        "fast only where the CPU has native bf16), or auto (bf16 exactly there)")


def add_decoding_args(p) -> None:
    """``--dtype``, ``--quantize``, ``--compile``: the knobs of ``zenlm.infer.prepare``."""
    add_dtype_arg(p)
    p.add_argument("--quantize", default="none", metavar="none|int8|int4",
                   help="int8: every projection and the output head as int8 rows; int4: 4-bit "
                        "weights in groups of 32, the head int8. Weight-only (the input stays "
                        "float), on any CPU; LoRA adapters are merged first (zenlm.infer.prepare)")
    p.add_argument("--int8", nargs="?", const="safe", choices=["safe", "all"], action=_QuantizeAlias,
                   help=argparse.SUPPRESS)
    p.add_argument("--int4", nargs=0, action=_QuantizeAlias, help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (tens of seconds to compile; "
                        "measured on a 2-core CPU it did not pay: see zenlm.infer.generate)")


def add_sampling_args(p, *, max_new_tokens: int = 128) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    p.add_argument("--seed", type=int)
    add_decoding_args(p)


def sampling_config(args):
    from zenlm.infer import SamplingConfig

    return SamplingConfig(max_new_tokens=args.max_new_tokens,
                          temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          stop=args.stop, seed=args.seed)


def load_for_text(source: str, dtype: str = "fp32", quantize: str = "none", compile: bool = False,
                  key_file: str | None = None):
    """``zenlm.load`` for commands that read and write text (the model must have a tokenizer),
    readied for decoding by the one policy, ``zenlm.infer.prepare``."""
    import zenlm
    from zenlm.errors import TokenizerError
    from zenlm.infer.prepare import check_options, prepare_for_decoding

    check_options(dtype, quantize)  # before the load, which can take seconds
    loaded = zenlm.load(source, key_file=key_file)
    if loaded.tokenizer is None:
        raise TokenizerError(f"{source} has no tokenizer (a folder needs tokenizer.json, or "
                             f"vocab.json + merges.txt)")
    _need_generator(loaded)
    prepare_for_decoding(loaded.model, dtype, quantize, compile, tokenizer=loaded.tokenizer)
    return loaded


def _need_generator(loaded) -> None:
    """Refuse, in one line, a model that cannot continue text: an encoder-decoder (it
    translates) or a bare encoder (it fills masks and embeds). A classifier passes: predict
    reads it through here too."""
    from zenlm.errors import ConfigError
    from zenlm.model.seq2seq import Seq2Seq

    model = loaded.model
    if isinstance(model, Seq2Seq):
        raise ConfigError(f"{loaded.source} is an encoder-decoder: use zenlm translate")
    config = getattr(model, "config", None)
    if config is not None and not config.causal:
        raise ConfigError(f"{loaded.source} is an encoder (bidirectional): use zenlm fill-mask "
                          f"or zenlm embed, or fine-tune a classifier on it")


def show_prompt(text: str, n_tokens: int) -> None:
    """The prompt as the model sees it, between marker lines (stderr: debugging, not output)."""
    sys.stderr.write(f"[prompt: {n_tokens} tokens]\n{text}\n[end of prompt]\n")
    sys.stderr.flush()


def add_minutes_arg(p, help: str = "wall-clock budget in minutes; the LR schedule is fitted to it") -> None:
    """``--minutes``: the one name of the time budget (pretrain, finetune, speedrun)."""
    p.add_argument("--minutes", type=float, help=help)


def add_resume_arg(p) -> None:
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in this folder: its own config, then any flags and --set")


def resumed_config(run_dir: str, out: str | None) -> dict:
    """The saved config of the run in ``run_dir``, writing back into that folder (the same for
    pretrain and finetune, so ``--resume`` means one thing)."""
    from pathlib import Path

    from zenlm.config import load_yaml
    from zenlm.errors import CheckpointError, ConfigError

    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise CheckpointError(f"{run_dir} is not a zenlm run folder (no config.yaml)")
    if out is not None and Path(out).resolve() != Path(run_dir).resolve():
        raise ConfigError(f"--resume {run_dir} continues that run in its own folder; drop --out {out}")
    raw = load_yaml(str(saved))
    raw.setdefault("train", {})["out_dir"] = str(run_dir)
    return raw


def add_policy_arg(p) -> None:
    p.add_argument("--policy", metavar="FILE",
                   help="a moderation policy (YAML/JSON: regex, keyword and classifier rules with "
                        "actions block, flag or log) applied to the prompt and the reply")


def load_policy(path: str | None):
    """The moderation policy of ``--policy`` (None without one); classifier rules are loaded
    with ``zenlm.load``."""
    if not path:
        return None
    import zenlm
    from zenlm.infer.moderation import Policy

    return Policy.load(path, load_model=zenlm.load)


def moderated(policy, prompt: str, reply):
    """``reply()``'s pieces under ``policy`` (as they are without one); flags and blocks are
    noted on stderr, never in the text."""
    if policy is None:
        return reply()
    from zenlm.infer.moderation import Moderated

    def note(verdict) -> None:
        rules = ", ".join(m["rule"] for m in verdict.matches)
        sys.stderr.write(f"[moderation: {verdict.where} {verdict.action}: {rules}]\n")
        sys.stderr.flush()

    return Moderated(policy, prompt, reply, on_verdict=note)


def need_lm(loaded, task: str) -> None:
    """Refuse a classifier or a tokenizer-less model where a task scores text with an LM."""
    from zenlm.errors import ConfigError

    if hasattr(loaded.model, "labels"):
        raise ConfigError(f"{loaded.source} is a classifier; --task {task} needs a language model "
                          f"(its base, or --task classify)")
    if loaded.tokenizer is None:
        raise ConfigError(f"{loaded.source} has no tokenizer")


def subsample(rows: list, limit: int | None, seed: int) -> list:
    """A seeded, order-keeping sample of ``limit`` rows (``--limit``): the same rows every run."""
    import random

    if not limit or limit >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]
