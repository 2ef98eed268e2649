"""DP-SGD step cost: a DP LoRA step against a non-DP LoRA step at the same logical batch.

Both run through zenlm's own pieces on the same model and examples: a classification task
(SST-2 sentences when ``../shared/data/sst2`` is there, synthetic ones otherwise), LoRA on q/k/v/o
plus the head, AdamW. The non-DP step is the loop's gradient accumulation (``train.batch_size``
rows per micro-batch, ``grad_accum`` of them); the DP step is ``PrivateTraining.step``: a
Poisson sample of the same expected size, per-example gradients through Opacus's hooks,
per-example clipping and noise. Also timed: the chat loss the DP path needs (one loss per
example through the full logits, ``reduction="none"``) against the chunked loss non-DP training
uses, without DP, at the same batch: the price of the plain path alone.

Each mode runs in its own process (so each has its own peak RSS); the modes alternate for
``--rounds`` rounds; the median step time of each is reported with the DP/non-DP ratio.

    . .venv/bin/activate
    python bench/dp_step.py --smoke                 # a tiny random model, seconds
    python bench/dp_step.py --model smollm2         # SmolLM2-135M (the SST-2 recipe's shape)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "dp_step.json"
SST2 = ROOT.parent / "shared/data/sst2/train.tsv"
MODES = ("lora", "dp-lora", "chat-chunked", "chat-plain")


def _tiny_base(folder: Path):
    """A small random Llama-shaped model and a byte-level tokenizer, saved as a run folder."""
    import torch

    from zenlm.interop.hf import export_hf
    from zenlm.config import TransformerConfig, family_switches
    from zenlm.model import Transformer
    from zenlm.tokenizer import Tokenizer

    text = (SST2.read_text()[:200_000] if SST2.is_file() else
            "the film is good and the acting is bad but the story is fine\n" * 500)
    tok = Tokenizer.train([text], 1024)
    cfg = TransformerConfig(**{**family_switches("llama"), "vocab_size": 1024, "n_layer": 4,
                               "n_head": 4, "n_kv_head": 2, "d_model": 128, "max_seq_len": 128})
    torch.manual_seed(0)
    export_hf(Transformer(cfg), tok, folder)
    return str(folder)


def _data(folder: Path, n: int) -> str:
    path = folder / "train.tsv"
    if SST2.is_file():
        lines = SST2.read_text().splitlines()
        path.write_text("\n".join(lines[:n + 1]) + "\n")
    else:
        import random

        rng = random.Random(0)
        words = "good bad film story acting fine dull great plot slow".split()
        path.write_text("sentence\tlabel\n" + "".join(
            f"{' '.join(rng.choice(words) for _ in range(rng.randint(4, 20)))}\t{rng.randint(0, 1)}\n"
            for _ in range(n)))
    return str(path)


def one_mode(args) -> dict:
    """Run ``args.mode`` for warm-up + ``args.steps`` steps in this process."""
    import torch

    import zenlm
    from zenlm.train.distributed import World
    from zenlm.train.finetune import ClassifyTask, resolve_finetune
    from zenlm.train.optim import make_adamw

    torch.set_num_threads(args.threads)
    tmp = Path(args.tmp)
    dp = args.mode == "dp-lora"
    raw = {"task": "classify", "base": args.base, "data": {"train": _data(tmp, args.examples),
                                                           "text_col": "sentence", "max_len": args.max_len},
           "train": {"out_dir": str(tmp / "run"), "batch_size": args.batch_size,
                     "grad_accum": args.grad_accum, "max_steps": 1000, "device": "cpu",
                     "progress": False, **({"dp": {"epsilon": 8.0, "accountant": "rdp"}} if dp else {})}}
    cfg = resolve_finetune(raw)
    task = ClassifyTask(cfg, zenlm.load(args.base), log=lambda *a, **k: None)
    model = task.build(World()).train()
    opt = make_adamw(model, 1e-3, 0.0, (0.9, 0.999), 1e-8, "cpu")
    gen = torch.Generator().manual_seed(0)
    logical = args.batch_size * args.grad_accum
    engine = None
    if dp:
        from zenlm.privacy.dp import PrivateTraining

        engine = PrivateTraining(cfg.train.dp, model, task, cfg.train, World(), log=lambda *a: None)
    times = []
    ex_lengths = task.dp_lengths()
    autocast = torch.autocast("cpu", enabled=False)
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        if engine is not None:
            _, _ = engine.step(gen, autocast, "cpu")
        else:
            idx = torch.randperm(task.dp_examples(), generator=gen)[:logical].tolist()
            idx.sort(key=lambda i: ex_lengths[i])  # as the DP step and the loop's buckets do
            for s in range(0, logical, args.batch_size):
                batch = task.dp_batch(idx[s:s + args.batch_size])
                if args.mode == "lora":
                    loss = task.loss(model, batch) / args.grad_accum
                else:
                    x, lengths, _ = batch
                    y = x.roll(-1, 1)
                    y[:, -1] = -100
                    y[torch.arange(x.shape[1])[None, :] >= (lengths[:, None] - 1)] = -100
                    bb = model.backbone  # the LM head on the same rows and adapters
                    if args.mode == "chat-chunked":
                        loss = bb(x, y) / args.grad_accum
                    else:
                        per = bb(x, y, reduction="none")
                        loss = (per.sum(1) / (y != -100).sum(1).clamp(min=1)).sum() / logical
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return {"mode": args.mode, "step_s": statistics.median(times), "steps": len(times),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "dp": engine.describe() if engine else None}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="base model (default: a tiny random one)")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: seconds")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--examples", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1: fair on a shared machine)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:  # a child process: one mode
        print(json.dumps(one_mode(args)))
        return
    if args.smoke:
        args.batch_size, args.grad_accum, args.steps, args.rounds, args.examples = 8, 2, 3, 1, 400
    import torch

    with tempfile.TemporaryDirectory() as d:
        base = args.model or _tiny_base(Path(d) / "base")
        runs: dict[str, list[dict]] = {}
        for _ in range(args.rounds):
            for mode in args.modes.split(","):
                tmp = Path(tempfile.mkdtemp(dir=d))
                cmd = [sys.executable, __file__, "--mode", mode, "--base", base, "--tmp", str(tmp)]
                for k in ("batch_size", "grad_accum", "max_len", "examples", "steps", "warmup", "threads"):
                    cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                rec = json.loads(out.strip().splitlines()[-1])
                runs.setdefault(mode, []).append(rec)
                print(f"  {mode}: {rec['step_s']:.3f} s/step, peak RSS {rec['peak_rss_mb']:.0f} MB", flush=True)
    med = {m: statistics.median(r["step_s"] for r in rs) for m, rs in runs.items()}
    result = {"model": args.model or "tiny random llama (4 x 128)", "logical_batch": args.batch_size * args.grad_accum,
              "micro_batch": args.batch_size, "max_len": args.max_len,
              "threads": args.threads, "torch_threads_default": torch.get_num_threads(),
              "cpu": _cpu_name(),
              "step_s": med, "peak_rss_mb": {m: max(r["peak_rss_mb"] for r in rs) for m, rs in runs.items()},
              "dp": runs.get("dp-lora", [{}])[0].get("dp")}
    if "lora" in med and "dp-lora" in med:
        result["dp_over_lora"] = med["dp-lora"] / med["lora"]
    if "chat-chunked" in med and "chat-plain" in med:
        result["plain_over_chunked_loss"] = med["chat-plain"] / med["chat-chunked"]
    print(json.dumps(result, indent=2))
    if not args.smoke:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
