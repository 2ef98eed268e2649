"""Conversations for chat fine-tuning: render with the model's chat template, mark the tokens
that carry loss (the assistant's), and pack short examples into full rows.

Which tokens are the assistant's is found by rendering prefixes of the conversation: for each
assistant turn, the text of the conversation so far with the generation prompt
(``...<|im_start|>assistant\\n``) must be a prefix of the text with the turn included; the
difference (the reply and the template's end-of-turn marker) carries loss, the rest does not.
Each piece is tokenized on its own, so the prompt tokens are exactly those the model will see
at inference, when the reply is generated after the encoded generation prompt.

Models without a chat template (those ``zenlm pretrain`` makes) get :data:`PLAIN_TEMPLATE`:
``User: ...`` / ``Assistant: ...`` lines, each reply ending with the end-of-text token so that
generation stops there.

Packing (several short conversations in one row, see ``batching.PackedSampler``) keeps rows
full; packed conversations are kept apart by segment ids (a block-diagonal attention mask and
positions that restart per conversation), so packing changes the speed, not the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from zenlm.errors import DataError

PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

ROLES = ("system", "user", "assistant")


@dataclass
class ChatExample:
    ids: list[int]
    mask: list[bool]  # True where the token is the assistant's (a target that carries loss)


def read_conversations(path: str | Path, *, messages_field: str = "messages",
                       prompt_field: str | None = None, response_field: str | None = None,
                       system: str | None = None) -> list[list[dict]]:
    """Conversations from JSONL: ``{"messages": [{"role", "content"}, ...]}`` per line, or a
    prompt/response pair of fields (``question``/``answer`` in GSM8K) turned into one user
    and one assistant message."""
    from zenlm.data.tables import read_table

    p = Path(path)
    _, rows = read_table(p, "jsonl")  # one JSON object per line; blank lines skipped
    out = []
    for i, row in enumerate(rows, 1):
        if prompt_field or response_field:
            if not (prompt_field and response_field):
                raise DataError("give both a prompt field and a response field")
            missing = [f for f in (prompt_field, response_field) if f not in row]
            if missing:
                raise DataError(f"{p} row {i} has no field {missing[0]!r} (it has {', '.join(row)})")
            messages = [{"role": "user", "content": str(row[prompt_field])},
                        {"role": "assistant", "content": str(row[response_field])}]
        else:
            messages = row.get(messages_field)
            if not isinstance(messages, list) or not messages:
                raise DataError(f"{p} row {i} has no {messages_field!r} list of messages "
                                f"(or pass a prompt and a response field)")
            for m in messages:
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise DataError(f"{p} row {i}: every message needs a role and a content")
                if m["role"] not in ROLES:
                    raise DataError(f"{p} row {i}: unknown role {m['role']!r} (use {', '.join(ROLES)})")
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{p} row {i} has no assistant message to learn from")
        out.append(messages)
    return out


def render(tokenizer, messages: list[dict]) -> ChatExample:
    """Token ids of a conversation and which of them are the assistant's."""
    pieces: list[tuple[str, bool]] = []
    done = ""

    def text(upto: int, prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], add_generation_prompt=prompt)

    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = text(i, True), text(i + 1, False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("the chat template does not render a conversation as a growing "
                            "prefix, so the assistant's tokens cannot be told apart")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = text(len(messages), False)
    if rest.startswith(done) and len(rest) > len(done):
        pieces.append((rest[len(done):], False))
    ids: list[int] = []
    mask: list[bool] = []
    for piece, trains in pieces:
        if piece:
            toks = tokenizer.encode(piece)
            ids += toks
            mask += [trains] * len(toks)
    return ChatExample(ids, mask)


def fit(example: ChatExample, max_len: int) -> ChatExample | None:
    """Cut to ``max_len + 1`` tokens (inputs and shifted targets of ``max_len``); None when no
    assistant token is left to learn."""
    ids, mask = example.ids[:max_len + 1], example.mask[:max_len + 1]
    if not any(mask[1:]):
        return None
    return ChatExample(ids, mask)


def to_batch(examples: list[ChatExample], rows: list[list[int]],
             pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets and segment ids for rows of (packed) examples.

    Targets are -100 wherever the token to predict is not the assistant's, and on padding.
    Segment ids number the examples within a row (padding: -1), so the model keeps packed
    examples apart (see ``Transformer.hidden_states``).
    """
    seqs = []
    for row in rows:
        ids, mask, seg = [], [], []
        for k, i in enumerate(row):
            ids += examples[i].ids
            mask += examples[i].mask
            seg += [k] * len(examples[i].ids)
        seqs.append((ids, mask, seg))
    width = max(len(ids) for ids, _, _ in seqs) - 1
    x = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    y = torch.full((len(seqs), width), -100, dtype=torch.int64)
    s = torch.full((len(seqs), width), -1, dtype=torch.int64)
    for r, (ids, mask, seg) in enumerate(seqs):
        t = torch.tensor(ids, dtype=torch.int64)
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        x[r, :len(ids) - 1] = t[:-1]
        y[r, :len(ids) - 1] = torch.where(keep, t[1:], torch.full_like(t[1:], -100))
        s[r, :len(ids) - 1] = torch.tensor(seg[:-1], dtype=torch.int64)
    return x, y, s


__all__ = ["PLAIN_TEMPLATE", "ChatExample", "read_conversations", "render", "fit", "to_batch"]
