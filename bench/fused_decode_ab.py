"""SmolLM2-135M-Instruct batch-1 decode: the fused native step (``zenlm.infer.fused``) against
the torch path, in one process, alternating, fp32, int8 and int4.

Each repetition decodes the same 128 greedy tokens with the fused step on, then off
(``zenlm.infer.fused.detach``), so both see the same machine state; the ratio is the median
of the per-repetition ratios (on a shared machine, ratios are what survive). The greedy tokens
of both paths are compared (fp32 must agree; int8 and int4 may differ after a near-tie, since
torch's int8 and int4 kernels round activations to bf16). The CPU and its read bandwidth are
recorded, and each rate is also given as a share of the bandwidth limit (weights read per
token / bandwidth).

    python bench/fused_decode_ab.py                  # fp32, int8, int4: 2 threads, 5 repetitions
    python bench/fused_decode_ab.py --quantize int8 --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import bytes_read_per_token, machine, read_bandwidth_gbs  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "fused_decode_ab.json"


def run(quantize: str, reps: int, new_tokens: int) -> dict:
    import zenlm
    from zenlm.infer import SamplingConfig, fused
    from zenlm.infer.generate import token_steps
    from zenlm.infer.prepare import prepare_for_decoding

    lm = zenlm.load("smollm2")
    model, tok = prepare_for_decoding(lm.model, quantize=quantize), lm.tokenizer
    step = model.__dict__.get("decode_forward")
    if not isinstance(step, fused.FusedDecode):
        raise SystemExit(f"the fused step is not in use here ({fused.unsupported(model) or 'see the log'})")
    ids = tok.encode_prompt("Once upon a time")
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0, stop_at_eot=False)

    def decode(on: bool) -> tuple[float, list[int]]:
        if on:
            model.decode_forward = step
        else:
            fused.detach(model)
        t = time.perf_counter()
        tokens = [int(x) for x in token_steps(model, [ids], cfg)]
        return len(tokens) / (time.perf_counter() - t), tokens

    decode(True), decode(False)  # warm-up: the native decoder built, caches touched
    rates = {"fused": [], "torch": []}
    tokens = {}
    for _ in range(reps):
        for name, on in (("fused", True), ("torch", False)):
            r, tokens[name] = decode(on)
            rates[name].append(r)
    return {"fused_tok_s": statistics.median(rates["fused"]), "torch_tok_s": statistics.median(rates["torch"]),
            "ratio": statistics.median(f / t for f, t in zip(rates["fused"], rates["torch"])),
            "runs": rates, "same_tokens": tokens["fused"] == tokens["torch"],
            "bytes_per_token": bytes_read_per_token(model)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quantize", action="append", choices=["none", "int8", "int4"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {machine()['describe']}")
    bw = [read_bandwidth_gbs()]
    out = {}
    for q in args.quantize or ["none", "int8", "int4"]:
        out[q] = run(q, args.reps, args.new_tokens)
    bw.append(read_bandwidth_gbs())
    for q, r in out.items():
        limit = max(bw) * 1e9 / r["bytes_per_token"]
        r["limit_tok_s"], r["fused_bandwidth_use"] = limit, r["fused_tok_s"] / limit
        print(f"{'fp32' if q == 'none' else q}: fused {r['fused_tok_s']:.1f} tok/s, torch {r['torch_tok_s']:.1f} "
              f"tok/s, ratio {r['ratio']:.2f}x (median of {args.reps}); fused at {r['fused_bandwidth_use']:.0%} "
              f"of the {limit:.1f} tok/s bandwidth limit; same greedy tokens: {r['same_tokens']}")
    print(f"read bandwidth {max(bw):.1f} GB/s, {torch.get_num_threads()} threads")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "read_bandwidth_gbs": bw, "threads": args.threads,
                                "reps": args.reps, "results": out}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
