"""The one gate every HTTP request passes: key, scope, limits, then audit and metrics.

It is ASGI middleware in front of the router, not a per-route dependency, so a route added
later (or a path no route matches) is refused without a key by construction: only ``/health``
is open. The scope a path needs comes from one table (``ROUTE_SCOPES``); a path missing from
it needs ``admin``. The same gate appends the request's audit record and counts it on
``/metrics`` once the response (a stream included) has ended, so nothing can skip the log.
"""

from __future__ import annotations

import time

from zenlm.serve.openai_errors import ApiError, error_response, from_exception

PUBLIC = frozenset({"/health"})
GEN, EMB, ADMIN = "generate", "embed", "admin"
ROUTE_SCOPES: dict[str, tuple[str, ...]] = {
    "/v1/models": (GEN, EMB),
    "/v1/completions": (GEN,),
    "/v1/chat/completions": (GEN,),
    "/v1/embeddings": (EMB,),
    # text about to be sent to the model is screened by whoever sends it; operators test the policy
    "/v1/moderations": (GEN, ADMIN),
    "/tokenize": (GEN, EMB),
    "/detokenize": (GEN, EMB),
    "/tokenizer_info": (GEN, EMB),
    "/ready": (GEN, EMB, ADMIN),
    "/metrics": (ADMIN,),
    "/": (GEN,),
    "/page/{name}": (GEN,),
    "/logout": (GEN, EMB, ADMIN),
    "/login": (),  # the key comes in the form body; the route authenticates it itself
}
COOKIE = "zenlm_key"
PAGE_HEADER = "x-zenlm-page"  # a cookie counts on a POST only with it: a cross-site form cannot set it


def route_of(path: str) -> str:
    """The route template of a path: the label on /metrics and the key into ROUTE_SCOPES."""
    if path in ROUTE_SCOPES or path in PUBLIC:
        return path
    if path.startswith("/page/") and "/" not in path[len("/page/"):]:
        return "/page/{name}"
    return "other"


def presented_key(scope) -> str | None:
    """``Authorization: Bearer KEY`` (a malformed header is a 401); else, for the chat page, the
    key cookie it logged in with."""
    from zenlm.serve.access import bearer

    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    if "authorization" in headers:
        return bearer(headers["authorization"])
    cookie = headers.get("cookie", "")
    if cookie and (scope["method"] in ("GET", "HEAD") or PAGE_HEADER in headers):
        for part in cookie.split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                return value
    return None


def check_scope(record, scopes: tuple[str, ...]) -> None:
    """Pass when the key holds any of ``scopes`` (ACCESS's require_scope decides what holds)."""
    from zenlm.serve.keys import require_scope

    last = None
    for s in scopes:
        try:
            require_scope(record, s)
            return
        except Exception as exc:  # ScopeError
            last = exc
    raise last


class Guard:
    """ASGI middleware: ``Guard(app, state)`` where ``state`` is the app's ServerState."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # no websocket routes: refuse the handshake
            return await send({"type": "websocket.close", "code": 1008})
        st = self.state
        path = scope["path"]
        route = route_of(path)
        ctx = scope["zenlm"] = {"t0": time.perf_counter(), "key_id": None, "prompt_tokens": 0,
                                "completion_tokens": 0, "prompt": None, "status": 500, "generations": []}

        permit = None

        def charge():
            """Tokens are charged once the work is done, and before the client sees the end of
            the response, so its next request already meets the quota spent."""
            used = ctx["prompt_tokens"] + ctx["completion_tokens"]
            if permit is not None and used and not ctx.get("charged"):
                ctx["charged"] = True
                permit.charge(used)

        async def send_status(message):
            if message["type"] == "http.response.start":
                ctx["status"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                charge()
            await send(message)

        try:
            if path in PUBLIC:
                return await self.app(scope, receive, send_status)
            if st.draining:
                err = ApiError(503, "the server is shutting down", code="shutting_down", retry_after=5)
                return await error_response(err)(scope, receive, send_status)
            try:
                if route != "/login":
                    record = st.keys.authenticate(presented_key(scope))
                    ctx["key_id"] = record.id
                    check_scope(record, ROUTE_SCOPES.get(route, (ADMIN,)))
                    permit = st.limiter.admit(record, 0)
                    ctx["record"] = record
            except Exception as exc:
                err = from_exception(exc)
                if err.status == 401 and route in ("/", "/page/{name}") and scope["method"] == "GET":
                    return await st.login_page(err)(scope, receive, send_status)
                return await error_response(err)(scope, receive, send_status)
            if permit is None:
                return await self.app(scope, receive, send_status)
            with permit:
                try:
                    await self.app(scope, receive, send_status)
                finally:
                    charge()  # a response cut short (the client left) is charged for what it used
        finally:
            for gen in ctx["generations"]:  # a stream whose client left before it began: free its rows
                gen.cancel()
            self._record(scope, route, ctx)

    def _record(self, scope, route: str, ctx: dict) -> None:
        st = self.state
        status = ctx["status"]
        st.metrics.requests.inc(route=route, status=str(status))
        if route in PUBLIC:
            return  # liveness probes carry no key and no data: kept out of the audit log
        client = scope.get("client")
        prompt = ctx["prompt"]
        fields = dict(event="request", key_id=ctx["key_id"], route=route, model=st.model_name,
                      status=status, prompt_tokens=ctx["prompt_tokens"],
                      completion_tokens=ctx["completion_tokens"],
                      latency_ms=round((time.perf_counter() - ctx["t0"]) * 1000, 3),
                      client=f"{client[0]}:{client[1]}" if client else None)
        if prompt is not None:
            fields["prompt"] = prompt
        if ctx.get("moderation"):  # the non-allow verdicts: rule names and scores, no text
            fields["moderation"] = ctx["moderation"]
        st.audit.append(**fields)

