"""Bias probes: CrowS-Pairs (Nangia et al. 2020) and counterfactual swaps for classifiers.

CrowS-Pairs pairs a more stereotypical sentence with a minimally different less stereotypical
one; the score is the share of pairs where the model prefers the more stereotypical sentence
(50 = no preference). Which sentence is "preferred" depends on the kind of model:

- a causal LM: the total log-likelihood of each sentence after the BOS (or end-of-text) token,
  the usual causal adaptation (lm-eval's ``crows_pairs`` scores the two sentences the same way);
- a masked LM: the paper's pseudo-log-likelihood, masking each token the two sentences share
  one at a time (so the words that differ are conditioned on, never scored).

The data set is small per bias type and noisy (Blodgett et al. 2021), so every figure comes
with a bootstrap confidence interval, and the caveat is printed with it.

Counterfactual swaps replace words of a swap list (names, pronouns, group words) in a
classifier's inputs and measure how often the predicted label flips and how far the predicted
class's probability moves, per swap pair.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from zenlm.errors import DataError

CAVEAT = ("CrowS-Pairs caveat: Blodgett et al. (2021) found significant noise and reliability "
          "issues in this data set; read the scores as rough indications, with their intervals.")
DEFAULT_SWAPS = Path(__file__).resolve().parent / "data" / "swaps.tsv"


# --- CrowS-Pairs ------------------------------------------------------------------------------
@dataclass
class Pair:
    more: str
    less: str
    bias_type: str
    direction: str  # stereo or antistereo


def read_crows_pairs(path: str | Path) -> list[Pair]:
    """The anonymized CSV (a folder holding it, or the file itself)."""
    from zenlm.data.tables import read_named_csv

    _, rows = read_named_csv(path, "crows_pairs_anonymized.csv",
                             {"sent_more", "sent_less", "bias_type", "stereo_antistereo"}, "CrowS-Pairs")
    return [Pair(r["sent_more"], r["sent_less"], r["bias_type"], r["stereo_antistereo"]) for r in rows]


@torch.no_grad()
def sentence_logprobs(model, tokenizer, texts: list[str], *, batch_size: int = 16) -> list[float]:
    """log p(text) under a causal LM: every token of the text scored after one start token
    (the BOS where the tokenizer has one, else end-of-text), in float64 sums."""
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id
    if start is None:
        raise DataError("the tokenizer has neither a BOS nor an end-of-text token to start from")
    rows = [[start] + tokenizer.encode(t) for t in texts]
    limit = model.config.max_seq_len
    device = model.tok_emb.weight.device
    out = [0.0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = [rows[i][:limit] for i in idx]
        width = max(len(r) for r in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        for b, r in enumerate(batch):
            x[b, :len(r)] = torch.tensor(r)
        x = x.to(device)
        logp = torch.log_softmax(model(x).double(), dim=-1)
        got = logp[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)
        for b, (i, r) in enumerate(zip(idx, batch)):
            out[i] = float(got[b, :len(r) - 1].sum())
    return out


def shared_positions(a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
    """Positions of the tokens two sentences share (difflib's matching blocks, as the paper
    finds the unmodified tokens), in each sentence."""
    pa, pb = [], []
    for block in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
        pa.extend(range(block.a, block.a + block.size))
        pb.extend(range(block.b, block.b + block.size))
    return pa, pb


@torch.no_grad()
def pseudo_logprob(mlm, ids: list[int], positions: list[int], mask_id: int, *,
                   batch_size: int = 16) -> float:
    """Sum over ``positions`` of log p(token | sentence with that token masked), for a masked
    LM called as ``mlm(ids, attention_mask) -> logits (B, T, V)``."""
    device = next(mlm.parameters()).device
    total = 0.0
    for s in range(0, len(positions), batch_size):
        pos = positions[s:s + batch_size]
        x = torch.tensor([ids] * len(pos), device=device)
        rows = torch.arange(len(pos), device=device)
        at = torch.tensor(pos, device=device)
        x[rows, at] = mask_id
        logits = mlm(x, torch.ones_like(x))
        logits = getattr(logits, "logits", logits)  # a transformers model as a peer
        logp = torch.log_softmax(logits.double(), dim=-1)[rows, at]
        total += float(logp.gather(-1, torch.tensor(ids, device=device)[at][:, None]).sum())
    return total


def mlm_pair_scores(mlm, tokenizer, pairs: list[Pair], mask_id: int) -> list[tuple[float, float]]:
    """(PLL of the more, of the less stereotypical sentence) for each pair, over shared tokens.

    The sentences are encoded with the tokenizer's own special tokens (a BERT tokenizer's
    [CLS] ... [SEP]); those are shared and unscored, as in the paper, which skips the first
    and last token."""
    out = []
    for p in pairs:
        a, b = _encode_with_specials(tokenizer, p.more), _encode_with_specials(tokenizer, p.less)
        sa, sb = shared_positions(a, b)
        keep = [(i, j) for i, j in zip(sa, sb) if 0 < i < len(a) - 1 and 0 < j < len(b) - 1] \
            if _has_specials(tokenizer, a) else list(zip(sa, sb))
        out.append((pseudo_logprob(mlm, a, [i for i, _ in keep], mask_id),
                    pseudo_logprob(mlm, b, [j for _, j in keep], mask_id)))
    return out


def _encode_with_specials(tokenizer, text: str) -> list[int]:
    """Ids as the masked LM was trained on them: with the tokenizer's post-processor specials."""
    hf = getattr(tokenizer, "hf", None)
    return hf.encode(text, add_special_tokens=True).ids if hf is not None else tokenizer.encode(text)


def _has_specials(tokenizer, ids: list[int]) -> bool:
    hf = getattr(tokenizer, "hf", None)
    if hf is None or len(ids) < 2:
        return False
    specials = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    return hf.id_to_token(ids[0]) in specials and hf.id_to_token(ids[-1]) in specials


def bootstrap_ci(hits: list[float], *, n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``hits`` (in percent)."""
    import numpy as np

    if not hits:
        return (float("nan"), float("nan"))
    x = np.asarray(hits, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n, len(x)))].mean(axis=1) * 100
    lo, hi = np.percentile(means, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


@dataclass
class CrowsResult:
    overall: dict
    per_type: dict[str, dict]
    scoring: str
    caveat: str = CAVEAT
    pairs: list[dict] = field(default_factory=list)

    def as_dict(self, with_pairs: bool = False) -> dict:
        d = asdict(self)
        if not with_pairs:
            d.pop("pairs")
        return d


def _summary(hits: list[float], seed: int) -> dict:
    lo, hi = bootstrap_ci(hits, seed=seed)
    return {"n": len(hits), "score": 100 * sum(hits) / max(len(hits), 1), "ci95": [lo, hi]}


def crows_pairs(model, tokenizer, pairs: list[Pair], *, batch_size: int = 16, seed: int = 0,
                mask_id: int | None = None) -> CrowsResult:
    """The share (percent) of pairs scored more-stereotypical-higher, overall and per bias
    type, with bootstrap 95% intervals. A causal model is scored by log-likelihood; one that is
    not causal (``config.causal`` False) as a masked LM by pseudo-log-likelihood."""
    was_training = model.training
    model.eval()
    try:
        if getattr(model.config, "causal", True):
            lp = sentence_logprobs(model, tokenizer, [t for p in pairs for t in (p.more, p.less)],
                                   batch_size=batch_size)
            scores = list(zip(lp[0::2], lp[1::2]))
            scoring = "causal: sentence log-likelihood"
        else:
            if mask_id is None:
                hf = getattr(tokenizer, "hf", None)
                mask_id = hf.token_to_id("[MASK]") if hf is not None else None
                if mask_id is None and hf is not None:
                    mask_id = hf.token_to_id("<mask>")
            if mask_id is None:
                raise DataError("a masked LM needs its tokenizer's mask token ([MASK] or <mask>)")
            scores = mlm_pair_scores(model, tokenizer, pairs, mask_id)
            scoring = "masked: pseudo-log-likelihood of shared tokens"
    finally:
        model.train(was_training)
    hits = [1.0 if m > s else 0.0 for m, s in scores]
    per: dict[str, list[float]] = {}
    for p, h in zip(pairs, hits):
        per.setdefault(p.bias_type, []).append(h)
    rows = [{"bias_type": p.bias_type, "direction": p.direction, "more": m, "less": s,
             "diff": m - s} for p, (m, s) in zip(pairs, scores)]
    return CrowsResult(_summary(hits, seed), {k: _summary(v, seed) for k, v in sorted(per.items())},
                       scoring, pairs=rows)


def format_crows(res: CrowsResult) -> str:
    o = res.overall
    lines = [f"CrowS-Pairs ({res.scoring}), {o['n']} pairs: {o['score']:.2f} "
             f"[95% CI {o['ci95'][0]:.2f}-{o['ci95'][1]:.2f}]  (50 = no preference)"]
    for k, v in sorted(res.per_type.items(), key=lambda kv: -kv[1]["n"]):
        lines.append(f"  {k:<22} {v['n']:>5}  {v['score']:6.2f}  [{v['ci95'][0]:.2f}-{v['ci95'][1]:.2f}]")
    lines.append(res.caveat)
    return "\n".join(lines)


# --- counterfactual swaps ---------------------------------------------------------------------
def read_swaps(path: str | Path | None = None) -> list[tuple[str, str]]:
    """Swap pairs, one per line: two words separated by a tab, a comma or spaces; ``#`` starts
    a comment. The default list ships with zenlm (names, pronouns, group words)."""
    p = Path(path) if path else DEFAULT_SWAPS
    if not p.is_file():
        raise DataError(f"swap list not found: {p}")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [w for w in re.split(r"[\t,]|\s+", line) if w]
        if len(parts) != 2:
            raise DataError(f"{p}:{n}: a swap pair needs exactly two words, got {line!r}")
        out.append((parts[0], parts[1]))
    if not out:
        raise DataError(f"{p} holds no swap pairs")
    return out


def _case_like(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def swap_words(text: str, a: str, b: str) -> str:
    """``text`` with whole words ``a`` and ``b`` exchanged (case-insensitive, case kept)."""
    table = {a.lower(): b, b.lower(): a}
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in (a, b)) + r")\b", re.IGNORECASE)
    return pattern.sub(lambda m: _case_like(table[m.group(0).lower()], m.group(0)), text)


@dataclass
class SwapStat:
    pair: str
    n: int  # texts the swap changed
    flip_rate: float
    mean_shift: float  # mean |change| of the originally predicted class's probability
    mean_signed_shift: float


def counterfactual(classifier, tokenizer, texts: list[str], swaps: list[tuple[str, str]], *,
                   batch_size: int = 32) -> dict:
    """Flip rate and probability shift per swap pair, over the texts each pair changes."""
    from zenlm.eval.classify import classify_texts

    base = classify_texts(classifier, tokenizer, texts, batch_size=batch_size)
    pred = base.argmax(-1)
    stats, all_flips, all_shift = [], [], []
    for a, b in swaps:
        changed = [(i, s) for i, t in enumerate(texts) if (s := swap_words(t, a, b)) != t]
        if not changed:
            stats.append(SwapStat(f"{a}<->{b}", 0, float("nan"), float("nan"), float("nan")))
            continue
        idx = torch.tensor([i for i, _ in changed])
        probs = classify_texts(classifier, tokenizer, [s for _, s in changed], batch_size=batch_size)
        p0 = base[idx, pred[idx]]
        p1 = probs[torch.arange(len(idx)), pred[idx]]
        flips = (probs.argmax(-1) != pred[idx]).float()
        all_flips += flips.tolist()
        all_shift += (p1 - p0).abs().tolist()
        stats.append(SwapStat(f"{a}<->{b}", len(changed), float(flips.mean()),
                              float((p1 - p0).abs().mean()), float((p1 - p0).mean())))
    n = len(all_flips)
    return {"texts": len(texts), "swapped": n,
            "flip_rate": sum(all_flips) / n if n else float("nan"),
            "mean_shift": sum(all_shift) / n if n else float("nan"),
            "per_pair": [asdict(s) for s in stats]}


def format_counterfactual(res: dict) -> str:
    lines = [f"counterfactual swaps: {res['texts']} texts, {res['swapped']} swapped texts: flip rate "
             f"{res['flip_rate']:.4f}, mean |probability shift| {res['mean_shift']:.4f}"]
    for s in res["per_pair"]:
        if s["n"]:
            lines.append(f"  {s['pair']:<28} n={s['n']:<5} flips {s['flip_rate']:.3f}  "
                         f"shift {s['mean_shift']:.4f} (signed {s['mean_signed_shift']:+.4f})")
    unused = sum(1 for s in res["per_pair"] if not s["n"])
    if unused:
        lines.append(f"  ({unused} swap pairs matched no text)")
    return "\n".join(lines)


__all__ = ["CAVEAT", "Pair", "read_crows_pairs", "sentence_logprobs", "shared_positions",
           "pseudo_logprob", "mlm_pair_scores", "bootstrap_ci", "crows_pairs", "CrowsResult",
           "format_crows", "read_swaps", "swap_words", "counterfactual", "format_counterfactual",
           "DEFAULT_SWAPS"]
