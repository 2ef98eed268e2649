"""``model.size: auto``: the model that learns most in a wall-clock budget on this machine.

One dial sets the shape, the depth (:func:`zenlm.config.depth_shape`: ``depth`` blocks of
width ``64 * depth``); batch and learning rate follow from it. The depth itself follows from the
budget and a measured speed: a couple of real training steps (forward, backward, AdamW) are
timed for growing depths, each depth's tokens in the budget are predicted from its rate, and the
largest depth that still sees :data:`TOKENS_PER_PARAM` tokens per parameter wins. Timing real
steps, not counting FLOPs, is what makes the choice fit the machine: the same FLOPs run at very
different speeds on different CPUs and GEMM libraries, and on small shapes overheads dominate.

A depth too large for its budget sees too few tokens; one too small saturates. Chinchilla's
compute-optimal ~20 tokens per parameter holds for large models; on minute-long CPU budgets no
depth gets near it, and the question is only which under-trained model is less so. Short runs
on a 2-core CPU kept favouring the smaller depth well below that ratio (the README has them),
so the target is set from those runs, not from the paper.

Only fields the recipe leaves out are chosen: a shape field, ``train.batch_size`` or
``train.lr`` set in the recipe or by ``--set`` is kept as given, and the measurement uses it.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from zenlm.config import TransformerConfig, depth_shape
from zenlm.errors import ConfigError

# The largest depth still seeing this many tokens per parameter wins; set between the ratios
# of the winner and the loser of 3-minute runs on an idle machine (README, "Speed and
# quality": depth 2 saw ~10 tokens per parameter and won, depth 3 ~1.4 and lost).
TOKENS_PER_PARAM = 4.0
MIN_DEPTH, MAX_DEPTH = 2, 16
CONTEXT = 128  # tokens per sequence: enough for minute-long budgets, cheap attention
BATCH_TOKENS = 4096  # tokens per optimizer step
# AdamW peak LR at width 192; others take lr * sqrt(192/d) (width 128: ~2e-3, which beat
# 3e-3, ~5e-3 and 1e-2 in the 3-minute runs, the first by little)
BASE_LR, BASE_WIDTH = 1.6e-3, 192
USABLE = 0.95  # of the budget, what training steps get (the rest: logging, the final eval)
MEASURE_STEPS = 2  # timed steps per candidate, after one untimed (allocator and caches warm up)

SHAPE_KEYS = ("n_layer", "d_model", "n_head", "n_kv_head")

# The speedrun trains its own tokenizer, so it can choose the vocabulary too. A larger one packs
# more bytes into each token, but in a model this small its embedding and head are most of the
# work of a step: in equal *time* (3 minutes, idle machine) 512 beat 1024, which beat 4096,
# though at equal steps the order was the reverse. Longer budgets train wider models, whose
# embeddings are a smaller share, so they get more (those two steps are not yet measured).
# (budget minutes up to, vocabulary)
VOCAB_BY_MINUTES = ((10.0, 512), (60.0, 4096), (float("inf"), 8192))


def vocab_for(minutes: float) -> int:
    """The tokenizer size for a budget (the speedrun's; pretraining reads its data's)."""
    return next(v for limit, v in VOCAB_BY_MINUTES if minutes <= limit)


def lr_for(d_model: int) -> float:
    """AdamW's peak LR shrinks as the model widens (the 1/sqrt(width) rule nanochat uses)."""
    return BASE_LR * (BASE_WIDTH / d_model) ** 0.5


def candidate(model: dict[str, Any], depth: int, context: int = CONTEXT) -> dict[str, Any]:
    """The model fields at ``depth``: the dial's shape where the recipe set none."""
    return {**depth_shape(depth), "max_seq_len": context, **model}


def count_params(model_fields: dict[str, Any]) -> int:
    """Parameters of the model (tied embeddings once), built on the meta device: no memory."""
    import torch

    from zenlm.model import Transformer

    with torch.device("meta"):
        m = Transformer(TransformerConfig(**model_fields))
    return sum(p.numel() for p in m.parameters())


def measure_tok_per_s(model_fields: dict[str, Any], batch_size: int, seq_len: int, lr: float,
                      device: str = "cpu", dtype: str = "fp32", steps: int = MEASURE_STEPS) -> float:
    """Training tokens per second of this shape here: real steps on random tokens."""
    import torch

    from zenlm.model import Transformer
    from zenlm.train.optim import make_adamw

    cfg = TransformerConfig(**model_fields)
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # the run's own seeded init must not see this
        torch.manual_seed(0)
        model = Transformer(cfg).to(device)
    opt = make_adamw(model, lr, 0.1, (0.9, 0.95), 1e-8, device)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=gen).to(device)
    autocast = torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16,
                              enabled=dtype == "bf16")

    def step() -> None:
        with autocast:
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch_size * seq_len * steps / (time.perf_counter() - t)


def choose(budget_s: float, model: dict[str, Any], train: dict[str, Any], *,
           device: str = "cpu", dtype: str = "fp32",
           measure: Callable[..., float] | None = None) -> dict[str, Any]:
    """The plan for ``budget_s`` seconds: the depth, the fields it sets, and what was measured.

    Depths are tried from small to large and the search stops at the first one under the
    tokens-per-parameter target, so a larger budget never picks a smaller depth (given the same
    rates) and the probe costs a few seconds, not one per possible depth."""
    measure = measure or measure_tok_per_s
    tried: list[dict[str, Any]] = []
    chosen = None
    for depth in range(MIN_DEPTH, MAX_DEPTH + 1):
        fields = candidate(model, depth, int(train.get("seq_len") or CONTEXT))
        seq_len = int(train.get("seq_len") or fields["max_seq_len"])
        batch = int(train.get("batch_size") or max(1, BATCH_TOKENS // seq_len))
        lr = float(train.get("lr") or lr_for(fields["d_model"]))
        params = count_params(fields)
        rate = float(measure(fields, batch, seq_len, lr, device, dtype))
        tokens = rate * budget_s * USABLE
        row = {"depth": depth, "params": params, "tok_per_s": round(rate, 1),
               "tokens": int(tokens), "tokens_per_param": round(tokens / params, 2)}
        tried.append(row)
        if tokens / params < TOKENS_PER_PARAM and chosen is not None:
            break
        chosen = (depth, fields, batch, seq_len, lr, row)
        if tokens / params < TOKENS_PER_PARAM:  # even the smallest depth is short of the target
            break
    depth, fields, batch, seq_len, lr, row = chosen
    return {"budget_minutes": round(budget_s / 60, 4), "depth": depth,
            "tokens_per_param_target": TOKENS_PER_PARAM, "chosen": row, "tried": tried,
            "model": {k: fields[k] for k in (*SHAPE_KEYS, "max_seq_len") if k not in model},
            "train": {k: v for k, v in (("batch_size", batch), ("lr", lr)) if k not in train}}


def fit_to_budget(raw: dict[str, Any], *, log=print,
                  measure: Callable[..., float] | None = None) -> dict[str, Any]:
    """``raw`` (model section already holding switches and vocab) with the chosen fields filled
    in and the plan under ``auto``; logs the choice in two lines."""
    from zenlm.config import merge
    from zenlm.hardware import resolve_dtype

    train = dict(raw.get("train") or {})
    model = dict(raw.get("model") or {})
    minutes = train.get("max_minutes")
    if not minutes:
        raise ConfigError("model.size=auto fits the model to a wall-clock budget: set "
                          "train.max_minutes (or choose a size: tiny, small, base or a depth)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("model.size=auto times this process's steps; under torchrun every rank "
                          "must build the same model, so give model.size (a name or a depth)")
    if "vocab_size" not in model:
        raise ConfigError("model.size=auto needs the vocabulary: set data.path to prepared data "
                          "or model.vocab_size")
    import torch

    device = train.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(str(train.get("dtype", "fp32")), device)
    plan = choose(float(minutes) * 60, model, train, device=device, dtype=dtype, measure=measure)
    row = plan["chosen"]
    shape = {**model, **plan["model"]}
    rates = ", ".join(f"depth {r['depth']} {r['tok_per_s']:,.0f}" for r in plan["tried"])
    log(f"auto size: measured tok/s {rates} ({torch.get_num_threads()} threads, {device}, {dtype})")
    log(f"auto size: depth {plan['depth']} = {shape['n_layer']} layers x {shape['d_model']}, "
        f"{shape['n_head']} heads ({shape['n_kv_head']} kv), context {shape['max_seq_len']}, "
        f"batch {train.get('batch_size') or plan['train'].get('batch_size')}, "
        f"lr {float(train.get('lr') or plan['train'].get('lr')):.2g}: {row['params'] / 1e6:.2f}M params, "
        f"~{row['tokens'] / 1e6:.1f}M tokens in {float(minutes):g} min "
        f"({row['tokens_per_param']:.2g} tokens/param; target {TOKENS_PER_PARAM:g})")
    out = merge(raw, {"model": plan["model"], "train": plan["train"]})
    out["auto"] = plan
    return out


__all__ = ["choose", "fit_to_budget", "measure_tok_per_s", "lr_for", "vocab_for", "TOKENS_PER_PARAM"]
