"""`zenlm generate --model RUN_OR_MODEL --prompt "..."`: one completion (or answer), streamed.

For a model whose tokenizer has a chat template the prompt is, by default, a user message: it is
wrapped with the template and the answer stops at the end of the turn (``--raw`` completes the
text as it is). ``--run`` is the same option as ``--model``, kept from before models could come
from anywhere.
"""

from __future__ import annotations

import sys


def add_model_arg(p) -> None:
    p.add_argument("--model", "--run", dest="model", required=True, metavar="RUN_OR_MODEL",
                   help="a run folder, Hugging Face folder, .gguf file, 'smollm2' or a hub id")


def add_sampling_args(p, *, max_new_tokens: int = 128) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--int8", nargs="?", const="safe", choices=["safe", "all"],
                   help="decode with int8 weights: ~4x fp32's speed where the CPU has native "
                        "bf16 (weight-only, every projection; SmolLM2: +1.1%% perplexity); elsewhere int8 "
                        "activations too, ~2x for ~1.4%%, and 'all' also quantizes q/k/v and "
                        "down_proj after smoothing outliers into the weights: ~3x, +1.3-2.6%% "
                        "(zenlm.infer.quantize)")
    p.add_argument("--int4", action="store_true",
                   help="decode with 4-bit weights (groups of 32) and bf16 activations: ~4x fp32's "
                        "speed, near-lossless for models from Q4 GGUF files; needs native bf16")
    p.add_argument("--dtype", choices=["fp32", "bf16", "auto"], default="fp32",
                   help="weights and activations: fp32 (default), bf16 (half the bytes per token; "
                        "fast only where the CPU has native bf16), or auto (bf16 exactly there)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (tens of seconds to compile; "
                        "measured on a 2-core CPU it did not pay: see zenlm.infer.generate)")


def sampling_config(args):
    from zenlm.infer import SamplingConfig

    return SamplingConfig(max_new_tokens=args.max_new_tokens,
                          temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          stop=args.stop, seed=args.seed)


def load_for_text(source: str, int8: str | None = None, compile: bool = False, dtype: str = "fp32",
                  int4: bool = False):
    """``zenlm.load`` for commands that read and write text: the model must have a tokenizer."""
    import zenlm
    from zenlm.errors import ConfigError, TokenizerError
    from zenlm.hardware import native_bf16, resolve_dtype

    if int4 and int8:
        raise ConfigError("choose one of --int4 and --int8")
    loaded = zenlm.load(source)
    if loaded.tokenizer is None:
        raise TokenizerError(f"{source} has no tokenizer (a folder needs tokenizer.json, or "
                             f"vocab.json + merges.txt)")
    loaded.model.fuse_projections()  # generation only: fewer, larger products per token
    if int4:
        if not native_bf16(loaded.model.tok_emb.weight.device):
            raise ConfigError("--int4 computes in bf16, which this CPU only emulates (~100x slower); "
                              "use --int8")
        from zenlm.infer.quantize import quantize_int4

        quantize_int4(loaded.model)
    elif resolve_dtype(dtype, loaded.model.tok_emb.weight.device) == "bf16":
        import torch

        loaded.model.to(torch.bfloat16)
    if int8:
        from zenlm.infer.quantize import calibration_ids, quantize_int8

        calib = calibration_ids(loaded.tokenizer) if int8 == "all" else None
        quantize_int8(loaded.model, calibration=calib)
    if compile:
        from zenlm.infer.generate import compile_decoding

        compile_decoding(loaded.model)
    return loaded


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt, or answer it with a chat model")
    add_model_arg(p)
    p.add_argument("--prompt", required=True)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="answer the prompt as a user message, with the chat template "
                           "(the default when the model has one)")
    mode.add_argument("--raw", dest="chat", action="store_false",
                      help="complete the prompt text as it is, even for a chat model")
    p.add_argument("--system", help="a system message (chat mode)")
    p.add_argument("--show-prompt", action="store_true",
                   help="print the prompt as the model sees it (template applied) to stderr")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from zenlm.errors import TokenizerError
    from zenlm.infer import stream

    cfg = sampling_config(args)
    loaded = load_for_text(args.model, args.int8, args.compile, args.dtype, args.int4)
    tok = loaded.tokenizer
    chat = bool(tok.chat_template) if args.chat is None else args.chat
    if chat:
        from zenlm.infer.chat import ChatSession

        if not tok.chat_template:
            raise TokenizerError(f"--chat: {args.model} has no chat template; use --raw")
        session = ChatSession(loaded.model, tok, cfg, system=args.system)
        pieces = session.reply(args.prompt)  # checks the prompt fits
        if args.show_prompt:
            from zenlm.cli.chat import show_prompt

            show_prompt(session.render(), len(session.last_prompt))
    else:
        if args.system:
            raise TokenizerError("--system is for chat mode (drop --raw)")
        pieces = stream(loaded.model, tok, args.prompt, cfg)  # checks the prompt fits
        if args.show_prompt:
            from zenlm.cli.chat import show_prompt

            show_prompt(args.prompt, len(tok.encode_prompt(args.prompt)))
        sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
