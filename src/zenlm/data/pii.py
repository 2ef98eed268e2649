"""PII scrubbing for training text: emails, phone numbers, IP addresses and card numbers.

Each kind is replaced by a placeholder token (``<EMAIL>``, ``<PHONE>``, ``<IP>``, ``<CARD>``)
and counted. The patterns lean towards precision: a number is a card only when it has a card's
length, an issuer's first digit and passes the Luhn check; a phone number needs a leading ``+``
(international) or the separators of a common national format, so plain counts, years, dates,
times and version strings stay as they are. Kinds are applied in an order where the more
specific goes first (an email holding digits, an IP that a phone pattern could also read).
Patterns never cross a line break, so text cut at line boundaries scrubs the same in pieces.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable

TOKENS = {"email": "<EMAIL>", "card": "<CARD>", "ipv6": "<IP>", "ipv4": "<IP>", "phone": "<PHONE>"}
KINDS = tuple(TOKENS)

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|"
                  rf"{_OCTET}(?:\.{_OCTET}){{3}})?(?![\w:]|\.\d)")
# 13 to 19 digits, in groups split by single spaces or hyphens
CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
_SEP = r"[ .-]"
PHONE = re.compile(
    r"(?<![\w+])(?<!\d[/.-])(?:"
    # international: +CC then groups, optionally an area code in parentheses (E.164: <= 15 digits)
    r"\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,4}){2,5}"
    # North America: (555) 123-4567, 555-123-4567, 555.123.4567
    r"|\(\d{3}\)[ ]?\d{3}[ .-]\d{4}|\d{3}([.-])\d{3}\1\d{4}"
    # Europe, trunk prefix 0: 020 7946 0958, 030 12345678, 06 12 34 56 78, 0171-1234567
    r"|0\d{1,4}([ /-])\d{2,8}(?:\2\d{2,8}){0,3}"
    r")(?![\w]|[.-]\d)")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> str | None:
    raw = m.group(0)
    digits = re.sub(r"[ -]", "", raw)
    if len(set(re.findall(r"[ -]", raw))) > 1:  # one separator kind per number
        return None
    if not 13 <= len(digits) <= 19 or digits[0] not in "23456" or not luhn_ok(digits):
        return None
    return "card"


def _ipv6(m: re.Match) -> str | None:
    text = m.group(0)
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return None
    groups = [g for g in text.split(":") if g]
    # "::2" and "1::2" are slices in code far more often than addresses
    if len(groups) < 3 and max((len(g) for g in groups), default=0) < 3:
        return None
    return "ipv6"


def _phone(m: re.Match) -> str | None:
    text = m.group(0)
    n = sum(c.isdigit() for c in text)
    if text.startswith("+"):
        return "phone" if 8 <= n <= 15 else None
    if text.startswith("0"):
        # national numbers with a trunk 0: 9 to 12 digits, and not a date like 01-02-2024
        if not 9 <= n <= 12 or re.fullmatch(r"\d{1,2}[/-]\d{1,2}[/-]\d{2,4}", text):
            return None
        return "phone"
    return "phone" if n == 10 else None


# (kind, pattern, check returning the kind or None to keep the text)
RULES: list[tuple[str, re.Pattern, Callable[[re.Match], str | None]]] = [
    ("email", EMAIL, lambda m: "email"),
    ("card", CARD, _card),
    ("ipv6", IPV6, _ipv6),  # before IPv4: ::ffff:10.0.0.1 is one address
    ("ipv4", IPV4, lambda m: "ipv4"),
    ("phone", PHONE, _phone),
]


class Scrubber:
    """Scrubs texts one after another and keeps the counts of what it replaced, per kind."""

    def __init__(self, kinds: tuple[str, ...] = KINDS):
        unknown = set(kinds) - set(KINDS)
        if unknown:
            from zenlm.errors import ConfigError

            raise ConfigError(f"unknown PII kind(s) {sorted(unknown)}; known: {', '.join(KINDS)}")
        self.rules = [r for r in RULES if r[0] in kinds]
        self.counts: Counter = Counter({k: 0 for k in kinds})

    def __call__(self, text: str) -> str:
        for _, pattern, check in self.rules:
            def replace(m: re.Match) -> str:
                kind = check(m)
                if kind is None:
                    return m.group(0)
                self.counts[kind] += 1
                return TOKENS[kind]

            text = pattern.sub(replace, text)
        return text

    def summary(self) -> dict:
        return {"scrubbed": True, "kinds": [r[0] for r in self.rules], "counts": dict(self.counts),
                "total": sum(self.counts.values())}


def scrub(text: str, kinds: tuple[str, ...] = KINDS) -> tuple[str, dict[str, int]]:
    """(scrubbed text, count per kind)."""
    s = Scrubber(kinds)
    out = s(text)
    return out, dict(s.counts)


__all__ = ["scrub", "Scrubber", "luhn_ok", "TOKENS", "KINDS"]
