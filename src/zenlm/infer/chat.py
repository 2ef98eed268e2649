"""Multi-turn chat on top of :func:`zenlm.infer.stream`: the model's chat template, a system
prompt, and a history that is trimmed (oldest turns first) to fit the context.

Each turn renders the whole conversation with the template and generates from it, so the model
sees exactly what ``transformers``' ``apply_chat_template`` would give it; nothing is cached
between turns (a 135M model prefills a few hundred tokens in well under a second on a CPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from zenlm.errors import PromptTooLongError, TokenizerError
from zenlm.infer.generate import stream
from zenlm.infer.sampling import SamplingConfig

_SENTINEL = "\u2063zenlm-end-of-turn\u2063"  # text no template writes by itself


def end_of_turn(tokenizer) -> str | None:
    """The special token the chat template closes an assistant turn with (e.g. ``<|im_end|>``).

    Most models stop at their EOS at the end of a turn, but some templates close turns with a
    different token than the tokenizer's EOS (Qwen2 base: EOS ``<|endoftext|>``, turns end with
    ``<|im_end|>``); generation must stop at that token too or it runs into a made-up next turn.
    Found by rendering a one-exchange conversation and reading what follows the reply.
    """
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}],
            add_generation_prompt=False)
    except TokenizerError:
        return None
    after = text.partition(_SENTINEL)[2].lstrip()
    specials = {t.content for t in tokenizer.hf.get_added_tokens_decoder().values() if t.special}
    return next((s for s in sorted(specials, key=len, reverse=True) if after.startswith(s)), None)


@dataclass
class ChatSession:
    """A conversation with one model: ``reply(text)`` streams the answer and records both turns.

    ``system`` (None: whatever the template does without one) is rendered first on every turn
    and is never dropped; when the conversation outgrows the context (less room for the reply)
    the oldest turns are dropped, and ``dropped`` counts the messages dropped so far.
    An interrupted reply (the consumer stops iterating, or Ctrl-C) is kept as far as it got:
    the history then holds what the user saw.
    """

    model: object
    tokenizer: object
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    dropped: int = 0
    last_prompt: list[int] = field(default_factory=list)  # the ids the last reply started from

    def __post_init__(self) -> None:
        if self.tokenizer is None or not self.tokenizer.chat_template:
            raise TokenizerError("this model's tokenizer has no chat template (use plain "
                                 "generation: zenlm generate --raw)")
        eot = end_of_turn(self.tokenizer)
        if eot and eot != self.tokenizer.eot and eot not in self.sampling.stop:
            self.sampling = replace(self.sampling, stop=[*self.sampling.stop, eot])

    # --- the conversation ---------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages.clear()

    def forget_unanswered(self) -> None:
        """Drop a last user message that got no reply at all (stopped before the first token)."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()

    def conversation(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def render(self, messages: list[dict] | None = None) -> str:
        """The prompt text the model sees for the next reply."""
        msgs = self.conversation() if messages is None else messages
        return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)

    def prompt_ids(self) -> list[int]:
        """The next prompt's token ids, dropping the oldest turns until it leaves room to answer."""
        context = self.model.config.max_seq_len
        room = max(1, min(self.sampling.max_new_tokens, context // 4))
        ids = self.tokenizer.encode(self.render())
        while len(ids) + room > context and len(self.messages) > 1:
            # one turn: the oldest user message and the reply that followed it
            n = 2 if len(self.messages) > 2 and self.messages[1]["role"] == "assistant" else 1
            del self.messages[:n]
            self.dropped += n
            ids = self.tokenizer.encode(self.render())
        if len(ids) >= context:
            raise PromptTooLongError(f"the message does not fit: with the system prompt and the chat "
                                     f"template it is {len(ids)} tokens; the model's context is {context}")
        return ids

    def reply(self, text: str) -> Iterator[str]:
        """Add a user message and stream the answer; the answer joins the history as it ends."""
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self.prompt_ids()
        except PromptTooLongError:
            self.messages.pop()
            raise
        self.last_prompt = ids
        return self._answer(ids)

    def _answer(self, ids: list[int]) -> Iterator[str]:
        pieces: list[str] = []
        try:
            for piece in stream(self.model, self.tokenizer, ids, self.sampling):
                pieces.append(piece)
                yield piece
        finally:  # also on Ctrl-C or close(): keep what was shown
            self.messages.append({"role": "assistant", "content": "".join(pieces)})
