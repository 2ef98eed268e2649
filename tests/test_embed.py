"""`zenlm embed` and int8 embeddings on all-MiniLM-L6-v2, and an encoder through the existing
fine-tuning (`zenlm finetune classify --model minilm`)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

import zenlm
from helpers import run_cli

SUBJECTS = ["the cat", "a young engineer", "my grandmother", "the city council", "this film",
            "the old bridge", "our new neighbour", "the football team", "a quiet student", "the river"]
VERBS = ["loves", "ignores", "was praised for", "slowly destroyed", "could not stand",
         "quietly admired", "wrote about", "is famous for"]
OBJECTS = ["rainy afternoons", "the final chapter", "cheap jokes", "its breathtaking music",
           "a long walk by the sea", "the 1998 elections", "unexpected visitors", "cold coffee"]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
            + "".join(f" and {rng.choice(OBJECTS)}" for _ in range(rng.randint(0, 3)))
            for _ in range(n)]


@pytest.fixture(scope="module", autouse=True)
def need_minilm():
    from zenlm.interop.load import minilm_path

    try:
        minilm_path()
    except zenlm.errors.ZenlmError as exc:
        pytest.skip(str(exc))


def test_int8_embeddings_stay_close_to_fp32():
    texts = sentences(48)
    fp32 = zenlm.embed(texts)
    int8 = zenlm.embed(texts, dtype="int8")
    cos = (fp32 * int8).sum(1)
    assert cos.mean() >= 0.995, cos.mean()
    assert np.allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-5)
    # not the same numbers: int8 really ran
    assert np.abs(fp32 - int8).max() > 1e-4
    # the nearest neighbour of each text is the same under both
    assert ((fp32 @ fp32.T).argsort(1)[:, -2] == (int8 @ int8.T).argsort(1)[:, -2]).mean() >= 0.9
    raw = zenlm.embed(texts[:3], normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)


def test_embed_cli_writes_npy_and_jsonl(tmp_path):
    texts = sentences(7, seed=3)
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    p = run_cli("embed", "--model", "minilm", tmp_path / "in.txt", "--out", tmp_path / "v.npy")
    assert p.returncode == 0, p.stderr
    vectors = np.load(tmp_path / "v.npy")
    assert vectors.shape == (7, 384)
    assert np.abs(vectors - zenlm.embed(texts)).max() < 1e-5
    p = run_cli("embed", tmp_path / "in.jsonl", "--field", "body", "--out", tmp_path / "v.jsonl", "--int8")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == texts
    assert (np.array([r["embedding"] for r in rows]) * vectors).sum(1).mean() > 0.99
    p = run_cli("embed", tmp_path / "in.txt", "--out", tmp_path / "v.csv")
    assert p.returncode == 2 and ".npy or .jsonl" in p.stderr
    p = run_cli("embed", "--model", "smollm2", tmp_path / "in.txt")
    assert p.returncode == 2 and "decoder" in p.stderr


def test_finetune_classify_minilm_with_layer_decay(tmp_path):
    rng = random.Random(0)
    good, bad = ["wonderful", "great", "delightful", "superb"], ["awful", "boring", "dreadful", "dull"]

    def rows(n):
        out = []
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            word = rng.choice(good if label == "pos" else bad)
            out.append((f"{rng.choice(SUBJECTS)} was {word} , said {rng.choice(SUBJECTS)}", label))
        return out

    for name, n in (("train", 160), ("val", 40)):
        (tmp_path / f"{name}.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows(n)))
    run = tmp_path / "run"
    p = run_cli("finetune", "classify", "--model", "minilm", "--train", tmp_path / "train.tsv",
                "--val", tmp_path / "val.tsv", "--text-col", "sentence", "--out", run,
                "--method", "full", "--lr", "1e-4", "--layer-decay", "0.8", "--max-steps", "20",
                "--batch-size", "16", "--set", "train.progress=false", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("val accuracy"))
    assert float(line.split()[2].rstrip(",")) >= 0.9, line
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["finetune"]["pooling"] in ("auto", "mean")
    groups = {g["name"]: g["lr_scale"] for g in cfg["param_groups"]}
    # embeddings (with the segment embeddings and their norm) at the bottom, the head on top
    assert groups["layer_00.decay"] == pytest.approx(0.8 ** 7)
    assert groups["layer_07.decay"] == pytest.approx(1.0)
    loaded = zenlm.load(str(run))
    assert loaded.model.head.pooling == "mean"
