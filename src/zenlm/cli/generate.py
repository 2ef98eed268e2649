"""`zenlm generate --model RUN_OR_MODEL --prompt "..."`: one completion (or answer), streamed.

For a model whose tokenizer has a chat template the prompt is, by default, a user message: it is
wrapped with the template and the answer stops at the end of the turn (``--raw`` completes the
text as it is). ``--run`` is the same option as ``--model``, kept from before models could come
from anywhere.
"""

from __future__ import annotations

import sys

from zenlm.cli.common import add_model_arg, add_sampling_args, load_for_text, sampling_config, show_prompt


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
    loaded = load_for_text(args.model, args.dtype, args.quantize, args.compile, args.key_file)
    tok = loaded.tokenizer
    chat = bool(tok.chat_template) if args.chat is None else args.chat
    if chat:
        from zenlm.infer.chat import ChatSession

        if not tok.chat_template:
            raise TokenizerError(f"--chat: {args.model} has no chat template; use --raw")
        session = ChatSession(loaded.model, tok, cfg, system=args.system)
        pieces = session.reply(args.prompt)  # checks the prompt fits
        if args.show_prompt:
            show_prompt(session.render(), len(session.last_prompt))
    else:
        if args.system:
            raise TokenizerError("--system is for chat mode (drop --raw)")
        pieces = stream(loaded.model, tok, args.prompt, cfg)  # checks the prompt fits
        if args.show_prompt:
            show_prompt(args.prompt, len(tok.encode_prompt(args.prompt)))
        sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
