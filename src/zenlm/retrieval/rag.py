"""Answers grounded in an index: retrieve, show the model the few sentences that matter, cite
the chunk its answer comes from.

The steps, each one a guard against a way small models go wrong:

1. Retrieve ``k`` chunks. When retrieval is weak (the best dense cosine is below
   ``min_cosine`` and no chunk shares most of the question's words) the answer says plainly
   that nothing relevant was found and the model is not called: a model given unrelated text
   invents an answer from it.
2. The model reads little: the ``sentences`` sentences of the first ``context_chunks`` chunks
   most like the question (the index's embedder's cosine, plus the share of the question's
   words they hold), kept in their chunk's order under the chunk's number. A 135M model loses
   the thread in three whole paragraphs; in two or three sentences that hold the answer it
   mostly copies the right words.
3. It is asked for a short answer copied from the context, decoded greedily and briefly; the
   first line is the answer.
4. The citation is the checker's, verified by string overlap, not left to the model (small
   models rarely write ``[n]``, and cite the wrong number when they do): the answer cites the
   best-ranked retrieved chunk that contains it verbatim, else the one holding most of its
   words. A number the model wrote itself is kept only if its chunk passes the same check
   (numbers naming no retrieved chunk are listed in ``invalid``). ``attributed`` says the
   citation is the checker's; an answer no chunk supports is flagged ``unsupported``.
5. The answer comes with ``quote``: the sentence of the cited chunk that holds the answer's
   words (the question's breaking ties), the chunk's text verbatim, kept apart from ``text``
   and rendered as ``Source [n]: "..."``: the evidence, and what to read where the model's
   few words are wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from zenlm.retrieval.index import STOPWORDS, Hit

NOTHING_FOUND = "I found nothing relevant to this question in the index."
SYSTEM = ("You answer questions from the context you are given. Reply with only the answer: "
          "a few words copied from the context.")
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
    context: list[tuple[int, list[str]]] = field(default_factory=list)  # what the model read

    @property
    def plain(self) -> str:
        """The answer without its citation numbers."""
        return _CITE.sub("", self.text).strip()

    def sources(self) -> dict[int, str]:
        return {n: h.span for n, h in self.citations.items()}

    def render(self) -> str:
        lines = [self.text]
        if self.quote:
            lines.append(f'Source [{next(iter(self.citations))}]: "{self.quote}"')
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
                "context": {str(n): xs for n, xs in self.context},
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


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def sentences_of(text: str) -> list[str]:
    return [x.strip() for x in _SENTENCE.split(text) if x.strip()]


def select_context(question: str, hits: list[Hit], embedder=None, *, chunks: int = 2,
                   sentences: int = 3) -> list[tuple[int, list[str]]]:
    """``(n, sentences)`` per chunk for the prompt: the ``sentences`` best sentences of the first
    ``chunks`` hits, each chunk's in their own order. A sentence scores its cosine to the
    question (with ``embedder``) plus the share of the question's words it holds: the cosine
    finds paraphrase, the words the names and numbers a question repeats."""
    from zenlm.retrieval.embedder import as_unit_rows

    pool = [(n, i, x) for n, h in enumerate(hits[:chunks], start=1) for i, x in enumerate(sentences_of(h.text))]
    if not pool:
        return []
    words = list(dict.fromkeys(_content_words(question)))
    score = [_coverage(words, x) for _, _, x in pool]
    if embedder is not None:
        texts = [question] + [x for _, _, x in pool]
        v = as_unit_rows(embedder.encode(texts), len(texts), int(embedder.dim))
        score = [s + float(c) for s, c in zip(score, v[1:] @ v[0])]
    best = sorted(range(len(pool)), key=lambda j: -score[j])[:sentences]
    out: dict[int, list[tuple[int, str]]] = {}
    for j in best:
        n, i, x = pool[j]
        out.setdefault(n, []).append((i, x))
    return [(n, [x for _, x in sorted(out[n])]) for n in sorted(out)]


def build_messages(question: str, context: list[tuple[int, list[str]]]) -> list[dict]:
    """The chosen sentences by chunk number only (file names and line numbers are noise a small
    model copies into its answer); the citation is attached after, by overlap."""
    lines = "\n".join(f"[{n}] {' '.join(xs)}" for n, xs in context)
    user = (f"Context:\n{lines}\n\nQuestion: {question}\n"
            f"Answer with a few words copied from the context.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def clean_answer(raw: str) -> str:
    """The answer in a model's reply: its first non-empty line, without an ``Answer:`` label
    or wrapping quotes."""
    quotes = "\"'“”"
    line = next((x.strip() for x in raw.strip().splitlines() if x.strip()), "").strip(quotes)
    line = re.sub(r"^(?:the\s+)?answer(?:\s+is)?\s*[:\-]?\s+", "", line, flags=re.IGNORECASE)
    return line.strip().strip(quotes).strip()


def _norm(text: str) -> str:
    return " ".join(w.lower() for w in _WORDS.findall(text))


def supports(answer: str, chunk: str, min_support: float = 0.5) -> float:
    """How well ``chunk`` backs ``answer``: 1.0 when it contains the answer's words verbatim
    (in order, case and punctuation aside), else the share of the answer's content words it
    holds when that reaches ``min_support``, else 0."""
    a = _norm(answer)
    if a and f" {a} " in f" {_norm(chunk)} ":
        return 1.0
    cover = _coverage(_content_words(answer), chunk)
    return cover if cover >= min_support else 0.0


def check_citations(raw: str, hits: list[Hit], min_support: float = 0.5) -> tuple[str, dict[int, Hit], list[int], bool, bool]:
    """(text, valid citations, invalid numbers, attributed, unsupported) of a model's answer.

    Numbers naming no hit are removed and listed; a number whose chunk does not back the answer
    (see :func:`supports`) is dropped. With no number left the answer cites the best-ranked hit
    that contains it verbatim, else the one with most of its words (``attributed``)."""
    cited: list[int] = []
    invalid: list[int] = []

    def take(m: re.Match) -> str:
        nums = [int(x) for x in re.split(r"\s*,\s*", m.group(1))]
        invalid.extend(n for n in nums if not 1 <= n <= len(hits))
        cited.extend(n for n in nums if 1 <= n <= len(hits) and n not in cited)
        return ""

    text = _CITE.sub(take, raw)
    text = re.sub(r"[ \t]+([.,;:!?])", r"\1", re.sub(r"[ \t]{2,}", " ", text)).strip()
    cited = [n for n in cited if supports(text, hits[n - 1].text, min_support) > 0]
    attributed = unsupported = False
    if not cited and hits and _WORDS.search(text):
        score = [supports(text, h.text, min_support) for h in hits]
        best = max(range(len(hits)), key=lambda i: (score[i], -i))  # ties: the better rank
        if score[best] > 0:
            cited, attributed = [best + 1], True
        else:
            unsupported = True
    elif not cited:
        unsupported = True
    if cited:
        text = f"{text} [{', '.join(map(str, cited))}]"
    return text, {n: hits[n - 1] for n in cited}, invalid, attributed, unsupported


def supporting_quote(question: str, answer: str, chunk: str) -> str:
    """The sentence of ``chunk`` that holds the answer (verbatim first, then by share of its
    words), the question's words breaking ties; with no answer words, the question's best."""
    q, a = list(dict.fromkeys(_content_words(question))), list(dict.fromkeys(_content_words(answer)))
    found = sentences_of(chunk)
    if not found or not (q or a):
        return ""
    return max(found, key=lambda x: (supports(answer, x) == 1.0, _coverage(a, x), _coverage(q, x)))


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
        min_cosine: float = 0.3, max_new_tokens: int = 32, context_chunks: int = 2,
        sentences: int = 3, hits: list[Hit] | None = None, generate=None) -> Answer:
    """Answer ``question`` from the best chunks of ``index``, citing the one it comes from as ``[n]``.

    ``model`` is a name or path for ``zenlm.load`` (loaded once and kept) or a loaded model.
    The model reads the ``sentences`` best sentences of the first ``context_chunks`` of ``k``
    hits. ``hits`` skips the search (chunks already retrieved); ``generate`` replaces the model
    with a function ``messages -> text`` (another model, or a recorded answer to check).
    """
    from zenlm.errors import PromptError

    if not question.strip():
        raise PromptError("the question is empty")
    if hits is None:
        hits = index.search(question, mode=mode, k=k)
    if not hits or weak_retrieval(question, hits, min_cosine):
        return Answer(question, NOTHING_FOUND, hits, found=False)
    context = select_context(question, hits, getattr(index, "embedder", None),
                             chunks=context_chunks, sentences=sentences)
    raw = (generate or _chat(model, max_new_tokens))(build_messages(question, context))
    text, cited, invalid, attributed, unsupported = check_citations(clean_answer(raw), hits)
    bare = _CITE.sub("", text).strip()
    quote = supporting_quote(question, bare, next(iter(cited.values())).text) if cited else ""
    return Answer(question, text, hits, True, cited, invalid, attributed, unsupported, raw, quote,
                  context)


def _chat(model, max_new_tokens: int):
    def run(messages: list[dict]) -> str:
        from zenlm.infer import SamplingConfig
        from zenlm.infer.chat import ChatSession

        loaded = load_chat_model(model)
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
        session = ChatSession(loaded.model, loaded.tokenizer, cfg, system=messages[0]["content"])
        return "".join(session.reply(messages[1]["content"])).strip()

    return run
