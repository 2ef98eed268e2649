"""Tokenizers: train a byte-level BPE, or load a Hugging Face tokenizer folder or a GGUF vocabulary.

We lean on Hugging Face ``tokenizers`` (Rust, parallel, the format every model ships in) and
keep a thin class around it that adds what training, evaluation and chat need: the end-of-text
token (document separator and stop token), the BOS token and whether prompts start with it, a
chat template rendered with jinja2 as ``transformers`` renders it, a stable hash for manifests,
and each token's length in bytes (for bits-per-byte).

zenlm's own tokenizers have one special token, ``<|endoftext|>``: documents start after it in
training, so it is also the BOS that prompts start with. Tokenizers of released models say what
they use in ``tokenizer_config.json`` (or GGUF metadata), read by :meth:`Tokenizer.from_hf_folder`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from zenlm.errors import TokenizerError
from zenlm.io import atomic_write_json, atomic_write_text, sha256_bytes

EOT = "<|endoftext|>"
SAME_AS_EOT = "<same as eot>"
BERT_SPECIALS = {"cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "pad": "[PAD]", "unk": "[UNK]"}  # Tokenizer(bos=...) default: zenlm documents start after the EOT


def byte_level_alphabet() -> dict[str, int]:
    """The printable stand-in character for each byte, as byte-level BPE writes tokens.

    Bytes that are printable Latin-1 stand for themselves; the rest are moved up past 255 in
    order, so every byte has a visible, whitespace-free character.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_to_byte: dict[str, int] = {chr(b): b for b in keep}
    shift = 0
    for b in range(256):
        if b not in keep:
            char_to_byte[chr(256 + shift)] = b
            shift += 1
    return char_to_byte


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the few facts zenlm needs about it.

    ``eot``: the end-of-text token (generation stops at it; EOS). ``bos``: the token a prompt or
    document starts with when ``add_bos`` (by default the same token as ``eot``, as zenlm trains).
    ``chat_template``: a jinja2 template as in ``tokenizer_config.json``.
    """

    def __init__(self, hf_tokenizer, eot: str | None = EOT, *, bos: str | None = SAME_AS_EOT,
                 add_bos: bool | None = None, chat_template: str | None = None):
        self.hf = hf_tokenizer
        self.eot = eot if eot and hf_tokenizer.token_to_id(eot) is not None else None
        self.eot_id = hf_tokenizer.token_to_id(self.eot) if self.eot else None
        bos = self.eot if bos is SAME_AS_EOT else bos  # None: this tokenizer has no BOS
        self.bos = bos if bos and hf_tokenizer.token_to_id(bos) is not None else None
        self.bos_id = hf_tokenizer.token_to_id(self.bos) if self.bos else None
        self.add_bos = (self.bos_id is not None) if add_bos is None else bool(add_bos and self.bos_id is not None)
        self.chat_template = chat_template
        # Encoder (BERT) tokens: BERT's names where the vocabulary has them; from_hf_folder
        # takes them from tokenizer_config.json instead
        self.specials: dict[str, str] = {
            name: tok for name, tok in BERT_SPECIALS.items() if hf_tokenizer.token_to_id(tok) is not None}
        # A tokenizer.json may fix padding and truncation (MiniLM's pads every text to 128);
        # zenlm pads batches itself and truncates only when asked, as transformers does.
        hf_tokenizer.no_padding()
        hf_tokenizer.no_truncation()

    def special_id(self, name: str) -> int | None:
        """The id of an encoder's named special token (``cls``, ``sep``, ``mask``, ``pad``,
        ``unk``), or None."""
        token = self.specials.get(name)
        return self.hf.token_to_id(token) if token else None

    @property
    def mask_token(self) -> str | None:
        return self.specials.get("mask")

    @property
    def mask_id(self) -> int | None:
        return self.special_id("mask")

    @property
    def pad_id(self) -> int:
        """The id padding uses: the tokenizer's pad token, else 0."""
        pad = self.special_id("pad")
        return 0 if pad is None else pad

    def encode_inputs(self, texts: list[str], pairs: list[str] | None = None,
                      max_length: int | None = None) -> list[tuple[list[int], list[int]]]:
        """(ids, token_type_ids) per text as an encoder reads it: the post-processor's special
        tokens added (BERT's ``[CLS] a [SEP] b [SEP]``), the longest part truncated first so
        that at most ``max_length`` tokens remain (specials included)."""
        if max_length is not None:
            self.hf.enable_truncation(max_length, strategy="longest_first")
        try:
            inputs = texts if pairs is None else list(zip(texts, pairs))
            encs = self.hf.encode_batch(inputs, add_special_tokens=True)
        finally:
            self.hf.no_truncation()
        return [(e.ids, e.type_ids) for e in encs]

    @property
    def eos_id(self) -> int | None:
        """The same token as ``eot_id``, under the name Hugging Face configs use."""
        return self.eot_id

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None,
              *, min_frequency: int = 2, show_progress: bool = False) -> "Tokenizer":
        """Train byte-level BPE; every byte is in the alphabet, so nothing is ever unknown."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        special_tokens = list(special_tokens or [EOT])
        if EOT not in special_tokens:
            special_tokens.insert(0, EOT)
        floor = 256 + len(special_tokens)
        if vocab_size < floor:
            raise TokenizerError(
                f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {floor} "
                f"(256 bytes + {len(special_tokens)} special tokens)")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise TokenizerError(f"tokenizer not found: {p}")
        try:
            return cls(HFTokenizer.from_file(str(p)))
        except Exception as exc:  # the Rust error text is long; its first line says enough
            raise TokenizerError(f"cannot read tokenizer {p}: {str(exc).splitlines()[0]}") from None

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike) -> "Tokenizer":
        """A Hugging Face tokenizer folder: ``tokenizer.json`` (or GPT-2's ``vocab.json`` +
        ``merges.txt``) with the special tokens, add-BOS flag and chat template of
        ``tokenizer_config.json`` / ``special_tokens_map.json`` / ``chat_template.jinja``."""
        import json

        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            hf = cls.load(folder / "tokenizer.json").hf
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

            try:
                bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
            except Exception as exc:
                raise TokenizerError(f"cannot read {folder}/vocab.json + merges.txt: "
                                     f"{str(exc).splitlines()[0]}") from None
            hf = HFTokenizer(bpe)
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            hf.decoder = decoders.ByteLevel()
        else:
            raise TokenizerError(f"no tokenizer in {folder}: expected tokenizer.json "
                                 f"(or vocab.json + merges.txt)")
        config: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            f = folder / name
            if f.is_file():
                try:
                    config.update(json.loads(f.read_text(encoding="utf-8")))
                except json.JSONDecodeError:
                    raise TokenizerError(f"{f} is not valid JSON") from None

        def token(key: str) -> str | None:
            value = config.get(key)
            return value.get("content") if isinstance(value, dict) else value

        # make sure special tokens named in the config are single, special ids
        from tokenizers import AddedToken

        named = [t for t in (token("bos_token"), token("eos_token")) if t]
        missing = [t for t in named if hf.token_to_id(t) is None]
        if missing:
            hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        specials = {name: token(f"{name}_token") for name in ("cls", "sep", "mask", "pad", "unk")}
        bos, eos = token("bos_token"), token("eos_token")
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # not stated: does tokenizer.json's post-processor prepend the BOS?
            bos_id = hf.token_to_id(bos) if bos else None
            with_special = hf.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and len(with_special) > 1 and with_special[0] == bos_id
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named_templates = {t.get("name"): t.get("template") for t in template}
            template = named_templates.get("default") or next(iter(named_templates.values()), None)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        out = cls(hf, eot=eos, bos=bos, add_bos=bool(add_bos), chat_template=template)
        out.specials = {k: v for k, v in specials.items() if v and hf.token_to_id(v) is not None}
        return out

    def save_hf_folder(self, folder: str | os.PathLike) -> list[Path]:
        """``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` that
        ``transformers.AutoTokenizer.from_pretrained`` reads with the same special tokens."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                          "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
                 for i, t in sorted(self.hf.get_added_tokens_decoder().items())}
        specials = {"bos_token": self.bos, "eos_token": self.eot,
                    **{f"{k}_token": v for k, v in self.specials.items()}}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
                  **specials, "add_bos_token": self.add_bos, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        paths = [folder / "tokenizer.json", folder / "tokenizer_config.json",
                 folder / "special_tokens_map.json"]
        atomic_write_text(paths[0], self._json_for_transformers())
        atomic_write_json(paths[1], config)
        atomic_write_json(paths[2], {k: v for k, v in specials.items() if v})
        return paths

    def _json_for_transformers(self) -> str:
        """``tokenizer.json`` whose post-processor adds the BOS exactly when ``add_bos`` says.

        ``transformers`` takes the BOS from tokenizer.json's post-processor, zenlm from
        ``add_bos``: writing a post-processor that agrees keeps the two in step."""
        import json

        data = json.loads(self.hf.to_str())
        post = data.get("post_processor") or {}
        if "cls" in self.specials:  # an encoder's [CLS] ... [SEP] template: kept as it is
            return json.dumps(data, ensure_ascii=False)
        if self.add_bos:
            a, b = ({"Sequence": {"id": s, "type_id": i}} for i, s in enumerate("AB"))
            bos = {"SpecialToken": {"id": self.bos, "type_id": 0}}
            data["post_processor"] = {
                "type": "TemplateProcessing", "single": [bos, a], "pair": [bos, a, bos, b],
                "special_tokens": {self.bos: {"id": self.bos, "ids": [self.bos_id], "tokens": [self.bos]}}}
        elif post.get("type") == "TemplateProcessing":
            data["post_processor"] = None
        return json.dumps(data, ensure_ascii=False)

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        atomic_write_text(p, self.to_json())
        return p

    # --- use ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """``encode`` with the BOS in front when this tokenizer's prompts start with one."""
        ids = self.encode(text)
        return [self.bos_id] + ids if self.add_bos and self.bos_id is not None else ids

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs) -> str | list[int]:
        """The conversation rendered with the model's chat template (as transformers renders it).

        The template writes the BOS itself where the model wants one, so ``tokenize=True``
        encodes the text without adding another."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template")
        template = _compile_chat_template(self.chat_template)
        try:
            text = template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos or "", eos_token=self.eot or "", **kwargs)
        except Exception as exc:  # TemplateError, or a template that reads a missing field
            raise TokenizerError(f"chat template failed: {str(exc).splitlines()[0]}") from None
        return self.encode(text) if tokenize else text

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        return self.hf.to_str()

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.to_json().encode())

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes each token stands for (0 for special tokens): the denominator of bits-per-byte."""
        table = byte_level_alphabet()
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        special = {t.content for t in self.hf.get_added_tokens_decoder().values() if t.special}
        for token, idx in self.hf.get_vocab(with_added_tokens=True).items():
            if token in special:
                continue
            if all(ch in table for ch in token):
                lengths[idx] = len(token)  # byte-level: one stand-in character per byte
            else:
                lengths[idx] = len(token.encode("utf-8"))
        return lengths

    def stream_decode(self) -> "StreamDecoder":
        return StreamDecoder(self)


@functools.lru_cache(maxsize=16)
def _compile_chat_template(source: str):
    """A chat template compiled in jinja2's immutable sandbox (templates come from model hubs,
    so they are untrusted code) with the globals and filters transformers gives them."""
    import json
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TokenizerError(f"chat template is not valid jinja2: {exc.message} (line {exc.lineno})") from None


class StreamDecoder:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 sequences.

    A byte-level token may end in the middle of a multi-byte character; printing it at once
    would show a replacement character. We decode the growing tail and emit only what is stable.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters of decode(self.ids) already returned

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self.emitted:]
        self.emitted = len(text)
        # keep the window short: restart from the last emitted token boundary
        if len(self.ids) > 64:
            self.ids, self.emitted = [], 0
        return piece

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        piece = text[self.emitted:]
        self.ids, self.emitted = [], 0
        return piece
