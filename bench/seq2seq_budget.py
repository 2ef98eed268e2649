"""Time to quality: transformers' MarianMTModel trained for the same wall-clock budget as a
`zenlm pretrain` run of an encoder-decoder recipe, then scored the same way.

What is the same for both, so the budget is the only thing that decides:
- the shape, the initial weights (zenlm's initialisation, exported to a Marian folder), the
  data and the order of its batches (zenlm's own length-grouped token-budget batches, drawn by
  the recipe's seed), dropout 0.1 (residual and attention, as zenlm applies it);
- the optimiser and schedule: AdamW with decay on matrices only, warmup then cosine fitted to
  the wall clock (zenlm's `lr_at` on elapsed / budget), gradient clipping, label smoothing;
- the scoring: the trained weights are read back into zenlm (`load_marian`, which checks the
  shapes and position tables) and translated by the same greedy and beam code as the zenlm
  run, then scored by sacreBLEU. Decoding speed is not part of this: that is train_seq2seq.py.

The peer's budget holds training only; zenlm's also paid for its evaluations and checkpoints
during the run, so the comparison leans toward the peer.

    zenlm pretrain --config recipes/multi30k-en-de.yaml --set data.path=DIR --minutes 25 --out RUN
    python bench/seq2seq_budget.py --config recipes/multi30k-en-de.yaml --data DIR --minutes 25 \\
        --zenlm-run RUN --out bench/results/seq2seq_budget_25.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def train_peer(cfg, minutes: float, log=print):
    """MarianMTModel from zenlm's initial weights, trained for ``minutes`` of wall clock on the
    recipe's batches and schedule. Returns the model, steps, target tokens and seconds."""
    import transformers

    from zenlm.interop.marian import export_marian
    from zenlm.model.seq2seq import Seq2Seq
    from zenlm.train.optim import lr_at, make_adamw
    from zenlm.train.seq2seq import Seq2SeqTask

    tc = cfg.train
    task = Seq2SeqTask(cfg)
    torch.manual_seed(tc.seed)  # the initialisation `zenlm pretrain` draws for this recipe
    init = Seq2Seq(cfg.model)
    with tempfile.TemporaryDirectory() as tmp:
        export_marian(init, task.tokenizer, tmp)
        theirs = transformers.MarianMTModel.from_pretrained(
            tmp, dropout=cfg.model.dropout, attention_dropout=cfg.model.dropout)
    del init
    for side in (theirs.model.encoder, theirs.model.decoder):
        side.embed_positions.weight.requires_grad_(False)  # sinusoidal, fixed, as in zenlm
    opt = make_adamw(theirs, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, "cpu")
    params = [p for p in theirs.parameters() if p.requires_grad]
    theirs.train()
    budget = minutes * 60
    step = tokens = 0
    t0 = time.time()
    while (elapsed := time.time() - t0) < budget:
        lr = lr_at(elapsed / budget, step, lr=tc.lr, min_lr_ratio=tc.min_lr_ratio,
                   warmup_steps=tc.warmup_steps, warmup_frac=tc.warmup_frac, schedule=tc.schedule)
        for g in opt.param_groups:
            g["lr"] = lr
        src, mask, tgt_in, labels = task.train_batch(None)
        logits = theirs(input_ids=src, attention_mask=mask, decoder_input_ids=tgt_in).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               label_smoothing=tc.label_smoothing)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += int((labels != -100).sum())
        if step % 200 == 0:
            log(f"peer step {step}: loss {float(loss):.4f}, lr {lr:.2e}, "
                f"{tokens / (time.time() - t0):,.0f} target tok/s, {elapsed / 60:.1f} min")
    return theirs.eval(), task, step, tokens, time.time() - t0


def score(model, tokenizer, srcs: list[str], refs: list[str], beam: int, pad_id: int) -> dict:
    from zenlm.eval.translate import score_translations
    from zenlm.infer.beam import DecodeConfig, translate

    hyps = translate(model, tokenizer, srcs, cfg=DecodeConfig(beam=beam, length_penalty=0.6), pad_id=pad_id)
    s = score_translations(hyps, refs)
    return {"bleu": s.bleu, "chrf": s.chrf, "bleu_lc_tok": s.bleu_lc_tok, "signature": s.signature}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the encoder-decoder recipe the zenlm run used")
    ap.add_argument("--data", required=True, help="the folder from `zenlm prepare --pairs` (with val)")
    ap.add_argument("--minutes", type=float, required=True, help="the peer's wall-clock budget")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="the same overrides the zenlm run was given")
    ap.add_argument("--zenlm-run", help="a zenlm run of the same recipe and budget, scored alongside")
    ap.add_argument("--beam", type=int, default=5, help="also score with this beam (0: greedy only)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from common import machine
    from zenlm.interop.marian import load_marian
    from zenlm.train.config import load_config

    transformers.logging.set_verbosity_error()
    cfg = load_config(args.config, [f"data.path={args.data}", *args.set], log=lambda *_: None)
    theirs, task, steps, tokens, seconds = train_peer(cfg, args.minutes)
    peer = load_marian(None, theirs.config.to_dict(), dict(theirs.state_dict())).eval()

    data, tok = task.data, task.tokenizer
    n = data.n_pairs("val")
    srcs = [tok.decode(data.sentence("val", "src", i)) for i in range(n)]
    refs = [tok.decode(data.sentence("val", "tgt", i)) for i in range(n)]
    contestants = {"transformers": peer}
    if args.zenlm_run:
        import zenlm

        contestants["zenlm"] = zenlm.load(args.zenlm_run).model.eval()
    res = {"machine": machine(), "recipe": args.config, "sets": args.set, "minutes": args.minutes,
           "val_sentences": n, "transformers_train": {
               "steps": steps, "target_tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds}}
    if args.zenlm_run:
        summary = json.loads((Path(args.zenlm_run) / "summary.json").read_text())
        res["zenlm_train"] = {k: summary[k] for k in ("step", "tokens", "train_seconds", "tok_per_s")}
    with torch.no_grad():
        for name, model in contestants.items():
            res[name] = {"greedy": score(model, tok, srcs, refs, 1, data.pad_id)}
            if args.beam > 1:
                res[name][f"beam{args.beam}"] = score(model, tok, srcs, refs, args.beam, data.pad_id)
    print(json.dumps(res, indent=2))
    if args.out:
        from zenlm.io import atomic_write_json

        atomic_write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
