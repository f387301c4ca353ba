"""Label selectors for dynamic groups: ``site=berlin,arch=arm64``. Pure.

Terms are joined by commas and must all hold: ``key=value`` (or ``==``), ``key!=value``,
``key`` (the label exists) and ``!key`` (it does not).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from tether.protocol.errors import StoreError

_KEY = r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}"
_TERM = re.compile(
    rf"^\s*(?:(?P<not>!)\s*(?P<nkey>{_KEY})|(?P<key>{_KEY})\s*(?:(?P<op>==|!=|=)\s*(?P<value>[^,=!]*))?)\s*$"
)


@dataclass(frozen=True)
class Term:
    key: str
    op: Literal["=", "!=", "exists", "absent"]
    value: str = ""

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "absent":
            return self.key not in labels
        if self.op == "=":
            return labels.get(self.key) == self.value
        return labels.get(self.key) != self.value


def parse_selector(text: str) -> tuple[Term, ...]:
    """Parse a selector; raise :class:`StoreError` naming the bad term."""
    if not text or not text.strip():
        raise StoreError("empty selector")
    terms = []
    for raw in text.split(","):
        m = _TERM.fullmatch(raw)
        if not m:
            raise StoreError(
                f"invalid selector term {raw.strip()!r} (use key=value, key!=value, key or !key)"
            )
        if m.group("not"):
            terms.append(Term(m.group("nkey"), "absent"))
        elif m.group("op") is None:
            terms.append(Term(m.group("key"), "exists"))
        else:
            op = "!=" if m.group("op") == "!=" else "="
            terms.append(Term(m.group("key"), op, m.group("value").strip()))  # type: ignore[arg-type]
    return tuple(terms)


def matches(selector: tuple[Term, ...], labels: Mapping[str, str]) -> bool:
    """Whether every term of ``selector`` holds for ``labels``."""
    return all(term.matches(labels) for term in selector)
