"""Attention capture costs nothing when off: decode and training speed of two source trees.

The capture hook adds one attribute check per attention call. This runs the same decode loop
(a KV cache, one token a step) and the same training step (forward + backward + AdamW) with
``--before`` (a checkout without the hook, e.g. main's ``src``) and ``--after`` (this tree's
``src``) in fresh subprocesses, alternating, and prints each one's median and the ratio. With
``--capture`` the after-tree also runs with every layer captured, to show what capture costs
when it is on.

    python bench/capture_off.py --before /work/main/src --after src            # ~1 minute
    python bench/capture_off.py --before /work/main/src --after src --reps 2 --tokens 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from zenlm.config import TransformerConfig
from zenlm.model import Transformer
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]))
tokens, capture = int(sys.argv[2]), sys.argv[3] == "1"
cfg = TransformerConfig.preset("llama", vocab_size=8192, n_layer=6, n_head=6, n_kv_head=2, d_model=384, max_seq_len=512)
model = Transformer(cfg).eval()
cap = model.capture_attention() if capture else None
x = torch.randint(0, 8192, (1, 32))
def decode():
    cache = model.new_cache(1, 32 + tokens)
    with torch.inference_mode():
        logits = model(x, cache=cache, last_only=True)
        for _ in range(tokens):
            logits = model(logits[:, -1].argmax(-1, keepdim=True), cache=cache, last_only=True)
            if cap is not None:
                cap.clear()
decode()
t = time.perf_counter(); decode(); dec = tokens / (time.perf_counter() - t)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
xb = torch.randint(0, 8192, (8, 128))
def step():
    loss = model(xb, xb)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    if cap is not None:
        cap.clear()
step()
times = []
for _ in range(3):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
print(json.dumps({"decode_tok_s": dec, "train_step_s": sorted(times)[1]}))
"""


def run(src: str, threads: int, tokens: int, capture: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(src), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(tokens), "1" if capture else "0"],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="a source tree without the capture hook")
    ap.add_argument("--after", required=True, help="this tree's src")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--capture", action="store_true", help="also time the after-tree with capture on")
    args = ap.parse_args()
    kinds = [("before", args.before, False), ("after", args.after, False)]
    if args.capture:
        kinds.append(("after, capture on", args.after, True))
    res: dict[str, list[dict]] = {k: [] for k, _, _ in kinds}
    for _ in range(args.reps):  # alternate, so drift on a shared machine hits both alike
        for name, src, cap in kinds:
            res[name].append(run(src, args.threads, args.tokens, cap))
    base = None
    import platform

    print(f"torch threads {args.threads}, {args.reps} reps, CPU {platform.processor() or platform.machine()}")
    for name, rows in res.items():
        dec = statistics.median(r["decode_tok_s"] for r in rows)
        step = statistics.median(r["train_step_s"] for r in rows)
        base = base or (dec, step)
        print(f"{name:<18} decode {dec:8.1f} tok/s ({dec / base[0]:.3f}x)   train step {step * 1000:7.1f} ms "
              f"({step / base[1]:.3f}x)")


if __name__ == "__main__":
    main()
