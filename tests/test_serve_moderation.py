"""Moderation in the server, as a client sees it: the official openai client against a real
uvicorn server on 127.0.0.1 serving SmolLM2 under a policy (``create_app(policy=...)``).

A blocked prompt must never reach the model (its forward calls are counted), a reply a block
rule matches ends with ``finish_reason: "content_filter"`` (checked against the model's own
unmoderated reply), every non-allow verdict lands in the audit record without the text, and
``/v1/moderations`` answers from the same policy, its classifier scores checked against a
forward of the classifier.
"""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import pytest
import torch

from serve_helpers import Served, load_smollm2, needs_smollm2

openai = pytest.importorskip("openai")

pytestmark = needs_smollm2

POLICY = {
    "message": "Blocked by policy.",
    "rules": [
        {"name": "weapons", "keywords": ["build a bomb"], "action": "block"},
        {"name": "six", "regex": [r"\b6\b"], "action": "block", "apply_to": ["output"]},
        {"name": "pets", "keywords": ["cat", "cats"], "action": "flag"},
        {"name": "greeting", "keywords": ["hello"], "action": "log"},
        # a real (untrained) classifier: its probability is the score, never above 1.0
        {"name": "toxic", "classifier": "tiny-clf", "labels": ["bad"], "threshold": 1.0, "action": "flag",
         "apply_to": ["prompt"]},
    ],
}
COUNT = "1, 2, 3, 4,"  # SmolLM2 greedily continues " 5, 6, ...": the output rule "six" fires


def _classifier(tokenizer):
    from zenlm.config import TransformerConfig
    from zenlm.model import Transformer
    from zenlm.model.heads import Classifier

    torch.manual_seed(0)
    cfg = TransformerConfig.preset("llama", vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                                   d_model=32, max_seq_len=64)
    return Classifier(Transformer(cfg), ["ok", "bad"]).eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    from zenlm.infer.moderation import Policy
    from zenlm.serve.app import create_app
    from zenlm.serve.keys import KeyStore

    loaded = load_smollm2()
    clf = _classifier(tokenizer)
    policy = Policy.from_dict(POLICY, load_model=lambda path: SimpleNamespace(model=clf, tokenizer=tokenizer))
    state = tmp_path_factory.mktemp("mod-state")
    store = KeyStore(state)
    keys = {name: store.create(name, [scope])[0] for name, scope in
            [("gen", "generate"), ("emb", "embed"), ("admin", "admin")]}
    app = create_app(loaded, state_dir=state, model_name="smollm2", policy=policy)
    with Served(app) as s:
        s.keys, s.loaded, s.state_dir, s.clf, s.clf_tok = keys, loaded, state, clf, tokenizer
        yield s


def client(served, key="gen"):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=served.keys[key], max_retries=0)


class _ModelWork:
    """Counts what reaches the model: every prompt goes through the engine, as a request
    (``submit``: prefill in torch's forward or in the native step) or a call (prompt scoring,
    embeddings), so both are counted there."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []
        for name in ("submit", "call"):
            inner = getattr(engine, name)
            setattr(engine, name, lambda *a, _inner=inner, _name=name, **k: (self.calls.append(_name), _inner(*a, **k))[1])

    def remove(self) -> None:
        del self.engine.submit, self.engine.call  # back to the class's own methods


def _bad_probability(served, text):
    tok = served.clf_tok
    ids = ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + tok.encode(text.strip())
    with torch.no_grad():
        logits = served.clf(torch.tensor([ids]), torch.tensor([len(ids)]))
    return torch.softmax(logits.float(), -1)[0, served.clf.labels.index("bad")].item()


def _records(served):
    from zenlm.serve.audit import iter_records

    return list(iter_records(served.state_dir / "audit"))


def test_moderations_flagged_and_not(served):
    r = client(served).moderations.create(input="I have two cats")
    assert r.id.startswith("modr-") and len(r.results) == 1
    res = r.results[0]
    assert res.flagged and res.categories.pets and not res.categories.weapons
    assert res.category_scores.pets == 1.0 and res.action == "flag"
    assert res.category_scores.toxic == pytest.approx(_bad_probability(served, "I have two cats"), abs=1e-5)
    calm = client(served, "admin").moderations.create(input="The weather is mild today.").results[0]
    assert not calm.flagged and calm.action == "allow"
    assert not any(getattr(calm.categories, rule["name"]) for rule in POLICY["rules"])


def test_moderations_list_input(served):
    texts = ["hello there", "how do I build a bomb", "nice weather", "bomb"]
    r = client(served).moderations.create(input=texts, model="anything")
    assert r.model == "anything"
    assert [x.flagged for x in r.results] == [True, True, False, False]
    assert [x.action for x in r.results] == ["log", "block", "allow", "allow"]  # whole phrases only
    for text, x in zip(texts, r.results):
        assert 0.0 < x.category_scores.toxic < 1.0
        assert x.category_scores.toxic == pytest.approx(_bad_probability(served, text), abs=1e-5)


def test_moderations_scope_and_errors(served):
    with pytest.raises(openai.PermissionDeniedError):
        client(served, "emb").moderations.create(input="hi")
    with pytest.raises(openai.BadRequestError) as e:
        client(served).moderations.create(input=[{"type": "image_url", "image_url": {"url": "x"}}])
    assert e.value.body["param"] == "input"


def test_blocked_prompts_never_reach_the_model(served):
    work = _ModelWork(served.state.engine)
    calls = work.calls
    try:
        with pytest.raises(openai.BadRequestError) as e:
            client(served).chat.completions.create(
                model="smollm2", max_tokens=4,
                messages=[{"role": "system", "content": "Be helpful."},
                          {"role": "user", "content": "How do I BUILD a  bomb?"}])
        assert e.value.status_code == 400 and e.value.body["code"] == "content_policy_violation"
        assert "weapons" in e.value.body["message"] and e.value.body["param"] == "messages"
        with pytest.raises(openai.BadRequestError) as e:
            client(served).completions.create(model="smollm2", prompt=["fine", "build a bomb"], max_tokens=2,
                                              echo=True, logprobs=1)
        assert e.value.body["code"] == "content_policy_violation" and e.value.body["param"] == "prompt"
        assert calls == []
        # the counter does count: a prompt the policy only flags is served
        r = client(served).chat.completions.create(model="smollm2", max_tokens=2, temperature=0,
                                                   messages=[{"role": "user", "content": "I love my cat"}])
        assert r.choices[0].finish_reason in ("length", "stop") and calls == ["submit"]
    finally:
        work.remove()


def test_output_block_ends_with_content_filter(served):
    from zenlm.infer import generate

    ref = generate(served.loaded.model, served.loaded.tokenizer, COUNT, max_new_tokens=12, temperature=0)
    m = re.search(r"\b6\b", ref)
    assert m, ref  # the unmoderated reply does say 6
    c = client(served)
    r = c.completions.create(model="smollm2", prompt=COUNT, max_tokens=12, temperature=0, logprobs=1)
    assert r.choices[0].finish_reason == "content_filter" and r.choices[0].text == ""
    assert not r.choices[0].logprobs.tokens  # nothing of the withheld reply leaks through logprobs
    assert r.usage.completion_tokens == 12  # what was generated is still counted
    pieces, finish = [], []
    for chunk in c.completions.create(model="smollm2", prompt=COUNT, max_tokens=12, temperature=0, stream=True):
        for ch in chunk.choices:
            pieces.append(ch.text)
            finish.append(ch.finish_reason)
    sent = "".join(pieces)
    assert finish[-1] == "content_filter" and finish.count("content_filter") == 1
    assert ref.startswith(sent) and not re.search(r"\b6\b", sent) and len(sent) >= m.start() - 1
    # a chat reply is withheld, and a chat stream cut, the same way
    from zenlm.infer import SamplingConfig
    from zenlm.infer.chat import ChatSession

    ask = "Continue the list: 1, 2, 3, 4, 5,"
    session = ChatSession(served.loaded.model, served.loaded.tokenizer, SamplingConfig(max_new_tokens=24,
                                                                                      temperature=0))
    ref = "".join(session.reply(ask))
    assert re.search(r"\b6\b", ref), ref
    msgs = [{"role": "user", "content": ask}]
    full = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=24, temperature=0)
    assert full.choices[0].finish_reason == "content_filter" and full.choices[0].message.content == ""
    chunks = list(c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=24, temperature=0,
                                            stream=True))
    sent = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert ref.startswith(sent) and sent and not re.search(r"\b6\b", sent)


def test_audit_records_moderation_and_verifies(served, capsys):
    from zenlm.cli.main import main

    def completions():
        return [r for r in _records(served) if r.get("route") == "/v1/completions"]

    before = len(completions())
    c = client(served)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="smollm2", prompt="please build a bomb now", max_tokens=2)
    c.completions.create(model="smollm2", prompt="hello, my cat", max_tokens=2, temperature=0)
    c.completions.create(model="smollm2", prompt=COUNT, max_tokens=12, temperature=0)
    deadline = time.monotonic() + 10  # a request's record is written once its response has gone
    while len(completions()) < before + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    recs = completions()[before:before + 3]
    assert len(recs) == 3
    blocked, flagged, cut = (r.get("moderation") for r in recs)
    assert recs[0]["status"] == 400 and blocked == [{"where": "prompt", "action": "block", "rules": ["weapons"]}]
    assert flagged[0]["action"] == "flag" and flagged[0]["rules"] == ["greeting", "pets"]
    assert recs[2]["status"] == 200 and cut == [{"where": "output", "action": "block", "rules": ["six"],
                                                "choice": 0}]
    assert all("toxic" not in e["rules"] for e in blocked + flagged + cut)  # threshold 1.0: never hit
    raw = b"".join(p.read_bytes() for p in (served.state_dir / "audit").glob("audit-*.jsonl"))
    assert b"bomb" not in raw and b"cat" not in raw  # rule names and hashes, no prompt text
    assert b'"moderation"' in raw
    served.state.audit.checkpoint()
    assert main(["audit", "verify", "--state", str(served.state_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_no_policy_is_a_404(served, tmp_path):
    from zenlm.serve.app import create_app
    from zenlm.serve.keys import KeyStore

    key = KeyStore(tmp_path).create("gen", ["generate"])[0]
    app = create_app(served.loaded, state_dir=tmp_path, model_name="smollm2", max_batch=1)
    with Served(app) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.NotFoundError) as e:
            c.moderations.create(input="hi")
        assert e.value.body["code"] == "moderation_not_configured" and "--policy" in e.value.body["message"]


def test_serve_cli_refuses_a_missing_policy(tmp_path, capsys):
    from zenlm.cli.main import main

    assert main(["serve", "--model", "smollm2", "--state", str(tmp_path / "s"),
                 "--policy", str(tmp_path / "none.yaml")]) == 2
    assert "moderation policy not found" in capsys.readouterr().err
