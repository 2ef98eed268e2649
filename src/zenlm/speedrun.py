"""The main job: tokenizer -> shards -> pretraining -> evaluation -> samples -> report, in minutes.

With no arguments it learns to write Python from the one corpus every installation has: the
Python standard library's own ``.py`` sources. Each stage is the library function a user would
call; this module only strings them together and writes ``report.md``.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from zenlm.io import atomic_write_text

CODE_PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "    for i in range(len(items)):\n",
]

SAMPLING = dict(temperature=0.6, top_p=0.9, repetition_penalty=1.1)
STDLIB_SKIP = {"site-packages", "__pycache__", "test", "tests", "idle_test", "encodings", "pydoc_data"}

@dataclass
class SpeedrunConfig:
    corpus: str | None = None  # None: the Python standard library's .py files
    name: str | None = None
    runs_dir: str = "runs"
    minutes: float = 5.0
    size: str = "auto"  # auto: the depth that fits the budget, timed here; or tiny/small/base/a depth
    vocab_size: int | None = None  # None: chosen from the budget (vocab_for)
    max_corpus_mb: float = 16.0  # a sample of the stdlib is plenty for 5 minutes
    lr: float | None = None  # None: the dial's (zenlm.train.budget.lr_for)
    batch_size: int | None = None  # None: the dial's (budget.BATCH_TOKENS per step)
    dtype: str = "auto"  # bf16 autocast where the CPU has native bf16 (more tokens in the budget), else fp32
    seed: int = 1337


def looks_like_data(path: Path) -> bool:
    """A module that is mostly a literal table (html.entities, locale's aliases, sysconfig data).

    Such tables are easy to predict, so a 5-minute model spends its capacity on them and then
    completes code prompts with entity names; code is what the speedrun should learn.
    """
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    literal = sum(1 for ln in lines if ln[:1] in "'\"" or ln[:1].isdigit())
    return len(lines) > 50 and literal > 0.5 * len(lines)


def stdlib_sources(max_bytes: int) -> list[Path]:
    """The standard library's own modules (not its tests or generated tables), in hash order.

    Hash order spreads a size cap over the whole library instead of cutting off at a letter.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not set(p.relative_to(root).parts) & STDLIB_SKIP]
    files.sort(key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest())
    picked, total = [], 0
    for f in files:
        size = f.stat().st_size
        if size == 0 or size > 1 << 20 or looks_like_data(f):  # empty, generated or data tables
            continue
        if total + size > max_bytes:
            continue
        picked.append(f)
        total += size
    return picked


def speedrun(cfg: SpeedrunConfig, log=print) -> Path:
    from zenlm.data.shards import PrepareConfig, prepare
    from zenlm.data.sources import Source, find_sources
    from zenlm.config import size_shape
    from zenlm.errors import ConfigError
    from zenlm.train.budget import BATCH_TOKENS, CONTEXT, lr_for, vocab_for
    from zenlm.train.config import resolve
    from zenlm.train.loop import pretrain

    if str(cfg.size) != "auto":
        size_shape(cfg.size)  # an unknown name fails now, not after the tokenizer is trained
    if cfg.minutes <= 0:
        raise ConfigError("--minutes must be positive")
    t0 = time.time()
    name = cfg.name or time.strftime("speedrun-%Y%m%d-%H%M%S")
    run = Path(cfg.runs_dir) / name
    if (run / "checkpoints").exists():
        raise ConfigError(f"{run} already exists; choose another --out")
    data_dir = run / "data"
    if cfg.corpus is None:
        files = stdlib_sources(int(cfg.max_corpus_mb * (1 << 20)))
        sources = [Source(f, "text", f.stat().st_size) for f in files]
        corpus_label = f"Python standard library ({len(files)} .py files from {sysconfig.get_paths()['stdlib']})"
    else:
        sources = find_sources([cfg.corpus])
        corpus_label = cfg.corpus
    log(f"[1/4] corpus: {corpus_label}, {sum(s.size for s in sources) / 1e6:.1f} MB")
    vocab = cfg.vocab_size or vocab_for(cfg.minutes)
    if not cfg.vocab_size:
        log(f"       vocabulary {vocab:,} for a {cfg.minutes:g}-minute budget")
    manifest = prepare(PrepareConfig(inputs=[], out=str(data_dir), vocab_size=vocab,
                                     sources=sources), log=log)

    log(f"[2/4] training a Llama-style model (size {cfg.size}) for {cfg.minutes:g} minutes")
    train = {"out_dir": str(run), "max_minutes": cfg.minutes, "max_steps": None,
             "warmup_frac": 0.03, "eval_every": 0, "ckpt_every": 100, "eval_batches": 40,
             "seed": cfg.seed, "weight_decay": 0.1, "dtype": cfg.dtype}
    model = {"family": "llama", "size": cfg.size, "tie_embeddings": True}
    lr, batch = cfg.lr, cfg.batch_size
    if str(cfg.size) != "auto":  # a fixed size takes the dial's LR and batch (auto picks its own)
        shape = size_shape(cfg.size)
        model.setdefault("max_seq_len", shape.get("max_seq_len", CONTEXT))  # a bare depth: CONTEXT
        lr = lr or lr_for(shape["d_model"])
        batch = batch or max(1, BATCH_TOKENS // model["max_seq_len"])
    train.update({k: v for k, v in (("lr", lr), ("batch_size", batch)) if v})
    run_cfg = resolve({"model": model, "data": {"path": str(data_dir)}, "train": train}, log=log)
    summary = pretrain(run_cfg, log=log)
    m = run_cfg.model
    summary["shape"] = (f"{m.n_layer} layers x {m.d_model}, {m.n_head} heads ({m.n_kv_head} kv), "
                        f"context {m.max_seq_len}, batch {run_cfg.train.batch_size}, "
                        f"lr {run_cfg.train.lr:.2g}"
                        + (f"; size auto: depth {run_cfg.auto['depth']}" if run_cfg.auto else ""))

    log("[3/4] sampling completions of code prompts")
    from zenlm.interop.load import load_run
    from zenlm.infer import generate

    loaded = load_run(run)
    samples = [(p, generate(loaded.model, loaded.tokenizer, p, max_new_tokens=96, seed=cfg.seed,
                            **SAMPLING)) for p in CODE_PROMPTS]
    log("[4/4] writing the report")
    report = render_report(cfg, corpus_label, manifest, summary, samples, time.time() - t0)
    atomic_write_text(run / "report.md", report)
    log(f"report: {run / 'report.md'}")
    for prompt, completion in samples[:2]:
        log("-" * 60 + "\n" + prompt + completion)
    return run


def render_report(cfg: SpeedrunConfig, corpus: str, manifest: dict, summary: dict,
                  samples: list[tuple[str, str]], seconds: float) -> str:
    val = summary.get("val") or {}
    config = json.loads(json.dumps(asdict(cfg)))
    lines = [
        f"# zenlm speedrun: {Path(summary['run']).name}",
        "",
        f"- corpus: {corpus}",
        f"- tokens in corpus: {manifest['train_tokens']:,} train / {manifest['val_tokens']:,} val "
        f"(vocabulary {manifest['vocab_size']:,}, split by {manifest['val_split']})",
        f"- model: {summary.get('shape', '')}",
        f"- parameters: {summary['params']:,} ({summary['params_non_embedding']:,} non-embedding)",
        f"- steps: {summary['step']:,}; tokens seen: {summary['tokens']:,}",
        f"- training time: {summary['train_seconds']:.0f} s; throughput: {summary['tok_per_s']:,.0f} tokens/s "
        f"({summary['threads']} threads, {summary.get('dtype', 'fp32')})",
        f"- final val: loss {val.get('val_loss', float('nan')):.4f}, perplexity {val.get('val_ppl', float('nan')):.2f}, "
        f"**bits-per-byte {val.get('val_bpb', float('nan')):.4f}**",
        f"- wall time, all stages: {seconds:.0f} s",
        "",
        "![loss curve](loss.png)",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(config, indent=2),
        "```",
        "",
        "Full run config: `config.yaml`; metrics: `metrics.jsonl`.",
        "",
        f"## Samples ({', '.join(f'{k} {v}' for k, v in SAMPLING.items())})",
        "",
    ]
    for prompt, completion in samples:
        lines += ["```python", prompt + completion, "```", ""]
    return "\n".join(lines)
