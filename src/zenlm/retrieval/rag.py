"""Answers grounded in an index: retrieve, show the model numbered chunks, check what it cites.

The steps, each one a guard against a way small models go wrong:

1. Retrieve ``k`` chunks. When retrieval is weak (the best dense cosine is below
   ``min_cosine`` and no chunk shares most of the question's words) the answer says plainly
   that nothing relevant was found and the model is not called: a model given unrelated text
   invents an answer from it.
2. The chunks go into the chat template's user turn as ``[1] file:lines`` + text, and the model
   is asked to answer briefly and cite ``[n]``.
3. Citations are checked: a number that names no retrieved chunk is removed (and listed in
   ``invalid``). An answer left with no valid citation is attributed to the best-ranked chunk
   that contains most of its words (``attributed`` says so: it is the checker's citation, not
   the model's); otherwise it is flagged ``unsupported``.
4. The answer comes with ``quote``: the sentence of the first cited chunk that shares most
   words with the question (then the answer), so a reader sees the evidence (a small model's own
   words are often wrong where the chunk it read is right). It is the chunk's text, never the
   model's, and is kept apart from ``text``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from zenlm.retrieval.index import STOPWORDS, Hit

NOTHING_FOUND = "I found nothing relevant to this question in the index."
SYSTEM = ("You answer questions using only the numbered sources you are given. Keep the answer "
          "short, and cite the source it comes from as [n].")
_CITE = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_WORDS = re.compile(r"[^\W_]+")
_MODELS: dict[str, object] = {}


@dataclass
class Answer:
    """``citations`` maps each valid cited number to its chunk, in order of first citation."""

    question: str
    text: str
    hits: list[Hit]
    found: bool
    citations: dict[int, Hit] = field(default_factory=dict)
    invalid: list[int] = field(default_factory=list)
    attributed: bool = False
    unsupported: bool = False
    raw: str = ""  # the model's text before the checks
    quote: str = ""  # the supporting sentence of the first cited chunk (its text, verbatim)

    def sources(self) -> dict[int, str]:
        return {n: h.span for n, h in self.citations.items()}

    def render(self) -> str:
        lines = [self.text]
        if self.quote:
            lines.append(f"> {self.quote} [{next(iter(self.citations))}]")
        if self.citations:
            lines.append("")
            lines += [f"[{n}] {h.span}" for n, h in self.citations.items()]
        if self.unsupported:
            lines.append("(no retrieved chunk supports this answer)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"question": self.question, "answer": self.text, "found": self.found,
                "sources": {str(n): s for n, s in self.sources().items()},
                "invalid_citations": self.invalid, "attributed": self.attributed,
                "unsupported": self.unsupported, "raw": self.raw, "quote": self.quote,
                "retrieved": [h.to_json() for h in self.hits]}


def _content_words(text: str) -> list[str]:
    return [w for w in (w.lower() for w in _WORDS.findall(text)) if w not in STOPWORDS]


def _coverage(words: list[str], text: str) -> float:
    """The share of ``words`` that occur in ``text`` (as words, case-insensitive)."""
    if not words:
        return 0.0
    have = set(w.lower() for w in _WORDS.findall(text))
    return sum(w in have for w in words) / len(words)


def weak_retrieval(question: str, hits: list[Hit], min_cosine: float, min_coverage: float = 0.67) -> bool:
    best = max((h.dense for h in hits if h.dense is not None), default=-1.0)
    if best >= min_cosine:
        return False
    words = list(dict.fromkeys(_content_words(question)))
    return not any(h.bm25 is not None and _coverage(words, h.text) >= min_coverage for h in hits)


def build_messages(question: str, hits: list[Hit]) -> list[dict]:
    """The chunks by number only (file names and line numbers are noise a small model copies
    into its answer); the numbers are mapped back to ``file:lines`` after."""
    sources = "\n\n".join(f"[{n}] {h.text}" for n, h in enumerate(hits, start=1))
    user = (f"Sources:\n\n{sources}\n\nQuestion: {question}\nAnswer the question with words "
            f"from the sources, and cite the source you used, like [1].")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def check_citations(raw: str, hits: list[Hit], min_support: float = 0.5) -> tuple[str, dict[int, Hit], list[int], bool, bool]:
    """(text, valid citations, invalid numbers, attributed, unsupported) of a model's answer."""
    cited: list[int] = []
    invalid: list[int] = []

    def keep_valid(m: re.Match) -> str:
        nums = [int(x) for x in re.split(r"\s*,\s*", m.group(1))]
        good = [n for n in nums if 1 <= n <= len(hits)]
        invalid.extend(n for n in nums if n not in good)
        cited.extend(n for n in good if n not in cited)
        return f"[{', '.join(map(str, good))}]" if good else ""

    text = _CITE.sub(keep_valid, raw)
    text = re.sub(r"[ \t]+([.,;:!?])", r"\1", re.sub(r"[ \t]{2,}", " ", text)).strip()
    attributed = unsupported = False
    if not cited and hits:
        words = _content_words(text)
        # the best-ranked chunk that holds most of the answer's words: retrieval rank is the
        # stronger evidence (a small model mixes in words from every chunk it was shown)
        best = next((n for n, h in enumerate(hits, start=1) if _coverage(words, h.text) >= min_support), None)
        if words and best is not None:
            cited, attributed = [best], True
            text = f"{text} [{best}]"
        else:
            unsupported = True
    return text, {n: hits[n - 1] for n in cited}, invalid, attributed, unsupported


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def supporting_quote(question: str, answer: str, chunk: str) -> str:
    """The sentence of ``chunk`` covering most of the question's words, the answer's breaking
    ties (a wrong answer's words must not outvote the question's)."""
    q, a = list(dict.fromkeys(_content_words(question))), list(dict.fromkeys(_content_words(answer)))
    sentences = [x.strip() for x in _SENTENCE.split(chunk) if x.strip()]
    if not sentences or not (q or a):
        return ""
    return max(sentences, key=lambda x: (_coverage(q, x), _coverage(a, x)))


def load_chat_model(model):
    """A loaded chat model readied for decoding, cached by name (a RAG run asks many times)."""
    if not isinstance(model, str):
        return model
    if model not in _MODELS:
        import zenlm
        from zenlm.infer.prepare import prepare_for_decoding

        loaded = zenlm.load(model)
        prepare_for_decoding(loaded.model, tokenizer=loaded.tokenizer)
        _MODELS[model] = loaded
    return _MODELS[model]


def ask(index, question: str, model="smollm2", k: int = 3, *, mode: str = "hybrid",
        min_cosine: float = 0.3, max_new_tokens: int = 64, hits: list[Hit] | None = None,
        generate=None) -> Answer:
    """Answer ``question`` from the ``k`` best chunks of ``index``, citing them as ``[n]``.

    ``model`` is a name or path for ``zenlm.load`` (loaded once and kept) or a loaded model.
    ``hits`` skips the search (chunks already retrieved); ``generate`` replaces the model with
    a function ``messages -> text`` (another model, or a recorded answer to check).
    """
    from zenlm.errors import PromptError

    if not question.strip():
        raise PromptError("the question is empty")
    if hits is None:
        hits = index.search(question, mode=mode, k=k)
    if not hits or weak_retrieval(question, hits, min_cosine):
        return Answer(question, NOTHING_FOUND, hits, found=False)
    messages = build_messages(question, hits)
    raw = (generate or _chat(model, max_new_tokens))(messages)
    text, cited, invalid, attributed, unsupported = check_citations(raw, hits)
    quote = supporting_quote(question, text, next(iter(cited.values())).text) if cited else ""
    return Answer(question, text, hits, True, cited, invalid, attributed, unsupported, raw, quote)


def _chat(model, max_new_tokens: int):
    def run(messages: list[dict]) -> str:
        from zenlm.infer import SamplingConfig
        from zenlm.infer.chat import ChatSession

        loaded = load_chat_model(model)
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
        session = ChatSession(loaded.model, loaded.tokenizer, cfg, system=messages[0]["content"])
        return "".join(session.reply(messages[1]["content"])).strip()

    return run
