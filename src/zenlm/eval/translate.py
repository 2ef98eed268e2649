"""Translation quality: sacreBLEU (with its signature), chrF, and lower-cased tokenised BLEU.

sacreBLEU is computed by the sacrebleu package itself, on detokenised, cased text with its
13a tokenizer, and reported with its signature so the number can be reproduced exactly.
Most published Multi30k numbers are instead BLEU on lower-cased, tokenised text (Moses'
tokenizer and multi-bleu.perl); sacremoses is not a dependency, so that figure here is BLEU
lower-cased over 13a tokens, which splits punctuation the way Moses does for these languages
and is labelled as what it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from zenlm.errors import DataError


@dataclass
class TranslationScores:
    n: int
    bleu: float  # sacreBLEU: cased, detokenised, 13a
    signature: str
    chrf: float
    chrf_signature: str
    bleu_lc_tok: float  # lower-cased, 13a-tokenised
    bleu_lc_tok_signature: str

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (f"{self.n} sentences: BLEU {self.bleu:.2f}  chrF {self.chrf:.2f}  "
                f"BLEU (lower-cased, tokenised) {self.bleu_lc_tok:.2f}\n{self.signature}")


def score_translations(hyps: list[str], refs: list[str]) -> TranslationScores:
    """Corpus-level scores of ``hyps`` against one reference each."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hyps) != len(refs):
        raise DataError(f"{len(hyps)} translations but {len(refs)} references")
    if not hyps:
        raise DataError("no sentences to score")
    bleu, chrf, lc = BLEU(), CHRF(), BLEU(lowercase=True, tokenize="13a")
    b, c, low = (m.corpus_score(hyps, [refs]) for m in (bleu, chrf, lc))
    return TranslationScores(
        n=len(hyps), bleu=b.score, signature=str(bleu.get_signature()), chrf=c.score,
        chrf_signature=str(chrf.get_signature()), bleu_lc_tok=low.score,
        bleu_lc_tok_signature=str(lc.get_signature()))


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 file (one sentence each), without the final newline's empty line."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise DataError(f"file not found: {p}")
    lines = p.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


__all__ = ["TranslationScores", "score_translations", "read_lines"]
