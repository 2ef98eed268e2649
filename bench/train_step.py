"""Training-step throughput: zenlm against transformers at the same shape, weights and batches.

For a GPT-2 shape (``GPT2LMHeadModel``) and a Llama shape (``LlamaForCausalLM``) — 6 layers x
384, vocab 8192, seq 256, batch 16 by default, as in the speed issue — zenlm builds the model,
exports it to a Hugging Face folder and transformers loads that folder, so both start from the
same weights. Each step is forward + backward + fused AdamW on the same batch. Modes: fp32
eager, fp32 ``torch.compile`` and bf16 autocast (on CPUs without native bf16 it is emulated and
~20x slower, so there it runs with a smaller batch: compare its ratio, not its speed).
Contestants alternate step by step after warm-up steps; the median of ``--steps`` is reported
with tokens/s, the ratio, model FLOPs utilisation against a matmul peak measured in the same
run, and peak RSS of the whole process.

    . .venv/bin/activate
    python bench/train_step.py                      # ~6 minutes on 2 cores
    python bench/train_step.py --modes fp32 --steps 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

from common import peak_matmul_gflops

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "train_step.json"

def build_pair(family: str, args):
    """A zenlm model and the transformers model loaded from its export: the same weights."""
    from transformers import AutoModelForCausalLM

    from zenlm.config import TransformerConfig
    from zenlm.interop.hf import export_hf
    from zenlm.model import Transformer

    kv = {"n_kv_head": 2} if family == "llama" else {}
    cfg = TransformerConfig.preset(family, vocab_size=args.vocab, n_layer=args.layers, n_head=6,
                                   d_model=args.d_model, max_seq_len=args.seq, tie_embeddings=True, **kv)
    torch.manual_seed(0)
    zen = Transformer(cfg)
    with tempfile.TemporaryDirectory() as d:
        export_hf(zen, None, d)
        hf = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa", torch_dtype=torch.float32)
    hf.config.use_cache = False
    return cfg, zen.train(), hf.train()


def step_fn(model, is_hf: bool, batch, bf16: bool, compiled: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if compiled else model
    x, y = batch
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> float:
        t = time.perf_counter()
        with ctx:
            loss = fwd(input_ids=x, labels=x).loss if is_hf else fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    return step


def flops_per_token(cfg) -> float:
    d, L, T, V, ff = cfg.d_model, cfg.n_layer, cfg.max_seq_len, cfg.vocab_size, cfg.d_ff
    kv = cfg.n_kv_head * cfg.head_dim
    per_layer = d * d * 2 + d * kv * 2 + d * ff * (3 if cfg.mlp == "swiglu" else 2)
    matmul = L * per_layer + d * V
    return 6 * matmul + 6 * L * T * d  # + causal attention scores and values (fwd + bwd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=["gpt2", "llama"])
    p.add_argument("--modes", nargs="+", default=["fp32", "compile", "bf16"])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--bf16-batch", type=int, help="default: --batch where bf16 is native, else 2")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    peak = peak_matmul_gflops()
    # bf16 MFU is against the bf16 rate: several times fp32's on CPUs with native bf16
    from zenlm.hardware import native_bf16

    native = native_bf16()
    peak_bf16 = (peak_matmul_gflops(n=2048 if native else 512, reps=2, dtype=torch.bfloat16)
                 if "bf16" in args.modes else None)
    if args.bf16_batch is None:  # emulated bf16 is so slow that a full batch would take minutes
        args.bf16_batch = args.batch if native else 2
    rows = []
    for family in args.families:
        cfg, zen, hf = build_pair(family, args)
        for mode in args.modes:
            batch_size = args.bf16_batch if mode == "bf16" else args.batch
            g = torch.Generator().manual_seed(0)
            x = torch.randint(0, args.vocab, (batch_size, args.seq + 1), generator=g)
            batch = (x[:, :-1].contiguous(), x[:, 1:].contiguous())
            steps = {"zenlm": step_fn(zen, False, batch, mode == "bf16", mode == "compile"),
                     "transformers": step_fn(hf, True, batch, mode == "bf16", mode == "compile")}
            slow = mode == "bf16" and not native  # emulated bf16: fewer steps, or it takes minutes
            n_steps, n_warm = (max(2, args.steps // 2), 1) if slow else (args.steps, args.warmup)
            times = {k: [] for k in steps}
            for i in range(n_warm + n_steps):  # alternate: the machine's noise hits both alike
                for name, step in steps.items():
                    dt = step()
                    if i >= n_warm:
                        times[name].append(dt)
            tokens = batch_size * args.seq
            res = {k: tokens / statistics.median(v) for k, v in times.items()}
            fpt = flops_per_token(cfg)
            rows.append({"family": family, "mode": mode, "batch": batch_size, "tok_s": res,
                         "ratio": res["zenlm"] / res["transformers"],
                         "mfu": {k: v * fpt / 1e9 / (peak_bf16 if mode == "bf16" else peak)
                                 for k, v in res.items()}})
            print(f"{family:6} {mode:8} zenlm {res['zenlm']:8,.0f} tok/s   transformers "
                  f"{res['transformers']:8,.0f} tok/s   ratio {rows[-1]['ratio']:.2f}x   "
                  f"MFU {100 * rows[-1]['mfu']['zenlm']:.0f}% vs {100 * rows[-1]['mfu']['transformers']:.0f}%",
                  flush=True)
    import transformers

    info = {"threads": torch.get_num_threads(), "peak_matmul_gflops": peak,
            "peak_bf16_matmul_gflops": peak_bf16,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "shape": vars(args)}
    print(f"threads {info['threads']}, fp32 matmul peak {peak:.0f} GFLOP/s"
          + (f", bf16 {peak_bf16:.0f}" if peak_bf16 else "") + ", peak RSS "
          f"{info['peak_rss_mb']:.0f} MB (both models in one process), {info['versions']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, **info}, indent=2))


if __name__ == "__main__":
    main()
