"""The run configuration: model + data + train sections, filled from a YAML recipe and `--set`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zenlm.config import TransformerConfig, build, load_yaml, merge, parse_overrides
from zenlm.data.masking import MaskingConfig
from zenlm.errors import ConfigError
from zenlm.privacy.config import DPConfig


@dataclass
class DataConfig:
    path: str = ""  # a folder written by `zenlm prepare`


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    batch_size: int = 16  # sequences per micro-batch, per process
    grad_accum: int = 1
    seq_len: int | None = None  # None: the model's max_seq_len
    max_steps: int | None = 1000
    max_minutes: float | None = None  # wall-clock budget; the schedule is fitted to it
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    schedule: str = "cosine"  # after warmup: cosine | inverse_sqrt (lr * sqrt(warmup / t))
    warmup_steps: int | None = None  # None: warmup_frac of the run
    warmup_frac: float = 0.05
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    # fp32 | bf16 (autocast, fp32 master weights) | auto: bf16 where the device computes it
    # natively (GPUs; CPUs with AVX512-BF16/AMX, see zenlm.hardware), fp32 elsewhere
    dtype: str = "fp32"
    compile: bool = False
    activation_checkpointing: bool = False
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    ckpt_every: int = 200
    keep_last: int = 2
    progress: bool = True
    eval_at_start: bool = False  # evaluate before the first step (what fine-tuning starts from)
    # stop after this many evaluations without improvement of the metric (0: never), then
    # restore the best weights; the metric is the task's own (val_loss, val_accuracy) unless set
    early_stop_patience: int = 0
    early_stop_metric: str | None = None
    # encoder-decoder (translation) runs: padded tokens per micro-batch (pairs grouped by
    # length; None: batch_size * max_seq_len), label smoothing, and how much of val each
    # evaluation translates for val BLEU (0: none) with which beam
    batch_tokens: int | None = None
    label_smoothing: float = 0.0
    eval_bleu_sentences: int = 200
    eval_beam: int = 1
    # a key file (zenlm.crypt): checkpoints are written sealed with it, and resume reads them
    encrypt_key_file: str | None = None
    dp: DPConfig = field(default_factory=DPConfig)  # differential privacy (off unless dp.epsilon)

    def __post_init__(self) -> None:
        if self.max_steps is None and self.max_minutes is None:
            raise ConfigError("set train.max_steps or train.max_minutes (or both)")
        if self.dtype not in ("fp32", "bf16", "auto"):
            raise ConfigError(f"train.dtype must be fp32, bf16 or auto, got {self.dtype!r}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1")
        if self.lr <= 0:
            raise ConfigError("train.lr must be positive")
        if self.schedule not in ("cosine", "inverse_sqrt"):
            raise ConfigError(f"train.schedule must be cosine or inverse_sqrt, got {self.schedule!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class RunConfig:
    model: TransformerConfig = field(default_factory=TransformerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # masked-LM pretraining of an encoder (model.causal: false): what is masked, and how
    mlm: MaskingConfig = field(default_factory=MaskingConfig)
    # What `model.size: auto` measured and chose (zenlm.train.budget); kept in config.yaml so a
    # run says why it has its shape. Informational: resuming reads the resolved fields.
    auto: dict[str, Any] | None = None


def resolve(raw: dict[str, Any], *, log=print) -> RunConfig:
    """Build a RunConfig from a recipe's sections.

    ``model.family`` fills architecture switches and ``model.size`` (a name, a depth, or
    ``auto``) fills the shape; either only where the model section does not set a field itself,
    so what a recipe or ``--set`` states always wins. A model without vocab_size takes the
    prepared data's vocabulary. ``size: auto`` times a few training steps on this machine and
    picks the depth that fits ``train.max_minutes`` (see :mod:`zenlm.train.budget`).
    """
    from zenlm.config import family_switches, size_shape

    raw = merge({}, raw)
    model = dict(raw.get("model") or {})
    family = model.pop("family", None)
    size = model.pop("size", None)
    if family is not None:
        model = {**family_switches(family), **model}
    data_path = (raw.get("data") or {}).get("path")
    if "vocab_size" not in model and data_path:
        manifest = Path(data_path) / "manifest.json"
        if manifest.is_file():
            vocab = json.loads(manifest.read_text())["vocab_size"]
            if model.get("causal") is False:
                vocab += 1  # room for the [MASK] token masked-LM pretraining adds
            model["vocab_size"] = 64 * ((vocab + 63) // 64)  # round up: faster matmuls
    raw["model"] = model
    if size == "auto":
        from zenlm.train.budget import fit_to_budget

        raw = fit_to_budget(raw, log=log)
    else:
        raw["model"] = {**size_shape(size), **model}
    return build(RunConfig, raw)


def load_config(recipe: str | None, overrides: list[str] | None = None, *, log=print) -> RunConfig:
    raw = load_yaml(recipe) if recipe else {}
    return resolve(merge(raw, parse_overrides(overrides or [])), log=log)
