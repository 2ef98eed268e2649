"""The continuous-batching engine alone (no HTTP): total tokens/s with 1, 2, 4, 8... concurrent
requests on SmolLM2, with time to first token and time between tokens, from TokenEvent.time.

Requests arrive ``--stagger`` seconds apart, each greedy for ``--tokens`` new tokens (EOS
ignored, so every request decodes the same amount). The serving benchmark with HTTP clients and
peer servers is bench/serve_load.py; this one isolates the engine.

    python bench/engine_batch.py --clients 1 8 --tokens 32             # a quick look
    python bench/engine_batch.py --quantize int8 --clients 1 2 4 8 16 --out bench/results/engine.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three laws of thermodynamics are", "import numpy as np\n", "My favourite recipe is",
           "In 1969, the first", "Dear customer, thank you for"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run(engine, tokenizer, clients: int, tokens: int, stagger: float) -> dict:
    from zenlm.infer import SamplingConfig
    from zenlm.infer.engine import Request

    cfg = SamplingConfig(max_new_tokens=tokens, temperature=0, stop_at_eot=False)
    t0 = time.monotonic()
    handles = []
    for i in range(clients):
        handles.append(engine.submit(Request(tokenizer.encode_prompt(PROMPTS[i % len(PROMPTS)]), cfg)))
        time.sleep(stagger)
    runs = [h.events() for h in handles]
    wall = time.monotonic() - t0
    ttft = [ev[0].time - h.submitted for h, ev in zip(handles, runs)]
    tbt = [b.time - a.time for ev in runs for a, b in zip(ev, ev[1:])]
    total = sum(len(ev) for ev in runs)
    return {"clients": clients, "tokens": total, "wall_s": round(wall, 3),
            "tokens_per_s": round(total / wall, 1),
            "ttft_p50_ms": round(1000 * statistics.median(ttft), 1), "ttft_p95_ms": round(1000 * pct(ttft, 0.95), 1),
            "tbt_p50_ms": round(1000 * statistics.median(tbt), 1), "tbt_p95_ms": round(1000 * pct(tbt, 0.95), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--quantize", default="none", choices=["none", "int8", "int4"])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--stagger", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    import zenlm
    from zenlm.infer.engine import Engine
    from zenlm.infer.prepare import prepare_for_decoding

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = zenlm.load(args.model)
    prepare_for_decoding(lm.model, quantize=args.quantize)
    engine = Engine(lm.model, lm.tokenizer, max_batch=max(args.clients), max_len=1024)
    engine.start()
    run(engine, lm.tokenizer, max(args.clients), 4, 0)  # warm-up: first batched shapes are slow
    rows = [run(engine, lm.tokenizer, n, args.tokens, args.stagger) for n in args.clients]
    engine.shutdown(5)
    result = {"model": args.model, "quantize": args.quantize, "threads": torch.get_num_threads(), "rows": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        from zenlm.io import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
