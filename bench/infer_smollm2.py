"""SmolLM2-135M-Instruct on a CPU: zenlm against transformers and llama.cpp, same GGUF, same run.

Measured for each contestant, each in a fresh subprocess (so cold start and peak RSS are
honest), contestants alternating, repeated ``--reps`` times (median reported):
  * cold start: process start -> model and tokenizer loaded -> first generated token;
  * prefill: tokens/s of one forward over a 512-token prompt (after a warm-up forward);
  * decode: greedy tokens/s for 128 new tokens at batch 1 and batch 8;
  * peak RSS of the process.
Contestants: zenlm fp32, zenlm int8 and int4 (``zenlm.infer.quantize``: weight-only, every
projection and the output head; int4 in groups of 32 with an int8 head), zenlm bf16 weights
(only on CPUs with native bf16, see ``zenlm.hardware``), transformers fp32
(``from_pretrained(gguf_file=...)`` + ``generate``), and llama-cpp-python on the same Q4_1 GGUF
when it is installed (``pip install llama-cpp-python``; it compiles llama.cpp, ~9 minutes).
Perplexity on the first 20,000 characters of GPL-3 (512-token windows) is reported for every
zenlm variant (quantized ones scored through the same kernels decoding uses) and transformers.
zenlm decodes as ``zenlm generate`` does (``zenlm.infer.prepare.prepare_for_decoding``). The
machine (CPU name, the flags that choose kernels), its read bandwidth measured before and after,
and each contestant's bytes of weights per token are recorded, so decode figures are also given
as a share of the bandwidth limit.

    . .venv/bin/activate
    python bench/infer_smollm2.py                 # ~10 minutes on 2 cores; JSON to bench/results/
    python bench/infer_smollm2.py --reps 1 --skip hf
    python bench/infer_smollm2.py --unfused --skip zenlm-int4 --skip hf   # fused vs torch decode step
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import bytes_read_per_token, machine, read_bandwidth_gbs  # noqa: E402
RESULTS = ROOT / "bench" / "results" / "infer_smollm2.json"
PPL_TEXT = Path("/usr/share/common-licenses/GPL-3")
PPL_CHARS = 20_000
NEW_TOKENS = 128
PROMPT_TOKENS = 512
CONTESTANTS = ("zenlm", "zenlm-int8", "zenlm-bf16", "zenlm-int4", "hf", "llama.cpp")
# zenlm fp32 and int8 with the native batch-1 decode step turned off (ZENLM_FUSED=0): the
# torch path, for an A/B of zenlm.infer.fused in the same run (--unfused)
UNFUSED = ("zenlm-unfused", "zenlm-int8-unfused")


def gguf_path() -> Path:
    from zenlm.interop.load import smollm2_path

    return smollm2_path()


def prompt_text() -> str:
    return PPL_TEXT.read_text()[20_000:40_000]  # not the perplexity slice


# ------------------------------------------------------------------------------------------
# one contestant per process


def run_zenlm(int8: bool, threads: int, bf16: bool = False, int4: bool = False) -> dict:
    import torch

    import zenlm
    from zenlm.infer import SamplingConfig
    from zenlm.infer.generate import token_steps
    from zenlm.infer.prepare import prepare_for_decoding

    lm = zenlm.load("smollm2")
    # as `zenlm generate` readies a model: fused projections, then the dtype or quantization
    prepare_for_decoding(lm.model, dtype="bf16" if bf16 else "fp32",
                         quantize="int8" if int8 else "int4" if int4 else "none")
    model, tok = lm.model, lm.tokenizer
    ids = tok.encode_prompt("Once upon a time")
    next(iter(token_steps(model, [ids], SamplingConfig(max_new_tokens=1, temperature=0))))
    first_token = time.time()

    long_ids = tok.encode_prompt(prompt_text())[:PROMPT_TOKENS]

    def prefill():
        with torch.no_grad():
            model(torch.tensor([long_ids]), last_only=True)

    def decode(batch: int):
        prompts = [tok.encode_prompt(p) for p in BATCH_PROMPTS[:batch]]
        cfg = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eot=False)
        n = sum(1 for _ in token_steps(model, prompts, cfg))
        return n * batch

    out = measure(prefill, decode, first_token)
    out["bytes_per_token"] = bytes_read_per_token(model)
    out["fused_decode"] = type(model.__dict__.get("decode_forward")).__name__ == "FusedDecode"
    from zenlm.eval.perplexity import evaluate_text

    if int8 or int4:  # score through the kernels decoding uses, not the prefill fallback
        import zenlm.infer.quantize as quantize

        quantize.INT8_MAX_ROWS = 1 << 30
    out["ppl"] = evaluate_text(model, tok, PPL_TEXT.read_text()[:PPL_CHARS], seq_len=512, batch=4).perplexity
    return out


def run_hf(threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()
    enc = tok("Once upon a time", return_tensors="pt")
    model.generate(**enc, max_new_tokens=1, do_sample=False)
    first_token = time.time()
    long_ids = tok(prompt_text(), return_tensors="pt").input_ids[:, :PROMPT_TOKENS]

    def prefill():
        with torch.no_grad():
            model(long_ids, logits_to_keep=1)

    def decode(batch: int):
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(BATCH_PROMPTS[:batch], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        return (out.shape[1] - enc.input_ids.shape[1]) * batch

    out = measure(prefill, decode, first_token)
    out["bytes_per_token"] = bytes_read_per_token(model)
    out["ppl"] = hf_perplexity(model, tok)
    return out


def hf_perplexity(model, tok) -> float:
    import math

    import torch

    ids = tok(PPL_TEXT.read_text()[:PPL_CHARS], return_tensors="pt").input_ids[0]
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 512):
            chunk = ids[s:s + 513]
            logits = model(chunk[None, :-1]).logits[0]
            nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
            n += len(chunk) - 1
    return math.exp(nll / n)


def run_llama_cpp(threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path()), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)
    llm("Once upon a time", max_tokens=1, temperature=0)
    first_token = time.time()
    long_ids = llm.tokenize(prompt_text().encode())[:PROMPT_TOKENS]

    def prefill():
        llm.reset()
        llm.eval(long_ids)

    def decode(batch: int):
        if batch != 1:
            return None  # llama-cpp-python's high-level API decodes one sequence at a time
        llm.reset()
        out = llm(BATCH_PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0, top_k=1)
        return out["usage"]["completion_tokens"]

    return measure(prefill, decode, first_token)


BATCH_PROMPTS = [
    "Once upon a time", "The capital of France is", "def fibonacci(n):", "In 1969, astronauts",
    "The best way to learn a language is", "Water boils at", "My favourite recipe for bread",
    "The theory of relativity says",
]


def measure(prefill, decode, first_token: float) -> dict:
    t0 = float(os.environ["BENCH_T0"])
    out = {"cold_start_s": first_token - t0}
    prefill()  # warm-up
    times = []
    for _ in range(3):  # a single forward is at the mercy of one scheduler hiccup
        t = time.perf_counter()
        prefill()
        times.append(time.perf_counter() - t)
    out["prefill_tok_s"] = PROMPT_TOKENS / statistics.median(times)
    for batch in (1, 8):
        t = time.perf_counter()
        n = decode(batch)
        out[f"decode_b{batch}_tok_s"] = None if n is None else n / (time.perf_counter() - t)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def child(name: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if name.endswith("-unfused"):
        os.environ["ZENLM_FUSED"] = "0"
        name = name.removesuffix("-unfused")
    if name == "zenlm":
        r = run_zenlm(False, threads)
    elif name == "zenlm-int8":
        r = run_zenlm(True, threads)
    elif name == "zenlm-bf16":
        r = run_zenlm(False, threads, bf16=True)
    elif name == "zenlm-int4":
        r = run_zenlm(False, threads, int4=True)
    elif name == "hf":
        r = run_hf(threads)
    else:
        r = run_llama_cpp(threads)
    r["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(r))


def spawn(name: str, threads: int) -> dict:
    """One contestant in a fresh process: its results, or ``{"failed": its last error line}``."""
    env = {**os.environ, "BENCH_T0": repr(time.time()), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--threads", str(threads)],
                          capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
    print(f"  {name} failed: {why}")
    return {"failed": why}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "llama_cpp_python", "gguf", "zenlm"):
        try:
            out[pkg] = md.version(pkg.replace("_", "-"))
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def main() -> int | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", action="append", default=[], choices=CONTESTANTS)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--unfused", action="store_true",
                   help="also run zenlm fp32 and int8 with the native decode step off (ZENLM_FUSED=0)")
    p.add_argument("--child", choices=CONTESTANTS + UNFUSED, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.threads)

    import importlib.util

    names = [c for c in CONTESTANTS if c not in args.skip]
    if args.unfused:
        names += [u for u in UNFUSED if u.removesuffix("-unfused") in names]
    if "llama.cpp" in names and importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp: skipped (llama-cpp-python is not installed)")
        names.remove("llama.cpp")
    from zenlm.hardware import native_bf16

    for n in ("zenlm-bf16",):  # int8 and int4 are weight-only: they run on any CPU
        if n in names and not native_bf16():
            print(f"{n}: skipped (this CPU has no native bf16: it would be emulated, ~100x slower)")
            names.remove(n)
    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {machine()['describe']}")
    bandwidth = [read_bandwidth_gbs()]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    # a contestant that fails is reported after the table and in the JSON, and the bench exits
    # non-zero: a column that silently goes missing once hid a bf16 decoding bug
    failures: dict[str, list[str]] = {}
    for rep in range(args.reps):  # alternate contestants within every repetition
        for n in names:
            print(f"rep {rep + 1}/{args.reps}: {n} ...", flush=True)
            r = spawn(n, args.threads)
            if "failed" in r:
                failures.setdefault(n, []).append(r["failed"])
            else:
                runs[n].append(r)

    bandwidth.append(read_bandwidth_gbs())
    bw = max(bandwidth)  # the ceiling: the best read rate seen, before or after
    keys = ["cold_start_s", "prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s", "peak_rss_mb", "ppl",
            "bytes_per_token"]
    med = {n: {k: (statistics.median(v) if (v := [r[k] for r in rs if r.get(k) is not None]) else None)
               for k in keys} for n, rs in runs.items() if rs}
    for m in med.values():  # decode at batch 1 against the bandwidth limit: bytes per token / GB/s
        if m["decode_b1_tok_s"] and m["bytes_per_token"]:
            m["limit_b1_tok_s"] = bw * 1e9 / m["bytes_per_token"]
            m["bandwidth_use_b1"] = m["decode_b1_tok_s"] / m["limit_b1_tok_s"]
    keys += ["limit_b1_tok_s", "bandwidth_use_b1"]
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF), {args.threads} threads, median of {args.reps}; "
          f"read bandwidth {bw:.1f} GB/s\n{machine()['describe']}\n")
    header = f"{'':22}" + "".join(f"{n:>17}" for n in med)
    print(header)
    fmt = {"cold_start_s": "{:.2f}", "prefill_tok_s": "{:.0f}", "decode_b1_tok_s": "{:.1f}",
           "decode_b8_tok_s": "{:.1f}", "peak_rss_mb": "{:.0f}", "ppl": "{:.3f}",
           "bytes_per_token": "{:.3g}", "limit_b1_tok_s": "{:.1f}", "bandwidth_use_b1": "{:.0%}"}
    for k in keys:
        cells = [("-" if med[n].get(k) is None else fmt[k].format(med[n][k])) for n in med]
        print(f"{k:22}" + "".join(f"{c:>17}" for c in cells))
    ratios = {}
    if "hf" in med:
        for n in med:
            if n.startswith("zenlm"):
                z, h = med[n], med["hf"]
                ratios[f"{n}/hf"] = {
                    "cold_start_speedup": h["cold_start_s"] / z["cold_start_s"],
                    "prefill": z["prefill_tok_s"] / h["prefill_tok_s"],
                    "decode_b1": z["decode_b1_tok_s"] / h["decode_b1_tok_s"],
                    "decode_b8": z["decode_b8_tok_s"] / h["decode_b8_tok_s"]}
    if "llama.cpp" in med:
        for n in med:
            if n.startswith("zenlm"):
                ratios[f"{n}/llama.cpp"] = {"decode_b1": med[n]["decode_b1_tok_s"] / med["llama.cpp"]["decode_b1_tok_s"]}
    for n in UNFUSED:
        if n in med and (fast := n.removesuffix("-unfused")) in med:
            ratios[f"{fast} fused/unfused"] = {"decode_b1": med[fast]["decode_b1_tok_s"] / med[n]["decode_b1_tok_s"]}
    for n in ("zenlm-int8", "zenlm-bf16", "zenlm-int4"):
        if "zenlm" in med and n in med:
            ratios[f"{n} perplexity change %"] = 100 * (med[n]["ppl"] / med["zenlm"]["ppl"] - 1)
    print("\nratios:")
    for k, v in ratios.items():
        print(f"  {k}: " + (", ".join(f"{a} {b:.2f}x" for a, b in v.items()) if isinstance(v, dict) else f"{v:+.2f}"))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    for n, whys in failures.items():
        print(f"FAILED {n} in {len(whys)} of {args.reps} runs: {whys[-1]}")
    from zenlm.io import atomic_write_json

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {"machine": machine(), "read_bandwidth_gbs": bandwidth, "median": med,
                            "runs": runs, "failures": failures, "ratios": ratios, "versions": versions(),
                            "threads": args.threads, "reps": args.reps})
    print(f"wrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
