"""The one training loop: pretraining today, fine-tuning tomorrow, under one process or torchrun.

It owns the things every run needs and that are easy to get subtly wrong: the LR schedule fitted
to a step count or a wall-clock budget, gradient accumulation without needless DDP syncs,
clipping, checkpoints a crash cannot corrupt, exact resumption (optimizer, schedule, RNG and data
position are all restored), metrics as JSONL, a progress bar and a loss-curve PNG.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch

from zenlm.checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint, save_checkpoint
from zenlm.data.loader import TokenShards
from zenlm.errors import CheckpointError, ConfigError
from zenlm.eval.perplexity import evaluate_batches
from zenlm.model import Transformer
from zenlm.tokenizer import Tokenizer
from zenlm.train.config import RunConfig
from zenlm.train.distributed import World, gather_objects, mean_across, setup, teardown
from zenlm.train.optim import lr_at, make_adamw


class StopRequest:
    """First Ctrl-C: finish the current step, checkpoint, exit cleanly. Second: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _sync_progress(world: World, progress: float, stop: bool) -> tuple[float, bool]:
    """Every rank must agree on the LR and on when to stop, or DDP diverges or hangs."""
    if not world.distributed:
        return progress, stop
    import torch.distributed as dist

    t = torch.tensor([progress, float(stop)], dtype=torch.float64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0]), bool(t[1])


def _truncate_metrics(path: Path, step: int) -> None:
    """After a crash the log may run past the last checkpoint; drop what will be redone."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def pretrain(cfg: RunConfig, *, resume: bool = False, log=print) -> dict:
    """Train ``cfg.model`` on ``cfg.data``; returns a summary (also in the run folder)."""
    world = setup(cfg.train.device)
    try:
        return _run(cfg, world, resume, log if world.is_main else (lambda *a, **k: None))
    finally:
        teardown(world)


def _run(cfg: RunConfig, world: World, resume: bool, log) -> dict:
    tc = cfg.train
    run = Path(tc.out_dir)
    data = TokenShards(cfg.data.path) if cfg.data.path else None
    if data is None:
        raise ConfigError("data.path is not set: point it at a folder written by `zenlm prepare`")
    tokenizer = Tokenizer.load(data.dir / "tokenizer.json")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size}")
    seq_len = tc.seq_len or cfg.model.max_seq_len
    if seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"train.seq_len={seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")

    ckpt = latest_checkpoint(run)
    if resume and ckpt is None:
        raise CheckpointError(f"nothing to resume: {run} has no finished checkpoint")
    if not resume and ckpt is not None:
        raise CheckpointError(f"{run} already holds a run; pass --resume to continue it, "
                              f"or set train.out_dir to a new folder")
    config_dict = asdict(cfg)
    metrics_path = run / "metrics.jsonl"
    if world.is_main:
        run.mkdir(parents=True, exist_ok=True)
        import yaml

        atomic_write_text(run / "config.yaml", yaml.safe_dump(config_dict, sort_keys=False))
        tokenizer.save(run / "tokenizer.json")

    device = world.device
    torch.manual_seed(tc.seed)
    model = Transformer(cfg.model).to(device)
    model.activation_checkpointing = tc.activation_checkpointing
    optimizer = make_adamw(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, device)
    gen = torch.Generator()
    gen.manual_seed(tc.seed + 1000 * world.rank)
    step, tokens, elapsed_before = 0, 0, 0.0
    if resume:
        weights, state, _ = load_checkpoint(ckpt)
        if state is None:
            raise CheckpointError(f"checkpoint {ckpt} has no training state (state.pt) to resume from")
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        if len(state["data_rng"]) != world.size:
            raise CheckpointError(f"{run} was trained with {len(state['data_rng'])} processes; "
                                  f"resume it with the same number (got {world.size})")
        gen.set_state(state["data_rng"][world.rank])
        torch.set_rng_state(state["torch_rng"])
        step, tokens, elapsed_before = state["step"], state["tokens"], state["elapsed"]
        if world.is_main:
            _truncate_metrics(metrics_path, step)
        log(f"resuming {run} from step {step} ({tokens:,} tokens)")

    n_params, n_non_emb = model.num_params(), model.num_params(non_embedding=True)
    log(f"model: {n_params / 1e6:.2f}M parameters ({n_non_emb / 1e6:.2f}M non-embedding); "
        f"{world.size} process(es) on {device}, {torch.get_num_threads()} threads each")
    train_model = torch.compile(model) if tc.compile else model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[world.local_rank] if device.startswith("cuda") else None)

    device_type = "cuda" if device.startswith("cuda") else "cpu"
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=tc.dtype == "bf16")
    tokens_per_step = tc.batch_size * seq_len * tc.grad_accum * world.size
    token_bytes = tokenizer.token_byte_lengths()
    metrics = open(metrics_path, "a") if world.is_main else None

    def emit(record: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def evaluate() -> dict:
        res = evaluate_batches(model, data.val_batches(tc.batch_size, seq_len, tc.eval_batches),
                               token_bytes, device)
        rec = {"step": step, "tokens": tokens, "val_loss": res.loss, "val_ppl": res.perplexity,
               "val_bpb": res.bits_per_byte}
        emit(rec)
        return rec

    def checkpoint() -> None:
        rngs = gather_objects(world, gen.get_state())
        if world.is_main:
            state = {"optimizer": optimizer.state_dict(), "step": step, "tokens": tokens,
                     "elapsed": elapsed_before + time.time() - t_start, "data_rng": rngs,
                     "torch_rng": torch.get_rng_state()}
            save_checkpoint(run, step, model.state_dict(), state, config_dict, keep_last=tc.keep_last)

    def progress_of(elapsed: float) -> float:
        p = step / tc.max_steps if tc.max_steps else 0.0
        if tc.max_minutes:
            p = max(p, elapsed / (tc.max_minutes * 60))
        return p

    bar = None
    if world.is_main and tc.progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.max_steps, initial=step, unit="step", dynamic_ncols=True,
                   disable=None, leave=True)
    last_eval = None
    t_start = time.time()
    t_log, tokens_log = t_start, tokens
    saved_at = step if resume else -1
    train_model.train()
    with StopRequest() as stop, (metrics or contextlib.nullcontext()):
        while True:
            elapsed = elapsed_before + time.time() - t_start
            progress, stopping = _sync_progress(world, progress_of(elapsed), stop.requested)
            if progress >= 1.0 or stopping:
                break
            lr = lr_at(progress, step, lr=tc.lr, min_lr_ratio=tc.min_lr_ratio,
                       warmup_steps=tc.warmup_steps, warmup_frac=tc.warmup_frac,
                       max_steps=tc.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss_sum = torch.zeros((), device=device)
            for micro in range(tc.grad_accum):
                x, y = data.train_batch(tc.batch_size, seq_len, gen)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                # Only the last micro-batch all-reduces gradients under DDP.
                sync = contextlib.nullcontext()
                if world.distributed and micro < tc.grad_accum - 1:
                    sync = train_model.no_sync()
                with sync:
                    with autocast:
                        loss = train_model(x, y) / tc.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += tokens_per_step

            if step % tc.log_every == 0 or step == 1:
                loss_val = mean_across(world, float(loss_sum))
                now = time.time()
                tps = (tokens - tokens_log) / max(now - t_log, 1e-9)
                t_log, tokens_log = now, tokens
                elapsed = elapsed_before + now - t_start
                emit({"step": step, "tokens": tokens, "loss": loss_val, "lr": lr,
                      "tok_per_s": tps, "elapsed": elapsed})
                if bar is not None:
                    left = _time_left(tc, step, elapsed)
                    bar.set_postfix_str(f"loss {loss_val:.3f} | {tps:,.0f} tok/s | {left} left")
            if bar is not None:
                bar.update(1)
            if tc.eval_every and step % tc.eval_every == 0 and world.is_main:
                last_eval = evaluate()
                log_eval = f"step {step}: val loss {last_eval['val_loss']:.4f}, bpb {last_eval['val_bpb']:.4f}"
                (bar.write if bar is not None else log)(log_eval)
            if tc.ckpt_every and step % tc.ckpt_every == 0:
                checkpoint()
                saved_at = step
        train_seconds = elapsed_before + time.time() - t_start
        if bar is not None:
            bar.close()
        if stop.requested:
            log(f"stopped by request at step {step}; checkpoint written, resume with --resume")
        if world.is_main and (last_eval is None or last_eval["step"] != step) and step > 0:
            last_eval = evaluate()
        if saved_at != step and step > 0:
            checkpoint()

    summary = {}
    if world.is_main:
        from zenlm.explain.plots import plot_loss

        plot_loss(metrics_path, run / "loss.png", title=run.name)
        summary = {
            "run": str(run), "step": step, "tokens": tokens, "train_seconds": round(train_seconds, 1),
            "tok_per_s": tokens / max(train_seconds, 1e-9), "params": n_params,
            "params_non_embedding": n_non_emb, "world_size": world.size,
            "threads": torch.get_num_threads(), "val": last_eval,
        }
        atomic_write_text(run / "summary.json", json.dumps(summary, indent=2))
        if last_eval:
            log(f"done: {step} steps, {tokens:,} tokens in {train_seconds:.0f}s; "
                f"val loss {last_eval['val_loss']:.4f}, ppl {last_eval['val_ppl']:.2f}, "
                f"bpb {last_eval['val_bpb']:.4f}")
    return summary


def _time_left(tc, step: int, elapsed: float) -> str:
    rate = elapsed / max(step, 1)
    left = []
    if tc.max_steps:
        left.append((tc.max_steps - step) * rate)
    if tc.max_minutes:
        left.append(tc.max_minutes * 60 - elapsed)
    s = max(0, int(min(left)))
    return f"{s // 60}:{s % 60:02d}"
