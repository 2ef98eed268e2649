"""SmolLM2-135M-Instruct decode through the fused step's two builds, AVX2 against AVX-512, in
one process, alternating, at several batch sizes.

The builds run the same code over 8- and 16-float vectors (``zenlm.infer.fused.ISAS``); which
one a machine gets is :func:`zenlm.infer.fused.isa`. Each repetition decodes the same greedy
tokens with one build, then the other (order alternating), on the same prepared model; the
ratio is the median of the per-repetition ratios. The greedy tokens of the two builds are
compared too: they sum in different orders, so they may part after a near-tie, but rarely.
Needs a CPU that reports avx512f.

    python bench/fused_builds_ab.py                          # int8, batches 1 and 8, 3 repetitions
    python bench/fused_builds_ab.py --quantize none --quantize int4 --batch 1 --batch 16
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
from common import machine  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "fused_builds_ab.json"


def run(quantize: str, batches: list[int], reps: int, new_tokens: int) -> dict:
    import zenlm
    from zenlm.infer import SamplingConfig, fused
    from zenlm.infer.generate import token_steps
    from zenlm.infer.prepare import prepare_for_decoding

    lm = zenlm.load("smollm2")
    model = prepare_for_decoding(lm.model, quantize=quantize)
    if not isinstance(model.__dict__.get("decode_forward"), fused.FusedDecode):
        raise SystemExit(f"the fused step is not in use here ({fused.unsupported(model) or 'see the log'})")
    steps = {isa: fused.FusedDecode(model, fused.native(isa)) for isa in ("avx2", "avx512")}
    ids = lm.tokenizer.encode_prompt("Once upon a time")
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0, stop_at_eot=False)

    def decode(isa: str, batch: int) -> tuple[float, list]:
        model.decode_forward = steps[isa]
        t = time.perf_counter()
        tokens = [t_.tolist() if hasattr(t_, "tolist") else int(t_) for t_ in token_steps(model, [ids] * batch, cfg)]
        return batch * new_tokens / (time.perf_counter() - t), tokens

    out = {}
    for batch in batches:
        decode("avx2", batch), decode("avx512", batch)  # warm-up: both decoders built
        rates, tokens = {"avx2": [], "avx512": []}, {}
        for rep in range(reps):
            for isa in ("avx2", "avx512") if rep % 2 == 0 else ("avx512", "avx2"):
                r, tokens[isa] = decode(isa, batch)
                rates[isa].append(r)
        out[batch] = {"avx2_tok_s": statistics.median(rates["avx2"]),
                      "avx512_tok_s": statistics.median(rates["avx512"]),
                      "ratio": statistics.median(b / a for a, b in zip(rates["avx2"], rates["avx512"])),
                      "runs": rates, "same_tokens": tokens["avx2"] == tokens["avx512"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quantize", action="append", choices=["none", "int8", "int4"])
    p.add_argument("--batch", action="append", type=int)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    import torch

    from zenlm.hardware import cpu_flags

    if "avx512f" not in cpu_flags():
        raise SystemExit("this CPU does not report avx512f: there is no AVX-512 build to compare")
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()['describe']}")
    out = {}
    for q in args.quantize or ["int8"]:
        out[q] = run(q, args.batch or [1, 8], args.reps, args.new_tokens)
        for batch, r in out[q].items():
            print(f"{'fp32' if q == 'none' else q} batch {batch}: avx2 {r['avx2_tok_s']:.1f} tok/s, avx512 "
                  f"{r['avx512_tok_s']:.1f} tok/s, ratio {r['ratio']:.2f}x (median of {args.reps}); "
                  f"same greedy tokens: {r['same_tokens']}", flush=True)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": machine(), "threads": args.threads, "reps": args.reps,
                               "new_tokens": args.new_tokens, "results": out}, indent=2))
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
