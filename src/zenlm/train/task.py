"""What the one training loop trains: a task supplies the model, batches, loss and evaluation.

The loop (``loop.py``) owns everything every run shares: schedule, accumulation, clipping,
checkpoints and resume, metrics, progress, the time budget, early stopping, DDP. A task owns
what differs between pretraining, classification and chat fine-tuning:

- ``build(world)``: the model to train, made after the loop has seeded torch (so random
  initialisation - a fresh model, a LoRA adapter, a head - is reproducible);
- ``param_groups(model, train_config)``: optimizer groups (layer-wise LR decay lives here);
- ``train_batch(gen)`` / ``to_device`` / ``loss(model, batch)`` / ``batch_tokens(batch)``:
  one micro-batch drawn with the loop's checkpointed generator, and its mean loss;
- ``evaluate(model)``: a dict of ``val_*`` metrics; ``metric`` names the one early stopping
  and "best" refer to by default;
- ``state_dict()`` / ``load_state_dict()``: the data position, for exact resumption;
- ``checkpoint_weights(model)`` / ``load_weights(model, weights)``: what a checkpoint holds
  (everything for pretraining; only what trains, for an adapter on a frozen base);
- ``config_dict()``, ``save_files(run)``, ``finish(model, run, last_eval)``: the run folder;
  ``card_fields()``: the parent model and data the lineage card (privacy/card.py) records.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zenlm.errors import CheckpointError


class Task:
    """The defaults every task shares; subclasses fill in data, loss and evaluation."""

    name = "task"
    metric = "val_loss"  # what early stopping watches unless train.early_stop_metric says

    def build(self, world) -> nn.Module:
        """The model on ``world.device``; ``world`` also says which shard of the data is ours."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, tc) -> list[dict]:
        from zenlm.train.optim import param_groups

        return param_groups(model, tc.weight_decay)

    def config_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def save_files(self, run: Path) -> None:
        """Files the run folder needs besides config and checkpoints (main rank only)."""

    def describe(self) -> str | None:
        """One line about the data, logged at the start."""
        return None

    def train_batch(self, gen: torch.Generator):
        raise NotImplementedError

    def to_device(self, batch, device: str):
        return tuple(t.to(device, non_blocking=True) for t in batch)

    def batch_tokens(self, batch) -> int:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        raise NotImplementedError

    def eval_line(self, rec: dict) -> str:
        return f"step {rec['step']}: val loss {rec['val_loss']:.4f}"

    def done_line(self, rec: dict) -> str:
        return self.eval_line(rec)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def checkpoint_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def load_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(weights)

    def finish(self, model: nn.Module, run: Path, last_eval: dict | None) -> dict:
        """Reports written at the end (main rank only); the dict joins summary.json."""
        return {}

    def card_fields(self) -> dict[str, Any]:
        """``parent`` (what zenlm.load read) and ``data`` (folders or files) for the card."""
        return {"parent": None, "data": []}


def trainable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` that train: an adapter and a head, not the frozen base."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def load_partial(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load a checkpoint holding part of ``model`` (its trainable tensors); every key in it
    must belong to the model."""
    expected = set(model.state_dict())
    unexpected = sorted(set(weights) - expected)
    if unexpected:
        raise CheckpointError(f"{source} does not fit this model (unexpected {unexpected[:3]})")
    model.load_state_dict(weights, strict=False)


class LMTask(Task):
    """Next-token prediction on prepared token shards: pretraining."""

    name = "lm"
    metric = "val_loss"

    def __init__(self, cfg):
        from zenlm.data.loader import TokenShards
        from zenlm.errors import ConfigError
        from zenlm.tokenizer import Tokenizer

        self.cfg = cfg
        tc = cfg.train
        if not cfg.data.path:
            raise ConfigError("data.path is not set: point it at a folder written by `zenlm prepare`")
        self.data = TokenShards(cfg.data.path)
        self.tokenizer = Tokenizer.load(self.data.dir / "tokenizer.json")
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                              f"tokenizer's {self.tokenizer.vocab_size}")
        self.seq_len = tc.seq_len or cfg.model.max_seq_len
        if self.seq_len > cfg.model.max_seq_len:
            raise ConfigError(f"train.seq_len={self.seq_len} exceeds model.max_seq_len="
                              f"{cfg.model.max_seq_len}")
        self.token_bytes = self.tokenizer.token_byte_lengths()
        self.device = "cpu"

    def build(self, world) -> nn.Module:
        from zenlm.model import Transformer

        self.device = world.device
        model = Transformer(self.cfg.model).to(self.device)
        model.activation_checkpointing = self.cfg.train.activation_checkpointing
        return model

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.cfg)

    def save_files(self, run: Path) -> None:
        self.tokenizer.save(run / "tokenizer.json")

    def train_batch(self, gen: torch.Generator):
        return self.data.train_batch(self.cfg.train.batch_size, self.seq_len, gen)

    def batch_tokens(self, batch) -> int:
        return batch[0].numel()

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return model(x, y)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from zenlm.eval.perplexity import evaluate_batches

        tc = self.cfg.train
        res = evaluate_batches(model, self.data.val_batches(tc.batch_size, self.seq_len, tc.eval_batches),
                               self.token_bytes, self.device)
        return {"val_loss": res.loss, "val_ppl": res.perplexity, "val_bpb": res.bits_per_byte}

    def eval_line(self, rec: dict) -> str:
        return f"step {rec['step']}: val loss {rec['val_loss']:.4f}, bpb {rec['val_bpb']:.4f}"

    def finish(self, model: nn.Module, run: Path, last_eval: dict | None) -> dict:
        pii = self.data.manifest.get("pii")
        return {"data_pii": pii} if pii and pii.get("scrubbed") else {}

    def card_fields(self) -> dict[str, Any]:
        return {"parent": None, "data": [self.data.dir]}

    def done_line(self, rec: dict) -> str:
        return (f"val loss {rec['val_loss']:.4f}, ppl {rec['val_ppl']:.2f}, "
                f"bpb {rec['val_bpb']:.4f}")


class MLMTask(LMTask):
    """Masked-LM pretraining of an encoder on the same prepared shards: windows of the token
    stream, masked by BERT's rule (``zenlm.data.masking``) with the loop's generator (so a
    resumed run masks exactly as the uninterrupted one), loss on the masked positions only.

    The tokenizer ``zenlm prepare`` trains has no mask token: ``[MASK]`` is added as a special
    token (its id the first after the vocabulary) and saved with the run, so ``fill-mask``
    finds it."""

    name = "mlm"
    metric = "val_loss"
    VAL_SEED = 1234  # validation masks are the same at every evaluation

    def __init__(self, cfg):
        super().__init__(cfg)
        from tokenizers import AddedToken

        from zenlm.errors import ConfigError

        tok = self.tokenizer
        if tok.mask_id is None:
            tok.hf.add_special_tokens([AddedToken("[MASK]", special=True, normalized=False)])
            tok.specials["mask"] = "[MASK]"
        if tok.mask_id >= cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} leaves no room for the "
                              f"[MASK] token (id {tok.mask_id}): set it to at least {tok.mask_id + 1}")
        self.mask_id = tok.mask_id
        self.special_ids = sorted({i for i in (tok.eot_id, tok.bos_id, tok.mask_id,
                                                *(tok.special_id(n) for n in ("cls", "sep", "pad")))
                                   if i is not None})
        self.token_bytes = None

    def _mask(self, x: torch.Tensor, gen: torch.Generator):
        from zenlm.data.masking import mask_tokens

        return mask_tokens(x, gen, mask_id=self.mask_id, vocab_size=self.tokenizer.vocab_size,
                           cfg=self.cfg.mlm, special_ids=self.special_ids)

    def train_batch(self, gen: torch.Generator):
        x, _ = self.data.train_batch(self.cfg.train.batch_size, self.seq_len, gen)
        return self._mask(x, gen)

    def batch_tokens(self, batch) -> int:
        return batch[0].numel()

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return model(x, y)  # targets at the masked positions only (-100 elsewhere)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        import math

        tc = self.cfg.train
        was_training = model.training
        model.eval()
        gen = torch.Generator().manual_seed(self.VAL_SEED)
        nats, right, count = 0.0, 0, 0
        for x, _ in self.data.val_batches(tc.batch_size, self.seq_len, tc.eval_batches):
            inp, tgt = self._mask(x, gen)
            inp, tgt = inp.to(self.device), tgt.to(self.device)
            keep = tgt != -100
            logits = model(inp)[keep].float()
            nats += float(torch.nn.functional.cross_entropy(logits, tgt[keep], reduction="sum"))
            right += int((logits.argmax(-1) == tgt[keep]).sum())
            count += int(keep.sum())
        if was_training:
            model.train()
        loss = nats / max(count, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
                "val_accuracy": right / max(count, 1), "val_masked": count}

    def eval_line(self, rec: dict) -> str:
        return (f"step {rec['step']}: val masked-token loss {rec['val_loss']:.4f}, "
                f"accuracy {rec['val_accuracy']:.3f}")

    def done_line(self, rec: dict) -> str:
        return (f"val masked-token loss {rec['val_loss']:.4f}, ppl {rec['val_ppl']:.2f}, "
                f"accuracy {rec['val_accuracy']:.3f}")


__all__ = ["Task", "LMTask", "MLMTask", "trainable_weights", "load_partial"]
