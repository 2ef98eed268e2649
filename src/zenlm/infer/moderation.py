"""Moderation policies: rules checked on prompts before the model sees them and on replies.

A policy file (YAML or JSON) lists rules. Each rule matches by regular expressions, by
keywords (case-insensitive, whole words or phrases) or by a zenlm classifier's probability of
some labels above a threshold, and names an action:

- ``block``: the prompt never reaches the model (or the reply is withheld); the policy's
  ``message`` is answered instead;
- ``flag``: the text goes through and the verdict says why it was flagged;
- ``log``: the text goes through and the match is only recorded.

Every non-allow verdict is appended to the policy's ``log_file`` (JSON lines) when it has one.
:meth:`Policy.check` is the whole interface a server needs: text in, :class:`Verdict` out.

Example::

    message: "Sorry, I can't help with that."
    log_file: moderation.jsonl
    rules:
      - {name: weapons, keywords: ["build a bomb", "make a pipe bomb"], action: block}
      - {name: ssn, regex: ['\\b\\d{3}-\\d{2}-\\d{4}\\b'], action: flag, apply_to: [output]}
      - {name: toxic, classifier: runs/toxic, labels: [toxic], threshold: 0.8, action: block}
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zenlm.errors import ConfigError

ACTIONS = ("log", "flag", "block")  # in rising severity
WHERE = ("prompt", "output")
RULE_KEYS = ("name", "regex", "keywords", "classifier", "labels", "threshold", "action", "apply_to")
POLICY_KEYS = ("rules", "message", "log_file")
DEFAULT_MESSAGE = "I can't help with that request."


def _unknown(keys, allowed, where: str) -> None:
    import difflib

    for key in keys:
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (expected one of {', '.join(allowed)})"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")


@dataclass
class Rule:
    name: str
    action: str = "block"
    apply_to: tuple[str, ...] = WHERE
    regex: list[str] = field(default_factory=list)
    keywords: list[str] = field(default_factory=list)
    classifier: str | None = None  # a zenlm classifier run (zenlm finetune classify)
    labels: list[str] = field(default_factory=list)  # the classifier labels that match
    threshold: float = 0.5
    _patterns: list[re.Pattern] = field(default_factory=list, repr=False)
    _model: object = field(default=None, repr=False)  # (classifier, tokenizer) once loaded

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ConfigError(f"rule {self.name!r}: action must be one of {ACTIONS}, got {self.action!r}")
        self.apply_to = (self.apply_to,) if isinstance(self.apply_to, str) else tuple(self.apply_to)
        bad = [w for w in self.apply_to if w not in WHERE]
        if bad:
            raise ConfigError(f"rule {self.name!r}: apply_to must name {WHERE}, got {bad}")
        if not (self.regex or self.keywords or self.classifier):
            raise ConfigError(f"rule {self.name!r} has nothing to match: give regex, keywords or classifier")
        if self.classifier and not self.labels:
            raise ConfigError(f"rule {self.name!r}: a classifier rule needs the labels that match")
        try:
            self._patterns = [re.compile(p, re.IGNORECASE) for p in self.regex]
        except re.error as exc:
            raise ConfigError(f"rule {self.name!r}: bad regular expression: {exc}") from None
        self._patterns += [re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, k.split())) + r"(?!\w)",
                                      re.IGNORECASE) for k in self.keywords if k.strip()]

    def match(self, text: str) -> dict | None:
        for p in self._patterns:
            m = p.search(text)
            if m:
                return {"rule": self.name, "action": self.action, "match": m.group(0)}
        if self._model is not None:
            score = classifier_score(*self._model, text, self.labels)
            if score >= self.threshold:
                return {"rule": self.name, "action": self.action, "score": score}
        return None

    def score(self, text: str) -> tuple[bool, float]:
        """(matches, score) for a moderation query: a regex or keyword hit scores 1.0; a
        classifier rule that no pattern hits scores its classifier's probability, even below the
        threshold, so a caller can see how close the text came."""
        if any(p.search(text) for p in self._patterns):
            return True, 1.0
        if self._model is not None:
            s = classifier_score(*self._model, text, self.labels)
            return s >= self.threshold, s
        return False, 0.0


def classifier_score(classifier, tokenizer, text: str, labels: list[str]) -> float:
    """The probability a zenlm classifier gives ``labels`` together, for one text."""
    import torch

    ids = tokenizer.encode(text.strip()) or [tokenizer.eot_id or 0]
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id] + ids
    ids = ids[:classifier.config.max_seq_len]
    device = next(classifier.parameters()).device
    with torch.no_grad():
        logits = classifier(torch.tensor([ids], device=device), torch.tensor([len(ids)], device=device))
    probs = torch.softmax(logits.float(), -1)[0]
    return float(sum(probs[classifier.labels.index(str(label))] for label in labels))


@dataclass
class Verdict:
    action: str  # allow, log, flag or block
    where: str
    matches: list[dict] = field(default_factory=list)

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    @property
    def flagged(self) -> bool:
        return self.action == "flag"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Policy:
    rules: list[Rule]
    message: str = DEFAULT_MESSAGE
    log_file: str | None = None

    @classmethod
    def from_dict(cls, data: dict, *, base: Path | None = None,
                  load_model: Callable[[str], object] | None = None) -> "Policy":
        """A policy from its parsed file. ``load_model`` (e.g. ``zenlm.load``) loads classifier
        runs; it is passed in because loading runs belongs to a floor above this one."""
        if not isinstance(data, dict):
            raise ConfigError("a moderation policy is a mapping with a 'rules' list")
        _unknown(data, POLICY_KEYS, "policy")
        rules = []
        for i, raw in enumerate(data.get("rules") or []):
            if not isinstance(raw, dict):
                raise ConfigError(f"policy rule {i} is not a mapping")
            _unknown(raw, RULE_KEYS, f"policy rule {raw.get('name', i)!r}")
            raw = dict(raw)
            for key in ("regex", "keywords", "labels"):
                if isinstance(raw.get(key), str):
                    raw[key] = [raw[key]]
            rule = Rule(**{"name": f"rule{i}", **raw})
            if rule.classifier:
                if load_model is None:
                    raise ConfigError(f"rule {rule.name!r} names a classifier, but nothing to load it with")
                path = Path(rule.classifier)
                if base is not None and not path.is_absolute() and (base / path).exists():
                    path = base / path
                loaded = load_model(str(path))
                clf = loaded.model
                if not hasattr(clf, "labels"):
                    raise ConfigError(f"rule {rule.name!r}: {rule.classifier} is not a classifier run")
                missing = [lab for lab in rule.labels if str(lab) not in clf.labels]
                if missing:
                    raise ConfigError(f"rule {rule.name!r}: labels {missing} not in the classifier's {clf.labels}")
                clf.eval()
                rule._model = (clf, loaded.tokenizer)
            rules.append(rule)
        if not rules:
            raise ConfigError("the moderation policy has no rules")
        log_file = data.get("log_file")
        if log_file and base is not None and not Path(log_file).is_absolute():
            log_file = str(base / log_file)
        return cls(rules, str(data.get("message", DEFAULT_MESSAGE)), log_file)

    @classmethod
    def load(cls, path: str | Path, load_model: Callable[[str], object] | None = None) -> "Policy":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"moderation policy not found: {p}")
        text = p.read_text(encoding="utf-8")
        try:
            if p.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
            raise ConfigError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                              f"{str(exc).splitlines()[0]}") from None
        return cls.from_dict(data, base=p.parent, load_model=load_model)

    def watches(self, where: str) -> bool:
        return any(where in r.apply_to for r in self.rules)

    def check(self, text: str, where: str = "prompt") -> Verdict:
        """The verdict on ``text`` as a prompt or an output: the most severe action of the rules
        that match (``allow`` when none do); recorded in the log file unless it is allow."""
        if where not in WHERE:
            raise ValueError(f"where must be one of {WHERE}")
        matches = [m for r in self.rules if where in r.apply_to and (m := r.match(text))]
        action = max((m["action"] for m in matches), key=ACTIONS.index, default="allow")
        verdict = Verdict(action, where, matches)
        if matches and self.log_file:
            # one whole line per write in append mode: a log, not a file to replace atomically
            line = json.dumps({"time": time.time(), **verdict.as_dict(), "chars": len(text)})
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        return verdict


class Moderated:
    """A reply stream under a policy: iterate it for the text to show.

    The prompt is checked first; a blocked prompt yields the policy's message and ``reply`` is
    never called, so the model never sees it. When the policy watches outputs the reply is held
    back until it ends (a reply cannot be unshown once streamed) and is checked whole; a
    blocked reply is replaced by the message. ``verdicts`` holds every verdict; ``blocked`` says
    where the text was stopped (None, "prompt" or "output")."""

    def __init__(self, policy: Policy, prompt: str, reply: Callable[[], Iterator[str]],
                 on_verdict: Callable[[Verdict], None] | None = None):
        self.policy, self.prompt, self.reply = policy, prompt, reply
        self.on_verdict = on_verdict
        self.verdicts: list[Verdict] = []
        self.blocked: str | None = None

    def _note(self, verdict: Verdict) -> Verdict:
        self.verdicts.append(verdict)
        if self.on_verdict is not None and verdict.action != "allow":
            self.on_verdict(verdict)
        return verdict

    def __iter__(self) -> Iterator[str]:
        if self._note(self.policy.check(self.prompt, "prompt")).blocked:
            self.blocked = "prompt"
            yield self.policy.message
            return
        pieces = self.reply()
        if not self.policy.watches("output"):
            yield from pieces
            return
        text = "".join(pieces)
        if self._note(self.policy.check(text, "output")).blocked:
            self.blocked = "output"
            yield self.policy.message
            return
        yield text


__all__ = ["Policy", "Rule", "Verdict", "Moderated", "ACTIONS", "classifier_score", "DEFAULT_MESSAGE"]
