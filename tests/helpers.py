"""Plain helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"

CORPUS_BYTES = 200_000
VOCAB = 384
TRAINED_STEPS = 60  # the session's shared trained run (conftest.trained_run)

# The tiny model every training test uses: Llama switches (RoPE, RMSNorm, SwiGLU, GQA).
TINY_MODEL = {"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 64,
              "max_seq_len": 64}
TINY_TRAIN = {"batch_size": 8, "seq_len": 32, "lr": 3e-3, "warmup_steps": 2, "log_every": 1,
              "eval_every": 0, "eval_batches": 4, "ckpt_every": 0, "progress": False,
              "device": "cpu", "seed": 1234}


def head_at_line(text: str, n: int) -> str:
    cut = text.rfind("\n", 0, n)
    return text[: cut + 1] if cut > 0 else text[:n]


def stdlib_sample(max_bytes: int = CORPUS_BYTES) -> str:
    """A deterministic sample of the standard library's own .py sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for f in sorted(root.glob("*.py")):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or len(text.encode()) > 60_000:
            continue
        out.append(text)
        total += len(text.encode())
        if total >= max_bytes:
            break
    return "".join(out)


def run_config(data_dir, out_dir, model: dict | None = None, **train):
    """A RunConfig for the tiny model, built through the same path a recipe takes."""
    from zenlm.train.config import resolve

    return resolve({"model": {**TINY_MODEL, **(model or {})}, "data": {"path": str(data_dir)},
                    "train": {**TINY_TRAIN, "out_dir": str(out_dir), **train}})


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONWARNINGS", None)
    return env


ZENLM = [sys.executable, "-m", "zenlm.cli.main"]


def run_cli(*args, timeout: float = 180, cwd=None) -> subprocess.CompletedProcess:
    """``python -m zenlm.cli.main ARGS`` as a real subprocess."""
    return subprocess.run([*ZENLM, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), cwd=cwd)


def quiet_transformers():
    """transformers for a peer test, without its progress bars and warnings (skip if absent)."""
    import pytest

    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass
    return transformers


def write_addition_pairs(path):
    """100 prompt/response pairs ("Add a and b?" -> "It is a+b.") for chat fine-tunes, as JSONL."""
    import json

    path.write_text("".join(json.dumps({"question": f"Add {a} and {b}?", "answer": f"It is {a + b}."}) + "\n"
                            for a in range(10) for b in range(10)))
    return path


MULTI30K = Path(__file__).resolve().parents[2] / "shared/data/multi30k"
EN_DE = {"one": "eins", "two": "zwei", "three": "drei", "four": "vier", "five": "fünf",
         "six": "sechs", "seven": "sieben", "eight": "acht", "nine": "neun", "zero": "null"}
# The tiny encoder-decoder of the translation tests, in Marian's shape (post-norm, sinusoidal).
TINY_SEQ2SEQ = {"encoder_layers": 2, "n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 48,
                "norm": "layernorm", "norm_position": "post", "pos": "sinusoidal",
                "scale_embeddings": True, "mlp": "gelu_exact", "bias": True}


def write_number_pairs(folder, n: int = 300, seed: int = 0):
    """``n`` English/German pairs of digit words ("three one four" -> "drei eins vier"),
    one a line, in ``folder``/src.txt and tgt.txt: a task a tiny model learns in seconds."""
    import random

    rng = random.Random(seed)
    words = list(EN_DE)
    src, tgt = [], []
    for _ in range(n):
        ws = [rng.choice(words) for _ in range(rng.randint(1, 6))]
        src.append(" ".join(ws).capitalize() + ".")
        tgt.append(" ".join(EN_DE[w] for w in ws).capitalize() + ".")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "src.txt").write_text("\n".join(src) + "\n", encoding="utf-8")
    (folder / "tgt.txt").write_text("\n".join(tgt) + "\n", encoding="utf-8")
    return folder / "src.txt", folder / "tgt.txt"


def random_seq2seq(vocab_size: int, seed: int = 0, scale: float = 0.3, **overrides):
    """A tiny Seq2Seq with weights spread wider than the init, so greedy outputs vary."""
    import torch

    from zenlm.config import TransformerConfig
    from zenlm.model.seq2seq import Seq2Seq

    torch.manual_seed(seed)
    model = Seq2Seq(TransformerConfig(vocab_size=vocab_size, **{**TINY_SEQ2SEQ, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn_like(p) * scale)
    return model
