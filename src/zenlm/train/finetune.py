"""Fine-tuning: a classification head or chat SFT on a loaded model, LoRA or full, trained by
the one loop (``loop.train``) through a task object.

A fine-tune run folder holds ``config.yaml`` (this config, plus the optimizer's parameter
groups and the class labels), ``tokenizer/`` (a Hugging Face tokenizer folder, chat template
included), ``metrics.jsonl``, ``summary.json``, ``loss.png``, ``checkpoints/`` (only the tensors
that train: adapters and head, or the unfrozen part of the model) and, for classification,
``confusion.png``; LoRA runs also write ``adapter/`` in PEFT's format. ``zenlm.load(run)`` loads
the base model named in the config and applies the latest checkpoint.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from zenlm.config import build, load_yaml, merge, parse_overrides
from zenlm.errors import ConfigError, DataError
from zenlm.model.lora import LoRAConfig
from zenlm.privacy.config import CanaryConfig
from zenlm.train.config import TrainConfig
from zenlm.train.task import Task, load_partial, trainable_weights

DERIVED = ("param_groups", "labels")  # written into config.yaml for the record, recomputed on load


@dataclass
class FinetuneData:
    train: str = ""
    val: str | None = None  # None: carve val_fraction of train (at most val_max rows)
    format: str | None = None  # tsv | csv | jsonl; None: from the file name
    val_fraction: float = 0.1
    val_max: int | None = 1000
    max_examples: int | None = None  # use only the first N training examples
    max_len: int | None = None  # tokens per example; None: 256 (classify) / 512 (chat), capped by the model
    text_col: str = "text"  # classify
    label_col: str = "label"
    messages_field: str = "messages"  # chat: JSONL {"messages": [...]} ...
    prompt_field: str | None = None  # ... or a prompt/response pair of fields
    response_field: str | None = None
    system: str | None = None  # a system message put in front of every conversation
    pack: bool = True  # chat: several short conversations per row
    chat_template: str | None = None  # None: the model's own (or a plain one when it has none)


@dataclass
class FinetuneMethod:
    method: Literal["lora", "full"] = "lora"
    epochs: float | None = None  # None: 1 epoch unless train.max_steps or train.max_minutes say
    layer_decay: float = 1.0  # group lr = lr * layer_decay ** (layers from the top)
    freeze_embeddings: bool = False
    freeze_layers: int = 0  # the first N blocks do not train (and get no LoRA)
    class_weights: str = "none"  # none | balanced | w0,w1,... (in label order)
    pooling: Literal["auto", "last", "first", "mean", "pooler"] = "auto"
    eval_batch_size: int = 64


@dataclass
class FinetuneConfig:
    task: Literal["classify", "chat"] = "classify"
    base: str = ""  # what zenlm.load reads: run folder, HF folder, GGUF file, smollm2, hub id
    data: FinetuneData = field(default_factory=FinetuneData)
    finetune: FinetuneMethod = field(default_factory=FinetuneMethod)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    canaries: CanaryConfig = field(default_factory=CanaryConfig)  # chat: secrets for the memorisation audit
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=None, max_minutes=1e9))


# Fine-tuning defaults that differ from pretraining's (a user value always wins).
TRAIN_DEFAULTS = {"weight_decay": 0.0, "warmup_frac": 0.06, "eval_every": 0, "ckpt_every": 100,
                  "keep_last": 1, "log_every": 10}
LR_DEFAULTS = {"lora": 1e-3, "full": 5e-5}


def resolve_finetune(raw: dict[str, Any]) -> FinetuneConfig:
    """A FinetuneConfig from a nested dict (YAML + overrides), with fine-tuning defaults."""
    raw = merge({}, raw)
    for key in DERIVED:
        raw.pop(key, None)
    method = (raw.get("finetune") or {}).get("method", "lora")
    train = dict(raw.get("train") or {})
    for key, value in TRAIN_DEFAULTS.items():
        train.setdefault(key, value)
    train.setdefault("lr", LR_DEFAULTS.get(method, 1e-3))
    task = raw.get("task", "classify")
    train.setdefault("eval_at_start", task == "chat")
    train.setdefault("out_dir", f"runs/{task}-{time.strftime('%Y%m%d-%H%M%S')}")
    epochs = (raw.get("finetune") or {}).get("epochs")
    if "max_steps" not in train:
        # steps come from the epochs once the data is read; 1 is a placeholder until then
        train["max_steps"] = None if train.get("max_minutes") and epochs is None else 1
        if train["max_steps"] == 1 and epochs is None:
            raw.setdefault("finetune", {})["epochs"] = 1.0
    raw["train"] = train
    cfg = build(FinetuneConfig, raw)
    if cfg.base and Path(cfg.base).expanduser().exists():  # a path: keep it valid from anywhere
        cfg.base = str(Path(cfg.base).expanduser().resolve())
    if not cfg.base:
        raise ConfigError("base is not set: the model to fine-tune (a run folder, a Hugging Face "
                          "folder, a GGUF file, smollm2 or a hub id)")
    if not cfg.data.train:
        raise ConfigError("data.train is not set: the training file")
    if cfg.train.early_stop_patience and not cfg.train.eval_every:
        raise ConfigError("train.early_stop_patience needs train.eval_every (evaluations to compare)")
    return cfg


def load_finetune_config(recipe: str | None, overrides: list[str] | None = None,
                         base: dict[str, Any] | None = None) -> FinetuneConfig:
    raw = merge(base or {}, load_yaml(recipe) if recipe else {})
    return resolve_finetune(merge(raw, parse_overrides(overrides or [])))


# ----------------------------------------------------------------------------------------------
# the tasks


class _FinetuneTask(Task):
    """What classification and chat share: the base model, the adaptation, the run folder."""

    def __init__(self, cfg: FinetuneConfig, base, log=print):
        if base.tokenizer is None:
            raise ConfigError(f"{cfg.base} has no tokenizer to encode the data with")
        self.cfg, self.base, self.tokenizer, self.log = cfg, base, base.tokenizer, log
        mc = base.model.config
        default_len = 256 if cfg.task == "classify" else 512
        self.max_len = min(cfg.data.max_len or default_len, mc.max_seq_len)
        self.pad_id = self.tokenizer.eot_id if self.tokenizer.eot_id is not None else 0
        self.groups_desc: list[dict] = []
        self.labels: list[str] | None = None
        self.model: nn.Module | None = None
        self.device = "cpu"

    def build(self, world) -> nn.Module:
        from zenlm.model.adapt import adapt

        f = self.cfg.finetune
        self.device = world.device
        backbone = self.base.model.to(self.device)
        backbone.activation_checkpointing = self.cfg.train.activation_checkpointing
        self.model = adapt(backbone, task=self.cfg.task, labels=self.labels, pooling=f.pooling,
                           method=f.method, lora=self.cfg.lora, freeze_embeddings=f.freeze_embeddings,
                           freeze_layers=f.freeze_layers).to(self.device)
        self._build_data(world)
        return self.model

    def _build_data(self, world) -> None:
        raise NotImplementedError

    def param_groups(self, model: nn.Module, tc) -> list[dict]:
        from zenlm.train.optim import describe_groups, param_groups

        groups = param_groups(model, tc.weight_decay, layer_decay=self.cfg.finetune.layer_decay,
                              n_layer=self.base.model.config.n_layer)
        if not any(g["params"] for g in groups):
            raise ConfigError("nothing to train: every parameter is frozen")
        self.groups_desc = describe_groups(groups)
        return groups

    def config_dict(self) -> dict[str, Any]:
        out = asdict(self.cfg)
        if self.labels is not None:
            out["labels"] = list(self.labels)
        out["param_groups"] = self.groups_desc
        return out

    def save_files(self, run: Path) -> None:
        self.tokenizer.save_hf_folder(run / "tokenizer")

    def checkpoint_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return trainable_weights(model)

    def card_fields(self) -> dict[str, Any]:
        return {"parent": self.cfg.base, "data": [p for p in (self.cfg.data.train, self.cfg.data.val) if p]}

    def load_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        load_partial(model, weights, "this checkpoint")

    def _save_adapter(self, model: nn.Module, run: Path) -> dict:
        if self.cfg.finetune.method != "lora":
            return {}
        if self.cfg.train.encrypt_key_file:  # a plaintext adapter would undo the encryption
            self.log("adapter/ not written: the checkpoints are encrypted (train.encrypt_key_file)")
            return {}
        from zenlm.errors import UnsupportedArchitectureError
        from zenlm.interop.peft import save_adapter

        try:
            path = save_adapter(model, run / "adapter", base=self.cfg.base, lora=self.cfg.lora)
        except UnsupportedArchitectureError as exc:
            self.log(f"adapter not written in PEFT's format: {exc}")
            return {}
        return {"adapter": str(path)}


class ClassifyTask(_FinetuneTask):
    name = "classify"
    metric = "val_accuracy"

    def __init__(self, cfg: FinetuneConfig, base, log=print):
        from zenlm.data.classify import (carve_val, class_weights, encode_texts, label_ids,
                                         label_names, read_labelled)

        super().__init__(cfg, base, log)
        d = cfg.data
        train = read_labelled(d.train, d.text_col, d.label_col, d.format)
        if d.val:
            val = read_labelled(d.val, d.text_col, d.label_col, d.format)
        else:
            tr, va = carve_val(len(train), d.val_fraction, d.val_max, cfg.train.seed)
            train, val = train.subset(tr), train.subset(va, f"{d.train} (held-out rows)")
        if d.max_examples:
            train = train.subset(list(range(min(d.max_examples, len(train)))))
        self.labels = label_names(train.labels)
        if len(self.labels) < 2:
            raise DataError(f"{d.train} has a single label ({self.labels[0]}): nothing to classify")
        self.val_rows = val
        self.train_y = label_ids(train.labels, self.labels, train.source)
        self.val_y = label_ids(val.labels, self.labels, val.source)
        self.train_ids = encode_texts(self.tokenizer, train.texts, self.max_len)
        self.val_ids = encode_texts(self.tokenizer, val.texts, self.max_len)
        w = class_weights(self.train_y, len(self.labels), cfg.finetune.class_weights)
        self.class_weights = None if w is None else torch.tensor(w, dtype=torch.float32)
        self.confusion: list[list[int]] | None = None
        self.sampler = None

    def save_files(self, run: Path) -> None:
        """The tokenizer, and the val rows as JSONL, so zero-shot, few-shot and fine-tuned
        scores can be compared on the very same examples (``zenlm eval --data RUN/val.jsonl``)."""
        from zenlm.data.tables import write_table

        super().save_files(run)
        d = self.cfg.data
        rows = [{d.text_col: t, d.label_col: y} for t, y in zip(self.val_rows.texts, self.val_rows.labels)]
        write_table(run / "val.jsonl", [d.text_col, d.label_col], rows)

    def describe(self) -> str:
        n_tok = sum(len(r) for r in self.train_ids)
        weights = "" if self.class_weights is None else \
            f"; class weights {', '.join(f'{w:.3g}' for w in self.class_weights.tolist())}"
        return (f"classify: {len(self.train_ids):,} train / {len(self.val_ids):,} val examples, "
                f"{len(self.labels)} classes ({', '.join(self.labels[:10])}), "
                f"{n_tok / max(len(self.train_ids), 1):.1f} tokens per example{weights}")

    def _build_data(self, world) -> None:
        from zenlm.data.batching import BucketSampler

        self.sampler = BucketSampler([len(r) for r in self.train_ids], self.cfg.train.batch_size,
                                     seed=self.cfg.train.seed, rank=world.rank, world=world.size)
        if self.class_weights is not None:
            self.class_weights = self.class_weights.to(world.device)

    def batches_per_epoch(self, world_size: int) -> int:
        from zenlm.data.batching import BucketSampler

        return BucketSampler([len(r) for r in self.train_ids], self.cfg.train.batch_size,
                             world=world_size).batches_per_epoch()

    def train_batch(self, gen: torch.Generator):
        from zenlm.data.batching import pad_rows

        idx = self.sampler.next()
        x, lengths = pad_rows([self.train_ids[i] for i in idx], self.pad_id)
        return x, lengths, torch.tensor([self.train_y[i] for i in idx], dtype=torch.int64)

    def batch_tokens(self, batch) -> int:
        return int(batch[1].sum())

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, lengths, y = batch
        return F.cross_entropy(model(x, lengths).float(), y, weight=self.class_weights)

    # DP-SGD (privacy/dp.py) draws its own examples, one per row, and needs one loss each
    def dp_examples(self) -> int:
        return len(self.train_ids)

    def dp_lengths(self) -> list[int]:
        return [len(r) for r in self.train_ids]

    def dp_batch(self, idx: list[int]):
        from zenlm.data.batching import pad_rows

        x, lengths = pad_rows([self.train_ids[i] for i in idx], self.pad_id)
        return x, lengths, torch.tensor([self.train_y[i] for i in idx], dtype=torch.int64)

    def example_losses(self, model: nn.Module, batch) -> torch.Tensor:
        x, lengths, y = batch
        return F.cross_entropy(model(x, lengths).float(), y, weight=self.class_weights, reduction="none")

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from zenlm.eval.classify import classify_ids, score

        probs = classify_ids(model, self.val_ids, batch_size=self.cfg.finetune.eval_batch_size,
                             pad_id=self.pad_id)
        gold = torch.tensor(self.val_y)
        loss = F.nll_loss(torch.log(probs.clamp_min(1e-12)), gold).item()
        res = score(self.val_y, probs.argmax(-1).tolist(), self.labels)
        self.confusion = res.confusion
        return {"val_loss": loss, "val_accuracy": res.accuracy, "val_macro_f1": res.macro_f1}

    def eval_line(self, rec: dict) -> str:
        return (f"step {rec['step']}: val loss {rec['val_loss']:.4f}, accuracy "
                f"{rec['val_accuracy']:.4f}, macro-F1 {rec['val_macro_f1']:.4f}")

    def done_line(self, rec: dict) -> str:
        return (f"val accuracy {rec['val_accuracy']:.4f}, macro-F1 {rec['val_macro_f1']:.4f}, "
                f"loss {rec['val_loss']:.4f}")

    def state_dict(self) -> dict:
        return self.sampler.state_dict() if self.sampler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def finish(self, model: nn.Module, run: Path, last_eval: dict | None) -> dict:
        from zenlm.explain.plots import plot_confusion

        out: dict = {"labels": self.labels, "n_train": len(self.train_ids), "n_val": len(self.val_ids),
                     "epochs": round(self.sampler.epochs_done, 3) if self.sampler else 0.0}
        if self.confusion is not None:
            plot_confusion(self.confusion, self.labels, run / "confusion.png",
                           title=f"{run.name}: val accuracy {last_eval['val_accuracy']:.3f}"
                           if last_eval else run.name)
            out["confusion"] = self.confusion
        out.update(self._save_adapter(model, run))
        return out


class ChatTask(_FinetuneTask):
    name = "chat"
    metric = "val_loss"

    def __init__(self, cfg: FinetuneConfig, base, log=print):
        from zenlm.data.chat import PLAIN_TEMPLATE, fit, read_conversations, render
        from zenlm.data.classify import carve_val

        super().__init__(cfg, base, log)
        d = cfg.data
        if d.chat_template:
            self.tokenizer.chat_template = d.chat_template
        elif not self.tokenizer.chat_template:
            self.tokenizer.chat_template = PLAIN_TEMPLATE
        kw = dict(messages_field=d.messages_field, prompt_field=d.prompt_field,
                  response_field=d.response_field, system=d.system)
        train = read_conversations(d.train, **kw)
        self.canaries: list[dict] = []
        if cfg.canaries.n:
            from zenlm.privacy.canaries import make_canaries, plant

            self.canaries = make_canaries(cfg.canaries)
        if d.val:
            val = read_conversations(d.val, **kw)
        else:
            tr, va = carve_val(len(train), d.val_fraction, d.val_max, cfg.train.seed)
            train, val = [train[i] for i in tr], [train[i] for i in va]
        if d.max_examples:
            train = train[:d.max_examples]
        if self.canaries:  # after the val carve: every copy of a canary is in the training data
            train = plant(train, self.canaries, cfg.canaries, system=d.system)
        self.train_ex = [e for e in (fit(render(self.tokenizer, m), self.max_len) for m in train) if e]
        self.val_ex = [e for e in (fit(render(self.tokenizer, m), self.max_len) for m in val) if e]
        self.dropped = len(train) + len(val) - len(self.train_ex) - len(self.val_ex)
        if not self.train_ex or not self.val_ex:
            raise DataError(f"no conversation of {d.train} keeps an assistant token within "
                            f"{self.max_len} tokens")
        self.sampler = None

    def describe(self) -> str:
        n = sum(len(e.ids) for e in self.train_ex)
        n_target = sum(sum(e.mask[1:]) for e in self.train_ex)
        return (f"chat: {len(self.train_ex):,} train / {len(self.val_ex):,} val conversations, "
                f"{n / len(self.train_ex):.0f} tokens each on average, {n_target / max(n, 1):.0%} "
                f"of them the assistant's; {'packed' if self.cfg.data.pack else 'bucketed'} into "
                f"rows of {self.max_len}" + (f"; {self.dropped} dropped (no assistant token "
                                              f"within max_len)" if self.dropped else ""))

    def _sampler(self, rank: int = 0, world: int = 1):
        from zenlm.data.batching import BucketSampler, PackedSampler

        lengths = [len(e.ids) for e in self.train_ex]
        bs, seed = self.cfg.train.batch_size, self.cfg.train.seed
        if self.cfg.data.pack:
            return PackedSampler(lengths, bs, self.max_len, seed=seed, rank=rank, world=world)
        return BucketSampler(lengths, bs, seed=seed, rank=rank, world=world)

    def _build_data(self, world) -> None:
        self.sampler = self._sampler(world.rank, world.size)

    def batches_per_epoch(self, world_size: int) -> int:
        return self._sampler(0, world_size).batches_per_epoch()

    def train_batch(self, gen: torch.Generator):
        from zenlm.data.chat import to_batch

        batch = self.sampler.next()
        rows = batch if self.cfg.data.pack else [[i] for i in batch]
        x, y, seg = to_batch(self.train_ex, rows, self.pad_id)
        n = sum(len(self.train_ex[i].ids) - 1 for row in rows for i in row)
        return x, y, seg, torch.tensor(n)

    def batch_tokens(self, batch) -> int:
        return int(batch[3])

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y, seg, _ = batch
        return model(x, y, segment_ids=seg if self.cfg.data.pack else None)

    # DP-SGD (privacy/dp.py): one conversation per row (packing would mix examples in one
    # gradient), and each conversation's mean loss over its assistant tokens
    def dp_examples(self) -> int:
        return len(self.train_ex)

    def dp_lengths(self) -> list[int]:
        return [len(e.ids) for e in self.train_ex]

    def dp_batch(self, idx: list[int]):
        from zenlm.data.chat import to_batch

        x, y, seg = to_batch(self.train_ex, [[i] for i in idx], self.pad_id)
        return x, y, seg, torch.tensor(sum(len(self.train_ex[i].ids) - 1 for i in idx))

    def example_losses(self, model: nn.Module, batch) -> torch.Tensor:
        x, y, _, _ = batch
        losses = model(x, y, reduction="none")  # the plain head: a module Opacus hooks
        return losses.sum(1) / (y != -100).sum(1).clamp(min=1)

    def save_files(self, run: Path) -> None:
        super().save_files(run)
        if self.canaries:
            from zenlm.privacy.canaries import save_canaries

            save_canaries(run, self.canaries, self.cfg.canaries, system=self.cfg.data.system)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from zenlm.data.batching import sorted_batches
        from zenlm.data.chat import to_batch

        total, count = 0.0, 0
        for idx in sorted_batches([len(e.ids) for e in self.val_ex], self.cfg.finetune.eval_batch_size):
            x, y, _ = to_batch(self.val_ex, [[i] for i in idx], self.pad_id)
            losses = model(x.to(self.device), y.to(self.device), reduction="none").double()
            mask = y.to(self.device) != -100
            total += float(losses[mask].sum())
            count += int(mask.sum())
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}

    def eval_line(self, rec: dict) -> str:
        return (f"step {rec['step']}: val loss {rec['val_loss']:.4f} on {rec['val_tokens']:,} "
                f"assistant tokens")

    def done_line(self, rec: dict) -> str:
        return f"val loss {rec['val_loss']:.4f} (ppl {rec['val_ppl']:.2f}) on assistant tokens"

    def state_dict(self) -> dict:
        return self.sampler.state_dict() if self.sampler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def finish(self, model: nn.Module, run: Path, last_eval: dict | None) -> dict:
        out = {"n_train": len(self.train_ex), "n_val": len(self.val_ex),
               "epochs": round(self.sampler.epochs_done, 3) if self.sampler else 0.0}
        out.update(self._save_adapter(model, run))
        return out


TASKS = {"classify": ClassifyTask, "chat": ChatTask}


def finetune(cfg: FinetuneConfig, base, *, resume: bool = False, log=print) -> dict:
    """Fine-tune ``base`` (a LoadedModel, e.g. from ``zenlm.load``) as ``cfg`` says; returns
    the run's summary. ``base.model`` is adapted and trained in place (no copy of the weights
    is made); load the run with ``zenlm.load(run)`` afterwards."""
    from zenlm.train.loop import train

    task = TASKS[cfg.task](cfg, base, log)
    tc = cfg.train
    if cfg.finetune.epochs is not None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        per_epoch = task.batches_per_epoch(world_size)
        tc.max_steps = max(1, math.ceil(cfg.finetune.epochs * per_epoch / tc.grad_accum))
    return train(task, tc, resume=resume, log=log)


__all__ = ["FinetuneConfig", "FinetuneData", "FinetuneMethod", "resolve_finetune",
           "load_finetune_config", "finetune", "ClassifyTask", "ChatTask"]
