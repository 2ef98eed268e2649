"""The encoder-decoder end to end: Hugging Face Marian export and import, a short training run
on Multi30k through `zenlm pretrain`, checkpoint averaging, and `zenlm translate`."""

from __future__ import annotations

import pytest
import torch

from helpers import MULTI30K, TINY_SEQ2SEQ, quiet_transformers, random_seq2seq, run_cli, write_number_pairs
from zenlm.data.pairs import PairsConfig, collate_pairs, prepare_pairs


@pytest.fixture(scope="module")
def numbers(tmp_path_factory):
    from zenlm.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("numbers")
    src, tgt = write_number_pairs(root / "raw", n=200)
    prepare_pairs(PairsConfig(src=str(src), tgt=str(tgt), out=str(root / "d"), vocab_size=300),
                  log=lambda *a: None)
    return Tokenizer.load(root / "d/tokenizer.json"), src.read_text().splitlines()


def test_marian_export_translates_to_the_same_tokens(numbers, tmp_path):
    transformers = quiet_transformers()
    from zenlm.infer.beam import greedy
    from zenlm.interop.hf import export_hf, load_hf_folder

    tok, lines = numbers
    model = random_seq2seq(tok.vocab_size, seed=3)
    export_hf(model, tok, tmp_path / "hf")
    hf = transformers.MarianMTModel.from_pretrained(tmp_path / "hf").eval()
    rows = [tok.encode(t) + [tok.eot_id] for t in lines[:8]]
    pad = tok.hf.token_to_id("<pad>")
    src, mask, tgt_in, _ = collate_pairs(rows, [tok.encode(t) for t in lines[8:16]], tok.eot_id, pad)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt_in).logits,
                                   model(src, mask, tgt_in), rtol=1e-4, atol=1e-4)
        ours = greedy(model, src, mask, bos_id=tok.eot_id, eos_id=tok.eot_id, pad_id=pad)
        theirs = hf.generate(input_ids=src, attention_mask=mask, do_sample=False, num_beams=1,
                             max_new_tokens=40, bad_words_ids=[[pad]])
    assert len({tuple(x) for x in ours}) > 1
    limits = (mask.sum(1) * 1.5 + 10).long().tolist()  # zenlm's default length limit per source
    for row, ids, limit in zip(ours, theirs.tolist(), limits):
        ids = ids[1:]  # after the decoder start token
        assert ids[: len(row)] == row
        if len(row) < limit - 1:  # zenlm's translation ended by itself: transformers' did there too
            assert ids[len(row)] == tok.eot_id
    back, back_tok = load_hf_folder(tmp_path / "hf")  # and the folder comes back as a Seq2Seq
    assert type(back).__name__ == "Seq2Seq" and back_tok.eot_id == tok.eot_id
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and torch.equal(a, b)


def test_shapes_marian_cannot_hold_are_refused(numbers, tmp_path):
    from zenlm.errors import UnsupportedArchitectureError
    from zenlm.interop.hf import export_hf

    tok, _ = numbers
    with pytest.raises(UnsupportedArchitectureError, match="norm_position='pre'"):
        export_hf(random_seq2seq(tok.vocab_size, norm_position="pre"), tok, tmp_path / "x")


def test_one_embedding_serves_source_target_and_output(numbers):
    tok, _ = numbers
    model = random_seq2seq(tok.vocab_size)
    assert model.decoder.tok_emb is model.encoder.tok_emb
    names = list(model.state_dict())
    assert sum(n.endswith("tok_emb.weight") for n in names) == 1 and not any("lm_head" in n for n in names)
    assert sum(p.numel() for p in model.parameters()) == model.num_params()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if not (MULTI30K / "train.en").is_file():
        pytest.skip(f"Multi30k is not at {MULTI30K}")
    from zenlm.train.config import resolve
    from zenlm.train.loop import pretrain

    root = tmp_path_factory.mktemp("m30k")
    for split, n in (("train", 1500), ("val", 60)):
        for lang in ("en", "de"):
            lines = (MULTI30K / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:n]
            (root / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare_pairs(PairsConfig(src=str(root / "train.en"), tgt=str(root / "train.de"), out=str(root / "d"),
                              val_src=str(root / "val.en"), val_tgt=str(root / "val.de"), vocab_size=500),
                  log=lambda *a: None)
    cfg = resolve({"model": {**TINY_SEQ2SEQ, "d_model": 64, "n_head": 4, "max_seq_len": 64},
                   "data": {"path": str(root / "d")},
                   "train": {"out_dir": str(root / "run"), "max_steps": 40, "batch_tokens": 800,
                             "label_smoothing": 0.1, "lr": 3e-3, "warmup_steps": 5, "eval_every": 0,
                             "eval_at_start": True, "eval_bleu_sentences": 10, "ckpt_every": 10,
                             "keep_last": 3, "progress": False, "device": "cpu", "log_every": 5}})
    summary = pretrain(cfg, log=lambda *a: None)
    return root, summary


def test_a_short_run_on_multi30k_lowers_val_loss(trained):
    import json

    root, summary = trained
    evals = [json.loads(line) for line in (root / "run/metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "val_loss" in e]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert {"val_bleu", "val_chrf", "val_bleu_lc_tok"} <= set(evals[-1])
    assert summary["task"] == "seq2seq" and summary["tokens"] > 0


def test_average_is_the_mean_of_the_last_checkpoints(trained, tmp_path):
    from safetensors.torch import load_file

    import zenlm

    root, _ = trained
    res = run_cli("average", root / "run", "--last", "3", "--out", tmp_path / "avg")
    assert res.returncode == 0, res.stderr
    ckpts = sorted((root / "run/checkpoints").glob("step_*"))[-3:]
    parts = [load_file(str(c / "model.safetensors")) for c in ckpts]
    avg = zenlm.load(tmp_path / "avg").model.state_dict()
    for k, v in avg.items():
        torch.testing.assert_close(v, sum(p[k].double() for p in parts).float() / 3, rtol=1e-6, atol=1e-7)
    assert not torch.equal(parts[0]["encoder.tok_emb.weight"], parts[-1]["encoder.tok_emb.weight"])
    bad = run_cli("average", root / "run", "--last", "9", "--out", tmp_path / "avg2")
    assert bad.returncode == 2 and "fewer than --last 9" in bad.stderr


def test_translate_cli_batched_equals_one_at_a_time(trained, tmp_path):
    import zenlm
    from zenlm.infer.beam import DecodeConfig, translate

    root, _ = trained
    lines = (root / "val.en").read_text(encoding="utf-8").splitlines()[:10]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    from helpers import ZENLM, cli_env
    import subprocess

    res = subprocess.run([*ZENLM, "translate", "--model", str(root / "run"), "--beam", "3",
                          "--batch-size", "4"], input=(tmp_path / "in.txt").read_text(encoding="utf-8"),
                         capture_output=True, text=True, env=cli_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    out = res.stdout.split("\n")[:-1]
    loaded = zenlm.load(root / "run")
    alone = [translate(loaded.model, loaded.tokenizer, [s], cfg=DecodeConfig(beam=3))[0] for s in lines]
    assert out == alone and len(out) == 10
    assert all("<pad>" not in t and "<|endoftext|>" not in t for t in out)  # detokenised text


def test_generate_refuses_an_encoder_decoder_in_one_line(trained):
    root, _ = trained
    res = run_cli("generate", "--model", root / "run", "--prompt", "Hello")
    assert res.returncode == 2, res.stderr
    assert "is an encoder-decoder: use zenlm translate" in res.stderr and "Traceback" not in res.stderr
