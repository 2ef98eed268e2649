"""Encoder-decoder speed against transformers' MarianMTModel of the same shape and weights.

Two measurements, on the same batches:
- training: target tokens per second of forward + backward + AdamW steps, the label-smoothed
  loss computed the same way for both (F.cross_entropy on the logits);
- decoding: sentences per second of beam-5 search (GNMT length penalty 0.6 for zenlm,
  transformers' own penalty 0.6 for generate: the penalties differ, the work per step does
  not), batched.

The zenlm model is built, exported to a Marian folder (zenlm.interop.marian) and loaded by
transformers, so both start from identical weights (the logits are checked to agree first).

    python bench/train_seq2seq.py --data DIR       # a folder from `zenlm prepare --pairs`
    python bench/train_seq2seq.py --smoke          # tiny shapes and few steps, a check only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def batches_from(data_dir: str | None, vocab: int, n: int, budget: int, max_len: int):
    from zenlm.data.pairs import PairShards, collate_pairs

    if data_dir:
        data = PairShards(data_dir)
        picked = data.budget_batches("train", budget, max_len)
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(picked), generator=g)[:n].tolist()
        return [data.collate("train", picked[i], max_len) for i in order], data.eot_id, data.pad_id
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):  # random pairs of 8-20 tokens, a Multi30k-like length
        rows = budget // 24
        src = [torch.randint(2, vocab, (int(torch.randint(8, 20, (1,), generator=g)),), generator=g).tolist() + [0]
               for _ in range(rows)]
        tgt = [torch.randint(2, vocab, (int(torch.randint(8, 20, (1,), generator=g)),), generator=g).tolist()
               for _ in range(rows)]
        out.append(collate_pairs(src, tgt, 0, 1))
    return out, 0, 1


def time_training(steps: dict, batches, warmup: int) -> dict[str, float]:
    """Target tokens/s of each step function, the two alternating batch by batch so a machine
    whose load changes (a shared one) slows both alike."""
    for b in batches[:warmup]:
        for fn in steps.values():
            fn(b)
    seconds = dict.fromkeys(steps, 0.0)
    tokens = 0
    for b in batches[warmup:]:
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn(b)
            seconds[name] += time.perf_counter() - t0
        tokens += int((b[3] != -100).sum())
    return {name: tokens / s for name, s in seconds.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="a folder from `zenlm prepare --pairs` (default: random tokens)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sentences", type=int, default=64, help="sources decoded with beam 5")
    ap.add_argument("--decode-reps", type=int, default=5, help="beam-5 rounds per contestant (median kept)")
    ap.add_argument("--dropout", type=float, default=0.1,
                    help="residual and attention dropout of both models (the recipe's 0.1)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--compile", action="store_true",
                    help="also time zenlm under torch.compile (dynamic shapes), as train.compile does")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, a few steps: checks that it runs")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.d_model, args.heads, args.batch_tokens = 1, 32, 2, 512
        args.steps, args.warmup, args.sentences, args.decode_reps = 3, 1, 4, 1
        args.vocab = min(args.vocab, 500)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from zenlm.config import TransformerConfig
    from zenlm.infer.beam import DecodeConfig, beam_search
    from zenlm.interop.marian import export_marian
    from zenlm.model.seq2seq import Seq2Seq
    from zenlm.tokenizer import Tokenizer

    transformers.logging.set_verbosity_error()
    batches, eos, pad = batches_from(args.data, args.vocab, args.steps + args.warmup, args.batch_tokens, 128)
    vocab = args.vocab
    if args.data:
        vocab = Tokenizer.load(Path(args.data) / "tokenizer.json").vocab_size
    cfg = TransformerConfig(vocab_size=vocab, n_layer=args.layers, encoder_layers=args.layers,
                            n_head=args.heads, d_model=args.d_model, d_ff=4 * args.d_model, max_seq_len=128,
                            norm="layernorm", norm_position="post", pos="sinusoidal", scale_embeddings=True,
                            mlp="gelu_exact", bias=True, dropout=args.dropout)
    torch.manual_seed(0)
    ours = Seq2Seq(cfg)

    class _Tok:  # the special ids are all the export needs of a tokenizer here
        eot_id = eos

        class hf:
            @staticmethod
            def token_to_id(t):
                return pad

        @staticmethod
        def save_hf_folder(folder):
            return []

    with tempfile.TemporaryDirectory() as tmp:
        export_marian(ours, _Tok, tmp)
        theirs = transformers.MarianMTModel.from_pretrained(tmp, dropout=args.dropout,
                                                            attention_dropout=args.dropout)
    src, mask, tgt_in, labels = batches[0]
    with torch.no_grad():
        diff = (ours.eval()(src, mask, tgt_in) - theirs.eval()(input_ids=src, attention_mask=mask,
                                                               decoder_input_ids=tgt_in).logits).abs().max()
    if diff > 1e-3:
        raise SystemExit(f"the two models disagree (max logit difference {diff:.2e})")

    def trainer(model, forward):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        model.train()

        def step(b):
            s, m, t, y = b
            logits = forward(s, m, t)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                                   label_smoothing=0.1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    res = {"shape": {"layers": f"{args.layers}+{args.layers}", "d_model": args.d_model, "heads": args.heads,
                     "vocab": vocab, "params": ours.num_params(), "batch_tokens": args.batch_tokens,
                     "dropout": args.dropout},
           "threads": torch.get_num_threads(), "data": args.data or "random tokens", "max_logit_diff": float(diff)}
    steps = {"zenlm": trainer(ours, lambda s, m, t: ours(s, m, t)),
             "transformers": trainer(theirs, lambda s, m, t: theirs(input_ids=s, attention_mask=m,
                                                                     decoder_input_ids=t).logits)}
    if args.compile:  # a copy of the same weights, so the eager contestant is untouched
        import copy

        twin = copy.deepcopy(ours)
        compiled = torch.compile(twin, dynamic=True)
        steps["zenlm-compiled"] = trainer(twin, lambda s, m, t: compiled(s, m, t))
    rates = time_training(steps, batches, args.warmup)
    for name, rate in rates.items():
        res[f"train_tok_per_s_{name}"] = rate
    res["train_speedup"] = res["train_tok_per_s_zenlm"] / res["train_tok_per_s_transformers"]
    if args.compile:
        res["train_speedup_compiled"] = res["train_tok_per_s_zenlm-compiled"] / res["train_tok_per_s_transformers"]

    # beam-5 decoding of the same sources (the first sentences of the batches)
    ours.eval()
    theirs.eval()
    rows = []
    for s, m, _, _ in batches:
        for i in range(s.shape[0]):
            rows.append(s[i, : int(m[i].sum())].tolist())
            if len(rows) == args.sentences:
                break
        if len(rows) == args.sentences:
            break
    from zenlm.data.pairs import collate_pairs

    src, mask, _, _ = collate_pairs(rows, [[] for _ in rows], eos, pad)
    max_new = int(mask.sum(1).max() * 1.5 + 10)
    dcfg = DecodeConfig(beam=5, length_penalty=0.6)
    decoders = {
        "zenlm": lambda: beam_search(ours, src, mask, bos_id=eos, eos_id=eos, pad_id=pad, cfg=dcfg),
        "transformers": lambda: theirs.generate(input_ids=src, attention_mask=mask, num_beams=5,
                                                length_penalty=0.6, max_new_tokens=max_new,
                                                do_sample=False, bad_words_ids=[[pad]])}
    rates: dict[str, list[float]] = {name: [] for name in decoders}
    with torch.no_grad():
        for _ in range(args.decode_reps):  # alternating, the median kept: one run each is noisy
            for name, fn in decoders.items():
                t0 = time.perf_counter()
                fn()
                rates[name].append(len(rows) / (time.perf_counter() - t0))
    for name, r in rates.items():
        res[f"beam5_sent_per_s_{name}"] = statistics.median(r)
    res["beam5_speedup"] = res["beam5_sent_per_s_zenlm"] / res["beam5_sent_per_s_transformers"]
    print(json.dumps(res, indent=2))
    if args.out:
        from zenlm.io import atomic_write_json

        atomic_write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
