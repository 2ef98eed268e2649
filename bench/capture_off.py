"""Attention capture costs nothing when off: decode and training speed with and without the hook.

The capture hook is one attribute check per attention call (``if self.capture is not None``).
"Before" is the same model with that check taken out: ``Attention.forward``'s own source with
the hook's two lines removed, compiled in the attention module's namespace, so it is today's
forward and nothing else changes (the script stops if the hook lines are not found). "After"
is the forward as shipped, capture off. The two alternate in one process, repetition by
repetition (a decode of ``--tokens`` tokens through a KV cache, then ``--steps`` training steps
of forward + backward + AdamW), so drift on a shared machine slows both alike; medians and
their ratio are printed and written with the CPU, flags and threads to
``bench/results/capture_off.json``. With ``--capture`` a third variant records every layer
(what capture costs when it is on).

    PYTHONPATH=src python bench/capture_off.py                     # the real run (a few minutes)
    PYTHONPATH=src python bench/capture_off.py --smoke             # tiny shapes: a check only
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results" / "capture_off.json"
HOOK = ("if self.capture is not None:", "self.capture(q, k, attn_mask, is_causal)")


def forward_without_hook():
    """``Attention.forward`` as it would be without capture: its source minus the hook."""
    from zenlm.model import attention

    lines = textwrap.dedent(inspect.getsource(attention.Attention.forward)).splitlines()
    at = [i for i, line in enumerate(lines) if line.strip() == HOOK[0]]
    if len(at) != 1 or lines[at[0] + 1].strip() != HOOK[1]:
        raise SystemExit(f"the capture hook ({HOOK[0]} {HOOK[1]}) is not where this bench expects it")
    del lines[at[0]:at[0] + 2]
    namespace = dict(vars(attention))
    exec(compile("\n".join(lines), attention.__file__, "exec"), namespace)
    return namespace["forward"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=9, help="alternating repetitions (medians over these)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per repetition")
    ap.add_argument("--steps", type=int, default=3, help="training steps per repetition")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--capture", action="store_true", help="also time capture on (every layer)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, two repetitions")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.smoke:
        args.reps, args.tokens, args.steps, args.layers, args.d_model, args.batch, args.seq = 2, 8, 1, 2, 64, 2, 32
    import torch

    from common import machine
    from zenlm.config import TransformerConfig
    from zenlm.io import atomic_write_json
    from zenlm.model import Transformer
    from zenlm.model.attention import Attention

    torch.set_num_threads(args.threads)
    after, before = Attention.forward, forward_without_hook()
    vocab = 8192
    heads = 6 if args.d_model % 6 == 0 else 4  # head_dim 64 at the default width
    cfg = TransformerConfig.preset("llama", vocab_size=vocab, n_layer=args.layers, n_head=heads, n_kv_head=2,
                                   d_model=args.d_model, max_seq_len=max(512, args.seq))
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    prompt = torch.randint(0, vocab, (1, 32))
    xb = torch.randint(0, vocab, (args.batch, args.seq))

    def decode() -> float:
        model.eval()
        cache = model.new_cache(1, 32 + args.tokens)
        with torch.inference_mode():
            logits = model(prompt, cache=cache, last_only=True)
            t = time.perf_counter()
            for _ in range(args.tokens):
                logits = model(logits[:, -1].argmax(-1, keepdim=True), cache=cache, last_only=True)
            return args.tokens / (time.perf_counter() - t)

    def train() -> float:
        model.train()
        t = time.perf_counter()
        for _ in range(args.steps):
            model(xb, xb).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t) / args.steps

    variants = {"before (no hook)": (before, False), "after, capture off": (after, False)}
    if args.capture:
        variants["after, capture on"] = (after, True)
    with torch.inference_mode():  # the two forwards compute the same thing
        Attention.forward = before
        a = model.eval()(prompt)
        Attention.forward = after
        assert torch.equal(a, model(prompt)), "the forward without the hook computes something else"
        with model.capture_attention(layers=[0]) as probe:
            Attention.forward = before
            model(prompt)
            Attention.forward = after
        assert not probe.calls[0], "the forward without the hook still calls it"
    rows: dict[str, dict[str, list[float]]] = {k: {"decode_tok_s": [], "train_step_s": []} for k in variants}
    try:
        for rep in range(args.reps + 1):  # the first is a warm-up, not kept
            for name, (forward, on) in variants.items():
                Attention.forward = forward
                cap = model.capture_attention() if on else None
                dec, step = decode(), train()
                if cap is not None:
                    cap.remove()
                if rep:
                    rows[name]["decode_tok_s"].append(dec)
                    rows[name]["train_step_s"].append(step)
    finally:
        Attention.forward = after
    base = "before (no hook)"
    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in rows.items()}
    res = {"machine": machine(), "threads": torch.get_num_threads(), "reps": args.reps,
           "shape": {"layers": args.layers, "d_model": args.d_model, "heads": cfg.n_head, "kv_heads": cfg.n_kv_head,
                     "decode_tokens": args.tokens, "train_batch": [args.batch, args.seq], "steps": args.steps},
           "median": med, "runs": rows,
           "ratio_vs_before": {k: {"decode_tok_s": med[k]["decode_tok_s"] / med[base]["decode_tok_s"],
                                   "train_step_s": med[k]["train_step_s"] / med[base]["train_step_s"]}
                               for k in med},
           "spread": {k: {m: (min(v) / statistics.median(v), max(v) / statistics.median(v)) for m, v in r.items()}
                      for k, r in rows.items()},
           "smoke": args.smoke}
    print(f"CPU {res['machine']['cpu']}, torch threads {res['threads']}, {args.reps} reps, "
          f"{args.layers} layers d{args.d_model}")
    for name in med:
        r, q = med[name], res["ratio_vs_before"][name]
        print(f"{name:<20} decode {r['decode_tok_s']:8.1f} tok/s ({q['decode_tok_s']:.3f}x)   "
              f"train step {r['train_step_s'] * 1000:8.1f} ms ({q['train_step_s']:.3f}x)")
    spread = res["spread"][base]
    print(f"noise: before's runs span {spread['decode_tok_s'][0]:.3f}-{spread['decode_tok_s'][1]:.3f}x (decode), "
          f"{spread['train_step_s'][0]:.3f}-{spread['train_step_s'][1]:.3f}x (train) of its median")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, res)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
