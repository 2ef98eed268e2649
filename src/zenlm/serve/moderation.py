"""Moderation in the server: one Policy (``zenlm.infer.moderation``) on prompts, on replies and
behind ``POST /v1/moderations``.

The routes call three things here and decide nothing themselves:

- ``prompts``: every prompt is checked before anything reaches the engine; a ``block`` is a 400
  with OpenAI's ``content_policy_violation`` code, so the model never sees the text;
- ``withhold``: a finished reply that a ``block`` rule matches is withheld whole (empty text, no
  logprobs) with ``finish_reason: "content_filter"``;
- ``StreamFilter``: a streamed reply is checked, accumulated, before each piece is sent; the
  piece that makes a ``block`` rule match is never sent and ends that choice with
  ``content_filter``. What was sent before that piece stays sent (a stream cannot be unshown).

Every verdict that is not ``allow`` goes into the request's audit record (``ctx["moderation"]``:
where, action, rule names, classifier scores) and never the matched text: the audit log keeps a
prompt only as its sha256 unless the server was started with ``--audit-prompts``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from uuid import uuid4

from fastapi import Request

from zenlm.infer.moderation import ACTIONS, Policy, Verdict
from zenlm.serve.openai_errors import ApiError
# FastAPI reads the route's annotations from this module's globals: the body model lives here
from zenlm.serve.schemas import ModerationRequest

CODE = "content_policy_violation"  # OpenAI's code for a request its policy refuses
FINISH = "content_filter"  # OpenAI's finish_reason for a reply its filter stopped
MODEL = "zenlm-policy"


def load(policy) -> Policy | None:
    """A Policy from a Policy, a file path or None; classifier rules load through ``zenlm.load``."""
    if policy is None or isinstance(policy, Policy):
        return policy
    import zenlm

    return Policy.load(Path(policy), load_model=zenlm.load)


def audit_entry(verdict: Verdict, choice: int | None = None) -> dict:
    """What the audit record keeps of a verdict: rule names and scores, no text."""
    entry = {"where": verdict.where, "action": verdict.action,
             "rules": sorted({m["rule"] for m in verdict.matches})}
    scores = {m["rule"]: round(float(m["score"]), 6) for m in verdict.matches if "score" in m}
    if scores:
        entry["scores"] = scores
    if choice is not None:
        entry["choice"] = choice
    return entry


def _note(ctx: dict, entry: dict) -> None:
    ctx.setdefault("moderation", []).append(entry)


class ServerModeration:
    """A policy as the server applies it."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.watches_output = policy.watches("output")
        # A stream is checked at every piece: only its block rules, and without writing the
        # policy's log at each piece (the whole reply is checked, and logged, once at its end).
        blocks = [r for r in policy.rules if r.action == "block" and "output" in r.apply_to]
        self._stream_guard = Policy(blocks, policy.message) if blocks else None
        # classifier forwards are blocking work: off the event loop; patterns are cheap
        self._threaded = any(r.classifier for r in policy.rules)

    async def _run(self, fn, *args):
        return await asyncio.to_thread(fn, *args) if self._threaded else fn(*args)

    async def prompts(self, ctx: dict, texts: list[str], param: str) -> None:
        """Check each prompt; raise the 400 on the first one a block rule matches."""
        for text in texts:
            verdict = await self._run(self.policy.check, text, "prompt")
            if verdict.action != "allow":
                _note(ctx, audit_entry(verdict))
            if verdict.blocked:
                rules = ", ".join(sorted({m["rule"] for m in verdict.matches if m["action"] == "block"}))
                raise ApiError(400, f"{self.policy.message} (blocked by the moderation policy: {rules})",
                               code=CODE, param=param)

    async def output(self, ctx: dict, text: str, choice: int) -> bool:
        """Check a whole reply and record the verdict; True when a block rule matches."""
        if not self.watches_output:
            return False
        verdict = await self._run(self.policy.check, text, "output")
        if verdict.action != "allow":
            _note(ctx, audit_entry(verdict, choice))
        return verdict.blocked

    async def withhold(self, ctx: dict, choices) -> None:
        """Withhold every finished choice (``serve.generation.Choice``) a block rule matches."""
        for c in choices:
            if await self.output(ctx, c.text, c.index):
                c.text, c.tokens, c.logprobs, c.tops = "", [], [], []
                c.finish_reason = FINISH

    async def stream_blocked(self, text: str) -> bool:
        if self._stream_guard is None:
            return False
        return (await self._run(self._stream_guard.check, text, "output")).blocked


class StreamFilter:
    """The choices of one stream under the policy. ``await feed(i, text, finish)`` says what to
    do with choice ``i``'s next event: ``"pass"`` it on, ``"stop"`` (send ``content_filter`` in
    its place and cancel the choice) or ``"drop"`` (the choice was stopped already)."""

    def __init__(self, mod: ServerModeration, ctx: dict, n: int):
        self.mod, self.ctx = mod, ctx
        self.text = [""] * n
        self.stopped: set[int] = set()

    async def feed(self, i: int, text: str, finish: str | None) -> str:
        if i in self.stopped:
            return "drop"
        acc = self.text[i] + text
        if text and await self.mod.stream_blocked(acc):
            self.stopped.add(i)
            await self.mod.output(self.ctx, acc, i)  # the record of the block (and any flags)
            return "stop"
        self.text[i] = acc
        if finish is not None:
            await self.mod.output(self.ctx, acc, i)
        return "pass"


def filter_for(st, ctx: dict, n: int) -> StreamFilter | None:
    mod = st.moderation
    return StreamFilter(mod, ctx, n) if mod is not None and mod.watches_output else None


# --- POST /v1/moderations -------------------------------------------------------------------------
def _inputs(value) -> list[str]:
    """OpenAI's moderation input: a string, a list of strings, or a list of parts of which only
    ``{"type": "text"}`` ones can be read here."""
    items = [value] if isinstance(value, str) else list(value)
    if not items:
        raise ApiError(400, "input: an empty list", param="input", code="invalid_value")
    out = []
    for x in items:
        if isinstance(x, str):
            out.append(x)
        elif x.get("type") == "text" and isinstance(x.get("text"), str):
            out.append(x["text"])
        else:
            raise ApiError(400, f"input: this server moderates text only, not {x.get('type')!r} parts",
                           param="input", code="invalid_value")
    return out


def result(policy: Policy, text: str) -> dict:
    """OpenAI's moderation result for one text: one category per rule (its name), its score (1.0
    for a regex or keyword hit, the classifier's probability for a classifier rule). ``flagged``
    is true when any category is, as in OpenAI's; ``action`` (an extra field) is what serving
    would do with the text: the most severe action of the rules that match, or ``allow``."""
    categories, scores, actions = {}, {}, []
    for rule in policy.rules:
        hit, score = rule.score(text)
        categories[rule.name] = categories.get(rule.name, False) or hit
        scores[rule.name] = max(scores.get(rule.name, 0.0), score)
        if hit:
            actions.append(rule.action)
    return {"flagged": any(categories.values()), "categories": categories, "category_scores": scores,
            "action": max(actions, key=ACTIONS.index, default="allow")}


def install_routes(app, st) -> None:
    @app.post("/v1/moderations")
    async def moderations(body: ModerationRequest, request: Request):
        mod = st.moderation
        if mod is None:
            raise ApiError(404, "this server has no moderation policy: start it with `zenlm serve --policy FILE`",
                           code="moderation_not_configured")
        ctx = request.scope["zenlm"]
        texts = _inputs(body.input)
        ctx["prompt"] = "\n".join(texts)
        results = [await mod._run(result, mod.policy, t) for t in texts]
        for i, r in enumerate(results):
            if r["flagged"]:
                _note(ctx, {"where": "moderations", "action": r["action"], "input": i,
                            "rules": sorted(k for k, v in r["categories"].items() if v)})
        return {"id": f"modr-{uuid4().hex}", "model": body.model or MODEL, "results": results}


__all__ = ["ServerModeration", "StreamFilter", "filter_for", "install_routes", "load", "result", "CODE", "FINISH"]
