"""Rebuild the example report cards in this folder, one per kind of run, from tiny real runs.

    PYTHONPATH=src python docs/reports/build.py [--shared ../shared/data]

A 2-layer model is pretrained on Tiny Shakespeare for a few hundred steps, then fine-tuned
three times from that run: a LoRA sentiment classifier on 2,000 rows of SST-2, the same with
DP-SGD at epsilon 8, and a chat SFT on addition questions; a small encoder-decoder (Marian's
shape) is trained from scratch to translate English number words into German ones, generated
here. Each run's card is written to ``docs/reports/<kind>/`` (``--kinds`` rebuilds some). The runs are tiny
(seconds on two CPU cores), so the numbers only show what the card holds, not what zenlm can
reach. Without the shared data sets the pretrain run falls back to the Python standard
library's sources and the classifier to a keyword task.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY = {"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 64, "max_seq_len": 64}
KINDS = ("pretrain", "classify", "classify-dp", "chat", "translate")
TINY_SEQ2SEQ = {"encoder_layers": 2, "n_layer": 2, "n_head": 4, "d_model": 64, "max_seq_len": 48,
                "norm": "layernorm", "norm_position": "post", "pos": "sinusoidal", "scale_embeddings": True,
                "mlp": "gelu_exact", "bias": True}
EN_DE = {"zero": "null", "one": "eins", "two": "zwei", "three": "drei", "four": "vier", "five": "fünf",
         "six": "sechs", "seven": "sieben", "eight": "acht", "nine": "neun"}


def quiet(*a, **k):
    pass


def corpus(shared: Path) -> str:
    p = shared / "tinyshakespeare" / "input.txt"
    if p.is_file():
        return p.read_text(encoding="utf-8")[:300_000]
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return "".join(f.read_text(encoding="utf-8", errors="replace") for f in files[:40])[:300_000]


def classify_rows(shared: Path) -> list[str]:
    p = shared / "sst2" / "train.tsv"
    if p.is_file():
        lines = p.read_text(encoding="utf-8").splitlines()[1:]
        random.Random(0).shuffle(lines)
        return [f"{t.strip()}\t{'positive' if y == '1' else 'negative'}"
                for t, y in (x.rsplit("\t", 1) for x in lines[:2000])]
    words = {"return": "ret", "import": "imp", "class": "cls"}
    rng = random.Random(0)
    out = []
    for _ in range(1000):
        w = rng.choice(sorted(words))
        out.append(f"alpha {w} beta gamma\t{words[w]}")
    return out


def number_pairs(folder: Path, n: int = 2000) -> tuple[Path, Path]:
    """English digit words and their German ones ("Three one four." -> "Drei eins vier."),
    one pair a line: a translation a tiny model learns in seconds, with a visible alignment."""
    rng = random.Random(0)
    src, tgt = [], []
    for _ in range(n):
        ws = [rng.choice(sorted(EN_DE)) for _ in range(rng.randint(1, 7))]
        src.append(" ".join(ws).capitalize() + ".")
        tgt.append(" ".join(EN_DE[w] for w in ws).capitalize() + ".")
    (folder / "en.txt").write_text("\n".join(src) + "\n", encoding="utf-8")
    (folder / "de.txt").write_text("\n".join(tgt) + "\n", encoding="utf-8")
    return folder / "en.txt", folder / "de.txt"


def translate_run(work: Path, common: dict) -> None:
    from zenlm.data.pairs import PairsConfig, prepare_pairs
    from zenlm.train.config import resolve
    from zenlm.train.loop import pretrain

    en, de = number_pairs(work)
    prepare_pairs(PairsConfig(src=str(en), tgt=str(de), out=str(work / "pairs"), vocab_size=300,
                              val_fraction=0.05), log=quiet)
    pretrain(resolve({"model": TINY_SEQ2SEQ, "data": {"path": str(work / "pairs")},
                      "train": {**common, "out_dir": str(work / "translate"), "batch_tokens": 1024,
                                "label_smoothing": 0.1, "lr": 3e-3, "warmup_steps": 20, "max_steps": 400,
                                "eval_every": 50, "eval_bleu_sentences": 100, "ckpt_every": 0}}), log=quiet)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(HERE.parents[2] / "shared" / "data"))
    ap.add_argument("--work", help="where the runs go (default: a new temporary folder)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"which cards to rebuild (default: {','.join(KINDS)})")
    args = ap.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if set(kinds) - set(KINDS):
        ap.error(f"unknown kinds {sorted(set(kinds) - set(KINDS))}: choose from {', '.join(KINDS)}")
    import torch

    import zenlm
    from zenlm.explain.report import write_report
    from zenlm.privacy.card import check_signature

    torch.set_num_threads(1)
    shared = Path(args.shared)
    work = Path(args.work or tempfile.mkdtemp(prefix="zenlm-examples-"))
    work.mkdir(parents=True, exist_ok=True)
    common = {"progress": False, "device": "cpu", "log_every": 5, "seed": 1}
    if "translate" in kinds:
        translate_run(work, common)
    if set(kinds) - {"translate"}:
        decoder_runs(work, shared, common)

    def verify(card):
        sig = check_signature(card)
        return f"valid ({sig['scheme']}, key {sig.get('key_id')})"

    for kind in kinds:
        res = write_report(work / kind, HERE / kind, load=zenlm.load, verify=verify, log=quiet)
        sizes = {Path(p).name: Path(p).stat().st_size for p in [res["html"], res["markdown"], *res["figures"]]}
        print(kind, json.dumps(sizes), json.dumps(res["notes"]) if res["notes"] else "")
    return 0


def decoder_runs(work: Path, shared: Path, common: dict) -> None:
    """The pretrain run and the three fine-tunes from it (all are needed by any of them)."""
    import zenlm
    from zenlm.data.shards import PrepareConfig, prepare
    from zenlm.train.config import resolve
    from zenlm.train.finetune import finetune, resolve_finetune
    from zenlm.train.loop import pretrain

    (work / "corpus.txt").write_text(corpus(shared), encoding="utf-8")
    prepare(PrepareConfig(inputs=[str(work / "corpus.txt")], out=str(work / "data"), vocab_size=512), log=quiet)
    pretrain(resolve({"model": TINY, "data": {"path": str(work / "data")},
                      "train": {**common, "out_dir": str(work / "pretrain"), "batch_size": 16, "seq_len": 64,
                                "lr": 3e-3, "warmup_steps": 10, "max_steps": 300, "eval_every": 50,
                                "eval_batches": 8, "ckpt_every": 0}}), log=quiet)
    (work / "sentiment.tsv").write_text("sentence\tlabel\n" + "\n".join(classify_rows(shared)) + "\n")
    finetune(resolve_finetune({"task": "classify", "base": str(work / "pretrain"),
                               "data": {"train": str(work / "sentiment.tsv"), "text_col": "sentence"},
                               "lora": {"r": 8, "targets": ["all"]},
                               "train": {**common, "out_dir": str(work / "classify"), "batch_size": 32,
                                         "lr": 5e-3, "max_steps": 200, "eval_every": 40}}),
             zenlm.load(str(work / "pretrain")), log=quiet)
    finetune(resolve_finetune({"task": "classify", "base": str(work / "pretrain"),
                               "data": {"train": str(work / "sentiment.tsv"), "text_col": "sentence"},
                               "lora": {"r": 8, "targets": ["all"]},
                               "train": {**common, "out_dir": str(work / "classify-dp"), "batch_size": 32,
                                         "grad_accum": 4, "lr": 5e-3, "max_steps": 40, "eval_every": 10,
                                         "dp": {"epsilon": 8.0}}}),
             zenlm.load(str(work / "pretrain")), log=quiet)
    (work / "pairs.jsonl").write_text("".join(json.dumps({"question": f"Add {a} and {b}?", "answer": f"It is {a + b}."})
                                              + "\n" for a in range(10) for b in range(10)))
    finetune(resolve_finetune({"task": "chat", "base": str(work / "pretrain"),
                               "data": {"train": str(work / "pairs.jsonl"), "prompt_field": "question",
                                        "response_field": "answer"},
                               "train": {**common, "out_dir": str(work / "chat"), "batch_size": 8,
                                         "lr": 3e-3, "max_steps": 120, "eval_every": 20, "eval_at_start": True}}),
             zenlm.load(str(work / "pretrain")), log=quiet)


if __name__ == "__main__":
    sys.exit(main())
