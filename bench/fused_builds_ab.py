"""SmolLM2-135M-Instruct decode through the fused step's two builds, AVX2 against AVX-512, in
one process, alternating, at several batch sizes.

The builds run the same code over 8- and 16-float vectors (``zenlm.infer.fused.ISAS``); which
one a machine gets is :func:`zenlm.infer.fused.isa`. Each repetition decodes the same greedy
tokens with one build, then the other (order alternating), on the same prepared model; the
ratio is the median of the per-repetition ratios. The greedy tokens of the two builds are
compared too: they sum in different orders, so they may part after a near-tie, but rarely.
Needs a CPU that reports AVX-512 with VNNI (``zenlm.infer.fused.AVX512_FLAGS``).

``--against REV`` compares instead this machine's build of the current kernel against the same
build of ``kernels/decode.cpp`` as it was at git revision REV (built beside it, once): how a
kernel change is measured.

    python bench/fused_builds_ab.py                          # int8, batches 1 and 8, 3 repetitions
    python bench/fused_builds_ab.py --quantize none --quantize int4 --batch 1 --batch 16
    python bench/fused_builds_ab.py --against HEAD~1 --batch 1 --batch 8 --batch 16
    python bench/fused_builds_ab.py --against HEAD~1 --prompt-tokens 400   # attention's share grows
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


def build_at(rev: str):
    """The current ISA's build of ``decode.cpp`` as it was at git revision ``rev``."""
    import hashlib
    import subprocess

    from torch.utils import cpp_extension

    from zenlm.infer import fused

    rel = fused.SOURCE.resolve().relative_to(ROOT)
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{rel}"], capture_output=True, text=True)
    if text.returncode:
        raise SystemExit(f"--against {rev}: {text.stderr.strip()}")
    isa = fused.isa()
    folder = fused.build_dir().parent / f"ab-{hashlib.sha256(text.stdout.encode()).hexdigest()[:12]}-{isa}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "decode.cpp").write_text(text.stdout)
    return cpp_extension.load(name=f"zenlm_decode_ab_{isa}", sources=[str(folder / "decode.cpp")],
                              build_directory=str(folder),
                              extra_cflags=["-O3", *fused.ISAS[isa], "-ffp-contract=off"], verbose=False)


def prompt_ids(tokenizer, n: int) -> list[int]:
    """A short story opening, or (``n`` > 0) the first ``n`` tokens of this project's README:
    a long context, where attention over the KV cache is a larger part of a step."""
    if n <= 0:
        return tokenizer.encode_prompt("Once upon a time")
    ids = tokenizer.encode((ROOT / "README.md").read_text(encoding="utf-8"))[:n]
    if len(ids) < n:
        raise SystemExit(f"--prompt-tokens {n}: the README holds only {len(ids)} tokens")
    return ids


def run(quantize: str, batches: list[int], reps: int, new_tokens: int, against: str | None = None,
        prompt_tokens: int = 0) -> dict:
    import zenlm
    from zenlm.infer import SamplingConfig, fused
    from zenlm.infer.generate import token_steps
    from zenlm.infer.prepare import prepare_for_decoding

    lm = zenlm.load("smollm2")
    model = prepare_for_decoding(lm.model, quantize=quantize)
    if not isinstance(model.__dict__.get("decode_forward"), fused.FusedDecode):
        raise SystemExit(f"the fused step is not in use here ({fused.unsupported(model) or 'see the log'})")
    if against:
        a, b = against, "current"
        steps = {a: fused.FusedDecode(model, build_at(against)), b: fused.FusedDecode(model, fused.native())}
    else:
        a, b = "avx2", "avx512"
        steps = {isa: fused.FusedDecode(model, fused.native(isa)) for isa in (a, b)}
    ids = prompt_ids(lm.tokenizer, prompt_tokens)
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0, stop_at_eot=False)

    def decode(isa: str, batch: int) -> tuple[float, list]:
        model.decode_forward = steps[isa]
        t = time.perf_counter()
        tokens = [t_.tolist() if hasattr(t_, "tolist") else int(t_) for t_ in token_steps(model, [ids] * batch, cfg)]
        return batch * new_tokens / (time.perf_counter() - t), tokens

    out = {}
    for batch in batches:
        decode(a, batch), decode(b, batch)  # warm-up: both decoders built
        rates, tokens = {a: [], b: []}, {}
        for rep in range(reps):
            for name in (a, b) if rep % 2 == 0 else (b, a):
                r, tokens[name] = decode(name, batch)
                rates[name].append(r)
        out[batch] = {f"{a}_tok_s": statistics.median(rates[a]), f"{b}_tok_s": statistics.median(rates[b]),
                      "ratio": statistics.median(y / x for x, y in zip(rates[a], rates[b])),
                      "runs": rates, "same_tokens": tokens[a] == tokens[b]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quantize", action="append", choices=["none", "int8", "int4"])
    p.add_argument("--batch", action="append", type=int)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--prompt-tokens", type=int, default=0,
                   help="start from the README's first N tokens (a long context) instead of a short prompt")
    p.add_argument("--against", metavar="REV", help="compare the current kernel with decode.cpp at git revision REV")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    import torch

    from zenlm.infer.fused import avx512_missing

    missing = avx512_missing()
    if missing and not args.against:
        raise SystemExit(f"this CPU does not report {', '.join(missing)}: there is no AVX-512 build to compare")
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()['describe']}")
    out = {}
    for q in args.quantize or ["int8"]:
        out[q] = run(q, args.batch or [1, 8], args.reps, args.new_tokens, args.against, args.prompt_tokens)
        for batch, r in out[q].items():
            (a, ra), (b, rb) = [(k[: -len("_tok_s")], v) for k, v in r.items() if k.endswith("_tok_s")]
            print(f"{'fp32' if q == 'none' else q} batch {batch}: {a} {ra:.1f} tok/s, {b} {rb:.1f} tok/s, "
                  f"ratio {r['ratio']:.2f}x (median of {args.reps}); same greedy tokens: {r['same_tokens']}",
                  flush=True)
    path = Path(args.out)
    if args.against and path == RESULTS:  # a kernel A/B keeps the builds' A/B
        path = RESULTS.with_name("kernel_ab.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": machine(), "against": args.against, "threads": args.threads,
                               "reps": args.reps,
                               "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
                               "results": out}, indent=2))
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
