"""Label selectors for dynamic groups: ``site=berlin,arch=arm64``. Pure.

Terms are joined by commas and must all hold: ``key=value`` (or ``==``), ``key!=value``,
``key`` (the label exists) and ``!key`` (it does not).

What a selector matches is a device's :class:`Attributes`: the labels the controller vouches
for (``trusted``: set by an operator, or pinned by its enrollment token or at approval) and
what the device reports about itself (``reported``: its facts and its own labels). A group's
selector matches only the trusted ones unless the group trusts device labels.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from tether.protocol import labels as label_rules
from tether.protocol.errors import CommandError

_KEY = label_rules.KEY.body
MAX_LABELS = 64
"""Labels an operator or a token may set on one device (device-reported ones are the agent's)."""
_TERM = re.compile(
    rf"^\s*(?:(?P<not>!)\s*(?P<nkey>{_KEY})|(?P<key>{_KEY})\s*(?:(?P<op>==|!=|=)\s*(?P<value>[^{re.escape(label_rules.FORBIDDEN)}]*))?)\s*$"
)


_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Attributes(Mapping[str, str]):
    """A device's attributes; as a mapping, all of them (a trusted label wins over a reported one).

    Kept per device in the controller's fleet view: no ``__dict__``, and with nothing trusted
    (most devices) no second dict (issue 21: the controller's memory per device)."""

    trusted: Mapping[str, str] = field(default_factory=dict)
    """Set by an operator, or pinned by the device's enrollment token or at its approval."""
    reported: Mapping[str, str] = field(default_factory=dict)
    """What the device says of itself: its facts (``arch``, ``hostname``...) and its own labels."""
    _merged: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.trusted:
            object.__setattr__(self, "trusted", _EMPTY)
            if type(self.reported) is dict:  # taken as given: nobody writes to it
                object.__setattr__(self, "_merged", self.reported)
                return
        object.__setattr__(self, "_merged", {**self.reported, **self.trusted})

    def __getitem__(self, key: str) -> str:
        return self._merged[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._merged)

    def __len__(self) -> int:
        return len(self._merged)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Attributes):
            return dict(self.trusted) == dict(other.trusted) and dict(self.reported) == dict(other.reported)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def selectable(self, trust_device: bool) -> Mapping[str, str]:
        """What a group selector may match: all of it if the group trusts device labels, else the trusted part."""
        return self if trust_device else self.trusted


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


def check_labels(labels: Mapping[str, str]) -> None:
    """Refuse labels a selector could not match (or a terminal would show wrongly), all named in
    one error (the rules: protocol/labels.py)."""
    problem = label_rules.problem(labels)
    if problem is not None:
        raise CommandError(problem)
    if len(labels) > MAX_LABELS:
        raise CommandError(f"too many labels ({len(labels)}; at most {MAX_LABELS})")


def parse_selector(text: str) -> tuple[Term, ...]:
    """Parse a selector; raise :class:`CommandError` naming the bad term."""
    if not text or not text.strip():
        raise CommandError("empty selector")
    terms = []
    for raw in text.split(","):
        m = _TERM.fullmatch(raw)
        if not m:
            raise CommandError(
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
