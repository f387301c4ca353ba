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
process only. The stack-definition check on receipt (``content_hash(definition.spec)``
against the topic's hash) is not cached: every simulated device still verifies it.
``tether-sim --no-hash-cache`` runs without the shortcut.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from tether.protocol.models import ServiceSpec, StackSpec

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
    setattr(spec_hash, _MARK, True)
    return spec_hash


def install() -> None:
    """Memoise ``spec_hash`` of service and stack specs in this process (idempotent)."""
    for cls in (ServiceSpec, StackSpec):
        if not getattr(cls.spec_hash, _MARK, False):
            cls.spec_hash = _cached(cls.spec_hash)  # type: ignore[method-assign, assignment]  # on purpose


def installed() -> bool:
    return all(getattr(cls.spec_hash, _MARK, False) for cls in (ServiceSpec, StackSpec))
