"""`zenlm serve --model M [--host 127.0.0.1] [--port 8000] [--state DIR] [--policy FILE]`: the OpenAI-compatible
server, with the chat page at ``/``. Keys come from `zenlm keys create --state DIR`."""

from __future__ import annotations

import sys

from zenlm.cli.common import add_decoding_args, add_model_arg, add_policy_arg
from zenlm.cli.keys import add_state_arg


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback; any other needs a key to exist)")
    p.add_argument("--port", type=int, default=8000)
    add_state_arg(p)  # keys, server secret and audit log: the same folder as `zenlm keys`
    p.add_argument("--name", help="the model name clients use (default: the model's folder or file name)")
    p.add_argument("--max-batch", type=int, default=16, help="rows in the running decode batch")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond it (then 503)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per step")
    p.add_argument("--native-chunk", type=int, default=16,
                   help="with the native decode step: prompt tokens computed inside each decode step "
                        "(0: prompts through the model's forward)")
    p.add_argument("--kv-cache", choices=["auto", "fp32", "fp16"], default="auto",
                   help="the KV cache's dtype (auto: the model's; fp16 halves its memory and what "
                        "attention reads a step, for many rows or long contexts)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM")
    p.add_argument("--audit-prompts", action="store_true",
                   help="keep prompt text in the audit log (by default only its sha256)")
    add_policy_arg(p)  # on every prompt and reply; also answers /v1/moderations
    add_decoding_args(p)
    p.set_defaults(func=run)


KV_DTYPES = {"auto": None, "fp32": "float32", "fp16": "float16"}


def run(args) -> int:
    from zenlm.cli.common import load_for_text, load_policy
    from zenlm.serve.keys import KeyStore
    from zenlm.serve.runner import check_bind, make_server

    check_bind(args.host, KeyStore(args.state))  # before the model loads
    policy = load_policy(args.policy)  # a bad policy file fails before the model loads too
    loaded = load_for_text(args.model, args.dtype, args.quantize, args.compile)
    from zenlm.serve.app import create_app

    app = create_app(loaded, state_dir=args.state, max_batch=args.max_batch, max_queue=args.max_queue,
                     prefill_chunk=args.prefill_chunk,
                     native_chunk=args.native_chunk, audit_prompts=args.audit_prompts,
                     kv_dtype=KV_DTYPES[args.kv_cache],
                     model_name=args.name or ("smollm2" if args.model == "smollm2" else None),
                     grace=args.grace, policy=policy)
    print(f"zenlm: serving {app.state.zenlm.model_name} on http://{args.host}:{args.port} "
          f"(state {args.state})", file=sys.stderr)
    make_server(app, args.host, args.port).run()
    return 0
