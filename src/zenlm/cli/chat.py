"""`zenlm chat [--model smollm2]`: talk with a chat model in the terminal.

Replies stream as they are generated. Commands: ``/reset`` forgets the conversation (the system
prompt stays), ``/system TEXT`` sets the system prompt (``/system`` alone removes it: the
template's default applies), ``/exit`` leaves (so do Ctrl-D and Ctrl-C at the prompt).
Ctrl-C during a reply stops that reply and returns to the prompt; the part already shown stays
in the conversation, so the history holds what the user saw. When the conversation outgrows the
model's context the oldest turns are dropped (the system prompt is kept), and a note says so
the first time. Notes go to stderr, the conversation to stdout.
"""

from __future__ import annotations

import sys

from zenlm.cli.common import (add_model_arg, add_policy_arg, add_sampling_args, load_for_text, load_policy,
                              moderated, sampling_config, show_prompt)

HELP = "/reset: forget the conversation   /system TEXT: set the system prompt   /exit: leave"


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="an interactive chat with a model that has a chat template")
    add_model_arg(p, required=False, default="smollm2",
                  help="a run folder, Hugging Face folder, .gguf file, 'smollm2' (default) or a hub id")
    p.add_argument("--system", help="the system prompt to start with")
    p.add_argument("--show-prompt", action="store_true",
                   help="before each reply, print the prompt as the model sees it (to stderr)")
    add_policy_arg(p)
    add_sampling_args(p, max_new_tokens=512)
    p.set_defaults(func=run)


def _note(text: str) -> None:
    print(f"[{text}]", file=sys.stderr, flush=True)


def _keep_moderated(session, moderated):
    """The moderated reply, with the history holding what the user saw: a blocked prompt is
    not kept at all, a blocked reply is kept as the policy's message."""
    yield from moderated
    if moderated.blocked == "output" and session.messages:
        session.messages[-1]["content"] = moderated.policy.message


def run(args) -> int:
    import signal
    import threading

    from zenlm.errors import PromptTooLongError
    from zenlm.infer.chat import ChatSession

    if threading.current_thread() is threading.main_thread():
        # Ctrl-C must stop a reply even when a shell started us as a background job: such a
        # shell ignores SIGINT for its children, and Python then leaves it ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)

    policy = load_policy(args.policy)
    loaded = load_for_text(args.model, args.dtype, args.quantize, args.compile, args.key_file)
    session = ChatSession(loaded.model, loaded.tokenizer, sampling_config(args), system=args.system)
    if sys.stdin.isatty():
        try:  # line editing and history at the prompt, where the platform has it
            import readline  # noqa: F401
        except ImportError:
            pass
    c = loaded.model.config
    _note(f"chatting with {args.model} ({loaded.model.num_params() / 1e6:.0f}M parameters, "
          f"context {c.max_seq_len} tokens). {HELP}. Ctrl-C stops a reply.")
    warned, echo = False, not sys.stdin.isatty()
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: leave quietly
            print()
            return 0
        if echo:  # piped input: show it, so the transcript reads as a conversation
            print(line, flush=True)
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                session.reset()
                _note("conversation cleared")
            elif command == "/system":
                session.system = rest.strip() or None
                _note(f"system prompt: {session.system!r}" if session.system else
                      "system prompt removed (the template's default applies)")
            else:
                _note(f"unknown command {command}. {HELP}")
            continue
        pieces = None
        try:
            if policy is None:
                pieces = session.reply(text)
            else:
                pieces = moderated(policy, text, lambda: session.reply(text))
                pieces = _keep_moderated(session, pieces)
            if session.dropped and not warned:
                warned = True
                _note(f"the conversation is longer than the model's context ({c.max_seq_len} "
                      f"tokens): the oldest turns are dropped from now on (the system prompt is kept)")
            if args.show_prompt and policy is None:
                show_prompt(session.render(), len(session.last_prompt))
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except PromptTooLongError as exc:
            _note(str(exc))
            continue
        except KeyboardInterrupt:  # stop this reply, keep what was shown, back to the prompt
            if pieces is not None:
                pieces.close()
            session.forget_unanswered()
            sys.stdout.write("\n")
            _note("reply stopped")
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
