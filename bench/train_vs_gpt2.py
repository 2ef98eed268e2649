"""Time to quality for a budget: zenlm's budget-chosen model against a sweep of transformers models.

Question: given M minutes of training on this CPU, does ``zenlm pretrain`` with
``model.size: auto`` (the depth, batch and LR it picks by timing a few steps here) reach a lower
val bits-per-byte than the best of several Hugging Face models (Llama and GPT-2 of different
shapes and vocabularies) trained for the same M minutes on the same text?

How it is measured:
  * corpora: tinyshakespeare and a sample of the Python standard library's sources; val is the
    last 10% of each file (``val_split=tail``), the same bytes for every contestant;
  * each contestant gets its own byte-level BPE tokenizer of its own vocabulary size, trained
    (with ``zenlm prepare``) before and outside its budget; zenlm's vocabulary is the one the
    speedrun picks for M minutes (``zenlm.train.budget.vocab_for``);
  * zenlm trains ``recipes/auto.yaml`` with its own loop (``zenlm.train.loop.pretrain``),
    ``train.max_minutes=M``,
    no intermediate evals or checkpoints; its size probe (a few timed steps) runs before the
    budget starts and is reported as ``probe_seconds``;
  * each peer trains with a plain PyTorch loop: AdamW (``make_adamw``: fused where available,
    decay on matrices only), warmup + cosine fitted to the same wall-clock budget (``lr_at``),
    clipping 1.0, fp32, dropout 0, SDPA attention, tied embeddings, 16 x 256 tokens per step;
    its LR is ``--hf-lr`` or, with ``--sweep-hf-lr``, the best of SWEEP_LRS on a short run;
  * every model is scored on the whole val split in windows of its own context by
    ``evaluate_batches`` (bpb = nats over tokens that stand for bytes / (ln 2 * bytes)), which
    does not depend on the tokenizer;
  * each contestant runs in its own subprocess, one after the other, with ``--threads``
    torch threads, so peak RSS (``getrusage`` in the child) and the cores belong to one
    model at a time. One run each: read tok/s with the CPU-share gauge beside it.

    PYTHONPATH=src python bench/train_vs_gpt2.py --minutes 3 10        # JSON to bench/results/
    PYTHONPATH=src python bench/train_vs_gpt2.py --minutes 0.3 --corpora shakespeare  # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import peak_matmul_gflops

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "auto.yaml"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
RESULTS = ROOT / "bench" / "results" / "train_vs_gpt2.json"
SWEEP_LRS = (1e-3, 2e-3, 4e-3)
T_PROCESS = time.time()

# The peers: (name, transformers class, n_layer, d_model, n_head, vocab, context). 64-wide heads.
PEERS = [
    ("llama-2x128-bpe512", "llama", 2, 128, 2, 512, 256),
    ("llama-3x192-bpe768", "llama", 3, 192, 3, 768, 256),
    ("llama-4x256-bpe1024", "llama", 4, 256, 4, 1024, 256),
    ("llama-6x256-bpe2048", "llama", 6, 256, 4, 2048, 256),
    ("gpt2-3x192-bpe768", "gpt2", 3, 192, 3, 768, 256),
    ("llama-2x128-bpe4096", "llama", 2, 128, 2, 4096, 256),  # the shape zenlm picks for short budgets
]
PEER_TOKENS_PER_STEP = 4096
# The peers share the recipe's optimizer settings (recipes/auto.yaml), so only model and LR differ.
COMMON_TRAIN = {"warmup_frac": 0.03, "min_lr_ratio": 0.1, "weight_decay": 0.1,
                "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0, "seed": 1337}


def zenlm_raw(data_dir: str, out_dir: str, minutes: float) -> dict:
    """``recipes/auto.yaml`` (what a user runs for "the best model for M minutes") on this data."""
    from zenlm.config import load_yaml, merge, parse_overrides

    return merge(load_yaml(str(RECIPE)), parse_overrides([
        f"data.path={data_dir}", f"train.out_dir={out_dir}", f"train.max_minutes={minutes}",
        "train.max_steps=null", "train.eval_every=0", "train.ckpt_every=0",
        "train.eval_batches=1000000000", "train.progress=false", "train.device=cpu",
        "train.dtype=fp32"]))


def train_zenlm(spec: dict, data_dir: str, minutes: float, out_dir: str) -> dict:
    from zenlm.train.config import resolve
    from zenlm.train.loop import pretrain

    t = time.time()
    cfg = resolve(zenlm_raw(data_dir, out_dir, minutes))
    probe = time.time() - t
    s = pretrain(cfg)
    m = cfg.model
    return {"lr": cfg.train.lr, "batch_size": cfg.train.batch_size, "context": m.max_seq_len,
            "shape": f"{m.n_layer}x{m.d_model} h{m.n_head}/{m.n_kv_head}", "vocab": m.vocab_size,
            "n_layer": m.n_layer, "d_model": m.d_model, "steps": s["step"], "tokens": s["tokens"],
            "train_seconds": s["train_seconds"], "params": s["params"],
            "probe_seconds": round(probe, 1), "auto": cfg.auto,
            "val_loss": s["val"]["val_loss"], "val_bpb": s["val"]["val_bpb"]}


def train_peer(spec: dict, data_dir: str, minutes: float, lr: float) -> dict:
    import torch
    import torch.nn.functional as F
    import transformers

    from zenlm.data.loader import TokenShards
    from zenlm.eval.perplexity import evaluate_batches
    from zenlm.tokenizer import Tokenizer
    from zenlm.train.optim import lr_at, make_adamw

    transformers.logging.set_verbosity_error()
    name, kind, n_layer, d, n_head, _, ctx = spec["peer"]
    data = TokenShards(data_dir)
    tokenizer = Tokenizer.load(data.dir / "tokenizer.json")
    vocab = 64 * ((tokenizer.vocab_size + 63) // 64)
    tc = COMMON_TRAIN
    torch.manual_seed(tc["seed"])
    if kind == "gpt2":
        hf_cfg = transformers.GPT2Config(
            vocab_size=vocab, n_positions=ctx, n_embd=d, n_layer=n_layer, n_head=n_head,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
            tie_word_embeddings=True, bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id,
            attn_implementation="sdpa")
        hf = transformers.GPT2LMHeadModel(hf_cfg)
    else:
        hidden = 64 * ((int(8 * d / 3) + 63) // 64)  # SwiGLU width, as Llama sizes it
        hf_cfg = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=d, intermediate_size=hidden, num_hidden_layers=n_layer,
            num_attention_heads=n_head, num_key_value_heads=n_head, max_position_embeddings=ctx,
            tie_word_embeddings=True, use_cache=False, bos_token_id=tokenizer.eot_id,
            eos_token_id=tokenizer.eot_id, attn_implementation="sdpa")
        hf = transformers.LlamaForCausalLM(hf_cfg)

    class WithLoss(torch.nn.Module):
        """zenlm's calling convention (targets -> loss) around the HF model, for training and eval."""

        def __init__(self, hf):
            super().__init__()
            self.hf = hf

        def forward(self, x, y, reduction: str = "mean"):
            logits = self.hf(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1),
                                   ignore_index=-100, reduction=reduction)
            return loss.view(y.shape) if reduction == "none" else loss

    model = WithLoss(hf)
    batch = max(1, PEER_TOKENS_PER_STEP // ctx)
    optimizer = make_adamw(model, lr, tc["weight_decay"], (tc["beta1"], tc["beta2"]), 1e-8, "cpu")
    gen = torch.Generator()
    gen.manual_seed(tc["seed"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n_params / 1e6:.2f}M parameters, lr {lr:g}, {torch.get_num_threads()} threads",
          flush=True)
    budget = minutes * 60
    step, tokens = 0, 0
    model.train()
    t_start = time.time()
    while True:
        progress = (time.time() - t_start) / budget
        if progress >= 1.0:
            break
        lr_now = lr_at(progress, step, lr=lr, min_lr_ratio=tc["min_lr_ratio"], warmup_steps=None,
                       warmup_frac=tc["warmup_frac"])
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        x, y = data.train_batch(batch, ctx, gen)
        model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += batch * ctx
    train_seconds = time.time() - t_start
    res = evaluate_batches(model, data.val_batches(batch, ctx), tokenizer.token_byte_lengths())
    print(f"{name} done: {step} steps, {tokens:,} tokens in {train_seconds:.0f}s; "
          f"val bpb {res.bits_per_byte:.4f}", flush=True)
    return {"lr": lr, "batch_size": batch, "context": ctx, "shape": f"{n_layer}x{d} h{n_head}",
            "vocab": vocab, "n_layer": n_layer, "d_model": d, "steps": step, "tokens": tokens,
            "train_seconds": round(train_seconds, 1), "params": n_params, "val_loss": res.loss,
            "val_bpb": res.bits_per_byte}


def child(args) -> None:
    """Train one contestant in this (fresh) process and write its numbers to --result."""
    import torch

    torch.set_num_threads(args.threads)
    spec = json.loads(args.child)
    with tempfile.TemporaryDirectory(prefix="bench_run_") as out_dir:
        if spec["peer"] is None:
            r = train_zenlm(spec, args.data, args.minutes, str(Path(out_dir) / "run"))
        else:
            r = train_peer(spec, args.data, args.minutes, args.hf_lr)
    r["tok_per_s"] = r["tokens"] / max(r["train_seconds"], 1e-9)
    # Training FLOPs per token ~ 6 * params + 12 * layers * context * d (attention scores).
    flops_tok = 6 * r["params"] + 12 * r["n_layer"] * r["context"] * r["d_model"]
    r["gflops"] = flops_tok * r["tok_per_s"] / 1e9
    ru = resource.getrusage(resource.RUSAGE_SELF)
    r["peak_rss_mb"] = ru.ru_maxrss / 1024
    r["threads"] = torch.get_num_threads()
    # Noise gauges: the share of its threads' wall time this process got on the CPU (about 1.0
    # on an idle machine), and the 1-minute load average (our own threads count ~threads).
    r["cpu_share"] = (ru.ru_utime + ru.ru_stime) / ((time.time() - T_PROCESS) * r["threads"])
    r["load1"] = os.getloadavg()[0]
    Path(args.result).write_text(json.dumps(r))


def spawn(spec: dict, data: str, minutes: float, lr: float, threads: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--data", data, "--minutes",
           str(minutes), "--hf-lr", str(lr), "--result", result, "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env)
    out = json.loads(Path(result).read_text())
    Path(result).unlink()
    return out


def corpus_sources(corpus: str, stdlib_mb: float):
    from zenlm.data.sources import Source
    from zenlm.speedrun import stdlib_sources

    if corpus == "shakespeare":
        return [Source(SHAKESPEARE, "text", SHAKESPEARE.stat().st_size)]
    files = stdlib_sources(int(stdlib_mb * (1 << 20)))
    return [Source(f, "text", f.stat().st_size) for f in files]


def versions() -> dict:
    import numpy
    import tokenizers
    import torch
    import transformers

    import zenlm
    from zenlm.hardware import describe

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "numpy": numpy.__version__, "zenlm": zenlm.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "cpu": describe()}


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    head = (f"{'name':24}{'shape':>16}{'vocab':>7}{'ctx':>5}{'params':>11}{'steps':>7}"
            f"{'tokens':>12}{'tok/s':>8}{'share':>7}{'lr':>9}{'val bpb':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:24}{r['shape']:>16}{r['vocab']:>7}{r['context']:>5}{r['params']:>11,}"
              f"{r['steps']:>7,}{r['tokens']:>12,}{r['tok_per_s']:>8,.0f}{r['cpu_share']:>7.2f}"
              f"{r['lr']:>9.2g}{r['val_bpb']:>9.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, nargs="+", default=[3.0, 10.0],
                   help="wall-clock training budgets per model (default 3 10)")
    p.add_argument("--corpora", nargs="+", choices=["shakespeare", "stdlib"],
                   default=["shakespeare", "stdlib"])
    p.add_argument("--stdlib-mb", type=float, default=8.0, help="size of the stdlib sample")
    p.add_argument("--peers", nargs="+", choices=[p[0] for p in PEERS], default=[p[0] for p in PEERS])
    p.add_argument("--hf-lr", type=float, default=2e-3, help="peer peak LR (without --sweep-hf-lr)")
    p.add_argument("--sweep-hf-lr", action="store_true",
                   help=f"per peer, pick the LR from {SWEEP_LRS} by val bpb after --sweep-minutes "
                        f"on the first corpus")
    p.add_argument("--sweep-minutes", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.minutes = args.minutes[0]
        return child(args)

    from zenlm.data.shards import PrepareConfig, prepare
    from zenlm.train.budget import vocab_for

    peers = [p for p in PEERS if p[0] in args.peers]
    report: dict = {"question": "zenlm (model.size auto) vs a sweep of HF models: val bpb after "
                                "equal wall-clock", "versions": versions(), "runs": [],
                    "hf_lr": args.hf_lr, "hf_lr_sweep": {}}
    print("cpu: " + report["versions"]["cpu"])
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        prepared: dict[tuple[str, int], tuple[str, dict]] = {}

        def data_for(corpus: str, vocab: int) -> str:
            """Shards of ``corpus`` with a tokenizer of ``vocab``, trained outside any budget."""
            if (corpus, vocab) not in prepared:
                out = str(Path(tmp) / f"{corpus}-{vocab}")
                manifest = prepare(PrepareConfig(inputs=[], out=out, vocab_size=vocab, val_split="tail",
                                                 val_fraction=0.1,
                                                 sources=corpus_sources(corpus, args.stdlib_mb)),
                                   log=lambda *a, **k: None)
                prepared[(corpus, vocab)] = (out, manifest)
            return prepared[(corpus, vocab)][0]

        peer_lr = {p[0]: args.hf_lr for p in peers}
        if args.sweep_hf_lr:
            for peer in peers:
                scores = {}
                for lr in SWEEP_LRS:
                    r = spawn({"peer": peer}, data_for(args.corpora[0], peer[5]), args.sweep_minutes,
                              lr, args.threads)
                    scores[f"{lr:g}"] = r["val_bpb"]
                peer_lr[peer[0]] = min(SWEEP_LRS, key=lambda lr: scores[f"{lr:g}"])
                report["hf_lr_sweep"][peer[0]] = scores
        report["peak_matmul_gflops"] = peak = peak_matmul_gflops()
        for corpus in args.corpora:
            for minutes in args.minutes:
                rows = []
                z = spawn({"peer": None}, data_for(corpus, vocab_for(minutes)), minutes, 0.0,
                          args.threads)
                rows.append({"name": "zenlm (size auto)", **z})
                for peer in peers:
                    r = spawn({"peer": peer}, data_for(corpus, peer[5]), minutes, peer_lr[peer[0]],
                              args.threads)
                    rows.append({"name": peer[0], **r})
                for r in rows:
                    r["mfu"] = r["gflops"] / peak
                best = min(rows[1:], key=lambda r: r["val_bpb"])
                run = {"corpus": corpus, "minutes": minutes, "rows": rows, "best_peer": best["name"],
                       "bpb_margin": best["val_bpb"] - z["val_bpb"],
                       "bpb_ratio": z["val_bpb"] / best["val_bpb"],
                       "zenlm_wins": z["val_bpb"] < best["val_bpb"],
                       "data": {k: prepared[(corpus, vocab_for(minutes))][1][k]
                                for k in ("train_bytes", "val_bytes")}}
                report["runs"].append(run)
                print_table(f"{corpus}, {minutes:g} min each ({report['versions']['cpu']})", rows)
                print(f"zenlm vs best peer ({best['name']}): val bpb {z['val_bpb']:.4f} vs "
                      f"{best['val_bpb']:.4f}, margin {run['bpb_margin']:+.4f} "
                      f"(ratio {run['bpb_ratio']:.3f}) -> "
                      f"{'zenlm wins' if run['zenlm_wins'] else 'zenlm does NOT win'}; "
                      f"zenlm's probe took {z['probe_seconds']:.0f} s before its budget")
    print(f"\npeer lr: {peer_lr} ({'swept' if args.sweep_hf_lr else '--hf-lr'}); "
          f"fp32 matmul peak now: {peak:.0f} GFLOP/s")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(args.out).with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2))
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
