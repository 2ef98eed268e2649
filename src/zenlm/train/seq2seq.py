"""Training an encoder-decoder on sentence pairs with the one loop: the translation task.

What differs from pretraining is all here: batches of whole sentence pairs grouped by length
under a token budget (``train.batch_tokens`` padded tokens per micro-batch; each epoch visits
every batch once, in an order drawn from the run's seed and the epoch, so the position is two
integers in the checkpoint), the loss with label smoothing (``train.label_smoothing``), and an
evaluation that translates part of val (``train.eval_bleu_sentences``, greedy or with
``train.eval_beam``) besides its loss, so runs can be compared and selected by val BLEU.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zenlm.errors import ConfigError
from zenlm.train.task import Task


class Seq2SeqTask(Task):
    name = "seq2seq"
    metric = "val_loss"

    def __init__(self, cfg):
        from zenlm.data.pairs import PairShards
        from zenlm.tokenizer import Tokenizer

        self.cfg = cfg
        if not cfg.data.path:
            raise ConfigError("data.path is not set: point it at a folder written by "
                              "`zenlm prepare --pairs SRC TGT --out DIR`")
        self.data = PairShards(cfg.data.path)
        self.tokenizer = Tokenizer.load(self.data.dir / "tokenizer.json")
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                              f"tokenizer's {self.tokenizer.vocab_size}")
        tc = cfg.train
        self.max_len = cfg.model.max_seq_len
        self.budget = tc.batch_tokens or tc.batch_size * self.max_len
        if self.budget < self.max_len:
            raise ConfigError(f"train.batch_tokens={self.budget} is below one sentence of "
                              f"model.max_seq_len={self.max_len} tokens")
        self.batches = self.data.budget_batches("train", self.budget, self.max_len)
        if not self.batches:
            raise ConfigError(f"no training pair fits model.max_seq_len={self.max_len}")
        self.val_batches = self.data.budget_batches("val", self.budget, self.max_len)
        self.epoch, self.pos = 0, 0
        self.rank, self.world = 0, 1
        self.device = "cpu"
        self._order = None

    def build(self, world) -> nn.Module:
        from zenlm.model.seq2seq import Seq2Seq

        self.device, self.rank, self.world = world.device, world.rank, world.size
        model = Seq2Seq(self.cfg.model).to(self.device)
        for side in (model.encoder, model.decoder):
            side.activation_checkpointing = self.cfg.train.activation_checkpointing
        return model

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.cfg)

    def save_files(self, run: Path) -> None:
        self.tokenizer.save(run / "tokenizer.json")

    def describe(self) -> str:
        n = sum(len(b) for b in self.batches)
        left = len(self.data) - n
        return (f"data: {n:,} train pairs in {len(self.batches):,} batches of <= {self.budget:,} "
                f"padded tokens" + (f" ({left:,} longer than {self.max_len} tokens left out)" if left else "")
                + f"; {self.data.n_pairs('val'):,} val pairs")

    def _epoch_order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            g = torch.Generator()
            g.manual_seed(self.cfg.train.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(len(self.batches), generator=g).tolist()
            self._order = (self.epoch, perm[self.rank::self.world] or perm[:1])
        return self._order[1]

    def train_batch(self, gen: torch.Generator):
        order = self._epoch_order()
        if self.pos >= len(order):
            self.epoch, self.pos = self.epoch + 1, 0
            order = self._epoch_order()
        idx = self.batches[order[self.pos]]
        self.pos += 1
        return self.data.collate("train", idx, self.max_len)

    def batch_tokens(self, batch) -> int:
        return int((batch[3] != -100).sum())  # target tokens: what translation speeds count

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        src, mask, tgt_in, labels = batch
        return model(src, mask, tgt_in, labels, label_smoothing=self.cfg.train.label_smoothing)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state.get("epoch", 0)), int(state.get("pos", 0))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        import math

        import torch.nn.functional as F

        from zenlm.eval.translate import score_translations
        from zenlm.infer.beam import DecodeConfig, translate

        total, count = 0.0, 0
        for idx in self.val_batches:
            src, mask, tgt_in, labels = (t.to(self.device) for t in self.data.collate("val", idx, self.max_len))
            logits = model(src, mask, tgt_in)
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                           ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
        loss = total / max(count, 1)
        res = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        n = min(self.cfg.train.eval_bleu_sentences, self.data.n_pairs("val"))
        if n > 0:
            tok = self.tokenizer
            srcs = [tok.decode(self.data.sentence("val", "src", i)) for i in range(n)]
            refs = [tok.decode(self.data.sentence("val", "tgt", i)) for i in range(n)]
            hyps = translate(model, tok, srcs, cfg=DecodeConfig(beam=self.cfg.train.eval_beam),
                             pad_id=self.data.pad_id)
            scores = score_translations(hyps, refs)
            res.update(val_bleu=scores.bleu, val_chrf=scores.chrf, val_bleu_lc_tok=scores.bleu_lc_tok)
        return res

    def eval_line(self, rec: dict) -> str:
        line = f"step {rec['step']}: val loss {rec['val_loss']:.4f}"
        if "val_bleu" in rec:
            line += f", BLEU {rec['val_bleu']:.2f}, chrF {rec['val_chrf']:.2f}"
        return line


__all__ = ["Seq2SeqTask"]
