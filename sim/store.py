"""The simulated device's store: the agent's :class:`MemoryStore`, its JSON blobs copied cheaply.

:meth:`MemoryStore.save_json` keeps ``json.loads(json.dumps(value))``: what a device that
wrote the file and read it back would hold (tuples become lists, a later change to the
caller's dict does not reach the store). The agent saves its applied stacks at every switch
and its jobs at every accept; for a simulated fleet that JSON round trip was 3 % of the
simulator's CPU per deploy. :func:`json_copy` makes the same value without text in
between for what the agent saves (dicts with string keys, lists, tuples, strings, numbers,
booleans, None) and falls back to the round trip for anything else.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tether.agent.store import MemoryStore


class _NotPlain(Exception):
    pass


def _copy(value: Any) -> Any:
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is dict:
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _NotPlain  # json.dumps turns other keys into strings
            out[key] = _copy(item)
        return out
    if kind is list or kind is tuple:
        return [_copy(item) for item in value]
    if kind is float and math.isfinite(value):
        return value
    raise _NotPlain


def json_copy(value: Any) -> Any:
    """``json.loads(json.dumps(value))``, made directly where the value is plain JSON."""
    try:
        return _copy(value)
    except _NotPlain:
        return json.loads(json.dumps(value))


class SimStore(MemoryStore):
    """A simulated device's state: in memory, as the agent's :class:`MemoryStore`."""

    def save_json(self, name: str, value: Any) -> None:
        if self.blobs.get(name) == value:
            return
        self.blobs[name] = json_copy(value)
