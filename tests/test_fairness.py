"""CrowS-Pairs and counterfactual swaps.

Per-pair scores of SmolLM2 in zenlm equal a transformers computation on the same weights (the
model exported by ``zenlm.export_hf`` and read back by transformers, tokenized by transformers'
own tokenizer), in float64. Pseudo-log-likelihood scoring runs on a transformers masked LM as
the model (any ``model(ids, attention_mask)`` giving MLM logits) and is checked against a plain
loop. Counterfactual swaps are checked on a classifier trained to read one word.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import zenlm
from helpers import REPO, quiet_transformers
from zenlm.eval.fairness import (Pair, bootstrap_ci, counterfactual, crows_pairs, read_crows_pairs,
                                 read_swaps, shared_positions, swap_words)

CROWS = REPO.parent / "shared" / "data" / "crows_pairs"
if not CROWS.is_dir():
    CROWS = Path("/work/shared/data/crows_pairs")


@pytest.fixture(scope="module")
def pairs():
    if not CROWS.is_dir():
        pytest.skip(f"shared data set not found at {CROWS}")
    return read_crows_pairs(CROWS)


def test_read_crows_pairs(pairs):
    assert len(pairs) == 1508
    assert {p.direction for p in pairs} == {"stereo", "antistereo"}
    assert sum(p.bias_type == "race-color" for p in pairs) == 516


@pytest.fixture(scope="module")
def smollm2_pair(tmp_path_factory):
    tr = quiet_transformers()
    try:
        loaded = zenlm.load("smollm2")
    except Exception as exc:
        pytest.skip(f"smollm2 not available: {exc}")
    folder = tmp_path_factory.mktemp("smollm2_hf")
    zenlm.export_hf(loaded, str(folder))
    loaded.model.double()  # float64 on both sides: the sums compared are over ~20 tokens
    hf = tr.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float64).eval()
    hf_tok = tr.AutoTokenizer.from_pretrained(folder)
    return loaded, hf, hf_tok


@pytest.mark.slow  # about 45 s on 2 shared cores: export, then SmolLM2 twice in float64
def test_causal_pair_scores_equal_transformers(pairs, smollm2_pair):
    loaded, hf, hf_tok = smollm2_pair
    some = pairs[:6]
    res = crows_pairs(loaded.model, loaded.tokenizer, some, batch_size=4)
    start = hf_tok.bos_token_id if hf_tok.bos_token_id is not None else hf_tok.eos_token_id
    for p, row in zip(some, res.pairs):
        for text, got in ((p.more, row["more"]), (p.less, row["less"])):
            ids = torch.tensor([[start] + hf_tok(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(hf(ids).logits.double(), -1)
            want = float(logp[0, :-1].gather(-1, ids[0, 1:, None]).sum())
            assert abs(got - want) < 1e-5, (text, got, want)
        assert row["diff"] == pytest.approx(row["more"] - row["less"])
    hits = [r["more"] > r["less"] for r in res.pairs]
    assert res.overall["score"] == pytest.approx(100 * sum(hits) / len(hits))
    assert res.overall["ci95"][0] <= res.overall["score"] <= res.overall["ci95"][1]
    assert sum(v["n"] for v in res.per_type.values()) == len(some)


def test_bootstrap_interval_narrows_with_more_data():
    small = bootstrap_ci([1.0, 0.0] * 10)
    large = bootstrap_ci([1.0, 0.0] * 500)
    assert small[0] < 50 < small[1] and large[0] < 50 < large[1]
    assert large[1] - large[0] < small[1] - small[0]
    assert bootstrap_ci([1.0] * 30) == (100.0, 100.0)


def test_shared_positions_are_the_unmodified_tokens():
    a, b = [5, 6, 7, 8, 9], [5, 6, 70, 71, 8, 9]
    assert shared_positions(a, b) == ([0, 1, 3, 4], [0, 1, 4, 5])


def test_masked_lm_pseudo_log_likelihood(tmp_path):
    """A transformers BERT as the masked LM: PLL over the shared tokens equals a plain
    mask-one-token-at-a-time loop, and the differing words are never scored."""
    tr = quiet_transformers()
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers, processors

    words = "[PAD] [UNK] [CLS] [SEP] [MASK] the doctor said he she was tired".split()
    vocab = {w: i for i, w in enumerate(words)}
    hf = HFTok(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    for w in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
        hf.add_special_tokens([w])
    from zenlm.tokenizer import Tokenizer

    tok = Tokenizer(hf, eot=None, bos=None)
    torch.manual_seed(0)
    mlm = tr.BertForMaskedLM(tr.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=64)).eval()

    class Encoder(torch.nn.Module):  # how zenlm calls a masked LM: model(ids, mask) -> logits
        def __init__(self):
            super().__init__()
            self.m = mlm
            self.config = type("C", (), {"causal": False})()

        def forward(self, ids, attention_mask):
            return self.m(input_ids=ids, attention_mask=attention_mask).logits

    pair = Pair("the doctor said he was tired", "the doctor said she was tired", "gender", "stereo")
    res = crows_pairs(Encoder().eval(), tok, [pair])
    assert res.scoring.startswith("masked")

    def pll(text):
        ids = tok.hf.encode(text).ids
        assert ids[0] == vocab["[CLS]"] and ids[-1] == vocab["[SEP]"]
        total = 0.0
        for i in (1, 2, 3, 5, 6):  # the, doctor, said, was, tired: not [CLS]/[SEP], not he/she
            x = torch.tensor([ids])
            x[0, i] = vocab["[MASK]"]
            with torch.no_grad():
                total += float(torch.log_softmax(mlm(input_ids=x).logits.double(), -1)[0, i, ids[i]])
        return total

    assert res.pairs[0]["more"] == pytest.approx(pll(pair.more), abs=1e-9)
    assert res.pairs[0]["less"] == pytest.approx(pll(pair.less), abs=1e-9)


def test_swap_words_keeps_case_and_whole_words():
    assert swap_words("He said his son and she left; heather stays.", "he", "she") == \
        "She said his son and he left; heather stays."
    assert swap_words("JOHN met Mary", "John", "Mary") == "MARY met John"
    pairs = read_swaps()
    assert ("he", "she") in pairs and len(pairs) > 20


def test_user_swap_list(tmp_path):
    f = tmp_path / "swaps.txt"
    f.write_text("# mine\ncat, dog\nred blue\n")
    assert read_swaps(f) == [("cat", "dog"), ("red", "blue")]
    f.write_text("just-one\n")
    from zenlm.errors import DataError

    with pytest.raises(DataError, match="two words"):
        read_swaps(f)


def test_counterfactual_flips_a_classifier_that_reads_the_pronoun(tokenizer):
    """A classifier trained so the label is the pronoun flips on he<->she and not on a swap
    of words it ignores."""
    from zenlm.config import TransformerConfig
    from zenlm.data.batching import pad_rows
    from zenlm.model import Transformer
    from zenlm.model.heads import Classifier

    torch.manual_seed(0)
    cfg = TransformerConfig.preset("llama", vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2,
                                   d_model=32, max_seq_len=32)
    clf = Classifier(Transformer(cfg), ["he", "she"])
    verbs = ["walked", "ran", "read", "sat", "slept", "ate", "sang", "wrote"]
    texts = [f"{p} {v} home" for p in ("he", "she") for v in verbs] + \
            [f"then {p} {v}" for p in ("he", "she") for v in verbs]
    labels = torch.tensor([0 if t.split()[0] == "he" or t.split()[1] == "he" else 1 for t in texts])
    x, lengths = pad_rows([tokenizer.encode(t) for t in texts], 0)
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(clf(x, lengths), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    test = ["he walked home", "she sat home", "then he ran"]
    res = counterfactual(clf, tokenizer, test, [("he", "she"), ("walked", "sat"), ("cat", "dog")])
    per = {s["pair"]: s for s in res["per_pair"]}
    assert per["he<->she"]["n"] == 3 and per["he<->she"]["flip_rate"] == 1.0
    assert per["he<->she"]["mean_shift"] > 0.5
    assert per["walked<->sat"]["n"] == 2 and per["walked<->sat"]["flip_rate"] == 0.0
    assert per["cat<->dog"]["n"] == 0
    json.dumps(res)  # plain data
