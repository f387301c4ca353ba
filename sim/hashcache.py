"""Stack definitions decoded, and their host-access refusals found, once per content: the simulator's shortcuts on the agent's code path.

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
bytes with and without).

What a device's host access policy refuses in a stack (``agent.policy.refusals``, checked
when a device first renders a version) is a pure function of the stack's content and the
(frozen) policy, and every simulated device has the same policy object: :func:`install`
remembers it per (stack version, policy object) for the renderer (2.5 % of the simulator's
CPU per deploy, issue 21's fifth pass). ``tether-sim --no-hash-cache`` runs without these
shortcuts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel
from tether.agent import rendering
from tether.agent.policy import HostAccess
from tether.protocol import codec
from tether.protocol.models import StackDefinition, StackSpec

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


_REFUSALS = "refusals"
"""The renderer's name for ``agent.policy.refusals`` (imported by name into ``agent.rendering``)."""

REFUSALS_KEPT = 256
"""(stack version, policy) pairs whose refusals are remembered."""


def _remember_refusals(
    original: Callable[[StackSpec, HostAccess], list[str]],
) -> Callable[[StackSpec, HostAccess], list[str]]:
    kept: dict[tuple[str, int], tuple[HostAccess, tuple[str, ...]]] = {}

    def refusals(spec: StackSpec, policy: HostAccess) -> list[str]:
        key = (spec.spec_hash(), id(policy))
        hit = kept.get(key)
        if hit is None or hit[0] is not policy:
            if len(kept) >= REFUSALS_KEPT:
                kept.clear()
            hit = kept[key] = (policy, tuple(original(spec, policy)))
        return list(hit[1])  # a new list: the renderer extends it

    refusals.__doc__ = original.__doc__
    refusals.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(refusals, _MARK, True)
    return refusals


def install() -> None:
    """Remember decoded stack definitions and stack versions' refusals in this process (idempotent)."""
    if not getattr(codec.decode, _MARK, False):
        codec.decode = _decode_definitions(codec.decode)  # type: ignore[assignment]  # on purpose
    if not getattr(getattr(rendering, _REFUSALS), _MARK, False):
        setattr(rendering, _REFUSALS, _remember_refusals(getattr(rendering, _REFUSALS)))


def uninstall() -> None:
    """Undo :func:`install` (for tests that compare with and without the shortcut)."""
    if getattr(codec.decode, _MARK, False):
        codec.decode = codec.decode.__wrapped__  # type: ignore[attr-defined]
    if getattr(getattr(rendering, _REFUSALS), _MARK, False):
        setattr(rendering, _REFUSALS, getattr(rendering, _REFUSALS).__wrapped__)


def installed() -> bool:
    return bool(getattr(codec.decode, _MARK, False) and getattr(getattr(rendering, _REFUSALS), _MARK, False))
