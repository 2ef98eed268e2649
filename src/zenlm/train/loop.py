"""The one training loop: pretraining and fine-tuning alike, under one process or torchrun.

What is trained comes from a :class:`~zenlm.train.task.Task` (model, batches, loss,
evaluation); the loop owns the things every run needs and that are easy to get subtly wrong: the LR schedule fitted
to a step count or a wall-clock budget, gradient accumulation without needless DDP syncs,
clipping, checkpoints a crash cannot corrupt, exact resumption (optimizer, schedule, RNG and data
position are all restored), early stopping on a val metric, metrics as JSONL, a progress bar
and a loss-curve PNG.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import torch

from zenlm.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from zenlm.errors import CheckpointError, ConfigError
from zenlm.hardware import resolve_dtype
from zenlm.io import atomic_write_json, atomic_write_text
from zenlm.model.linear import cpu_backend
from zenlm.train.config import RunConfig, TrainConfig
from zenlm.train.distributed import World, barrier, gather_objects, mean_across, setup, teardown
from zenlm.train.optim import lr_at, make_adamw
from zenlm.train.task import Task


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
    from zenlm.train.task import LMTask, MLMTask

    world = setup(cfg.train.device)
    try:
        quiet = log if world.is_main else (lambda *a, **k: None)
        if cfg.model.encoder_layers:  # an encoder-decoder trains on sentence pairs
            from zenlm.train.seq2seq import Seq2SeqTask

            task = Seq2SeqTask(cfg)
        else:
            task = LMTask(cfg) if cfg.model.causal else MLMTask(cfg)  # an encoder learns masked tokens
        summary = _run(task, cfg.train, world, resume, quiet)
        barrier(world)  # leave together (not after an error: the other rank may be gone)
        return summary
    finally:
        teardown(world)


def train(task: Task, tc: TrainConfig, *, resume: bool = False, log=print) -> dict:
    """Train any task (classification, chat SFT, ...) with the same loop as pretraining."""
    world = setup(tc.device)
    try:
        summary = _run(task, tc, world, resume, log if world.is_main else (lambda *a, **k: None))
        barrier(world)
        return summary
    finally:
        teardown(world)


def _minimize(metric: str) -> bool:
    return metric.endswith(("loss", "ppl", "bpb"))


def _run(task: Task, tc: TrainConfig, world: World, resume: bool, log) -> dict:
    run = Path(tc.out_dir)
    ckpt = latest_checkpoint(run)
    if resume and ckpt is None:
        raise CheckpointError(f"nothing to resume: {run} has no finished checkpoint")
    if not resume and ckpt is not None:
        raise CheckpointError(f"{run} already holds a run; pass --resume to continue it, "
                              f"or set train.out_dir to a new folder")
    metrics_path = run / "metrics.jsonl"
    device = world.device
    torch.manual_seed(tc.seed)
    model = task.build(world)
    groups = task.param_groups(model, tc)
    optimizer = make_adamw(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, device,
                           groups=groups)
    # DP-SGD (train.dp): per-example gradients, clipped and noised per logical batch (privacy/)
    from zenlm.privacy.dp import private_training

    dp = private_training(model, task, tc, world, log)
    config_dict = task.config_dict()
    if world.is_main:
        run.mkdir(parents=True, exist_ok=True)
        import yaml

        atomic_write_text(run / "config.yaml", yaml.safe_dump(config_dict, sort_keys=False))
        task.save_files(run)

    key = None
    if tc.encrypt_key_file:
        from zenlm.crypt import read_key_file

        key = read_key_file(tc.encrypt_key_file)
    gen = torch.Generator()
    gen.manual_seed(tc.seed + 1000 * world.rank)
    step, tokens, elapsed_before = 0, 0, 0.0
    metric = tc.early_stop_metric or task.metric
    best: dict = {"metric": metric, "value": None, "step": None, "bad_evals": 0}
    best_weights: dict | None = None
    if resume:
        weights, state, _ = load_checkpoint(ckpt, key=key)
        if state is None:
            raise CheckpointError(f"checkpoint {ckpt} has no training state (state.pt) to resume from")
        task.load_weights(model, weights)
        optimizer.load_state_dict(state["optimizer"])
        if len(state["data_rng"]) != world.size:
            raise CheckpointError(f"{run} was trained with {len(state['data_rng'])} processes; "
                                  f"resume it with the same number (got {world.size})")
        gen.set_state(state["data_rng"][world.rank])
        torch.set_rng_state(state["torch_rng"])
        step, tokens, elapsed_before = state["step"], state["tokens"], state["elapsed"]
        task.load_state_dict((state.get("task") or [{}] * world.size)[world.rank])
        best.update(state.get("best") or {})
        best_weights = state.get("best_weights")
        if dp is not None:
            dp.load_state_dict(state.get("dp") or {})
        if world.is_main:
            _truncate_metrics(metrics_path, step)
        log(f"resuming {run} from step {step} ({tokens:,} tokens)")

    n_params = sum(p.numel() for p in model.parameters())
    n_emb = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("tok_emb.weight", "pos_emb.weight")))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable = "" if n_train == n_params else f"; {n_train / 1e6:.3f}M trainable"
    dtype = resolve_dtype(tc.dtype, device)
    log(f"model: {n_params / 1e6:.2f}M parameters ({(n_params - n_emb) / 1e6:.2f}M non-embedding"
        f"{trainable}); {world.size} process(es) on {device}, {torch.get_num_threads()} threads "
        f"each, {dtype}" + (" (dtype auto)" if tc.dtype == "auto" else "")
        # chosen before any torch.compile: a compiled graph cannot time the probe itself
        + (f"; fp32 products via {cpu_backend()}" if device == "cpu" and dtype == "fp32" else ""))
    if (about := task.describe()) is not None:
        log(about)
    if dp is not None:
        log(dp.describe())
    train_model = torch.compile(model) if tc.compile else model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[world.local_rank] if device.startswith("cuda") else None)

    device_type = "cuda" if device.startswith("cuda") else "cpu"
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    metrics = open(metrics_path, "a") if world.is_main else None

    def emit(record: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def evaluate() -> dict:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            res = task.evaluate(model)
        model.train(was_training)
        rec = {"step": step, "tokens": tokens, **res}
        if dp is not None:
            rec["epsilon"] = dp.epsilon()
            rec.update(dp.clipping())
        emit(rec)
        return rec

    def eval_line(rec: dict) -> str:
        line = task.eval_line(rec)
        if "epsilon" in rec:
            line += f"; epsilon {rec['epsilon']:.3f}"
        if "clipped" in rec:
            line += (f" (gradients clipped: {rec['clipped']:.0%} of examples, median norm "
                     f"{rec['grad_norm_median']:.3g})")
        return line

    def track_best(rec: dict) -> bool:
        """Update the best value of the early-stopping metric; True when patience ran out."""
        nonlocal best_weights
        if not tc.early_stop_patience:
            return False
        if metric not in rec:
            raise ConfigError(f"train.early_stop_metric={metric!r} is not among the evaluation's "
                              f"metrics ({', '.join(k for k in rec if k.startswith('val_'))})")
        value = rec[metric]
        better = best["value"] is None or (value < best["value"] if _minimize(metric) else value > best["value"])
        if better:
            best.update(value=value, step=rec["step"], bad_evals=0)
            best_weights = {k: v.detach().to("cpu", copy=True)
                            for k, v in task.checkpoint_weights(model).items()}
        else:
            best["bad_evals"] += 1
        return best["bad_evals"] >= tc.early_stop_patience

    def checkpoint() -> None:
        gathered = gather_objects(world, (gen.get_state(), task.state_dict()))  # one collective
        rngs, task_states = [g[0] for g in gathered], [g[1] for g in gathered]
        if world.is_main:
            state = {"optimizer": optimizer.state_dict(), "step": step, "tokens": tokens,
                     "elapsed": elapsed_before + time.time() - t_start, "data_rng": rngs,
                     "torch_rng": torch.get_rng_state(), "task": task_states}
            if dp is not None:
                state["dp"] = dp.state_dict()
            if tc.early_stop_patience:
                state["best"] = dict(best)
                state["best_weights"] = best_weights
            save_checkpoint(run, step, task.checkpoint_weights(model), state, config_dict,
                            keep_last=tc.keep_last, key=key)

    def progress_of(elapsed: float) -> float:
        p = step / tc.max_steps if tc.max_steps else 0.0
        if tc.max_minutes:
            p = max(p, elapsed / (tc.max_minutes * 60))
        return p

    last_eval = None
    patience_out = False
    budget_out = False
    if tc.eval_at_start and step == 0 and world.is_main:
        last_eval = evaluate()
        patience_out = track_best(last_eval)
        log(eval_line(last_eval))
    bar = None
    if world.is_main and tc.progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.max_steps, initial=step, unit="step", dynamic_ncols=True,
                   disable=None, leave=True)
    t_start = time.time()
    t_log, tokens_log = t_start, tokens
    saved_at = step if resume else -1
    train_model.train()
    with StopRequest() as stop, (metrics or contextlib.nullcontext()):
        while True:
            elapsed = elapsed_before + time.time() - t_start
            budget_out = dp is not None and dp.exhausted()
            progress, stopping = _sync_progress(world, progress_of(elapsed),
                                                stop.requested or patience_out or budget_out)
            if progress >= 1.0 or stopping:
                break
            lr = lr_at(progress, step, lr=tc.lr, min_lr_ratio=tc.min_lr_ratio,
                       warmup_steps=tc.warmup_steps, warmup_frac=tc.warmup_frac,
                       max_steps=tc.max_steps, schedule=tc.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss_sum = torch.zeros((), device=device)
            step_tokens = 0
            if dp is not None:  # a Poisson-sampled logical batch, noised gradients in p.grad
                loss_sum, step_tokens = dp.step(gen, autocast, device)
            for micro in range(tc.grad_accum if dp is None else 0):
                batch = task.to_device(task.train_batch(gen), device)
                step_tokens += task.batch_tokens(batch)
                # Only the last micro-batch all-reduces gradients under DDP.
                sync = contextlib.nullcontext()
                if world.distributed and micro < tc.grad_accum - 1:
                    sync = train_model.no_sync()
                with sync:
                    with autocast:
                        loss = task.loss(train_model, batch) / tc.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
            if tc.grad_clip > 0 and dp is None:  # DP clips each example instead
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                               tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += step_tokens * world.size

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
                patience_out = track_best(last_eval)
                (bar.write if bar is not None else log)(eval_line(last_eval))
            if tc.ckpt_every and step % tc.ckpt_every == 0:
                checkpoint()
                saved_at = step
        train_seconds = elapsed_before + time.time() - t_start
        if bar is not None:
            bar.close()
        if stop.requested:
            log(f"stopped by request at step {step}; checkpoint written, resume with --resume")
        elif budget_out and progress < 1.0:
            log(f"privacy budget reached at step {step}: epsilon {dp.epsilon():.3f} of "
                f"{tc.dp.epsilon:g}; checkpoint written")
        elif patience_out:
            log(f"early stop at step {step}: {metric} has not improved for "
                f"{tc.early_stop_patience} evaluations")
        if world.is_main and (last_eval is None or last_eval["step"] != step) and step > 0:
            last_eval = evaluate()
            track_best(last_eval)
        if tc.early_stop_patience:
            # only rank 0 knows the best weights: every rank writes the final checkpoint (a
            # collective) whether or not rank 0 restores them
            saved_at = -1
            if world.is_main and best_weights is not None and best["step"] != step:
                task.load_weights(model, best_weights)  # the run ends with its best weights
                log(f"restored the weights of step {best['step']} (best {metric} {best['value']:.4f})")
                last_eval = {**evaluate(), "restored_from_step": best["step"]}
        if saved_at != step and step > 0:
            checkpoint()

    summary = {}
    if world.is_main:
        from zenlm.explain.plots import plot_loss

        plot_loss(metrics_path, run / "loss.png", title=run.name)
        summary = {
            "run": str(run), "task": task.name, "step": step, "tokens": tokens,
            "train_seconds": round(train_seconds, 1),
            "tok_per_s": tokens / max(train_seconds, 1e-9), "params": n_params,
            "params_non_embedding": n_params - n_emb, "params_trainable": n_train,
            "world_size": world.size, "threads": torch.get_num_threads(), "dtype": dtype, "val": last_eval,
        }
        if tc.early_stop_patience:
            summary["best"] = dict(best)
        if dp is not None:
            summary["privacy"] = dp.summary()
            dp.close()  # hooks off before the task writes its files (adapter, export)
        summary.update(task.finish(model, run, last_eval))
        atomic_write_json(run / "summary.json", summary)
        from zenlm.privacy.card import write_run_card

        write_run_card(run, task.name, config_dict, summary, log=log, **task.card_fields())
        if last_eval:
            log(f"done: {step} steps, {tokens:,} tokens in {train_seconds:.0f}s; "
                f"{task.done_line(last_eval)}")
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
