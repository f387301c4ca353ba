"""Memoised spec hashes: the one shortcut the simulator takes on the agent's own code path.

A reconcile pass computes ``ServiceSpec.spec_hash()`` (canonical JSON + SHA-256) two or
three times per service, so a device that receives a new 3-service stack computes about
24 hashes; profiled under ``bench/deploy_latency.py`` at 10,000 devices this was 30 % of
the simulator's single core. On a real device that is ~0.3 ms once per deploy and every
``reconcile_interval``, paid in parallel on every device's own CPU; in the simulator all
devices pay it one after the other on one core, so it delays every device behind them and
the benchmark would measure the simulator, not Tether.

The hash is a pure function of an immutable (frozen) model, so remembering it per object
changes no behaviour: the same hashes are computed, once per object instead of on every
call. :func:`install` wraps ``ServiceSpec.spec_hash`` and ``StackSpec.spec_hash`` in this
process only.

A stack definition is one retained message that every device of a deploy receives, the
same bytes for all: decoding, validating and hashing it to verify it against its topic was
a tenth of the simulator's CPU per deploy at 10,000 devices, the same work on the same
bytes 10,000 times. :func:`install` also makes ``codec.decode(payload, StackDefinition)``
remember what it decoded for the last few distinct payloads (by their bytes): a device
that receives those exact bytes gets the same frozen model (its hash already computed) and
still checks it against the topic's hash; a payload that fails to decode is refused by
every device that receives it. What the devices send is unchanged (a test compares the
bytes with and without). ``tether-sim --no-hash-cache`` runs without these shortcuts.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel
from tether.protocol import codec
from tether.protocol.models import ServiceSpec, StackDefinition, StackSpec

M = TypeVar("M", bound=BaseModel)

DEFINITIONS_KEPT = 16
"""Distinct stack-definition payloads remembered (the most recently decoded)."""

_MARK = "_tether_sim_cached"


def _cached(original: Callable[[Any], str]) -> Callable[[Any], str]:
    cache: dict[int, tuple[weakref.ref[Any], str]] = {}

    def spec_hash(self: Any) -> str:
        key = id(self)
        hit = cache.get(key)
        if hit is not None and hit[0]() is self:
            return hit[1]
        value = original(self)

        def forget(_ref: weakref.ref[Any], k: int = key) -> None:
            cache.pop(k, None)

        cache[key] = (weakref.ref(self, forget), value)
        return value

    spec_hash.__doc__ = original.__doc__
    spec_hash.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(spec_hash, _MARK, True)
    return spec_hash


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
    """Memoise ``spec_hash`` of service and stack specs, and decoded stack definitions, in
    this process (idempotent)."""
    for cls in (ServiceSpec, StackSpec):
        if not getattr(cls.spec_hash, _MARK, False):
            cls.spec_hash = _cached(cls.spec_hash)  # type: ignore[method-assign, assignment]  # on purpose
    if not getattr(codec.decode, _MARK, False):
        codec.decode = _decode_definitions(codec.decode)  # type: ignore[assignment]  # on purpose


def uninstall() -> None:
    """Undo :func:`install` (for tests that compare with and without the shortcuts)."""
    for cls in (ServiceSpec, StackSpec):
        if getattr(cls.spec_hash, _MARK, False):
            cls.spec_hash = cls.spec_hash.__wrapped__  # type: ignore[union-attr, method-assign]
    if getattr(codec.decode, _MARK, False):
        codec.decode = codec.decode.__wrapped__  # type: ignore[attr-defined]


def installed() -> bool:
    hashes = all(getattr(cls.spec_hash, _MARK, False) for cls in (ServiceSpec, StackSpec))
    return hashes and getattr(codec.decode, _MARK, False)
