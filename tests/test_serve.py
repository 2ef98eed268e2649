"""The server as a client sees it: the official openai client (only base_url and api_key set)
against a real uvicorn server on 127.0.0.1 serving SmolLM2, checked against the model itself."""

from __future__ import annotations

import http.client
import json
import re
import time

import pytest
import torch

from serve_helpers import Served, get, load_smollm2, needs_smollm2

openai = pytest.importorskip("openai")

pytestmark = needs_smollm2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from zenlm.serve.app import create_app
    from zenlm.serve.keys import KeyStore

    loaded = load_smollm2()
    state = tmp_path_factory.mktemp("serve-state")
    store = KeyStore(state)
    keys = {
        "gen": store.create("gen", ["generate"])[0],
        "emb": store.create("emb", ["embed"])[0],
        "admin": store.create("admin", ["admin"])[0],
        "rate": store.create("rate", ["generate"], rate="2/min")[0],
        "quota": store.create("quota", ["generate"], tokens="20/day")[0],
    }
    revoked, rec = store.create("revoked", ["generate"])
    store.revoke(rec.id)
    keys["revoked"] = revoked
    # a small engine, so that a full queue is easy to reach
    app = create_app(loaded, state_dir=state, max_batch=2, max_queue=2, model_name="smollm2")
    with Served(app) as s:
        s.keys, s.loaded, s.state_dir = keys, loaded, state
        yield s


def client(served, key="gen", **kw):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=served.keys.get(key, key), max_retries=0, **kw)


def logits_of(loaded, ids):
    with torch.no_grad():
        return loaded.model(torch.tensor([ids]))[0].float().log_softmax(-1)


def test_models(served):
    models = client(served).models.list()
    assert [m.id for m in models.data] == ["smollm2"]
    assert client(served, "emb").models.list().data[0].id == "smollm2"


def test_completion_greedy_matches_the_library(served):
    from zenlm.infer import generate

    prompt = "The capital of France is"
    r = client(served).completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0)
    ref = generate(served.loaded.model, served.loaded.tokenizer, prompt, max_new_tokens=12, temperature=0)
    assert r.choices[0].text == ref
    assert r.usage.prompt_tokens == len(served.loaded.tokenizer.encode_prompt(prompt))
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"


def test_completion_stop_n_seed(served):
    c = client(served)
    r = c.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=10, temperature=0, stop=[" 7"])
    assert r.choices[0].finish_reason == "stop" and " 7" not in r.choices[0].text
    assert "6" in r.choices[0].text
    kw = dict(model="smollm2", prompt="Once upon a time", max_tokens=4, temperature=1.0, n=2, seed=7)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]  # a seed repeats
    assert len(a.choices) == 2 and a.choices[0].text != a.choices[1].text  # choices differ
    batch = c.completions.create(model="smollm2", prompt=["Hello", "Goodbye"], max_tokens=3, temperature=0)
    assert [ch.index for ch in batch.choices] == [0, 1]


def test_completion_logprobs_and_echo_match_a_forward(served):
    tok = served.loaded.tokenizer
    prompt = "The sky is blue and the grass is"
    r = client(served).completions.create(model="smollm2", prompt=prompt, max_tokens=1, temperature=0,
                                          logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    ids = tok.encode_prompt(prompt)
    assert r.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
    ref = logits_of(served.loaded, ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=2e-3)
    nxt = int(ref[-1].argmax())
    assert lp.token_logprobs[-1] == pytest.approx(ref[-1, nxt].item(), abs=2e-3)
    top = lp.top_logprobs[-1]
    assert len(top) == 2 and max(top.values()) == pytest.approx(lp.token_logprobs[-1], abs=1e-4)
    assert lp.text_offset[1] == len(tok.decode(ids[:1]))


def test_chat_plain_and_streamed(served):
    from zenlm.infer import SamplingConfig
    from zenlm.infer.chat import ChatSession

    c = client(served)
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    r = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=20, temperature=0)
    session = ChatSession(served.loaded.model, served.loaded.tokenizer,
                          SamplingConfig(max_new_tokens=20, temperature=0), system="You are terse.")
    ref = "".join(session.reply("Name a colour."))
    assert r.choices[0].message.content == ref and r.choices[0].message.role == "assistant"
    pieces, usage, finish = [], None, None
    for chunk in c.chat.completions.create(model="smollm2", messages=msgs, max_completion_tokens=20,
                                           temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(pieces) == ref
    assert usage.completion_tokens == r.usage.completion_tokens and usage.prompt_tokens == r.usage.prompt_tokens
    assert finish == r.choices[0].finish_reason


def test_chat_logprobs_seed_stop(served):
    c = client(served)
    msgs = [{"role": "user", "content": "Count from one to ten in words."}]
    r = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)  # greedy: the best
    kw = dict(model="smollm2", messages=msgs, max_tokens=4, temperature=1.0, seed=3, n=2)
    assert ([x.message.content for x in c.chat.completions.create(**kw).choices]
            == [x.message.content for x in c.chat.completions.create(**kw).choices])
    full = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8, temperature=0)
    text = full.choices[0].message.content
    word = text.split()[len(text.split()) // 2]
    cut = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8, temperature=0, stop=[word])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[:text.index(word)]


def test_embeddings_are_mean_pooled_hidden_states(served):
    tok, model = served.loaded.tokenizer, served.loaded.model
    texts = ["a cat sat on the mat", "quantum chromodynamics"]
    for fmt in (None, "float"):  # the client asks for base64 unless told
        kw = {} if fmt is None else {"encoding_format": fmt}
        r = client(served, "emb").embeddings.create(model="smollm2", input=texts, **kw)
        assert [d.index for d in r.data] == [0, 1]
        for text, d in zip(texts, r.data):
            with torch.no_grad():
                ref = model.hidden_states(torch.tensor([tok.encode(text)]))[0].mean(0)
            assert torch.allclose(torch.tensor(d.embedding), ref, atol=1e-4)
    assert r.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)


def test_error_objects(served):
    with pytest.raises(openai.AuthenticationError) as e:
        client(served, "zk_not-a-key").models.list()
    assert e.value.body["code"] is not None or e.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(served, "revoked").models.list()
    with pytest.raises(openai.PermissionDeniedError):
        client(served, "emb").chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.PermissionDeniedError):
        client(served, "gen").embeddings.create(model="smollm2", input="hi")
    with pytest.raises(openai.BadRequestError) as e:
        client(served).completions.create(model="smollm2", prompt="hi", temperature=5)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client(served).completions.create(model="smollm2", prompt=[10**9])
    with pytest.raises(openai.NotFoundError):
        client(served).completions.create(model="gpt-9", prompt="hi")
    c = client(served, "rate")
    c.models.list(), c.models.list()
    with pytest.raises(openai.RateLimitError) as e:
        c.models.list()
    assert int(e.value.response.headers["retry-after"]) >= 1
    status, headers, body = get(served.url + "/v1/models", "garbage")
    err = json.loads(body)["error"]
    assert status == 401 and set(err) == {"message", "type", "param", "code"}


def test_every_route_refuses_without_a_key(served):
    """Deny by default: walk every registered route, every method, with no key and a bad key."""
    from starlette.routing import Route

    routes = [r for r in served.app.routes if isinstance(r, Route)]
    assert {r.path for r in routes} >= {"/v1/completions", "/v1/chat/completions", "/v1/embeddings",
                                        "/v1/models", "/tokenize", "/detokenize", "/metrics", "/ready", "/"}
    checked = 0
    for r in routes:
        path = re.sub(r"\{[^}]+\}", "page.js", r.path)
        for method in sorted(r.methods - {"HEAD"}):
            for auth in ({}, {"Authorization": "Bearer zk_forged"}):
                conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
                conn.request(method, path, body=b"{}" if method == "POST" else None,
                             headers={"Content-Type": "application/json", **auth})
                resp = conn.getresponse()
                resp.read()
                conn.close()
                if r.path == "/health":
                    assert resp.status == 200
                else:
                    assert resp.status == 401, (method, path, resp.status)
                checked += 1
    assert checked >= 2 * len(routes)
    assert get(served.url + "/no/such/route")[0] == 401  # an unknown path too
    assert get(served.url + "/no/such/route", served.keys["admin"])[0] == 404
    assert get(served.url + "/metrics", served.keys["gen"])[0] == 403


def _open_stream(served, max_tokens=400):
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    body = json.dumps({"model": "smollm2", "prompt": "1, 2, 3, 4, 5, 6, 7, 8,",
                       "max_tokens": max_tokens, "temperature": 0, "stream": True})
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Authorization": f"Bearer {served.keys['gen']}", "Content-Type": "application/json"})
    return conn, conn.getresponse()


def _wait(pred, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_disconnect_frees_the_row_within_a_second(served):
    engine = served.state.engine
    assert _wait(lambda: engine.running == 0 and engine.queue_depth == 0, 30)
    conn, resp = _open_stream(served)
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")  # the first event: the row is decoding
    assert engine.running == 1
    conn.sock.shutdown(2)
    conn.close()
    t0 = time.time()
    assert _wait(lambda: engine.running == 0, 1.0), f"row still running after {time.time() - t0:.2f}s"


def test_full_queue_is_503_with_retry_after(served):
    engine = served.state.engine
    assert _wait(lambda: engine.running == 0 and engine.queue_depth == 0, 30)
    streams = []
    try:
        streams += [_open_stream(served) for _ in range(2)]
        assert _wait(lambda: engine.running == 2, 10)
        streams += [_open_stream(served) for _ in range(2)]  # 2 rows running + 2 queued: full
        assert _wait(lambda: engine.queue_depth == 2, 10)
        assert all(resp.status == 200 for _, resp in streams)
        status, headers, body = _post(served, "/v1/completions", {"model": "smollm2", "prompt": "hi", "max_tokens": 2})
        assert status == 503 and int(headers["Retry-After"]) >= 1
        assert json.loads(body)["error"]["type"] == "server_error"
    finally:
        for conn, _ in streams:
            conn.sock.shutdown(2)
            conn.close()
    assert _wait(lambda: engine.running == 0 and engine.queue_depth == 0, 5)


def _post(served, path, obj, key="gen"):
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    conn.request("POST", path, body=json.dumps(obj),
                 headers={"Authorization": f"Bearer {served.keys[key]}", "Content-Type": "application/json"})
    r = conn.getresponse()
    out = r.status, r.headers, r.read()
    conn.close()
    return out


def test_tokenize_detokenize(served):
    tok = served.loaded.tokenizer
    status, _, body = _post(served, "/tokenize", {"prompt": "hello world", "add_special_tokens": False})
    ids = json.loads(body)["tokens"]
    assert status == 200 and ids == tok.encode("hello world")
    status, _, body = _post(served, "/detokenize", {"tokens": ids}, key="emb")
    assert json.loads(body)["prompt"] == "hello world"
    status, _, body = _post(served, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert json.loads(body)["tokens"] == tok.encode(text)


def test_metrics_and_audit(served):
    from zenlm.serve.audit import verify

    client(served).completions.create(model="smollm2", prompt="Hi", max_tokens=3, temperature=0)
    assert get(served.url + "/v1/models", "zk_bad")[0] == 401
    status, headers, body = get(served.url + "/metrics", served.keys["admin"])
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    for name, kind in [("zenlm_requests_total", "counter"), ("zenlm_queue_depth", "gauge"),
                       ("zenlm_running", "gauge"), ("zenlm_time_to_first_token_seconds", "histogram"),
                       ("zenlm_time_between_tokens_seconds", "histogram"), ("zenlm_audit_records", "gauge")]:
        assert f"# TYPE {name} {kind}" in text
    line = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+-]+|^[a-z_]+\{.*\} \+Inf$|^#')
    for ln in text.strip().splitlines():
        assert line.match(ln), ln
    assert re.search(r'zenlm_requests_total\{route="/v1/completions",status="200"\} [1-9]', text)
    assert re.search(r'zenlm_requests_total\{route="/v1/models",status="401"\} [1-9]', text)
    ttft_count = int(re.search(r"zenlm_time_to_first_token_seconds_count (\d+)", text).group(1))
    assert ttft_count >= 1
    assert re.search(r'zenlm_time_to_first_token_seconds_bucket\{le="\+Inf"\} ' + str(ttft_count), text)
    # one audit record per request, the key id and never the key, and a chain that verifies
    audit = served.state.audit
    assert f"zenlm_audit_records {audit.size}" in text or audit.size > 0
    log = (served.state_dir / "audit").glob("*")
    raw = b"".join(p.read_bytes() for p in log if p.is_file())
    assert all(k.encode() not in raw for k in served.keys.values())
    assert b'"route":"/v1/completions"' in raw and b"prompt_sha256" in raw and b'"prompt":"Hi"' not in raw
    audit.checkpoint()
    report = verify(served.state_dir / "audit", served.state_dir / "audit.key")
    assert report.ok, report.reason


def test_refuses_a_public_address_without_keys(tmp_path, capsys):
    from zenlm.cli.main import main

    assert main(["serve", "--model", "smollm2", "--host", "0.0.0.0", "--state", str(tmp_path / "s")]) == 2
    assert "refusing to listen on 0.0.0.0" in capsys.readouterr().err


def test_tokens_are_charged_after_completion(served):
    """A daily token quota: a request is admitted while the quota is not spent, its prompt +
    completion tokens are charged once it ends (here past the quota),
    and the next request over the quota is a 429 with Retry-After."""
    store = served.state.keys
    key_id = next(r.id for r in store.list() if r.name == "quota")
    c = client(served, "quota")
    r = c.completions.create(model="smollm2", prompt="1, 2, 3,", max_tokens=16, temperature=0)
    assert served.state.limiter.used_today(key_id) == r.usage.total_tokens
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model="smollm2", prompt="1, 2, 3,", max_tokens=20, temperature=0)
    assert e.value.body["code"] == "rate_limit_exceeded"
    assert int(e.value.response.headers["retry-after"]) >= 1


def test_page_cookie_counts_on_a_post_only_with_the_page_header(served):
    cookie = {"Cookie": f"zenlm_key={served.keys['gen']}", "Content-Type": "application/json"}
    body = json.dumps({"model": "smollm2", "prompt": "hi", "max_tokens": 1})

    def req(method, path, headers, data=None):
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        r.read()
        conn.close()
        return r.status

    assert req("GET", "/v1/models", cookie) == 200
    assert req("POST", "/v1/completions", cookie, body) == 401  # a cross-site form could send this
    assert req("POST", "/v1/completions", {**cookie, "X-Zenlm-Page": "1"}, body) == 200
