"""Labels: the one home of their rules, used by the agent, the controller, the CLI and the simulator. Pure.

A label is ``key=value``. Keys are :data:`~.names.LABEL_KEY` (1-63 letters, digits and
``._/-``, starting with a letter or digit). Values are at most :data:`MAX_VALUE` printable
characters, none of :data:`FORBIDDEN` (``,`` ``=`` ``!``): those separate and compare terms
of a selector (``site=berlin,arch!=arm64``), so a value holding one could never be matched.
``k=v`` items (``--label``, ``TETHER_LABELS``, a labels command's output) are split at the
first ``=``, key and value stripped; :func:`parse` checks the result with the same rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from . import names

KEY = names.LABEL_KEY
MAX_VALUE = 128
FORBIDDEN = ",=!"
RULES = (
    "keys: letters, digits and '._/-', at most 63; values: at most 128 printable characters, none of ',=!'"
)


def value_ok(value: object) -> bool:
    """Whether ``value`` may be a label's value."""
    return (
        isinstance(value, str)
        and len(value) <= MAX_VALUE
        and value.isprintable()
        and not any(c in value for c in FORBIDDEN)
    )


def problem(labels: Mapping[str, str]) -> str | None:
    """One message naming every invalid label of ``labels`` (None: all valid)."""
    bad = [
        f"{key}={value!r}" if KEY.ok(key) else f"{key!r}"
        for key, value in labels.items()
        if not KEY.ok(key) or not value_ok(value)
    ]
    return f"invalid label {', '.join(bad)} ({RULES})" if bad else None


def split(item: str) -> tuple[str, str]:
    """``key=value`` as (key, value), split at the first ``=`` and stripped; ValueError if it has
    no ``=`` or no key. The parts are not checked: see :func:`parse`."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{item!r} is not key=value")
    return key.strip(), value.strip()


def parse(items: Iterable[str]) -> dict[str, str]:
    """``key=value`` items as labels (a later key wins); ValueError naming every bad item at once."""
    labels: dict[str, str] = {}
    errors: list[str] = []
    for item in items:
        try:
            key, value = split(item)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        labels[key] = value
    if errors:
        raise ValueError("; ".join(errors))
    found = problem(labels)
    if found is not None:
        raise ValueError(found)
    return labels
