"""Zero- and few-shot evaluation by log-likelihood: multiple choice, and classification by
prompting.

A model answers a multiple-choice item by the choice it finds most likely after the context:
the sum of the log-probabilities of the choice's tokens (raw accuracy), or that sum divided by
the choice's length in bytes (length-normalised accuracy, which stops long choices losing just
for having more tokens to pay for). Classification by prompting is the same question with the
label words as the choices, so one data set can be scored zero-shot, few-shot (examples drawn
from a train file put in front) and fine-tuned (``eval/classify.py``) and the numbers compared.

Context and choice are tokenized separately and concatenated, as a model sees them when it
generates the choice after the prompt; a space ending the context moves to the choice.
Only the positions that predict choice tokens go through the LM head (``Transformer.logits``,
so a quantized head scores as it decodes), so a 49k vocabulary costs nothing for the prompt
tokens; the few-shot examples every prompt starts with are run once into a KV cache rather than
once per item.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from zenlm.errors import DataError


@dataclass
class ChoiceItem:
    context: list[int]
    choices: list[list[int]]
    gold: int | None = None
    choice_bytes: list[int] | None = None


def split_space(context: str, choice: str) -> tuple[str, str]:
    """Move whitespace that ends the context to the start of the choice (" positive" is one
    token in byte-level BPE; "positive" after a trailing space is not)."""
    stripped = context.rstrip(" ")
    return stripped, context[len(stripped):] + choice


def make_item(tokenizer, context: str | list[int], choices: list[str], gold: int | None = None,
              *, add_bos: bool = True) -> ChoiceItem:
    """A ChoiceItem from text: the context with the BOS where the model wants one (a chat
    prompt already rendered as ids is used as is)."""
    if isinstance(context, str):
        pieces = [split_space(context, c) for c in choices]
        ctx_text = pieces[0][0]
        ctx = tokenizer.encode_prompt(ctx_text) if add_bos else tokenizer.encode(ctx_text)
        choice_texts = [c for _, c in pieces]
    else:
        ctx, choice_texts = list(context), list(choices)
    ids = [tokenizer.encode(c) for c in choice_texts]
    if any(not c for c in ids):
        raise DataError(f"a choice encodes to no tokens: {choice_texts}")
    return ChoiceItem(ctx, ids, gold, [max(len(c.encode("utf-8")), 1) for c in choice_texts])


def common_prefix(seqs: list[list[int]]) -> list[int]:
    first = seqs[0]
    n = min(len(x) for x in seqs)
    for other in seqs[1:]:
        k = 0
        while k < n and other[k] == first[k]:
            k += 1
        n = k
    return first[:n]


MIN_SHARED = 16  # a shared prefix shorter than this is not worth a cache


@torch.no_grad()
def score_items(model, items: list[ChoiceItem], *, batch_size: int = 16,
                share_prefix: bool = True) -> list[list[float]]:
    """Sum of log-probabilities of each choice of each item, given the item's context.

    Items whose choices are all one token share one row (one forward gives every choice);
    others get a row per choice (context + choice minus its last token). Rows are sorted by
    length and right-padded; a context too long for the model loses its oldest tokens.

    Few-shot prompts repeat the same shots (and chat prompts the same system turn) in front of
    every item: with ``share_prefix`` the tokens all contexts start with are run once into a
    KV cache, and each batch runs only what follows them, attending to the cache.
    """
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    limit = model.config.max_seq_len
    for item in items:
        if not item.context:
            raise DataError("a context encodes to no tokens (and the model adds no BOS)")
        if max(len(c) for c in item.choices) >= limit:
            raise DataError(f"a choice of {max(len(c) for c in item.choices)} tokens does not fit "
                            f"the model's context of {limit}")
    shared: list[int] = []
    if share_prefix and len(items) > 1:
        fits = all(len(it.context) + max(len(c) for c in it.choices) - 1 <= limit for it in items)
        # keep one context token per item: the position that predicts its first choice token
        shared = common_prefix([it.context for it in items])[:min(len(it.context) for it in items) - 1]
        if not fits or len(shared) < MIN_SHARED:
            shared = []
    skip = len(shared)
    rows = []  # (item, [choice indices], ids after the shared prefix, position of the first prediction)
    for i, item in enumerate(items):
        if all(len(c) == 1 for c in item.choices):
            ctx = item.context[-limit:][skip:]
            rows.append((i, list(range(len(item.choices))), ctx, len(ctx) - 1))
            continue
        for j, c in enumerate(item.choices):
            ids = (item.context + c[:-1])[-limit:][skip:]  # the last choice token is never an input
            rows.append((i, [j], ids, len(ids) - len(c)))
    scores = [[0.0] * len(item.choices) for item in items]
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][2]))
    cache = None
    if shared:
        size = min(batch_size, len(rows))
        cache = model.new_cache(size, skip + max(len(r[2]) for r in rows))
        model(torch.tensor([shared], device=device).expand(size, skip), cache=cache, last_only=True)
    for s in range(0, len(order), batch_size):
        batch = [rows[r] for r in order[s:s + batch_size]]
        width = max(len(ids) for _, _, ids, _ in batch)
        x = torch.zeros(cache.batch if cache is not None else len(batch), width, dtype=torch.int64)
        for b, (_, _, ids, _) in enumerate(batch):
            x[b, :len(ids)] = torch.tensor(ids)
        if cache is not None:
            cache.pos = skip  # forget the last batch's suffixes; the shared prefix stays
        hidden = model.hidden_states(x.to(device), cache=cache)
        # every row's predicting positions through the head at once: a row of single-token
        # choices has one (each choice read from it), a choice's own row one per token
        spans = [1 if len(js) > 1 else len(items[i].choices[js[0]]) for i, js, _, _ in batch]
        at = torch.tensor([(b, start + k) for b, ((*_, start), n) in enumerate(zip(batch, spans))
                           for k in range(n)], device=device)
        logp = model.logits(hidden[at[:, 0], at[:, 1]]).float().log_softmax(-1)
        for (i, js, _, _), row in zip(batch, logp.split(spans)):
            if len(js) > 1:
                for j in js:
                    scores[i][j] = float(row[0, items[i].choices[j][0]])
            else:
                target = torch.tensor(items[i].choices[js[0]], device=device)
                scores[i][js[0]] = float(row.gather(1, target[:, None]).sum())
    model.train(was_training)
    return scores


@dataclass
class ChoiceResult:
    accuracy: float
    accuracy_norm: float
    n: int
    predictions: list[int]
    predictions_norm: list[int]

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "accuracy_norm": self.accuracy_norm, "n": self.n}


def pick(items: list[ChoiceItem], scores: list[list[float]]) -> ChoiceResult:
    raw = [max(range(len(s)), key=s.__getitem__) for s in scores]
    norm = [max(range(len(s)), key=lambda j: s[j] / it.choice_bytes[j]) for s, it in zip(scores, items)]
    gold = [it.gold for it in items]
    n = len(items)
    acc = sum(p == g for p, g in zip(raw, gold)) / max(n, 1)
    acc_norm = sum(p == g for p, g in zip(norm, gold)) / max(n, 1)
    return ChoiceResult(acc, acc_norm, n, raw, norm)


# ----------------------------------------------------------------------------------------------
# multiple choice: JSONL {"context": ..., "choices": [...], "gold": i}


def read_choice_file(path: str) -> list[dict]:
    from zenlm.data.tables import read_table

    _, rows = read_table(path, "jsonl")
    for i, row in enumerate(rows, 1):
        missing = [k for k in ("context", "choices", "gold") if k not in row]
        if missing:
            raise DataError(f"{path} line {i} lacks {', '.join(missing)} (need context, choices, gold)")
        if not isinstance(row["choices"], list) or len(row["choices"]) < 2:
            raise DataError(f"{path} line {i}: choices must be a list of at least two")
        gold = row["gold"]
        if isinstance(gold, str) and gold in row["choices"]:
            row["gold"] = row["choices"].index(gold)
        elif not isinstance(gold, int) or not 0 <= gold < len(row["choices"]):
            raise DataError(f"{path} line {i}: gold must be a choice's index or text")
    return rows


def draw(rows: list, k: int, seed: int, key=None) -> list:
    """``k`` rows at random; with ``key``, dealt round-robin over its values so every class
    shows up in a few-shot prompt."""
    if k <= 0:
        return []
    if k > len(rows):
        raise DataError(f"asked for {k} shots from a file of {len(rows)} rows")
    rng = random.Random(seed)
    if key is None:
        return rng.sample(rows, k)
    by: dict = {}
    for r in rng.sample(rows, len(rows)):
        by.setdefault(key(r), []).append(r)
    groups = [by[g] for g in sorted(by)]
    out = []
    while len(out) < k:
        for g in groups:
            if g and len(out) < k:
                out.append(g.pop())
    rng.shuffle(out)
    return out


def multiple_choice(model, tokenizer, rows: list[dict], shots: list[dict] | None = None, *,
                    sep: str = "\n\n", batch_size: int = 16) -> ChoiceResult:
    """Accuracy (raw and length-normalised) on multiple-choice rows, with ``shots`` solved
    examples in front of every context."""
    prefix = "".join(s["context"] + s["choices"][s["gold"]] + sep for s in shots or [])
    items = [make_item(tokenizer, prefix + r["context"], [str(c) for c in r["choices"]], r["gold"])
             for r in rows]
    return pick(items, score_items(model, items, batch_size=batch_size))


# ----------------------------------------------------------------------------------------------
# classification by prompting


BASE_TEMPLATE = "Text: {text}\nLabel:"
CHAT_TEMPLATE = "{text}"


def classify_prompts(tokenizer, texts: list[str], label_words: list[str],
                     shots: list[tuple[str, int]] | None = None, *, chat: bool = False,
                     template: str | None = None, instruction: str | None = None,
                     gold: list[int] | None = None) -> list[ChoiceItem]:
    """One ChoiceItem per text: the label words are the choices.

    A base model reads ``template`` (``Text: {text}\\nLabel:``) with each shot answered after
    it; a chat model gets the instruction as a system message, each shot as a user turn and
    an assistant reply, then the text as the last user turn and the generation prompt.
    """
    texts = [t.strip() for t in texts]  # surrounding whitespace is formatting (GLUE's trailing space)
    shots = [(t.strip(), y) for t, y in shots or []]
    if chat:
        template = template or CHAT_TEMPLATE
        instruction = instruction or ("Classify the text. Answer with one word: "
                                      + ", ".join(label_words) + ".")
        head = [{"role": "system", "content": instruction}]
        for text, label in shots or []:
            head += [{"role": "user", "content": template.format(text=text)},
                     {"role": "assistant", "content": label_words[label]}]
        items = []
        for i, text in enumerate(texts):
            messages = head + [{"role": "user", "content": template.format(text=text)}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            items.append(make_item(tokenizer, ids, list(label_words), gold[i] if gold else None))
        return items
    template = template or BASE_TEMPLATE
    prefix = (instruction + "\n\n") if instruction else ""
    prefix += "".join(template.format(text=t) + " " + label_words[y] + "\n\n" for t, y in shots or [])
    return [make_item(tokenizer, prefix + template.format(text=t), [" " + w for w in label_words],
                      gold[i] if gold else None) for i, t in enumerate(texts)]


CONTENT_FREE = ("N/A", "", "[MASK]")


def label_prior(model, tokenizer, label_words: list[str], shots=None, *, batch_size: int = 16,
                **prompt_kwargs) -> list[float]:
    """The log-probability the prompt alone gives each label: the label distribution after
    content-free texts (``N/A``, empty, ``[MASK]``), averaged over them."""
    items = classify_prompts(tokenizer, list(CONTENT_FREE), label_words, shots, **prompt_kwargs)
    probs = torch.tensor(score_items(model, items, batch_size=batch_size), dtype=torch.float64)
    probs = probs.log_softmax(-1).exp().mean(0)
    return probs.log().tolist()


def prompt_classify(model, tokenizer, texts: list[str], gold: list[int], labels: list[str],
                    label_words: list[str], shots: list[tuple[str, int]] | None = None, *,
                    chat: bool = False, template: str | None = None, instruction: str | None = None,
                    batch_size: int = 16, calibrate: bool = False):
    """(ClassifyResult of the raw scores, length-normalised accuracy).

    A small model's prompt often favours one label whatever the text (SmolLM2-135M on SST-2
    says "negative" to 92% of reviews zero-shot with its chat template). ``calibrate`` divides
    that prior out — contextual calibration (Zhao et al., 2021): each label's probability is
    divided by its probability after content-free texts, before the largest is picked.
    """
    from zenlm.eval.classify import score

    kw = dict(chat=chat, template=template, instruction=instruction)
    items = classify_prompts(tokenizer, texts, label_words, shots, gold=gold, **kw)
    scores = score_items(model, items, batch_size=batch_size)
    if calibrate:
        prior = label_prior(model, tokenizer, label_words, shots, batch_size=batch_size, **kw)
        scores = [[x - p for x, p in zip(row, prior)] for row in scores]
    res = pick(items, scores)
    return score(gold, res.predictions, labels), res.accuracy_norm


__all__ = ["ChoiceItem", "make_item", "score_items", "pick", "ChoiceResult", "read_choice_file",
           "draw", "multiple_choice", "classify_prompts", "label_prior", "prompt_classify"]
