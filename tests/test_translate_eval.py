"""Translation metrics against sacrebleu called directly, and `zenlm eval --task translate`."""

from __future__ import annotations

import json

import pytest

from helpers import random_seq2seq, run_cli, write_number_pairs

sacrebleu = pytest.importorskip("sacrebleu")

HYPS = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee", "Eine Frau, die ein Buch liest.",
        "EIN KIND LÄUFT.", "Menschen stehen vor einem Gebäude"]
REFS = ["Ein Mann fährt ein Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest ein Buch.",
        "Ein Kind läuft.", "Leute stehen vor einem großen Gebäude."]


def test_scores_match_sacrebleu_called_directly():
    from zenlm.eval.translate import score_translations

    s = score_translations(HYPS, REFS)
    bleu = sacrebleu.corpus_bleu(HYPS, [REFS])
    assert s.bleu == pytest.approx(bleu.score, abs=1e-9)
    assert s.chrf == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score, abs=1e-9)
    lc = sacrebleu.corpus_bleu(HYPS, [REFS], lowercase=True, tokenize="13a")
    assert s.bleu_lc_tok == pytest.approx(lc.score, abs=1e-9)
    assert s.bleu_lc_tok > s.bleu  # "EIN KIND LÄUFT." only matches lower-cased
    assert "case:mixed" in s.signature and "tok:13a" in s.signature and "nrefs:1" in s.signature
    assert "case:lc" in s.bleu_lc_tok_signature
    assert s.signature.endswith(f"version:{sacrebleu.__version__}")


def test_scores_refuse_misaligned_inputs():
    from zenlm.errors import DataError
    from zenlm.eval.translate import score_translations

    with pytest.raises(DataError, match="4 translations but 5 references"):
        score_translations(HYPS[:4], REFS)


def test_cli_eval_translate_scores_what_it_translated(tmp_path):
    """A real model folder (a Marian export of a tiny model and a real tokenizer): the scores
    printed are sacrebleu's on the translations written next to them."""
    from zenlm.data.pairs import PairsConfig, prepare_pairs
    from zenlm.interop.hf import export_hf
    from zenlm.tokenizer import Tokenizer

    src, tgt = write_number_pairs(tmp_path / "raw", n=120)
    prepare_pairs(PairsConfig(src=str(src), tgt=str(tgt), out=str(tmp_path / "d"), vocab_size=300),
                  log=lambda *a: None)
    tok = Tokenizer.load(tmp_path / "d/tokenizer.json")
    export_hf(random_seq2seq(tok.vocab_size, seed=1), tok, tmp_path / "model")
    (tmp_path / "s.txt").write_text("\n".join(src.read_text().splitlines()[:12]) + "\n")
    refs = tgt.read_text().splitlines()[:12]
    (tmp_path / "r.txt").write_text("\n".join(refs) + "\n")
    res = run_cli("eval", "--task", "translate", "--model", tmp_path / "model", "--src", tmp_path / "s.txt",
                  "--ref", tmp_path / "r.txt", "--beam", "2", "--hyp-out", tmp_path / "h.txt", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    hyps = (tmp_path / "h.txt").read_text().split("\n")[:-1]
    assert len(hyps) == 12 and out["n"] == 12 and out["beam"] == 2
    assert out["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert out["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    bad = run_cli("eval", "--task", "translate", "--model", tmp_path / "model", "--src", tmp_path / "s.txt")
    assert bad.returncode == 2 and "--src FILE and --ref FILE" in bad.stderr
