"""The OpenAI-compatible HTTP server: ``create_app(loaded, state_dir=...)`` returns a FastAPI app.

Routes are thin: they turn a request body into engine requests (``zenlm.infer.engine``), wait
for or stream the tokens, and shape OpenAI's JSON. Keys, scopes, limits, the audit record and
the request metrics live in one gate in front of every route (``zenlm.serve.guard``), not in the
routes, so no route can forget them. Blocking work (a prompt's logprobs, embeddings) runs in
the engine's own thread through ``engine.call``, never beside a decode step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from uuid import uuid4

from fastapi import Request

from zenlm.serve import metrics as prom
from zenlm.serve.generation import Choice, Generation
from zenlm.serve.guard import COOKIE, Guard
from zenlm.serve.moderation import FINISH, filter_for
from zenlm.serve.openai_errors import ApiError, error_response, from_exception
# FastAPI reads the routes' annotations from this module's globals: the body models live here
from zenlm.serve.schemas import ChatRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, TokenizeRequest

PAGE_DIR = Path(__file__).parent / "page"
PAGE_FILES = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}
# The page loads only its own two files and talks only to this server: no CDN, no inline script.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            "img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
LOGIN_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"


class Metrics:
    """The server's Prometheus metrics (rendered at /metrics)."""

    def __init__(self, state: "ServerState"):
        r = self.registry = prom.Registry()
        self.requests = r.add(prom.Counter("zenlm_requests_total", "HTTP requests by route and status",
                                           ("route", "status")))
        self.prompt_tokens = r.add(prom.Counter("zenlm_prompt_tokens_total", "prompt tokens read"))
        self.completion_tokens = r.add(prom.Counter("zenlm_completion_tokens_total",
                                                    "completion tokens generated"))
        r.add(prom.Gauge("zenlm_queue_depth", "requests waiting for a row in the running batch",
                         lambda: state.engine.queue_depth))
        r.add(prom.Gauge("zenlm_running", "rows in the running decode batch", lambda: state.engine.running))
        self.ttft = r.add(prom.Histogram("zenlm_time_to_first_token_seconds",
                                         "from the request's arrival to its first token", prom.LATENCY_BUCKETS))
        self.tbt = r.add(prom.Histogram("zenlm_time_between_tokens_seconds",
                                        "between consecutive tokens of one choice", prom.LATENCY_BUCKETS))
        r.add(prom.Gauge("zenlm_audit_records", "records in the audit log", lambda: state.audit.size))
        r.add(prom.Gauge("zenlm_audit_head_info", "the audit log's chain head (HMAC of its last record)",
                         lambda: {(str(state.audit.head),): 1}, labels=("head",)))
        r.add(prom.Gauge("zenlm_audit_checkpoint_size", "records covered by the last signed checkpoint",
                         lambda: state.last_checkpoint().get("size", 0)))
        r.add(prom.Gauge("zenlm_audit_checkpoint_info", "the last signed checkpoint's head",
                         lambda: {(str(state.last_checkpoint().get("head", "")),): 1}, labels=("head",)))
        r.add(prom.Gauge("zenlm_engine_stat", "the engine's own counters (steps, prefix tokens reused...)",
                         lambda: {(k,): v for k, v in (getattr(state.engine, "stats", None) or {}).items()
                                  if isinstance(v, (int, float))}, labels=("name",)))
        r.add(prom.Gauge("zenlm_draining", "1 once shutdown began (new requests get 503)",
                         lambda: int(state.draining)))

    def on_token(self, ttft: float | None = None, tbt: float | None = None) -> None:
        if ttft is not None:
            self.ttft.observe(ttft)
        if tbt is not None:
            self.tbt.observe(tbt)


@dataclass
class ServerState:
    """What the routes and the gate share: the model, the engine, keys, limits, audit, metrics."""

    loaded: Any
    engine: Any
    keys: Any
    limiter: Any
    audit: Any
    model_name: str
    grace: float = 30.0
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    checkpoint: dict = field(default_factory=dict)
    eot_stop: str | None = None
    metrics: Metrics | None = None
    moderation: Any = None  # zenlm.serve.moderation.ServerModeration, with --policy

    def last_checkpoint(self) -> dict:
        """The audit log's latest signed checkpoint (size and head)."""
        return getattr(self.audit, "last_checkpoint", None) or self.checkpoint

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def context(self) -> int:
        return int(getattr(self.engine, "max_len", None) or self.loaded.model.config.max_seq_len)

    def begin_shutdown(self, grace: float | None = None) -> threading.Thread:
        """Refuse new requests (503), let the running ones finish within ``grace``, then cancel
        the rest: what SIGTERM does. Returns the thread that waits for the engine."""
        self.draining = True
        t = threading.Thread(target=self.engine.shutdown, args=(self.grace if grace is None else grace,),
                             name="zenlm-drain", daemon=True)
        t.start()
        return t

    def login_page(self, err: ApiError, message: str = ""):
        from starlette.responses import HTMLResponse

        html = (PAGE_DIR / "login.html").read_text(encoding="utf-8")
        note = message or "This server needs an API key with the generate scope."
        html = html.replace("{{note}}", _html_escape(note))
        return HTMLResponse(html, status_code=err.status,
                            headers={"Content-Security-Policy": LOGIN_CSP, "Cache-Control": "no-store",
                                     "X-Content-Type-Options": "nosniff"})


def _html_escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#39;"))


def default_model_name(source: str) -> str:
    return Path(str(source)).name or str(source)


def create_app(loaded, *, state_dir: str | Path, engine=None, max_batch: int = 16, max_queue: int = 64,
               prefill_chunk: int = 256, native_chunk: int = 16, max_len: int | None = None,
               audit_prompts: bool = False,
               model_name: str | None = None, grace: float = 30.0, checkpoint_every: int = 100,
               policy=None, kv_dtype: str | None = None):
    """The server app for a prepared model (``zenlm.infer.prepare.prepare_for_decoding`` done).

    ``state_dir`` holds the keys (keys.sqlite + secret), the audit log (audit/) and its key
    (audit.key, outside the log folder). ``engine``: an Engine to serve with (else one is built
    with the sizes given); it is started with the app and shut down with it. ``policy``: a
    moderation Policy or its file, applied to prompts and replies and answering /v1/moderations.
    ``kv_dtype``: the engine's KV cache dtype by name ("float16"; None: the model's).
    """
    from fastapi import FastAPI

    from zenlm.infer.chat import end_of_turn
    from zenlm.serve.audit import AuditLog
    from zenlm.serve.keys import KeyStore
    from zenlm.serve import moderation
    from zenlm.serve.limits import Limiter
    from zenlm.serve.state import state_paths

    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    if engine is None:
        from zenlm.infer.engine import Engine

        import torch

        engine = Engine(loaded.model, loaded.tokenizer, max_batch=max_batch, max_queue=max_queue,
                        prefill_chunk=prefill_chunk, native_chunk=native_chunk, max_len=max_len,
                        kv_dtype=getattr(torch, kv_dtype) if kv_dtype else None)
    keys = KeyStore(state_dir)
    tok = loaded.tokenizer
    eot = end_of_turn(tok) if tok is not None and tok.chat_template else None
    st = ServerState(loaded=loaded, engine=engine, keys=keys, limiter=Limiter(keys),
                     audit=AuditLog(state_paths(state_dir).audit_dir, state_paths(state_dir).audit_key,
                                    checkpoint_every=checkpoint_every, record_prompts=audit_prompts),
                     model_name=model_name or default_model_name(getattr(loaded, "source", "model")),
                     grace=grace, eot_stop=eot if eot and eot != tok.eot else None)
    st.metrics = Metrics(st)
    policy = moderation.load(policy)
    st.moderation = moderation.ServerModeration(policy) if policy is not None else None

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            if not st.draining:
                st.draining = True
                await asyncio.to_thread(engine.shutdown, grace)
            try:
                st.checkpoint = st.audit.checkpoint()
            except Exception:  # an audit log that cannot checkpoint must not block the exit
                pass

    app = FastAPI(title="zenlm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.zenlm = st
    _install_errors(app)
    _install_routes(app, st)
    moderation.install_routes(app, st)
    app.add_middleware(Guard, state=st)
    return app


# --- errors -------------------------------------------------------------------------------------
def _install_errors(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from zenlm.errors import ZenlmError

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg = "the body is not valid JSON"
        return error_response(ApiError(400, f"{'.'.join(loc) + ': ' if loc else ''}{msg}",
                                       param=".".join(loc) or None, code="invalid_value"))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(ApiError)
    async def _api(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(ZenlmError)
    async def _zenlm(request, exc: ZenlmError):
        return error_response(from_exception(exc))


# --- helpers shared by the generating routes ---------------------------------------------------
def _check_model(st: ServerState, model: str | None) -> None:
    if model is not None and model != st.model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {st.model_name!r}",
                       code="model_not_found", param="model")


def _ctx(request) -> dict:
    return request.scope["zenlm"]


def _sampling(body, max_new: int, stop: list[str], seed: int | None):
    from zenlm.infer.sampling import SamplingConfig

    return SamplingConfig(max_new_tokens=max_new, temperature=body.temperature,
                          top_k=body.top_k, top_p=None if body.top_p >= 1.0 else body.top_p,
                          repetition_penalty=body.repetition_penalty, stop=list(stop), seed=seed)


def _room(st: ServerState, ids: list[int], wanted: int | None) -> int:
    """Tokens a prompt may still generate: what was asked, cut to what the context leaves."""
    from zenlm.errors import PromptTooLongError

    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt", code="invalid_value")
    free = st.context - len(ids)
    if free <= 0 and (wanted is None or wanted > 0):
        raise PromptTooLongError(f"the prompt is {len(ids)} tokens; the model's context is {st.context}")
    return max(0, free) if wanted is None else min(wanted, max(0, free))


def _requests(st: ServerState, prompts: list[list[int]], body, max_new: int, stop: list[str],
              logprobs: int | None):
    """One engine request per (prompt, choice); choice i of a seeded request uses seed + i, so n
    choices differ and the same request repeats."""
    from zenlm.infer.engine import Request as EngineRequest

    out = []
    for ids in prompts:
        for i in range(body.n):
            seed = None if body.seed is None else body.seed + i
            out.append(EngineRequest(prompt_ids=list(ids), sampling=_sampling(body, max_new, stop, seed),
                               logprobs=logprobs))
    return out


def _token_text(tok, t: int) -> str:
    return tok.decode([t])


def _check_ids(st: ServerState, ids: list[int], param: str) -> None:
    v = st.tokenizer.vocab_size
    bad = next((t for t in ids if not 0 <= t < v), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{v - 1})", param=param,
                       code="invalid_value")


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode("utf-8")


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# --- completions --------------------------------------------------------------------------------
def _items(value, param: str) -> list:
    """OpenAI's one-or-many inputs (a string, strings, token ids, lists of token ids) as a list
    of items, each a string or a list of ids; an empty list is a 400 naming ``param``."""
    if isinstance(value, str):
        items = [value]
    elif value and all(isinstance(v, int) for v in value):
        items = [list(value)]
    else:
        items = list(value)
    if not items:
        raise ApiError(400, f"{param}: an empty list", param=param, code="invalid_value")
    return items


def _completion_prompts(st: ServerState, prompt) -> tuple[list[str], list[list[int]]]:
    """The prompts of a completion request (a string, strings, ids or lists of ids) as text
    (for the audit record and echo) and as token ids (strings get the BOS the model expects)."""
    tok = st.tokenizer
    items = _items(prompt, "prompt")
    texts, out = [], []
    for p in items:
        if isinstance(p, str):
            ids = tok.encode_prompt(p) if p else []
        else:
            _check_ids(st, p, "prompt")
            ids = list(p)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt", code="invalid_value")
        texts.append(p if isinstance(p, str) else tok.decode(ids))
        out.append(ids)
    return texts, out


def _legacy_logprobs(tok, tokens: list[int], lps: list, tops: list, offset: int = 0) -> dict:
    texts = [_token_text(tok, t) for t in tokens]
    offsets, pos = [], offset
    for s in texts:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": texts, "token_logprobs": list(lps),
            "top_logprobs": [None if t is None else {_token_text(tok, a): float(b) for a, b in t}
                             for t in tops],
            "text_offset": offsets}


async def _prompt_logprobs(st: ServerState, ids: list[int], top: int):
    return await asyncio.to_thread(st.engine.prompt_logprobs, ids, top)


# --- the routes ---------------------------------------------------------------------------------
def _install_routes(app, st: ServerState) -> None:
    from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse

    tok = st.tokenizer

    @app.get("/health")
    async def health():
        return {"status": "draining" if st.draining else "ok"}

    @app.get("/ready")
    async def ready():
        if st.draining:
            raise ApiError(503, "the server is shutting down", code="shutting_down", retry_after=5)
        return {"status": "ready", "model": st.model_name, "queue_depth": st.engine.queue_depth,
                "running": st.engine.running}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(st.metrics.registry.render(), media_type=prom.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": st.model_name, "object": "model", "created": st.created,
                                            "owned_by": "zenlm", "max_model_len": st.context}]}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"eos_token": tok.eot, "bos_token": tok.bos, "pad_token": None,
                "chat_template": tok.chat_template, "model_max_length": st.context,
                "add_bos_token": bool(tok.add_bos), "tokenizer_class": "zenlm"}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        _check_model(st, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt or messages", param="prompt", code="invalid_value")
        if body.messages is not None:
            text = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages],
                                           add_generation_prompt=body.add_generation_prompt)
            ids = tok.encode(text)
        else:
            ids = tok.encode_prompt(body.prompt) if body.add_special_tokens else tok.encode(body.prompt)
        return {"count": len(ids), "max_model_len": st.context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        _check_model(st, body.model)
        _check_ids(st, body.tokens, "tokens")
        return {"prompt": tok.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(st, body.model)
        ctx = _ctx(request)
        texts, prompts = _completion_prompts(st, body.prompt)
        ctx["prompt"] = "\n".join(texts)
        ctx["prompt_tokens"] = sum(len(p) for p in prompts)
        st.metrics.prompt_tokens.inc(ctx["prompt_tokens"])
        if st.moderation is not None:  # before anything (echo logprobs included) reaches the engine
            await st.moderation.prompts(ctx, texts, "prompt")
        k = body.logprobs
        max_new = min(_room(st, ids, body.max_tokens) for ids in prompts)
        echoes: list[tuple[str, dict | None]] = []
        if body.echo:
            for text, ids in zip(texts, prompts):
                lp = None
                if k is not None:
                    rows = await _prompt_logprobs(st, ids, k)
                    lp = _legacy_logprobs(tok, ids, [r[0] for r in rows],
                                          [None if r[0] is None else list(r[1]) for r in rows])
                echoes.append((text, lp))
        cid, created = f"cmpl-{uuid4().hex}", int(time.time())
        n_choices = len(prompts) * body.n

        def echo_of(i):
            return echoes[i // body.n] if body.echo else ("", None)

        if max_new == 0:  # echo only (scoring a prompt): nothing to generate
            choices = [Choice(i, finish_reason="length") for i in range(n_choices)]
            gen = None
        else:
            gen = Generation(st.engine, _requests(st, prompts, body, max_new, body.stop, k),
                             on_token=st.metrics.on_token, t0=ctx["t0"])
            ctx["generations"].append(gen)

        def choice_json(c: Choice) -> dict:
            etext, elp = echo_of(c.index)
            lp = None
            if k is not None:
                lp = _legacy_logprobs(tok, c.tokens, c.logprobs,
                                      [list(t or []) for t in c.tops], offset=len(etext))
                if elp is not None:
                    lp = {key: elp[key] + lp[key] for key in lp}
            return {"index": c.index, "text": etext + c.text, "logprobs": lp,
                    "finish_reason": c.finish_reason}

        if not body.stream:
            if gen is not None:
                choices = await gen.collect(request.is_disconnected)
                ctx["completion_tokens"] = sum(len(c.tokens) for c in choices)
                st.metrics.completion_tokens.inc(ctx["completion_tokens"])
                if st.moderation is not None:
                    await st.moderation.withhold(ctx, choices)
            return {"id": cid, "object": "text_completion", "created": created, "model": st.model_name,
                    "choices": [choice_json(c) for c in choices],
                    "usage": _usage(ctx["prompt_tokens"], ctx["completion_tokens"])}

        include_usage = body.include_usage()

        def chunk(index, text, lp=None, finish=None):
            obj = {"id": cid, "object": "text_completion", "created": created, "model": st.model_name,
                   "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = None
            return _sse(obj)

        filt = filter_for(st, ctx, n_choices)

        async def stream():
            offsets = [0] * n_choices
            try:
                if body.echo:
                    for i in range(n_choices):
                        etext, elp = echo_of(i)
                        offsets[i] = len(etext)
                        yield chunk(i, etext, elp)
                if gen is None:
                    for i in range(n_choices):
                        yield chunk(i, "", None, "length")
                else:
                    async for i, ev in gen.events():
                        if ev.token is not None:
                            ctx["completion_tokens"] += 1
                            st.metrics.completion_tokens.inc()
                        if filt is not None and (say := await filt.feed(i, ev.text, ev.finish_reason)) != "pass":
                            if say == "stop":
                                gen.handles[i].cancel()
                                yield chunk(i, "", None, FINISH)
                            continue
                        lp = None
                        if k is not None and ev.token is not None:
                            lp = _legacy_logprobs(tok, [ev.token], [ev.logprob], [list(ev.top_logprobs or [])],
                                                  offset=offsets[i])
                        offsets[i] += len(ev.text)
                        if ev.text or lp is not None or ev.finish_reason is not None:
                            yield chunk(i, ev.text, lp, ev.finish_reason)
                if include_usage:
                    yield _sse({"id": cid, "object": "text_completion", "created": created,
                                "model": st.model_name, "choices": [],
                                "usage": _usage(ctx["prompt_tokens"], ctx["completion_tokens"])})
                yield b"data: [DONE]\n\n"
            finally:
                if gen is not None:
                    gen.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        _check_model(st, body.model)
        if not tok.chat_template:
            raise ApiError(400, f"{st.model_name} has no chat template: use /v1/completions",
                           code="no_chat_template")
        ctx = _ctx(request)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        ids = tok.encode(text)  # the template writes the BOS itself where the model wants one
        ctx["prompt"], ctx["prompt_tokens"] = text, len(ids)
        st.metrics.prompt_tokens.inc(len(ids))
        if st.moderation is not None:  # every message: the client writes the system and assistant ones too
            await st.moderation.prompts(ctx, ["\n".join(m["content"] for m in messages)], "messages")
        wanted = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_new = _room(st, ids, wanted)
        stop = list(body.stop) + ([st.eot_stop] if st.eot_stop else [])
        k = (body.top_logprobs or 0) if body.logprobs else None
        cid, created = f"chatcmpl-{uuid4().hex}", int(time.time())
        gen = Generation(st.engine, _requests(st, [ids], body, max_new, stop, k),
                         on_token=st.metrics.on_token, t0=ctx["t0"])
        ctx["generations"].append(gen)

        def content_lp(tokens, lps, tops):
            out = []
            for t, lp, top in zip(tokens, lps, tops):
                s = _token_text(tok, t)
                out.append({"token": s, "logprob": float(lp), "bytes": list(s.encode("utf-8")),
                            "top_logprobs": [{"token": (a_s := _token_text(tok, a)), "logprob": float(b),
                                              "bytes": list(a_s.encode("utf-8"))} for a, b in (top or [])[:k]]})
            return out

        if not body.stream:
            choices = await gen.collect(request.is_disconnected)
            ctx["completion_tokens"] = sum(len(c.tokens) for c in choices)
            st.metrics.completion_tokens.inc(ctx["completion_tokens"])
            if st.moderation is not None:
                await st.moderation.withhold(ctx, choices)
            return {"id": cid, "object": "chat.completion", "created": created, "model": st.model_name,
                    "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                                 "logprobs": {"content": content_lp(c.tokens, c.logprobs, c.tops)}
                                 if k is not None else None,
                                 "finish_reason": c.finish_reason} for c in choices],
                    "usage": _usage(ctx["prompt_tokens"], ctx["completion_tokens"])}

        include_usage = body.include_usage()

        def chunk(index, delta, lp=None, finish=None):
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": st.model_name,
                   "choices": [{"index": index, "delta": delta,
                                "logprobs": {"content": lp} if lp is not None else None,
                                "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = None
            return _sse(obj)

        filt = filter_for(st, ctx, body.n)

        async def stream():
            try:
                for i in range(body.n):
                    yield chunk(i, {"role": "assistant", "content": ""})
                async for i, ev in gen.events():
                    if ev.token is not None:
                        ctx["completion_tokens"] += 1
                        st.metrics.completion_tokens.inc()
                    if filt is not None and (say := await filt.feed(i, ev.text, ev.finish_reason)) != "pass":
                        if say == "stop":
                            gen.handles[i].cancel()
                            yield chunk(i, {}, None, FINISH)
                        continue
                    lp = None
                    if k is not None and ev.token is not None:
                        lp = content_lp([ev.token], [ev.logprob], [ev.top_logprobs])
                    if ev.text or lp is not None:
                        yield chunk(i, {"content": ev.text}, lp)
                    if ev.finish_reason is not None:
                        yield chunk(i, {}, None, ev.finish_reason)
                if include_usage:
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                "model": st.model_name, "choices": [],
                                "usage": _usage(ctx["prompt_tokens"], ctx["completion_tokens"])})
                yield b"data: [DONE]\n\n"
            finally:
                gen.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        import numpy as np

        _check_model(st, body.model)
        ctx = _ctx(request)
        items = _items(body.input, "input")
        rows = []
        for x in items:
            ids = tok.encode(x) if isinstance(x, str) else list(x)
            if isinstance(x, list):
                _check_ids(st, ids, "input")
            if not ids:
                raise ApiError(400, "input: an empty text", param="input", code="invalid_value")
            if len(ids) > st.context:
                raise ApiError(400, f"input: {len(ids)} tokens; the model's context is {st.context}",
                               param="input", code="context_length_exceeded")
            rows.append(ids)
        ctx["prompt"] = "\n".join(x if isinstance(x, str) else tok.decode(x) for x in items)
        ctx["prompt_tokens"] = sum(len(r) for r in rows)
        st.metrics.prompt_tokens.inc(ctx["prompt_tokens"])
        vecs = await asyncio.wrap_future(st.engine.call(mean_pooled, rows))
        if body.dimensions is not None:
            if not 0 < body.dimensions <= len(vecs[0]):
                raise ApiError(400, f"dimensions must be in 1..{len(vecs[0])}", param="dimensions",
                               code="invalid_value")
            vecs = [v[:body.dimensions] for v in vecs]
        data = []
        for i, v in enumerate(vecs):
            arr = np.asarray(v, dtype=np.float32)
            emb = (base64.b64encode(arr.astype("<f4").tobytes()).decode("ascii")
                   if body.encoding_format == "base64" else arr.tolist())
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": st.model_name,
                "usage": {"prompt_tokens": ctx["prompt_tokens"], "total_tokens": ctx["prompt_tokens"]}}

    # --- the chat page ---------------------------------------------------------------------------
    page_headers = {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                    "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}

    @app.get("/")
    async def page():
        return HTMLResponse((PAGE_DIR / "index.html").read_text(encoding="utf-8"), headers=page_headers)

    @app.get("/page/{name}")
    async def page_file(name: str):
        if name not in PAGE_FILES:
            raise ApiError(404, f"no page file {name!r}", code="not_found")
        return Response((PAGE_DIR / name).read_bytes(), media_type=PAGE_FILES[name], headers=page_headers)

    @app.post("/login")
    async def login(request: Request):
        """The page's key entry: the key from the form, checked like a Bearer key, kept in an
        HttpOnly cookie (the page's script never holds it) that a cross-site request cannot send."""
        from zenlm.serve.guard import check_scope

        ctx = _ctx(request)
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        key = (form.get("key") or [""])[0].strip()
        try:
            record = st.keys.authenticate(key or None)
            ctx["key_id"] = record.id
            check_scope(record, ("generate",))
        except Exception as exc:
            err = from_exception(exc)
            return st.login_page(err, f"Refused: {err.message}")
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(COOKIE, key, httponly=True, samesite="strict", path="/")
        return resp

    @app.post("/logout")
    async def logout():
        resp = RedirectResponse("/", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp


def mean_pooled(model, rows: list[list[int]]) -> list[list[float]]:
    """The mean of the decoder's final hidden states over each input's tokens (run in the engine
    thread by ``engine.call``): one row at a time, so no padding enters any mean."""
    import torch

    body = getattr(model, "backbone", model)
    out = []
    with torch.no_grad():
        for ids in rows:
            h = body.hidden_states(torch.tensor([ids], device=body.tok_emb.weight.device))
            out.append(h[0].float().mean(0).tolist())
    return out
