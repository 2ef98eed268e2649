"""Answers grounded in an index: retrieve, show the model the few sentences that matter, cite
the chunk its answer comes from.

The steps, each one a guard against a way small models go wrong:

1. Retrieve ``k`` chunks. When retrieval is weak (the best dense cosine is below
   ``min_cosine`` and no chunk shares most of the question's words) the answer says plainly
   that nothing relevant was found and the model is not called: a model given unrelated text
   invents an answer from it.
2. The model reads little: the ``sentences`` (default 1) sentences of the first
   ``context_chunks`` chunks most like the question (the index's embedder's cosine, plus the
   share of the question's words they hold), best first, each under its chunk's number. A 135M
   model loses the thread in three whole paragraphs, and even between two sentences it often
   picks the wrong one; the selection is right more often than the model is.
3. It is asked for one short sentence copying the context, after one worked example of that
   (``EXAMPLE``), decoded greedily and briefly with a repetition penalty below 1 (0.8), which
   favours the prompt's tokens: it copies the context's words where it would paraphrase them
   into wrong ones. The first line is the answer.
4. The citation is the checker's, verified by string overlap, not left to the model (small
   models rarely write ``[n]``, and cite the wrong number when they do): the answer cites the
   best-ranked retrieved chunk that contains it verbatim, else the one holding most of its
   words. A number the model wrote itself is kept only if its chunk passes the same check
   (numbers naming no retrieved chunk are listed in ``invalid``). ``attributed`` says the
   citation is the checker's; an answer no chunk supports is flagged ``unsupported``.
5. The answer comes with ``quote``: the cited chunk's sentence most like the question (the
   best sentence the model read, when it came from that chunk; else the one sharing most of
   the question's words), the chunk's text verbatim, kept apart from ``text`` and rendered as
   ``Source [n]: "..."``: the evidence, and what to read where the model's few words are
   wrong (a wrong answer's words must not choose the evidence shown for it).
6. An answer no retrieved chunk supports (a made-up date, a repeated instruction) is not
   shown as the answer: the best sentence the model read takes its place, cited, and
   ``fallback`` says so (``model_text`` keeps what the model wrote). Every answer that found
   something thus carries a citation that holds its words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from zenlm.retrieval.index import STOPWORDS, Hit

NOTHING_FOUND = "I found nothing relevant to this question in the index."
SYSTEM = ("You answer questions from the context you are given. Reply with one short sentence "
          "that copies the words of the context.")
# One worked exchange shown before the question (made up, about nothing an index holds): a
# small model imitates a demonstration far better than it follows an instruction.
EXAMPLE = ([(1, "The bridge over the Tamar was opened in 1859 and carries the railway into Cornwall."),
            (2, "Its engineer was Isambard Kingdom Brunel.")],
           "When was the bridge over the Tamar opened?",
           "The bridge over the Tamar was opened in 1859 [1].")
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
    context: list[tuple[int, str]] = field(default_factory=list)  # what the model read, best first
    model_text: str = ""  # the model's answer, cleaned, without citation numbers or fallback
    fallback: bool = False  # the model's answer was unsupported: a source sentence stands in

    @property
    def plain(self) -> str:
        """The answer without its citation numbers."""
        return _CITE.sub("", self.text).strip()

    def sources(self) -> dict[int, str]:
        return {n: h.span for n, h in self.citations.items()}

    def render(self) -> str:
        lines = [self.text]
        if self.quote and self.quote != self.plain:
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
                "context": [{"source": n, "sentence": x} for n, x in self.context],
                "model_answer": self.model_text, "fallback": self.fallback,
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
                   sentences: int = 1) -> list[tuple[int, str]]:
    """``(n, sentence)`` for the prompt: the ``sentences`` best sentences of the first ``chunks``
    hits, best first (a small model leans on what it reads first). A sentence scores its cosine
    to the question (with ``embedder``) plus the share of the question's words it holds: the
    cosine finds paraphrase, the words the names and numbers a question repeats."""
    from zenlm.retrieval.embedder import as_unit_rows

    pool = [(n, x) for n, h in enumerate(hits[:chunks], start=1) for x in sentences_of(h.text)]
    if not pool:
        return []
    words = list(dict.fromkeys(_content_words(question)))
    score = [_coverage(words, x) for _, x in pool]
    if embedder is not None:
        texts = [question] + [x for _, x in pool]
        v = as_unit_rows(embedder.encode(texts), len(texts), int(embedder.dim))
        score = [s + float(c) for s, c in zip(score, v[1:] @ v[0])]
    return [pool[j] for j in sorted(range(len(pool)), key=lambda j: -score[j])[:sentences]]


def build_messages(question: str, context: list[tuple[int, str]]) -> list[dict]:
    """The chosen sentences under their chunk's number only (file names and line numbers are
    noise a small model copies into its answer); the citation is attached after, by overlap."""
    def turn(context, question):
        lines = "\n".join(f"[{n}] {x}" for n, x in context)
        return {"role": "user", "content": f"Context:\n{lines}\n\nQuestion: {question}\n"
                                           f"Answer in one short sentence, copying the words of the context."}

    return [{"role": "system", "content": SYSTEM}, turn(*EXAMPLE[:2]),
            {"role": "assistant", "content": EXAMPLE[2]}, turn(context, question)]


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
    """The sentence of ``chunk`` covering most of the question's words, the answer's breaking
    ties (a wrong answer's words must not outvote the question's)."""
    q, a = list(dict.fromkeys(_content_words(question))), list(dict.fromkeys(_content_words(answer)))
    found = sentences_of(chunk)
    if not found or not (q or a):
        return ""
    return max(found, key=lambda x: (_coverage(q, x), _coverage(a, x)))


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
        min_cosine: float = 0.3, max_new_tokens: int = 48, context_chunks: int = 2,
        sentences: int = 1, repetition_penalty: float = 0.8, hits: list[Hit] | None = None,
        generate=None, copy: bool = True) -> Answer:
    """Answer ``question`` from the best chunks of ``index``, citing the one it comes from as ``[n]``.

    ``model`` is a name or path for ``zenlm.load`` (loaded once and kept) or a loaded model.
    The model reads the ``sentences`` best sentences of the first ``context_chunks`` of ``k``
    hits. ``repetition_penalty`` below 1 favours the tokens of the prompt (copying the context).
    ``hits`` skips the search (chunks already retrieved); ``generate`` replaces the model
    with a function ``messages -> text`` (another model, or a recorded answer to check).
    ``copy`` holds the reply to a span of the sentences read (:func:`copy_constraint`).
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
    copying = [x for _, x in context] if copy else None
    raw = (generate or _chat(model, max_new_tokens, repetition_penalty, copying))(build_messages(question, context))
    model_text = clean_answer(raw)
    text, cited, invalid, attributed, unsupported = check_citations(model_text, hits)
    fallback = unsupported and bool(context)
    if fallback:  # the sentence the model read that is most like the question, cited
        n, best = context[0]
        text, cited, attributed = f"{best} [{n}]", {n: hits[n - 1]}, True
    quote = ""
    if cited:  # the best sentence read, when it is the cited chunk's; else the chunk's own best
        first = next(iter(cited))
        quote = next((x for n, x in context[:1] if n == first), "") or supporting_quote(
            question, _CITE.sub("", text).strip(), cited[first].text)
    own = re.sub(r"\s+([.,;:!?])", r"\1", _CITE.sub("", model_text)).strip()  # without its numbers
    return Answer(question, text, hits, True, cited, invalid, attributed, unsupported, raw, quote,
                  context, own, fallback)


def copy_constraint(sources: list[tuple[list[int], set[int]]], ends: set[int]):
    """``SamplingConfig.allowed`` for a reply that is one contiguous run of tokens of one of
    ``sources`` (ids, and the positions where a word starts), then one of ``ends``. A small
    model asked to copy an answer still paraphrases or drifts; held to spans of the text it
    read it can only choose where to start and stop, which is the part it gets right."""
    def allowed(made: list[int]) -> set[int]:
        n, nxt = len(made), set()
        for src, starts in sources:
            for i in range(len(src) - n):
                if src[i:i + n] == made and (n or i in starts):
                    nxt.add(src[i + n])
        return (nxt | ends) if n else (nxt or ends)

    return allowed


def _chat(model, max_new_tokens: int, repetition_penalty: float = 1.0, copy: list[str] | None = None):
    def run(messages: list[dict]) -> str:
        from zenlm.infer import SamplingConfig
        from zenlm.infer.chat import ChatSession, end_of_turn

        loaded = load_chat_model(model)
        allowed = None
        if copy:
            tok = loaded.tokenizer
            eot = end_of_turn(tok)
            ends = {i for i in (tok.eot_id, tok.hf.token_to_id(eot) if eot else None) if i is not None}
            sources = []
            for ids in (tok.encode(p + x) for x in copy for p in ("", " ")):
                starts = {i for i, t in enumerate(ids) if i == 0 or tok.decode([t])[:1].isspace()}
                sources.append((ids, starts))
            allowed = copy_constraint(sources, ends)
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                             repetition_penalty=repetition_penalty, allowed=allowed)
        session = ChatSession(loaded.model, loaded.tokenizer, cfg, system=messages[0]["content"],
                              messages=list(messages[1:-1]))
        return "".join(session.reply(messages[-1]["content"])).strip()

    return run
