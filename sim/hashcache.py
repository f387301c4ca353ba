"""Stack definitions decoded once per payload: the one shortcut the simulator takes on the agent's code path.

(The hashes themselves need no memo here any more: ``ServiceSpec`` and ``StackSpec`` keep
their content hash once computed (``protocol/models.py``), for real agents too; the wrapper
that memoised ``spec_hash()`` per object in this process cost more per call, 0.8 against
0.3 µs, than the models' own cached attribute, and was dropped in issue 21's fifth pass.)

A stack definition is one retained message that every device of a deploy receives, the
same bytes for all: decoding, validating and hashing it to verify it against its topic was
a tenth of the simulator's CPU per deploy at 10,000 devices, the same work on the same
bytes 10,000 times. :func:`install` makes ``codec.decode(payload, StackDefinition)``
remember what it decoded for the last few distinct payloads (by their bytes): a device
that receives those exact bytes gets the same frozen model (its hash already computed) and
still checks it against the topic's hash; a payload that fails to decode is refused by
every device that receives it. What the devices send is unchanged (a test compares the
bytes with and without). ``tether-sim --no-hash-cache`` runs without this shortcut.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel
from tether.protocol import codec
from tether.protocol.models import StackDefinition

M = TypeVar("M", bound=BaseModel)

DEFINITIONS_KEPT = 16
"""Distinct stack-definition payloads remembered (the most recently decoded)."""

_MARK = "_tether_sim_cached"


def _decode_definitions(original: Callable[[bytes, type[Any]], Any]) -> Callable[[bytes, type[Any]], Any]:
    kept: OrderedDict[bytes, StackDefinition] = OrderedDict()

    def decode(payload: bytes, model: type[M]) -> M:
        if model is not StackDefinition:
            return original(payload, model)  # type: ignore[no-any-return]
        key = bytes(payload)
        hit = kept.get(key)
        if hit is not None:
            kept.move_to_end(key)
            return hit  # type: ignore[return-value]
        value = original(key, model)  # raises for a bad payload: not remembered
        kept[key] = value
        if len(kept) > DEFINITIONS_KEPT:
            kept.popitem(last=False)
        return value  # type: ignore[no-any-return]

    decode.__doc__ = original.__doc__
    decode.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(decode, _MARK, True)
    return decode


def install() -> None:
    """Remember decoded stack definitions in this process (idempotent)."""
    if not getattr(codec.decode, _MARK, False):
        codec.decode = _decode_definitions(codec.decode)  # type: ignore[assignment]  # on purpose


def uninstall() -> None:
    """Undo :func:`install` (for tests that compare with and without the shortcut)."""
    if getattr(codec.decode, _MARK, False):
        codec.decode = codec.decode.__wrapped__  # type: ignore[attr-defined]


def installed() -> bool:
    return bool(getattr(codec.decode, _MARK, False))
